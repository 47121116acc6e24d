"""The report's PNG: conversion rate by experiment arm, with 95% intervals (matplotlib).

matplotlib is an optional dependency (`pip install 'nudgeflow[report]'`): the
table, JSON and CSV need none, and a flow's image has no use for a plotting
library. Without it, `--png` is refused in one line before anything is read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from nudgeflow.app.lift import rate_interval
from nudgeflow.app.report import Report, Tally
from nudgeflow.core.errors import InputFileError, UsageError

MISSING = "--png needs matplotlib, which is not installed: pip install 'nudgeflow[report]'"


def check_available() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(MISSING)


def _panels(report: Report) -> list[tuple[str, list[tuple[str, Tally]]]]:
    """One panel per rule with an experiment; without any, one panel of every rule."""
    panels = [
        (name, sorted(rule.arms.items()))
        for name, rule in sorted(report.rules.items()) if rule.arms
    ]
    if panels:
        return panels
    return [("conversion by rule", [(name, rule.total)
                                    for name, rule in sorted(report.rules.items())])]


def write_png(report: Report, path: Path) -> None:
    """Bars of conversion rate per arm (or per rule), with Wilson 95% intervals."""
    check_available()
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, whatever the environment
    import matplotlib.pyplot as plt

    panels = _panels(report)
    figure, axes = plt.subplots(1, max(1, len(panels)), squeeze=False,
                                figsize=(4.5 * max(1, len(panels)), 4.0))
    for axis, (title, bars) in zip(axes[0], panels, strict=False):
        # the counts under each label: a bar of zero height has no room for them
        labels = [f"{label}\n{tally.converted}/{tally.attributed}" for label, tally in bars]
        rates = [100 * (tally.conversion_rate or 0.0) for _, tally in bars]
        lows, highs = [], []
        for (_, tally), rate in zip(bars, rates, strict=True):
            low, high = rate_interval(tally.converted, tally.attributed)
            lows.append(max(0.0, rate - 100 * low))
            highs.append(max(0.0, 100 * high - rate))
        axis.bar(labels, rates, yerr=[lows, highs], capsize=4, color="#4c72b0")
        axis.set_title(title)
        axis.set_ylabel("conversion rate (%)")
        axis.tick_params(axis="x", rotation=30 if len(bars) > 3 else 0)
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        msg = f"cannot write {path}: {exc.strerror or exc}"
        raise InputFileError(msg) from None
    finally:
        plt.close(figure)

"""Medians of runs, percentiles of samples, the machine, and the printed table."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["machine_info", "percentile", "spread", "table"]


def spread(values: Sequence[float], digits: int = 1) -> dict[str, Any]:
    """`{"median", "min", "max", "runs"}` of the runs' values (at least one)."""
    if not values:
        msg = "no runs to summarise"
        raise ValueError(msg)
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) by linear interpolation between closest ranks."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    def load() -> list[float] | None:
        try:
            return [round(x, 2) for x in os.getloadavg()]
        except OSError:
            return None

    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gb": _memory_gb(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "bytewax": version("bytewax"),
        "confluent_kafka": version("confluent-kafka"),
        "load_average_at_start": load(),
    }


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, float):
        if abs(value) < 1:
            text = f"{value:.3f}"
        elif abs(value) < 1000:
            text = f"{value:,.1f}"
        else:
            text = f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return f"{text}{unit}"


def _row(label: str, s: dict[str, Any] | None, unit: str = "") -> list[str]:
    if not s:
        return [label, "-", "-", "-", "0"]
    return [label, _fmt(s["median"], unit), _fmt(s["min"], unit), _fmt(s["max"], unit),
            str(len(s["runs"]))]


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (also what `nudgeflow bench` prints)."""
    rows: list[list[str]] = [["measure", "median", "min", "max", "runs"]]
    tp = result["throughput"]
    rows.append(_row("ceiling: confluent-kafka + orjson, 1 process (events/s)",
                     result["ceiling"]))
    rows.append(_row("flow, 1 worker, 1 partition (events/s)", tp.get("1w_1p")))
    rows.append(_row("flow, 2 processes, 1 partition (events/s)", tp.get("2p_1p")))
    rows.append(_row("flow, 2 processes, 4 partitions (events/s)", tp.get("2p_4p")))
    rows.append(_row("ratio: flow 1 worker / ceiling (per run)", result["ratio_detail"]))
    for name in ("50", "80"):
        lat = result["latency"].get(f"at_{name}pct")
        if not lat:
            continue
        rate = lat.get("rate_eps")
        for q in ("p50", "p95", "p99"):
            rows.append(_row(f"event→dispatch {q} at {name}% = {_fmt(rate)} ev/s (ms)", lat[q]))
        rows.append(_row(f"timer lag p99 at {name}% (ms)", lat.get("timer_p99")))
    mem = result["memory"]
    for key, s in mem.items():
        if key.startswith("users_"):
            users = key.removeprefix("users_")
            rows.append(_row(f"state per active user, {users} users: RSS (bytes)", s["rss"]))
            rows.append(_row(f"state per active user, {users} users: pickled (bytes)",
                             s["pickled"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
        if index == 0:
            lines.append("|" + "|".join(
                "-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
            ) + "|")
    return "\n".join(lines)

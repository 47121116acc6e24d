"""The latency sweep as a PNG: event→dispatch percentiles against the offered rate.

    python -m nudgeflow.bench.plot RESULT.json [OUT.png]

x: the paced producer's rate (events/s; the top axis in % of the measured
sustained 1-worker drain rate); y: p50, p95 and p99 of event→dispatch latency,
log scale, each point the median of its segments; a horizontal line at the
200 ms budget; marked: the highest offered rate whose p99 is still within the
budget, and the knee, the first rate past it whose p99 is not (shaded beyond).
matplotlib is an optional dependency (the `bench` extra): without it `plot`
returns a message instead of a file.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Final

import orjson

__all__ = ["BUDGET_MS", "knee", "plot"]

BUDGET_MS: Final = 200.0


def knee(sweep: list[dict[str, Any]], budget_ms: float = BUDGET_MS) -> dict[str, Any] | None:
    """The highest offered rate of the sweep whose p99 is within `budget_ms`, or None."""
    within = [p for p in sweep if p.get("p99") is not None and p["p99"] <= budget_ms]
    if not within:
        return None
    best = max(within, key=lambda p: p["rate_eps"])
    return {"rate_eps": best["rate_eps"], "pct": best["pct"], "p99": best["p99"]}


def plot(result: dict[str, Any], out: Path) -> str | None:
    """Write the sweep of `result` to `out`; None when written, else why not (one line)."""
    sweep = result.get("latency_sweep") or []
    points = [p for p in sweep if p.get("p50") is not None]
    if not points:
        return "no latency sweep to plot"
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return ("matplotlib is not installed: no plot (pip install 'nudgeflow[bench]', "
                "or pip install matplotlib)")
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")

    points.sort(key=lambda p: p["rate_eps"])
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for key, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^-")):
        xs = [p["rate_eps"] for p in points if p.get(key)]
        ys = [p[key] for p in points if p.get(key)]
        ax.plot(xs, ys, style, label=key, linewidth=1.6, markersize=5)
    _y_axis(ax, points)
    _marks(ax, points)
    _x_axis(ax, points, result.get("events_per_s", {}).get("flow_default_1w"))
    config = result.get("config", {})
    machine = result.get("machine", {})
    ax.set_title(
        f"nudgeflow bench ({config.get('name', '?')}): latency against offered rate\n"
        f"1 worker tailing, default rules; {machine.get('nproc', '?')} CPUs shared with "
        "Kafka, Redis and the API", fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return None


def _y_axis(ax: Any, points: list[dict[str, Any]]) -> None:
    ax.set_yscale("log")
    values = [p[k] for p in points for k in ("p50", "p95", "p99") if p.get(k)]
    low, high = min([*values, BUDGET_MS]) / 1.6, max([*values, BUDGET_MS]) * 3.0
    ax.set_ylim(low, high)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000,
                         20_000, 50_000, 100_000) if low <= t <= high]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_ylabel("event→dispatch latency (ms, log)")
    ax.axhline(BUDGET_MS, color="crimson", linestyle=":", linewidth=1.5,
               label=f"{BUDGET_MS:.0f} ms budget (event→dispatch)")


def _marks(ax: Any, points: list[dict[str, Any]]) -> None:
    """The last rate within the budget, and the knee: the first rate past it that is not.

    Both are legend entries, so that no annotation ever covers a curve.
    """
    found = knee(points)
    above = [p for p in points if p.get("p99") is not None and p["p99"] > BUDGET_MS
             and (found is None or p["rate_eps"] > found["rate_eps"])]
    if found is not None:
        ax.axvline(found["rate_eps"], color="grey", linestyle="--", linewidth=1,
                   label=f"p99 within budget up to {found['rate_eps']:,.0f} ev/s "
                         f"({found['pct']:.0f}%): {found['p99']:,.0f} ms")
        ax.plot([found["rate_eps"]], [found["p99"]], "o", markersize=11, markerfacecolor="none",
                markeredgecolor="grey")
    if above:
        first = min(above, key=lambda p: p["rate_eps"])
        ax.axvspan(first["rate_eps"], first["rate_eps"] * 10, color="crimson", alpha=0.07,
                   label=f"past the knee: p99 {first['p99']:,.0f} ms at "
                         f"{first['rate_eps']:,.0f} ev/s ({first['pct']:.0f}%)")
        ax.plot([first["rate_eps"]], [first["p99"]], "o", markersize=11,
                markerfacecolor="none", markeredgecolor="crimson")


def _x_axis(ax: Any, points: list[dict[str, Any]], sustained: float | None) -> None:
    rates = [p["rate_eps"] for p in points]
    if sustained:
        ax.axvline(sustained, color="black", linewidth=0.8, alpha=0.5)
        ax.text(sustained, ax.get_ylim()[0], " drain rate (100%)", rotation=90,
                va="bottom", ha="right", fontsize=7, alpha=0.7)
        top = ax.secondary_xaxis(
            "top", functions=(lambda x: x * 100.0 / sustained, lambda p: p * sustained / 100.0)
        )
        top.set_xlabel("% of the sustained 1-worker drain rate")
        rates.append(sustained)
    ax.set_xlim(0, max(rates) * 1.05)
    ax.set_xlabel("offered rate (events/s, paced producer)")


def main(argv: list[str]) -> int:
    source = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else source.with_suffix(".png")
    problem = plot(orjson.loads(source.read_bytes()), out)
    if problem is not None:
        print(f"plot: {problem}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

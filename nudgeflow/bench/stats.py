"""Medians of runs, percentiles of samples, the machine, and the printed table."""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["machine_info", "percentile", "spread", "sweep_table", "table"]


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

    from nudgeflow.operators.native import compiled

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
        # a build with NUDGEFLOW_MYPYC=1 (setup.py), as the Docker image is
        "detection_compiled": compiled(),
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


def _one(value: float | None) -> dict[str, Any] | None:
    return None if value is None else {"median": value, "min": value, "max": value,
                                       "runs": [value]}


_THROUGHPUT_ROWS = (
    ("ceiling_plain", "ceiling: confluent-kafka + orjson loop, whole topic (events/s)"),
    ("ceiling_bytewax", "ceiling: bytewax, keyed stateful_map counter, whole topic (events/s)"),
    ("flow_default_1w", "flow, default rules, 1 worker (events/s)"),
    ("flow_cart_1w", "flow, cart_abandonment only, 1 worker (events/s)"),
    ("flow_no_intent_1w", "flow, default rules less high_intent, 1 worker (events/s)"),
    ("flow_instant_api_1w", "flow, default rules, instant loopback API (events/s)"),
    ("flow_slow_api_1w", "flow, default rules, {delay} ms loopback API (events/s)"),
    ("flow_default_2p_1p", "flow, 2 processes, 1 partition (events/s)"),
    ("flow_default_2p_4p", "flow, 2 processes, 4 partitions (events/s)"),
)


def table(result: dict[str, Any]) -> str:
    """The results as a Markdown table (also what `nudgeflow bench` prints)."""
    rows: list[list[str]] = [["measure", "median", "min", "max", "runs"]]
    tp = result["throughput"]
    delay = _fmt(result.get("slow_api", {}).get("delay_ms"))
    for key, label in _THROUGHPUT_ROWS:
        if key in tp:
            rows.append(_row(label.format(delay=delay), tp[key]))
    ratios = result.get("ratios", {})
    rows.append(_row("ratio: flow / plain ceiling (per round)", ratios.get("ratio")))
    rows.append(_row("ratio_bytewax: flow / bytewax ceiling (per round)",
                     ratios.get("ratio_bytewax")))
    rows.append(_row(f"slow_api_ratio: {delay} ms API / instant API (per round)",
                     ratios.get("slow_api_ratio")))
    api = result.get("dispatch_api") or {}
    if api.get("accepted_per_s") is not None:
        value = api["accepted_per_s"]
        runs = api.get("runs") or 1
        rows.append(_row("reference dispatch API alone (accepted/s, api_rps)", {
            "median": value, "min": api.get("min", value), "max": api.get("max", value),
            "runs": [value] * runs,
        }))
    else:
        rows.append(_row("reference dispatch API alone (accepted/s, api_rps)", None))
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
            if "unparked" in s:
                rows.append(_row("  the same with none parked: RSS (bytes)",
                                 s["unparked"]["rss"]))
            if "parked_share" in s:
                rows.append(_row("  users parked at the end (share)", s["parked_share"]))
                rows.append(_row("  the stream through detection, parking (s)", s["seconds"]))
                rows.append(_row("  the same with none parked (s)", s["unparked"]["seconds"]))
            rows.append(_row(f"state per active user, {users} users: snapshot (bytes)",
                             s["pickled"]))
    for label, entry in (result.get("snapshots") or {}).get("users", {}).items():
        n = f"{entry['users']:,}"
        rows.append(_row(f"snapshot per epoch, {n} users touched (ms)", entry["ms"]))
        rows.append(_row(f"snapshot bytes per epoch, {n} users (MB)",
                         _one(round(entry["bytes"] / 1e6, 1))))
        parked = entry.get("shards", {}).get("parked")
        if parked:
            rows.append(_row(f"snapshot per epoch, {n} parked users unchanged (ms)",
                             parked["ms"]))
            rows.append(_row(f"snapshot bytes per epoch, {n} parked users (MB)",
                             _one(round(parked["bytes"] / 1e6, 1))))
        growth = entry.get("sqlite_growth_bytes")
        if growth:
            rows.append(_row(f"SQLite recovery store growth per epoch, {n} users (MB)", {
                k: (round(v / 1e6, 1) if k != "runs" else [round(x / 1e6, 1) for x in v])
                for k, v in growth.items()
            }))
            rows.append(_row(f"recovery writes per epoch, {n} users (ms)",
                             entry.get("recovery_write_ms")))
        del label
    return _markdown(rows)


def sweep_table(result: dict[str, Any]) -> str:
    """The latency sweep: one row per offered rate (medians of its segments)."""
    rows: list[list[str]] = [["offered rate", "% of drain", "achieved", "p50 ms", "p95 ms",
                              "p99 ms", "timer p99 ms", "segments"]]
    for point in result.get("latency_sweep") or []:
        rows.append([
            f"{_fmt(point['rate_eps'])} ev/s", f"{point['pct']:g}%",
            _fmt(point.get("achieved_eps")), _fmt(point.get("p50")), _fmt(point.get("p95")),
            _fmt(point.get("p99")), _fmt(point.get("timer_p99")), str(point["segments"]),
        ])
    knee = result.get("latency_knee")
    text = _markdown(rows)
    budget = _fmt(result.get("latency_budget_ms"))
    if knee:
        text += (f"\nknee: p99 within the {budget} ms budget up to {_fmt(knee['rate_eps'])} "
                 f"ev/s ({knee['pct']:g}% of the drain rate)")
    else:
        text += f"\nknee: no offered rate had its p99 within the {budget} ms budget"
    return text


def _markdown(rows: list[list[str]]) -> str:
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

"""A tiny `nudgeflow bench` on the real services: the JSON has every field, with sane values.

No timing is asserted: the machine is shared and noisy. Only that every measure
ran, that the numbers are finite and ordered as they must be.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson
import pytest

from nudgeflow.bench.cli import bench_main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _spread_ok(entry: dict[str, Any], runs: int) -> None:
    assert len(entry["runs"]) == runs
    assert entry["min"] <= entry["median"] <= entry["max"]


def test_a_tiny_bench_writes_every_field(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    code = bench_main([
        "--quick", "--brokers", kafka_bootstrap, "--redis-url", redis_url,
        "--users", "300", "--runs", "1", "--latency-seconds", "6",
        "--memory-users", "300", "--memory-runs", "1", "--json", str(out),
    ])
    assert code == 0
    result = orjson.loads(out.read_bytes())

    assert _positive(result["throughput_eps"])
    assert _positive(result["ceiling_eps"])
    assert result["ratio"] == pytest.approx(result["throughput_eps"] / result["ceiling_eps"],
                                            rel=1e-3)
    latency = result["latency_ms"]
    assert set(latency) == {"p50", "p95", "p99"}
    assert all(_positive(latency[q]) for q in latency)
    assert latency["p50"] <= latency["p95"] <= latency["p99"]
    assert _positive(result["timer_lag_ms"]["p99"])
    assert _positive(result["bytes_per_user"])

    for name in ("1w_1p", "2p_1p", "2p_4p"):
        _spread_ok(result["throughput"][name], 1)
    _spread_ok(result["ceiling"], 1)
    for rate in ("at_50pct", "at_80pct"):
        entry = result["latency"][rate]
        assert _positive(entry["rate_eps"])
        assert entry["triggers_measured"] > 0
        _spread_ok(entry["p99"], 1)
    memory = result["memory"]["users_300"] if "users_300" in result["memory"] else next(
        iter(result["memory"].values())
    )
    assert _positive(memory["rss"]["median"])
    assert _positive(memory["pickled"]["median"])
    assert set(result["targets"]) == {
        "ratio_at_least_0.3", "latency_p99_under_50ms_at_50pct", "timer_lag_p99_under_1s",
        "at_most_1KB_per_user",
    }
    machine = result["machine"]
    assert machine["nproc"] >= 1
    assert machine["python"].startswith("3.11")
    assert machine["bytewax"] == "0.21.1"
    assert result["stream"]["messages"] > 0

"""A tiny `nudgeflow bench` on the real services: the JSON has every field, with sane values.

It runs `--smoke`, every phase of `--quick` at its smallest and with one round
(a 6 k-event topic, 3 s flow runs, 2,000 users' snapshots), so that it stays
within CI's few minutes; `--quick` itself is the documented 200 k-event run.
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


def test_a_smoke_bench_writes_every_field(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    code = bench_main([
        "--smoke", "--brokers", kafka_bootstrap, "--redis-url", redis_url, "--json", str(out),
    ])
    assert code == 0
    result = orjson.loads(out.read_bytes())

    # Today's headline fields.
    assert _positive(result["throughput_eps"])
    assert _positive(result["ceiling_eps"])
    assert _positive(result["ratio"])
    # A latency is null only when its segments measured no trigger at all (a tiny run on
    # a loaded machine can pace too few events for one); otherwise it is a positive ms.
    latency = result["latency_ms"]
    assert set(latency) == {"p50", "p95", "p99", "p99_80pct"}
    measured = {name: result["latency"][f"at_{name}pct"]["triggers_measured"]
                for name in ("50", "80")}
    for q, value in latency.items():
        if value is None:
            assert measured["80" if q == "p99_80pct" else "50"] == 0, (q, result["latency"])
        else:
            assert _positive(value), (q, result["latency"])
    if measured["50"]:
        assert latency["p50"] <= latency["p95"] <= latency["p99"]
    timer_p99 = result["timer_lag_ms"]["p99"]
    assert timer_p99 is None or isinstance(timer_p99, int | float)
    assert _positive(result["bytes_per_user"])

    # Throughput: every set-up once per round, on the same topic.
    events_per_s = result["events_per_s"]
    assert set(events_per_s) == {"flow_default_1w", "flow_cart_1w", "flow_no_intent_1w",
                                 "ceiling_plain", "ceiling_bytewax"}
    for name, value in events_per_s.items():
        assert _positive(value), (name, result["throughput"])
    assert events_per_s["flow_default_1w"] == result["throughput_eps"]
    assert events_per_s["ceiling_plain"] == result["ceiling_eps"]
    for name in ("ceiling_plain", "ceiling_bytewax", "flow_default_1w", "flow_cart_1w",
                 "flow_no_intent_1w", "flow_instant_api_1w", "flow_slow_api_1w"):
        _spread_ok(result["throughput"][name], 1)
    for name in ("flow_default_1w", "flow_cart_1w", "flow_no_intent_1w",
                 "flow_instant_api_1w", "flow_slow_api_1w"):
        read = result["events_read"][name]["median"]
        assert 0 < read <= result["stream"]["messages"]
    # Ratios are per round, then the median of the rounds.
    ratios = result["ratios"]
    for name in ("ratio", "ratio_bytewax", "slow_api_ratio"):
        _spread_ok(ratios[name], 1)
        assert _positive(result[name])
        assert result[name] == ratios[name]["median"]
    tp = result["throughput"]
    assert result["ratio"] == pytest.approx(
        tp["flow_default_1w"]["runs"][0] / tp["ceiling_plain"]["runs"][0], rel=1e-2)
    assert result["ratio_bytewax"] == pytest.approx(
        tp["flow_default_1w"]["runs"][0] / tp["ceiling_bytewax"]["runs"][0], rel=1e-2)
    assert result["slow_api_ratio"] == pytest.approx(
        tp["flow_slow_api_1w"]["runs"][0] / tp["flow_instant_api_1w"]["runs"][0], rel=1e-2)
    # Both loopback APIs were called: the flows dispatched to them.
    requests = result["slow_api"]["requests_per_run"]
    assert requests["instant"][0] > 0
    assert requests["slow"][0] > 0
    assert result["slow_api"]["delay_ms"] == 50.0

    # The reference API on its own: a number when api_rps ran, else null and why.
    api = result["dispatch_api"]
    if result["dispatch_api_rps"] is None:
        assert isinstance(api["error"], str)
    else:
        assert _positive(result["dispatch_api_rps"])
        assert api["error"] is None

    # Snapshots per epoch: time and bytes for the N users touched.
    snapshot_ms = result["snapshot_ms_per_epoch"]
    assert set(snapshot_ms) == {"users_2k"}
    assert _positive(snapshot_ms["users_2k"])
    assert _positive(result["recovery_bytes_per_epoch"]["users_2k"])
    entry = result["snapshots"]["users"]["users_2k"]
    assert entry["users"] == 2000
    assert entry["bytes_per_user"] == pytest.approx(entry["bytes"] / 2000, abs=0.1)
    assert _positive(entry["sqlite_growth_bytes"]["median"])
    # The same users parked store their deflated snapshots: under half the bytes.
    parked = entry["shards"]["parked"]
    assert _positive(parked["ms"]["median"])
    assert 0 < parked["bytes"] < entry["shards"]["bytes"] / 2

    # Latency at 50% and 80%, and the sweep over offered rates, ascending.
    for rate in ("at_50pct", "at_80pct"):
        point = result["latency"][rate]
        assert _positive(point["rate_eps"])
        assert point["sent"] > 0
        if point["triggers_measured"]:
            _spread_ok(point["p99"], 1)
    if measured["80"]:
        assert latency["p99_80pct"] == result["latency"]["at_80pct"]["p99"]["median"]
    sweep = result["latency_sweep"]
    assert [p["pct"] for p in sweep] == [35.0, 50.0, 80.0]
    rates = [p["rate_eps"] for p in sweep]
    assert rates == sorted(rates)
    assert sum(p["triggers_measured"] for p in sweep) > 0
    for point in sweep:
        assert point["sent"] > 0
        assert _positive(point["achieved_eps"])
        if point["triggers_measured"]:
            assert point["p50"] <= point["p95"] <= point["p99"]
        else:
            assert point["p99"] is None
    assert result["latency_budget_ms"] == 200.0
    knee = result["latency_knee"]
    assert knee is None or knee["p99"] <= 200.0

    # The plot next to the JSON (or why not).
    png = out.with_suffix(".png")
    if result["plot"] is None:
        assert "matplotlib" in result["plot_note"]
    else:
        assert result["plot"] == str(png)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    memory = result["memory"]["users_300"]
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
    assert result["config"]["name"] == "smoke"

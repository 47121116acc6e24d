"""`nudgeflow bench --collector --smoke` on the real Kafka: every field, sane values.

No timing is asserted (the machine is shared): only that both measures ran and
that the topic held every accepted event (the bench itself fails otherwise).
"""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

from nudgeflow.bench.cli import bench_main

pytestmark = pytest.mark.integration


def test_the_collector_bench_reports_throughput_and_latency(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    out = tmp_path / "collector.json"
    assert bench_main(["--collector", "--smoke", "--brokers", kafka_bootstrap,
                       "--json", str(out)]) == 0
    result = orjson.loads(out.read_bytes())
    auto = result["stacks"]["auto"]
    for name in ("batch_events_per_s", "single_p50_ms", "single_p99_ms"):
        value = auto[name]["median"]
        assert math.isfinite(value) and value > 0, name
    assert auto["single_p50_ms"]["median"] <= auto["single_p99_ms"]["median"]
    [run] = result["runs"]
    assert run["topic_messages"] >= result["config"]["single_requests"]
    assert result["config"]["cores"] == 1

"""`nudgeflow bench --intent` runs without services and reports the cost per scored event."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from nudgeflow.cli import main


def test_the_intent_bench_writes_its_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "intent.json"
    assert main(["bench", "--intent", "--users", "40", "--runs", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| high_intent, amortised per scored event |" in table
    result = orjson.loads(out.read_bytes())
    assert result["model"] == "sample-shop-1"
    assert 0 < result["scored_events"] <= result["events"]
    assert result["target_us"] == 20.0
    assert {"compiled score", "array walk + calibration"} <= set(result["parts_us"])

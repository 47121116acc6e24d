"""`nudgeflow demo` ends with the report of what its triggers and experiments achieved."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from nudgeflow.app.demo import DEMO_EXPERIMENTS, run_demo
from nudgeflow.app.report import report_files


def test_the_demo_prints_the_report_of_its_experiments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(users=400, hours=2.0, out_dir=tmp_path) == 0
    out = capsys.readouterr().out
    report = report_files(tmp_path / "triggers.jsonl", tmp_path / "outcomes.jsonl",
                          tmp_path / "dispatch-outcomes.jsonl")
    saved = orjson.loads((tmp_path / "report.json").read_bytes())
    assert saved == orjson.loads(orjson.dumps(report.to_json()))
    # the dispatch API delivered every dispatched trigger whose send time has come (all:
    # the sample's clock is in the past), and its outcomes log says so
    for entry in saved["rules"].values():
        assert entry["sent"] == entry["dispatched"]
    # every rule with a demo experiment is read against its holdout, in the printout
    assert "lift against the holdout" in out
    for rule in DEMO_EXPERIMENTS:
        assert "holdout" in saved["rules"][rule]["variants"]
        assert f"  {rule} / " in out
    assert (tmp_path / "report.csv").read_text().startswith("rule,variant,")

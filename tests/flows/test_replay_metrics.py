"""A replay that records metrics (the demo's, for its dashboard) counts what it decided.

The counts are deltas of prometheus-client's default registry, where the flow
records and the health server reads; the output files must not change.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from nudgeflow.app.replay import ReplaySummary, run_replay
from nudgeflow.app.samples import SampleSpec, write_sample

SERIES = {
    "applied": ("nudgeflow_events_total", {"outcome": "applied"}),
    "duplicate": ("nudgeflow_events_total", {"outcome": "duplicate"}),
    "late": ("nudgeflow_dead_letters_total", {"reason": "late"}),
    "invalid": ("nudgeflow_dead_letters_total", {"reason": "invalid"}),
}


def _counts() -> dict[str, float]:
    out = {name: REGISTRY.get_sample_value(*series) or 0.0 for name, series in SERIES.items()}
    out["decisions"] = sum(
        sample.value for family in REGISTRY.collect() for sample in family.samples
        if sample.name == "nudgeflow_triggers_detected_total"
    )
    return out


def _replay(tmp_path: Path, name: str, *, record: bool) -> tuple[ReplaySummary, dict[str, float]]:
    events, profiles = tmp_path / "events.jsonl", tmp_path / "profiles.jsonl"
    before = _counts()
    summary = run_replay(events, tmp_path / name, profiles=profiles, record_metrics=record)
    after = _counts()
    return summary, {k: after[k] - before[k] for k in after}


def test_a_replay_records_its_outcomes_only_when_asked_and_decides_the_same(
    tmp_path: Path,
) -> None:
    write_sample(tmp_path, SampleSpec(users=80, hours=1.0))
    plain, untouched = _replay(tmp_path, "plain.jsonl", record=False)
    counted, delta = _replay(tmp_path, "counted.jsonl", record=True)
    assert set(untouched.values()) == {0.0}
    assert (tmp_path / "plain.jsonl").read_bytes() == (tmp_path / "counted.jsonl").read_bytes()
    assert (tmp_path / "plain.dlq.jsonl").read_bytes() == (
        tmp_path / "counted.dlq.jsonl").read_bytes()
    assert counted == plain
    assert counted.triggers > 0 and counted.invalid > 0
    assert delta == {
        "applied": counted.applied, "duplicate": counted.duplicate, "late": counted.late,
        "invalid": counted.invalid, "decisions": counted.triggers,
    }

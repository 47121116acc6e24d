"""Live outcomes reach Kafka `triggers.outcomes`, and `report --from-topics` reads them.

The live flow runs in-process on a testing source, with a wall clock that moves
as the recording's did (as in tests/flows/test_live_equals_replay.py), and
writes its decisions and outcomes to real topics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.testing import TestingSink, TestingSource, run_main
from kafka_helpers import TopicFactory, consume_all

from nudgeflow.app.replay import run_replay
from nudgeflow.app.report import report_files
from nudgeflow.app.samples import SampleSpec, generate_lines, generate_profiles
from nudgeflow.cli import main
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import load_profiles
from nudgeflow.core.rules import load_rules
from nudgeflow.core.settings import DEFAULT_RULES, KafkaSettings, Settings
from nudgeflow.enrich.profile_store import StaticProfiles
from nudgeflow.flows.live import LiveParts, build_live_flow

pytestmark = pytest.mark.integration


def _messages(lines: list[bytes], clock: list[int]) -> Iterator[Any]:
    """The lines as one partition's messages; reading one moves the clock to its ts."""
    for offset, raw in enumerate(lines):
        event = decode_event(raw)
        key = None
        if isinstance(event, Event):
            clock[0] = max(clock[0], event.ts)
            key = event.user_id.encode()
        yield KafkaSourceMessage(key=key, value=raw, topic="events", partition=0, offset=offset)


def test_live_outcomes_go_to_their_topic_and_the_report_reads_the_topics(
    kafka_bootstrap: str, make_topic: TopicFactory, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = SampleSpec(users=400, hours=3.0, seed=11)
    lines = [line.data for line in generate_lines(spec)]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    profiles = tmp_path / "profiles.jsonl"
    profiles.write_bytes(b"\n".join(orjson.dumps(p) for p in generate_profiles(spec)))
    replay_outcomes = tmp_path / "replay.outcomes.jsonl"
    run_replay(events, tmp_path / "replay.jsonl", profiles=profiles, outcomes=replay_outcomes)
    expected = sorted(replay_outcomes.read_bytes().splitlines())
    assert len(expected) >= 3

    decisions_topic = make_topic(partitions=2, prefix="decisions")
    outcomes_topic = make_topic(partitions=2, prefix="outcomes")
    settings = Settings(kafka=KafkaSettings(
        bootstrap=kafka_bootstrap, decisions_topic=decisions_topic,
        outcomes_topic=outcomes_topic,
    ))
    clock = [0]
    parts = LiveParts(
        source=TestingSource(_messages(lines, clock), batch_size=50),
        dispatch=TestingSink([]), dead_letters=TestingSink([]),
        profiles=StaticProfiles(load_profiles(profiles)), clock=lambda: clock[0],
    )
    run_main(build_live_flow(settings, rules=load_rules(DEFAULT_RULES), parts=parts))

    outcomes = consume_all(kafka_bootstrap, outcomes_topic, len(expected), timeout_s=30)
    assert sorted(m.value() for m in outcomes) == expected
    assert all(m.key() == orjson.loads(m.value())["user_id"].encode() for m in outcomes)

    decided = consume_all(kafka_bootstrap, decisions_topic, 10**6, timeout_s=5)
    triggers, outs = tmp_path / "topic.triggers.jsonl", tmp_path / "topic.outcomes.jsonl"
    triggers.write_bytes(b"\n".join(m.value() for m in decided) + b"\n")
    outs.write_bytes(b"\n".join(expected) + b"\n")
    capsys.readouterr()
    report_json = tmp_path / "report.json"
    assert main(["report", "--from-topics", "--brokers", kafka_bootstrap,
                 "--decisions-topic", decisions_topic, "--outcomes-topic", outcomes_topic,
                 "--json", str(report_json)]) == 0
    assert "rule / variant" in capsys.readouterr().out
    from_files = orjson.loads(orjson.dumps(report_files(triggers, outs).to_json()))
    assert orjson.loads(report_json.read_bytes()) == from_files
    assert sum(rule["converted"] for rule in from_files["rules"].values()) == len(expected)

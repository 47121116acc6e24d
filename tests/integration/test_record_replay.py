"""Record a topic, replay the recording through the flow and into another topic: same triggers."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from kafka_helpers import TopicFactory

from nudgeflow.app.samples import SampleSpec, generate_lines
from nudgeflow.cli import main
from nudgeflow.core.recording import iter_recording

pytestmark = pytest.mark.integration


def _triggers(path: Path) -> list[tuple[str, str]]:
    rows = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return sorted((r["trigger_id"], r["decision"]) for r in rows)


def test_a_recording_replays_into_a_topic_and_through_the_flow_unchanged(
    kafka_bootstrap: str, make_topic: TopicFactory, tmp_path: Path
) -> None:
    source = make_topic(partitions=3, prefix="rec-src")
    # One partition, so the round trip keeps the recording's interleaving too.
    target = make_topic(partitions=1, prefix="rec-dst")
    sample = list(generate_lines(SampleSpec(users=120, hours=2.0, seed=3)))
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    for line in sample:
        producer.produce(source, value=line.data, key=line.user_id.encode(),
                         headers=[("origin", b"test")])
    assert producer.flush(30) == 0

    recording = tmp_path / "source.rec"
    assert main(["record", "--topic", source, "--out", str(recording),
                 "--brokers", kafka_bootstrap, "--no-progress"]) == 0
    recorded = [message for _, message in iter_recording(recording)]
    assert len(recorded) == len(sample)
    assert recorded[0].headers == (("origin", b"test"),)
    by_user: dict[bytes | None, list[bytes | None]] = {}
    for message in recorded:
        by_user.setdefault(message.key, []).append(message.value)
    for line in sample:  # every key's messages in the order they were produced
        assert by_user[line.user_id.encode()].pop(0) == line.data

    # The stream clock follows the line order, and a recording of 3 partitions
    # interleaves them as they were read: compare with the same lines as JSONL.
    in_recorded_order = tmp_path / "recorded-order.jsonl"
    in_recorded_order.write_bytes(b"\n".join(m.value or b"" for m in recorded) + b"\n")
    from_file, from_recording = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["replay", str(in_recorded_order), "--out", str(from_file), "--quiet"]) == 0
    assert main(["replay", str(recording), "--out", str(from_recording), "--quiet"]) == 0
    assert _triggers(from_file) == _triggers(from_recording)
    assert len(_triggers(from_file)) > 20

    assert main(["replay", str(recording), "--to-topic", target, "--brokers", kafka_bootstrap,
                 "--as-fast-as-possible", "--quiet"]) == 0
    again = tmp_path / "target.rec"
    assert main(["record", "--topic", target, "--out", str(again),
                 "--brokers", kafka_bootstrap, "--no-progress"]) == 0
    through_target = tmp_path / "c.jsonl"
    assert main(["replay", str(again), "--out", str(through_target), "--quiet"]) == 0
    assert _triggers(through_target) == _triggers(from_file)


def test_record_of_a_missing_topic_is_one_clear_error(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"no-such-topic-{uuid.uuid4().hex}"
    code = main(["record", "--topic", missing, "--out", str(tmp_path / "r"),
                 "--brokers", kafka_bootstrap, "--no-progress"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err

"""`KafkaMessageSource` reads what bytewax's `KafkaSource` reads, and opens to the same envelopes.

Both read the same partition of a real topic to its end; every message must
come out the same, offsets resume the same, and the flow's opener must make the
same `Envelope`s and dead letters of either.
"""

from __future__ import annotations

from typing import Any

import orjson
from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from confluent_kafka import OFFSET_BEGINNING
from kafka_helpers import TopicFactory, produce

from nudgeflow.flows.live import _open_message
from nudgeflow.sources.kafka import KafkaMessageSource, Message, source_message


def _messages() -> list[tuple[bytes | None, bytes]]:
    out: list[tuple[bytes | None, bytes]] = []
    for i in range(120):
        event = {"event_id": f"e{i}", "user_id": f"u{i % 7}", "type": "page_view",
                 "ts": 1_700_000_000_000 + i, "url": "/x"}
        out.append((f"u{i % 7}".encode(), orjson.dumps(event)))
    out.append((b"u1", b"not json"))
    out.append((b"u2", orjson.dumps({"event_id": "k", "user_id": "u9", "type": "page_view",
                                     "ts": 1_700_000_000_500})))  # key is not its user
    return out


def _read_all(source: Any, resume: int | None = None, limit: int | None = None,
              ) -> tuple[list[Any], int | None]:
    part = source.build_part("step", source.list_parts()[0], resume)
    items: list[Any] = []
    try:
        while limit is None or len(items) < limit:
            items.extend(part.next_batch())
    except StopIteration:
        pass
    state = part.snapshot()
    part.close()
    return items, state


def _sources(bootstrap: str, topic: str, batch_size: int = 50) -> tuple[Any, Any]:
    options: dict[str, Any] = {"tail": False, "starting_offset": OFFSET_BEGINNING,
                               "batch_size": batch_size}
    return (KafkaSource([bootstrap], [topic], **options),
            KafkaMessageSource([bootstrap], [topic], **options))


def test_it_reads_the_same_messages_and_opens_them_the_same(
    kafka_bootstrap: str, make_topic: TopicFactory
) -> None:
    topic = make_topic(1, prefix="msgsrc")
    produce(kafka_bootstrap, topic, _messages(), partition=0)
    theirs, ours = _sources(kafka_bootstrap, topic)
    expected, expected_state = _read_all(theirs)
    got, state = _read_all(ours)
    assert len(got) == len(expected) == len(_messages())
    assert all(type(msg) is Message for msg in got)
    assert [source_message(msg) for msg in got] == expected
    assert isinstance(expected[0], KafkaSourceMessage)
    assert state == expected_state == len(_messages())
    opened_ours = [_open_message(msg, 5) for msg in got]
    opened_theirs = [_open_message(msg, 5) for msg in expected]
    assert opened_ours == opened_theirs
    assert sum(1 for x in opened_ours if type(x).__name__ == "DeadLetter") == 1


def test_it_resumes_from_the_offset_its_snapshot_gave(
    kafka_bootstrap: str, make_topic: TopicFactory
) -> None:
    topic = make_topic(1, prefix="msgsrc")
    produce(kafka_bootstrap, topic, _messages(), partition=0)
    _, ours = _sources(kafka_bootstrap, topic, batch_size=10)
    first, state = _read_all(ours, limit=40)
    rest, _ = _read_all(ours, resume=state)
    assert state == len(first)
    assert [m.offset() for m in first + rest] == list(range(len(_messages())))

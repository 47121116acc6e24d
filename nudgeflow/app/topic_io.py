"""Recording a Kafka topic to a file, and producing a recording back into a topic.

`record_topic` keeps every message exactly (key, value bytes, timestamp,
partition, offset, headers) between a start and an end, per partition, and
writes them merged by timestamp: the arrival order a replay then follows.
`replay_to_topic` produces them back with their keys (so each key lands on one
partition, in order) and, unless asked to go as fast as possible, with the
recorded gaps between messages divided by `speed`.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from tqdm import tqdm

from nudgeflow.core.errors import InputFileError, ServiceError
from nudgeflow.core.recording import RecordedMessage, iter_recording, recording_header
from nudgeflow.core.timeutil import now_ms


@dataclass(frozen=True)
class Bounds:
    """Where a recording starts and ends: offsets (per partition) or times (epoch ms)."""

    from_offset: int | None = None
    to_offset: int | None = None  # exclusive
    from_time_ms: int | None = None
    to_time_ms: int | None = None  # exclusive


def _partitions(bootstrap: str, topic: str) -> list[int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        # All topics, not `list_topics(topic)`: a metadata request for one topic
        # creates it on brokers with auto.create.topics.enable.
        metadata = admin.list_topics(timeout=10)
    except KafkaException as exc:
        msg = f"cannot reach Kafka at {bootstrap}: {exc}"
        raise ServiceError(msg) from None
    info = metadata.topics.get(topic)
    if info is None or info.error is not None or not info.partitions:
        msg = f"topic {topic!r} does not exist on {bootstrap}"
        raise ServiceError(msg)
    return sorted(info.partitions)


def _ranges(
    consumer: Consumer, topic: str, partitions: list[int], bounds: Bounds
) -> dict[int, tuple[int, int]]:
    """[start, end) offsets per partition."""
    ranges: dict[int, tuple[int, int]] = {}
    starts: dict[int, int] = {}
    ends: dict[int, int] = {}
    if bounds.from_time_ms is not None or bounds.to_time_ms is not None:
        for bound, into in ((bounds.from_time_ms, starts), (bounds.to_time_ms, ends)):
            if bound is None:
                continue
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, bound) for p in partitions], timeout=10
            )
            for tp in found:
                into[tp.partition] = tp.offset
    for p in partitions:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        start = max(low, bounds.from_offset if bounds.from_offset is not None else low)
        start = max(start, starts.get(p, start)) if starts.get(p, -1) >= 0 else start
        end = min(high, bounds.to_offset if bounds.to_offset is not None else high)
        if p in ends:
            end = min(end, ends[p] if ends[p] >= 0 else high)
        ranges[p] = (start, max(start, end))
    return ranges


def _read_partition(
    bootstrap: str, topic: str, partition: int, start: int, end: int
) -> Iterator[RecordedMessage]:
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": "nudgeflow-record",
        "enable.auto.commit": False, "enable.partition.eof": True,
    })
    consumer.assign([TopicPartition(topic, partition, start)])
    try:
        offset = start
        while offset < end:
            batch = consumer.consume(500, 1.0)
            for msg in batch:
                position = msg.offset()
                if msg.error() is not None or position is None:
                    continue
                offset = position + 1
                if position >= end:
                    break
                kind, ts = msg.timestamp()
                yield RecordedMessage(
                    partition=partition, offset=position,
                    timestamp_ms=ts if kind else None,
                    key=_bytes(msg.key()), value=_bytes(msg.value()),
                    headers=tuple((str(h[0]), _bytes(h[1])) for h in (msg.headers() or [])),
                )
    finally:
        consumer.close()


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def record_topic(
    bootstrap: str, topic: str, out: Path, bounds: Bounds, *, progress: bool = True
) -> int:
    """Write the topic's messages within `bounds` to `out`; return how many."""
    partitions = _partitions(bootstrap, topic)
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": "nudgeflow-record"})
    try:
        ranges = _ranges(probe, topic, partitions, bounds)
    finally:
        probe.close()
    total = sum(end - start for start, end in ranges.values())
    streams = [
        _read_partition(bootstrap, topic, p, start, end)
        for p, (start, end) in ranges.items() if end > start
    ]
    merged = heapq.merge(
        *streams, key=lambda m: (m.timestamp_ms or 0, m.partition, m.offset)
    )
    try:
        handle = out.open("wb")
    except OSError as exc:
        msg = f"cannot write {out}: {exc.strerror or exc}"
        raise InputFileError(msg) from None
    count = 0
    with handle, tqdm(total=total, unit="msg", disable=not progress, desc="record") as bar:
        handle.write(recording_header(topic, recorded_at=now_ms(), partitions=len(partitions)))
        handle.write(b"\n")
        for message in merged:
            handle.write(message.to_json_bytes())
            handle.write(b"\n")
            count += 1
            bar.update(1)
    return count


def topic_values(bootstrap: str, topic: str) -> Iterator[tuple[int, int, bytes | None]]:
    """(partition, offset, value) of every message the topic holds now, partition by partition."""
    partitions = _partitions(bootstrap, topic)
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": "nudgeflow-record"})
    try:
        ranges = _ranges(probe, topic, partitions, Bounds())
    finally:
        probe.close()
    for partition, (start, end) in sorted(ranges.items()):
        if end > start:
            for message in _read_partition(bootstrap, topic, partition, start, end):
                yield message.partition, message.offset, message.value


def replay_to_topic(
    recording: Path,
    bootstrap: str,
    topic: str,
    *,
    speed: float | None = 1.0,
    progress: bool = True,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Produce a recording's messages to `topic`; `speed=None` goes as fast as possible."""
    messages = [m for _, m in iter_recording(recording)]
    if not messages and not recording.exists():
        msg = f"cannot read {recording}"
        raise InputFileError(msg)
    _partitions(bootstrap, topic)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "linger.ms": 5})
    first_ts = next((m.timestamp_ms for m in messages if m.timestamp_ms is not None), None)
    started = clock()
    with tqdm(total=len(messages), unit="msg", disable=not progress, desc="replay") as bar:
        for message in messages:
            if speed is not None and first_ts is not None and message.timestamp_ms is not None:
                due = (message.timestamp_ms - first_ts) / 1000 / speed
                wait = due - (clock() - started)
                if wait > 0:
                    producer.poll(0)
                    sleep(wait)
            while True:
                try:
                    producer.produce(
                        topic, value=message.value, key=message.key,
                        headers=[(n, v) for n, v in message.headers] or None,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
            bar.update(1)
    if producer.flush(60):
        msg = f"some messages to {topic!r} were not delivered"
        raise ServiceError(msg)
    return len(messages)

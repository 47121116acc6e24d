"""Small, blocking Kafka helpers for integration tests.

Import from tests as ``from kafka_helpers import consume_all, produce`` (pytest puts
``tests/`` on ``sys.path`` because ``tests/conftest.py`` lives there).
"""

from __future__ import annotations

import time
import uuid
from typing import Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

# Errors a consumer may report while a fresh topic/partition is still settling.
_TRANSIENT_CONSUMER_ERRORS = frozenset(
    {KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART}
)


class TopicFactory(Protocol):
    """Type of the ``make_topic`` fixture: creates a fresh topic, returns its name."""

    def __call__(self, partitions: int = 1, prefix: str = "t") -> str: ...


def produce(
    bootstrap: str,
    topic: str,
    messages: list[tuple[bytes | None, bytes]],
    *,
    partition: int | None = None,
    timeout_s: float = 30.0,
) -> None:
    """Produce ``(key, value)`` pairs in order and wait until all are acknowledged.

    Without ``partition`` librdkafka's default partitioner picks the partition from
    the key (note: it is CRC32-based, not the Java client's murmur2).
    Raises ``RuntimeError`` on any delivery error or if the flush times out.
    """
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": 0, "enable.idempotence": True}
    )
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(str(err))

    for key, value in messages:
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=key,
                    partition=-1 if partition is None else partition,
                    on_delivery=on_delivery,
                )
                break
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(timeout_s)
    if remaining:
        msg = f"{remaining} message(s) to {topic!r} not delivered within {timeout_s}s"
        raise RuntimeError(msg)
    if errors:
        msg = f"delivery to {topic!r} failed: {errors[:5]}"
        raise RuntimeError(msg)


def consume_all(
    bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0
) -> list[Message]:
    """Read ``topic`` from the earliest offset with a throwaway consumer group.

    Returns as soon as ``expected`` messages arrived, or whatever arrived when
    ``timeout_s`` ran out (so the caller can assert on the count). Messages are
    in per-partition order; order across partitions is arbitrary.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "topic.metadata.refresh.interval.ms": 1000,
        }
    )
    received: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        consumer.subscribe([topic])
        while len(received) < expected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            batch = consumer.consume(
                num_messages=expected - len(received), timeout=min(remaining, 0.5)
            )
            for message in batch:
                err = message.error()
                if err is None:
                    received.append(message)
                elif err.code() not in _TRANSIENT_CONSUMER_ERRORS:
                    raise KafkaException(err)
    finally:
        consumer.close()
    return received


def wait_for_topic(
    admin: AdminClient, topic: str, partitions: int, timeout_s: float = 30.0
) -> None:
    """Block until metadata shows ``topic`` with ``partitions`` led partitions."""
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(topic=topic, timeout=5)
        info = metadata.topics.get(topic)
        if (
            info is not None
            and info.error is None
            and len(info.partitions) == partitions
            and all(p.leader >= 0 for p in info.partitions.values())
        ):
            return
        if time.monotonic() >= deadline:
            msg = f"topic {topic!r} not ready with {partitions} partition(s) after {timeout_s}s"
            raise TimeoutError(msg)
        time.sleep(0.1)

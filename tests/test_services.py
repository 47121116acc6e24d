"""Smoke tests proving scripts/services.sh gives a working Redis and Kafka."""

from __future__ import annotations

import uuid

import pytest
import redis
from kafka_helpers import TopicFactory, consume_all, produce

pytestmark = pytest.mark.integration


def test_redis_set_get(redis_client: redis.Redis) -> None:
    key = f"nudgeflow:test:{uuid.uuid4().hex}"
    assert redis_client.ping() is True
    assert redis_client.set(key, b"hello", ex=60) is True
    assert redis_client.get(key) == b"hello"
    assert redis_client.dbsize() == 1  # flushed before the test


def test_kafka_roundtrip_keeps_key_and_value(
    kafka_bootstrap: str, make_topic: TopicFactory
) -> None:
    topic = make_topic(partitions=3, prefix="services")
    sent: list[tuple[bytes | None, bytes]] = [
        (b"user-1", b'{"event":"view","sku":"A"}'),
        (b"user-2", b'{"event":"cart","sku":"B"}'),
        (None, b"no-key"),
    ]
    # Spread over all three partitions explicitly, so every partition is exercised.
    for partition, message in enumerate(sent):
        produce(kafka_bootstrap, topic, [message], partition=partition)

    received = consume_all(kafka_bootstrap, topic, expected=len(sent), timeout_s=30)

    assert sorted(((m.key(), m.value()) for m in received), key=repr) == sorted(sent, key=repr)
    assert {m.partition() for m in received} == {0, 1, 2}
    assert all(m.topic() == topic for m in received)


def test_kafka_default_partitioner_keeps_keys_together(
    kafka_bootstrap: str, make_topic: TopicFactory
) -> None:
    topic = make_topic(partitions=3)
    sent: list[tuple[bytes | None, bytes]] = [
        (f"user-{i % 4}".encode(), f"v{i}".encode()) for i in range(40)
    ]
    produce(kafka_bootstrap, topic, sent)

    received = consume_all(kafka_bootstrap, topic, expected=len(sent), timeout_s=30)

    assert len(received) == len(sent)
    partitions_by_key: dict[bytes | None, set[int | None]] = {}
    values_by_key: dict[bytes | None, list[bytes | None]] = {}
    for m in received:
        partitions_by_key.setdefault(m.key(), set()).add(m.partition())
        values_by_key.setdefault(m.key(), []).append(m.value())
    assert all(len(p) == 1 for p in partitions_by_key.values())
    # Per-key order is preserved because a key always lands on one partition.
    for key, values in values_by_key.items():
        assert values == [v for k, v in sent if k == key]

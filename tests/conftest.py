"""Shared fixtures for integration tests (real Kafka + Redis from scripts/services.sh).

Start the services with ``eval "$(scripts/services.sh up | tail -2)"`` (or just run
``scripts/test.sh``). Without ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` the integration
fixtures skip locally and fail under CI (env ``CI`` set).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # NewTopic: stub gap
    AdminClient,
    NewTopic,
)
from kafka_helpers import TopicFactory, wait_for_topic

_HINT = "integration tests need scripts/services.sh up"


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def _required_env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if value:
        return value
    reason = f"{name} is not set: {_HINT}"
    if _in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """``host:port`` of the test Kafka broker (env ``KAFKA_BOOTSTRAP``)."""
    return _required_env("KAFKA_BOOTSTRAP")


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the test Redis (env ``REDIS_URL``), e.g. ``redis://127.0.0.1:6379/0``."""
    return _required_env("REDIS_URL")


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A ``redis.Redis`` on ``redis_url``; the database is flushed before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def make_topic(kafka_bootstrap: str) -> Iterator[TopicFactory]:
    """Factory ``make_topic(partitions=1, prefix="t") -> name`` for fresh, uniquely named
    topics (ready when returned); all of them are deleted at teardown."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def _make(partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:16]}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)],
            operation_timeout=30,
            request_timeout=30,
        )
        futures[name].result(timeout=60)
        created.append(name)
        wait_for_topic(admin, name, partitions)
        return name

    yield _make

    if created:
        for future in admin.delete_topics(created, operation_timeout=30).values():
            # KafkaException: already gone (e.g. the test deleted it).
            with contextlib.suppress(KafkaException):
                future.result(timeout=60)

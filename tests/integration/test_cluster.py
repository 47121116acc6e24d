"""Parallelism: 2 processes on a 6-partition topic decide exactly what 1 worker decides."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import redis
from confluent_kafka import Producer
from kafka_helpers import TopicFactory
from live_helpers import (
    WAIT_BOUND_MS,
    expected_dispatched,
    load_sample_profiles,
    produce_by_partition,
    start_flow,
    wait_for_ids,
)

from nudgeflow.app.samples import SampleSpec, generate_lines
from nudgeflow.core.rules import load_rules
from nudgeflow.core.settings import DEFAULT_RULES

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_processes_on_six_partitions_dispatch_what_one_worker_decides(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_topic: TopicFactory,
    dispatch_api: tuple[str, Path],
) -> None:
    api_url, api_log = dispatch_api
    topic = make_topic(partitions=6, prefix="cluster")
    spec = SampleSpec(users=300, hours=3.0, seed=5)
    sample = list(generate_lines(spec))
    profiles = load_sample_profiles(redis_client, spec)
    lines = [s.data for s in sample]
    rules = load_rules(DEFAULT_RULES)
    expected = expected_dispatched(lines, profiles, rules, partitions=6)
    # Past timestamps: once the topic is read, each partition's clock runs on with the
    # wall clock, so timers due after its last event may fire while the test waits.
    at_most = expected_dispatched(lines, profiles, rules, quiet_ms=WAIT_BOUND_MS, partitions=6)
    assert len(expected) > 50

    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    produce_by_partition(producer, topic, ((s.user_id.encode(), s.data) for s in sample), 6)

    cluster = start_flow(kafka_bootstrap, topic, api_url, redis_url, "--processes", "2")
    try:
        received = wait_for_ids(api_log, expected, timeout_s=120)
    finally:
        cluster.send_signal(signal.SIGTERM)
        _, err = cluster.communicate(timeout=60)
    assert expected <= set(received) <= at_most, err.decode(errors="replace")[-2000:]
    assert len(received) == len(set(received))

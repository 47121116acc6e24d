"""The collector on the real Kafka and Redis: what a 200 promises, and what a 503 means."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis
from kafka_helpers import TopicFactory, consume_all

from nudgeflow.bench.services import free_port
from nudgeflow.collect.server import CollectorThread, build_collector
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.settings import CollectSettings, Settings, load_settings

pytestmark = pytest.mark.integration

KEY = "wk_integration"
AUTH = (KEY, "")
TS = "2026-03-01T10:00:00Z"


def java_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java clients pick for a key: murmur2, made positive, modulo."""
    m, length = 0x5BD1E995, len(key)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(key[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = key[length - length % 4:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def settings_for(bootstrap: str, topic: str, redis_url: str, **collect: Any) -> Settings:
    base = load_settings(brokers=bootstrap, topic=topic, dead_letter_topic=f"{topic}.dlq",
                         redis_url=redis_url)
    return base.model_copy(update={"collect": CollectSettings(write_keys=[KEY], **collect)})


@pytest.fixture
def collector(kafka_bootstrap: str, make_topic: TopicFactory, redis_client: redis.Redis,
              redis_url: str) -> Iterator[tuple[str, str]]:
    topic = make_topic(partitions=3, prefix="collect")
    app, writer = build_collector(settings_for(kafka_bootstrap, topic, redis_url))
    try:
        with CollectorThread(app) as server:
            yield server.url, topic
    finally:
        writer.close()


def test_a_200_means_kafka_holds_every_event_keyed_by_user(
    collector: tuple[str, str], kafka_bootstrap: str
) -> None:
    url, topic = collector
    calls = [
        {"type": "track", "messageId": "m1", "userId": "u1", "timestamp": TS,
         "event": "Product Added", "properties": {"product_id": "p1", "price": 5}},
        {"type": "page", "messageId": "m2", "userId": "u2", "timestamp": TS, "name": "Pricing"},
        {"type": "track", "messageId": "m3", "userId": "u1", "timestamp": TS,
         "event": "Coupon Applied"},
    ]
    answer = httpx.post(f"{url}/v1/batch", json={"batch": calls}, auth=AUTH)
    assert answer.status_code == 200
    assert answer.json()["accepted"] == 2
    assert [r["index"] for r in answer.json()["rejected"]] == [2]
    # The answer came after the acknowledgement: the messages are there to read now.
    messages = consume_all(kafka_bootstrap, topic, expected=2, timeout_s=15)
    by_id = {}
    for message in messages:
        decoded = decode_event(message.value())
        assert isinstance(decoded, Event)
        assert message.key() == decoded.user_id.encode()
        # where a shop's own Java producer would put that user too
        assert message.partition() == java_partition(message.key(), 3)
        by_id[decoded.event_id] = decoded
    assert by_id["m1"].type == "add_to_cart"
    assert by_id["m2"].page_type == "pricing"
    [dead] = consume_all(kafka_bootstrap, f"{topic}.dlq", expected=1, timeout_s=15)
    headers = dict(dead.headers() or [])
    assert headers["reason"].decode().startswith("unsupported Segment track event")
    assert orjson.loads(dead.value())["messageId"] == "m3"


def test_identify_writes_the_profile_hash(
    collector: tuple[str, str], redis_client: redis.Redis
) -> None:
    url, _ = collector
    answer = httpx.post(f"{url}/v1/identify", auth=AUTH, json={
        "userId": "u7", "traits": {"segment": "vip", "opt_in": ["email"], "email": "x@y.z"}})
    assert answer.status_code == 200
    assert redis_client.hgetall("profile:u7") == {
        b"segment": b"vip", b"opt_in": b"email", b"email": b"x@y.z"}


def test_kafka_that_cannot_take_the_events_gets_503_and_retry_after(redis_url: str) -> None:
    # Nothing listens on port 1: every delivery times out after the collector's 1 s.
    settings = settings_for("127.0.0.1:1", "never", redis_url, delivery_timeout_s=1.0)
    app, writer = build_collector(settings, check_kafka=False)
    try:
        with CollectorThread(app) as server:
            event = {"event_id": "e1", "user_id": "u1", "type": "page_view", "ts": TS}
            answer = httpx.post(f"{server.url}/v1/events", json=event, auth=AUTH, timeout=10)
            assert answer.status_code == 503
            assert answer.headers["retry-after"] == "2"
            assert "Kafka did not take the events" in answer.json()["error"]
            assert httpx.get(f"{server.url}/readyz").status_code == 503
    finally:
        writer.close(timeout_s=0.1)


def test_nudgeflow_collect_runs_as_a_command(
    kafka_bootstrap: str, make_topic: TopicFactory, redis_url: str
) -> None:
    topic = make_topic(prefix="collect-cli")
    port = free_port()
    command = [sys.executable, "-m", "nudgeflow", "collect", "--port", str(port), "--brokers",
               kafka_bootstrap, "--topic", topic, "--write-key", KEY, "--redis-url", redis_url]
    with subprocess.Popen(command, stderr=subprocess.PIPE) as process:
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise
                time.sleep(0.1)  # waiting for the process to listen, not for a result
            event = {"event_id": "e1", "user_id": "u1", "type": "page_view", "ts": TS}
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/events", json=event, auth=AUTH)
            assert answer.json() == {"accepted": 1, "rejected": []}
        finally:
            process.terminate()
            _, stderr = process.communicate(timeout=15)
    assert process.returncode == 0, stderr.decode()  # a SIGTERM is a clean stop
    [message] = consume_all(kafka_bootstrap, topic, expected=1, timeout_s=15)
    assert message.key() == b"u1"


def test_nudgeflow_collect_without_a_write_key_is_one_line_and_exit_2() -> None:
    result = subprocess.run([sys.executable, "-m", "nudgeflow", "collect"],
                            check=False, capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "nudgeflow: error: no write key: pass --write-key KEY "
        "(or NUDGEFLOW_COLLECT__WRITE_KEYS='[\"KEY\"]')"
    ]


def test_nudgeflow_collect_with_kafka_unreachable_is_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nudgeflow", "collect", "--write-key", KEY, "--brokers",
         "127.0.0.1:1"],
        check=False, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "NUDGEFLOW_COLLECT__CONNECT_TIMEOUT_S": "1"},
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("nudgeflow: error: Kafka at 127.0.0.1:1 cannot be reached: ")

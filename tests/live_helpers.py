"""Helpers for the live-flow integration tests: expected triggers, profiles, the API log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka import Producer

from nudgeflow.app.samples import SampleSpec, generate_profiles
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import NO_PROFILE, Profile, profile_from_mapping
from nudgeflow.core.rules import RulesConfig
from nudgeflow.core.stream_clock import StreamClock
from nudgeflow.operators.detector import Detector, UserState

# Longer than any live test runs: a bound on how far the wall clock moves a partition's
# stream clock past its last event while a test waits.
WAIT_BOUND_MS = 15 * 60_000


def partition_of(key: bytes, partitions: int) -> int:
    """The partition the tests produce a key to (explicitly: the expectation needs to know)."""
    return zlib.crc32(key) % partitions


def expected_dispatched(
    lines: list[bytes], profiles: dict[str, Profile], rules: RulesConfig,
    quiet_ms: int | None = None, partitions: int = 1,
) -> set[str]:
    """Trigger ids the live flow dispatches for these messages (what a replay decides).

    Each partition has its own stream clock (TRIGGERS.md "Time"), so the lines
    are replayed partition by partition, as `partition_of` places them; with
    one partition this is exactly `nudgeflow replay`'s line-by-line reading,
    without its end-of-input decisions. `quiet_ms` lets every partition's clock
    run on that far past its largest `ts`, as the wall clock does in live mode
    while a test waits (past timestamps: the clock is far behind the wall).
    """
    detector = Detector(rules)
    states: dict[str, UserState] = {}
    clocks = [StreamClock() for _ in range(partitions)]
    dispatched: set[str] = set()
    for raw in lines:
        event = decode_event(raw)
        if not isinstance(event, Event):
            continue
        clock = clocks[partition_of(event.user_id.encode(), partitions)]
        state = states.setdefault(event.user_id, detector.new_user(event.user_id))
        _, decisions = detector.process(
            state, event, profiles.get(event.user_id, NO_PROFILE),
            stream=clock.read(event.ts, None),
        )
        dispatched.update(d.trigger.trigger_id for d in decisions if d.dispatched)
    if quiet_ms is not None:
        for user_id, state in states.items():
            stream = clocks[partition_of(user_id.encode(), partitions)].now(None)
            assert stream is not None
            decisions = detector.advance(state, stream + quiet_ms)
            dispatched.update(d.trigger.trigger_id for d in decisions if d.dispatched)
    return dispatched


def produce_by_partition(
    producer: Producer, topic: str, messages: Iterable[tuple[bytes, bytes]], partitions: int
) -> None:
    """Produce (key, value) pairs to the partitions `partition_of` names, in order."""
    for key, value in messages:
        producer.produce(topic, value=value, key=key, partition=partition_of(key, partitions))
    assert producer.flush(30) == 0


def load_sample_profiles(client: redis.Redis, spec: SampleSpec) -> dict[str, Profile]:
    """Writes the sample's profiles as Redis hashes; returns them as the flow will read them."""
    profiles: dict[str, Profile] = {}
    pipe = client.pipeline(transaction=False)
    for row in generate_profiles(spec):
        mapping = {k: (",".join(v) if isinstance(v, list) else str(v))
                   for k, v in row.items() if k != "user_id"}
        pipe.hset(f"profile:{row['user_id']}", mapping=mapping)
        profiles[row["user_id"]] = profile_from_mapping(mapping)
    pipe.execute()
    return profiles


def read_api_log(path: Path) -> list[dict[str, Any]]:
    """The API's log lines so far; a last line still being written is not one yet."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return [orjson.loads(line) for line in complete.splitlines() if line.strip()]


def wait_for_ids(path: Path, wanted: set[str], timeout_s: float) -> list[str]:
    """Polls the API log until every wanted id is there, or the time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids = [row["trigger_id"] for row in read_api_log(path)]
        if wanted <= set(ids) or time.monotonic() > deadline:
            return ids
        time.sleep(0.2)


def start_flow(
    bootstrap: str,
    topic: str,
    api_url: str,
    redis_url: str,
    *args: str,
    env: dict[str, str] | None = None,
    stdout: int | None = None,
    stderr: int | None = subprocess.PIPE,
) -> subprocess.Popen[bytes]:
    """`nudgeflow run` as a user starts it, writing to the test's own side topics.

    The dead-letter and decision topics default to `<topic>.dlq` and
    `<topic>.decisions`; `args` and `env` add to or override what is here.
    """
    settings = {
        **os.environ,
        "NUDGEFLOW_DISPATCH__TIMEOUT_S": "2.0",
        "NUDGEFLOW_KAFKA__DEAD_LETTER_TOPIC": f"{topic}.dlq",
        "NUDGEFLOW_KAFKA__DECISIONS_TOPIC": f"{topic}.decisions",
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "nudgeflow", "run", "--brokers", bootstrap, "--topic", topic,
         "--dispatch-url", api_url, "--redis-url", redis_url, *args],
        env=settings, stdout=stdout, stderr=stderr,
    )


def three_product_views(user: str, at_ms: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of `user` viewing product p1 three times, a second apart from `at_ms`."""
    return [(user.encode(), orjson.dumps({
        "event_id": f"{user}-{n}", "user_id": user, "type": "page_view", "page_type": "product",
        "product_id": "p1", "ts": at_ms + n * 1000,
    })) for n in range(3)]

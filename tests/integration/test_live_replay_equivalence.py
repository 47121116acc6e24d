"""A live flow reading a pre-filled topic as fast as it can decides what replay decides.

TRIGGERS.md "Time": a backlog is caught up in event time exactly as replay
would. The topic holds a recording of the past (one partition, so its order is
the file's); the flow reads it on real Kafka and Redis with the real wall
clock, and every decision it makes on the `triggers.decisions` topic for a
timer or event within the recording's time span must be replay's. (Once the
backlog is read, the partition's clock runs on with the wall clock and the
flow goes on deciding later timers too; replay stops at the recording's end.)
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Producer
from kafka_helpers import TopicFactory, consume_all
from live_helpers import load_sample_profiles, produce_by_partition, start_flow

from nudgeflow.app.replay import run_replay
from nudgeflow.app.samples import SampleSpec, generate_lines, generate_profiles
from nudgeflow.core.events import Event, decode_event, parse_ts

pytestmark = pytest.mark.integration


def _key(decision: dict[str, Any]) -> tuple[Any, ...]:
    return (decision["trigger_id"], decision["decision"], decision["reason"],
            decision.get("channel"))


def _fired_at(decision: dict[str, Any]) -> int:
    value = parse_ts(decision["fired_at"])
    assert isinstance(value, int)
    return value


def test_a_backlog_read_live_decides_what_replay_decides(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_topic: TopicFactory,
    dispatch_api: tuple[str, Path],
    tmp_path: Path,
) -> None:
    api_url, _ = dispatch_api
    spec = SampleSpec(users=200, hours=3.0, seed=17)
    sample = list(generate_lines(spec))
    lines = [line.data for line in sample]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    profiles_file = tmp_path / "profiles.jsonl"
    profiles_file.write_bytes(b"\n".join(orjson.dumps(p) for p in generate_profiles(spec)))
    load_sample_profiles(redis_client, spec)

    out = tmp_path / "replay.jsonl"
    run_replay(events, out, profiles=profiles_file)
    replayed = {_key(orjson.loads(line)) for line in out.read_bytes().splitlines()}
    assert len(replayed) > 50
    end = max(e.ts for raw in lines if isinstance(e := decode_event(raw), Event))

    topic = make_topic(partitions=1, prefix="backlog")
    decisions_topic = make_topic(partitions=1, prefix="backlog-decisions")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 5})
    produce_by_partition(producer, topic, ((s.user_id.encode(), s.data) for s in sample), 1)

    flow = start_flow(kafka_bootstrap, topic, api_url, redis_url,
                      env={"NUDGEFLOW_KAFKA__DECISIONS_TOPIC": decisions_topic},
                      stdout=subprocess.DEVNULL)
    try:
        # Replay's end decides every timer due by the recording's end; live decides
        # them as its clock runs on past it (the lateness and a user's lag after it).
        deadline = time.monotonic() + 120
        while True:
            rows = [orjson.loads(m.value() or b"null") for m in
                    consume_all(kafka_bootstrap, decisions_topic, 10 * len(replayed), 2.0)]
            live = {_key(row) for row in rows if _fired_at(row) <= end}
            if replayed <= live or time.monotonic() > deadline:
                break
    finally:
        flow.terminate()
        _, err = flow.communicate(timeout=30)
    assert live == replayed, (
        f"only live: {sorted(live - replayed)[:5]}, only replay: {sorted(replayed - live)[:5]}\n"
        + (err or b"").decode(errors="replace")[-2000:]
    )

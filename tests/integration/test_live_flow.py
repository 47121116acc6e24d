"""The live flow end to end on real Kafka, Redis and the reference dispatch API.

`nudgeflow run` runs as a subprocess, as a user runs it. Events go to a
3-partition topic; the test checks that the dispatch API received exactly the
triggers the detector decides for the same arrival order, that a quiet user's
timer fired within 1 s of its deadline by the wall clock, and that bad and late
messages reached the dead-letter topic with their reasons.
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
from live_helpers import (
    expected_dispatched,
    produce_by_partition,
    read_api_log,
    start_flow,
    wait_for_ids,
)
from rule_texts import LIVE_RULES

from nudgeflow.core.profiles import Profile
from nudgeflow.core.rules import RulesConfig, parse_rules
from nudgeflow.core.timeutil import datetime_to_ms, format_ms

pytestmark = pytest.mark.integration

RULES = LIVE_RULES

HISTORY_START = 1_772_359_200_000  # 2026-03-01T10:00:00Z


def _event(event_id: str, user: str, kind: str, ts: int | str, **fields: Any) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": user, "type": kind, "ts": ts, **fields})


def _history() -> list[bytes]:
    """Users whose triggers follow from the events alone (the timers are passed by later events)."""
    lines: list[bytes] = []
    minute = 60_000
    for n in range(12):
        user = f"hist-{n}"
        t0 = HISTORY_START + n * minute
        lines.append(_event(f"{user}-a", user, "add_to_cart", t0, product_id="p1", price=10.0))
        if n % 3 == 0:  # a purchase before the deadline: nothing fires
            lines.append(_event(f"{user}-b", user, "purchase", t0 + 1000))
        for k in range(3):  # three views of one product within 10 min: product_interest
            lines.append(_event(f"{user}-v{k}", user, "page_view", t0 + 5 * minute + k * 1000,
                                page_type="product", product_id="p9"))
        if n % 4 == 1:  # out of order, within the 1 s lateness: still applied
            lines.append(_event(f"{user}-late-ok", user, "page_view", t0 + 5 * minute + 1500,
                                page_type="home"))
        if n % 4 == 2:  # a minute behind: late, dead-lettered
            lines.append(_event(f"{user}-late", user, "page_view", t0 + 4 * minute,
                                page_type="home"))
        lines.append(_event(f"{user}-v{k}", user, "page_view", t0 + 5 * minute + 2000,
                            page_type="product", product_id="p9"))  # duplicate id
    return lines


def load_rules_text(text: str) -> RulesConfig:
    return parse_rules(text, "test-rules.yaml")


def test_live_flow_dispatches_exactly_the_detected_triggers(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_topic: TopicFactory,
    dispatch_api: tuple[str, Path],
    tmp_path: Path,
) -> None:
    api_url, api_log = dispatch_api
    # History on partitions 0-2; the quiet user alone on 3, since their event, stamped
    # now, moves their partition's stream clock to now (every user's there).
    events_topic = make_topic(partitions=4, prefix="events")
    dlq_topic = make_topic(partitions=1, prefix="dlq")
    decisions_topic = make_topic(partitions=1, prefix="decisions")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)

    profiles: dict[str, Profile] = {}
    for n in range(12):
        if n % 5 != 4:  # some users have no profile: no channel, suppressed
            redis_client.hset(f"profile:hist-{n}", mapping={"segment": "regular",
                                                             "opt_in": "email"})
            profiles[f"hist-{n}"] = Profile(segment="regular", opt_in=("email",))
    redis_client.hset("profile:quiet", mapping={"segment": "regular", "opt_in": "email"})

    history = _history()
    bad = [b"not json", _event("x1", "hist-0", "add_to_cart", HISTORY_START)]  # no product_id
    messages = [(orjson.loads(raw)["user_id"].encode(), raw) for raw in history]
    messages += [(b"hist-0", b) for b in bad]

    flow = start_flow(
        kafka_bootstrap, events_topic, api_url, redis_url,
        "--dead-letter-topic", dlq_topic, "--rules", str(rules_file), "--workers", "2",
        env={"NUDGEFLOW_KAFKA__DECISIONS_TOPIC": decisions_topic},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
        produce_by_partition(producer, events_topic, messages, 3)
        expected = expected_dispatched(history, profiles, load_rules_text(RULES), quiet_ms=60_000,
                                       partitions=3)
        wait_for_ids(api_log, expected, timeout_s=60)
        # The flow is up and caught up. A quiet user whose cart timer only the wall
        # clock can decide; the producer is warm, so the event leaves now.
        produced_at = datetime_to_ms_now()
        quiet = _event("quiet-a", "quiet", "add_to_cart", format_ms(produced_at),
                       product_id="p1", price=5.0)
        producer.produce(events_topic, value=quiet, key=b"quiet", partition=3)
        assert producer.flush(30) == 0
        deadline = time.monotonic() + 30
        while not any(r["user_id"] == "quiet" for r in read_api_log(api_log)):
            assert time.monotonic() < deadline, "the quiet user's timer never fired"
            time.sleep(0.05)
        rows = read_api_log(api_log)
    finally:
        flow.terminate()
        output, _ = flow.communicate(timeout=30)

    received = [row["trigger_id"] for row in rows]
    quiet_rows = [row for row in rows if row["user_id"] == "quiet"]
    assert len(quiet_rows) == 1, output.decode(errors="replace")[-2000:]
    assert sorted(r for r in received if r not in {q["trigger_id"] for q in quiet_rows}) == sorted(
        expected
    )
    assert len(received) == len(set(received)), "a trigger reached the API twice"
    assert all(row["message"]["body"] for row in rows), "a trigger went out without its message"

    # The deadline passed (wall clock) when the watermark passed ts + 2 s timeout:
    # produced_at + timeout + lateness. The API answered within 1 s of that.
    deadline_passed = produced_at + 2_000 + 1_000
    received_at = datetime_to_ms(_parse(quiet_rows[0]["received_at"]))
    lag = received_at - deadline_passed
    print(f"live timer lag: {lag} ms")
    assert lag < 1_000

    letters = consume_all(kafka_bootstrap, dlq_topic, expected=5, timeout_s=20)
    reasons = {m.value(): dict(m.headers() or [])["reason"].decode() for m in letters}
    assert reasons[b"not json"].startswith("not valid JSON")
    assert "product_id" in reasons[bad[1]]
    late = [v for v, r in reasons.items() if r == "late"]
    assert len(late) == 3  # hist-2, hist-6, hist-10
    headers = dict(letters[0].headers() or [])
    assert headers["source.topic"].decode() == events_topic


def datetime_to_ms_now() -> int:
    from datetime import UTC, datetime

    return datetime_to_ms(datetime.now(UTC))


def _parse(text: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00"))

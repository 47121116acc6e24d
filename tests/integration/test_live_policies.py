"""Response policies on the live path: real Kafka, Redis profiles and the dispatch API.

One stream where a frequency cap, quiet hours, a delayed send cancelled by a
purchase, a holdout and a duplicate event all occur; the API's log must show
exactly the expected sends, and `triggers.decisions` every decision's reason.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Producer
from kafka_helpers import TopicFactory, consume_all
from live_helpers import read_api_log, start_flow

from nudgeflow.core.policies import Policies
from nudgeflow.core.rules import parse_rules
from nudgeflow.core.timeutil import datetime_to_ms, format_ms

pytestmark = pytest.mark.integration

RULES = """
rules:
  - name: long_read
    kind: threshold
    match: {event: page_leave}
    field: dwell_ms
    above: 1000
    channels: [email]
  - name: night_nudge
    kind: nth_event
    match: {event: page_view, where: {page_type: pricing}}
    n: 1
    channels: [sms]
  - name: cart_abandonment
    kind: absence
    after: {event: add_to_cart}
    timeout: 15m
    cancel_on: [{event: purchase}, {cart: empty}]
    metadata: cart
    channels: [email]
    delay: 1h
    cancel_delayed_on: [{event: purchase}]
  - name: held_out
    kind: nth_event
    match: {event: page_view, where: {page_type: home}}
    n: 1
    channels: [email]
    experiment: {name: home-test, holdout: 0.5}
"""
T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z
MIN = 60_000


def _event(event_id: str, user: str, kind: str, ts: int, **fields: Any) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": user, "type": kind, "ts": ts, **fields})


def _zone_at_midnight() -> tuple[str, str]:
    """A fixed-offset zone where the local time is within the hour after midnight, and the
    next 08:00 there in UTC (RFC 3339)."""
    now = datetime.now(UTC)
    for hours in range(-12, 15):
        local = now + timedelta(hours=hours)
        if local.hour == 0:
            # tz database names invert the sign: Etc/GMT-9 is UTC+9
            name = "UTC" if hours == 0 else f"Etc/GMT{'-' if hours > 0 else '+'}{abs(hours)}"
            resume = local.replace(hour=8, minute=0, second=0, microsecond=0)
            return name, format_ms(datetime_to_ms(resume - timedelta(hours=hours)))
    msg = "every hour of the day has a zone at midnight"
    raise AssertionError(msg)


def _held_and_kept_users() -> tuple[str, str]:
    config = parse_rules(RULES)
    rule = config.rules[3]
    policies = Policies(config.policies)
    held = kept = None
    for n in range(200):
        assignment = policies.assign(rule, f"visitor-{n}")
        assert assignment is not None
        if assignment.holdout and held is None:
            held = f"visitor-{n}"
        if not assignment.holdout and kept is None:
            kept = f"visitor-{n}"
    assert held is not None and kept is not None
    return held, kept


def test_caps_quiet_hours_delay_cancel_holdout_and_duplicates_on_the_live_path(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_topic: TopicFactory,
    dispatch_api: tuple[str, Path],
    tmp_path: Path,
) -> None:
    api_url, api_log = dispatch_api
    events = make_topic(partitions=3, prefix="pol")
    decisions_topic = make_topic(partitions=1, prefix="pol-decisions")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    templates = tmp_path / "templates"
    templates.mkdir()
    for name in ("long_read.email", "cart_abandonment.email", "held_out.email"):
        (templates / f"{name}.j2").write_text("Subject: Hello\n\nHi {{ profile.name }}\n")
    (templates / "night_nudge.sms.j2").write_text("Plans are waiting for you")
    held, kept = _held_and_kept_users()
    for user in ("reader", "buyer", held, kept):
        redis_client.hset(f"profile:{user}", mapping={"segment": "regular", "opt_in": "email,sms"})
    # Live sends go out "now" (wall clock), so quiet hours apply to the wall clock: the
    # owl lives where it is about midnight right now, and the SMS waits for 08:00 there.
    owl_zone, owl_resume = _zone_at_midnight()
    redis_client.hset("profile:owl", mapping={
        "segment": "regular", "opt_in": "sms", "timezone": owl_zone})

    lines = [
        # four long reads within a day: three sends, the fourth capped
        *[_event(f"r{k}", "reader", "page_leave", T0 + k * MIN, dwell_ms=5000, url=f"/a{k}")
          for k in range(4)],
        _event("r0", "reader", "page_leave", T0 + 5 * MIN, dwell_ms=5000, url="/a0"),  # dup
        _event("o1", "owl", "page_view", T0 + 4 * 60 * MIN, page_type="pricing"),
        # abandoned at 10:15, held until 11:15, cancelled by the purchase at 10:30
        _event("b1", "buyer", "add_to_cart", T0, product_id="p1", price=10.0),
        _event("b2", "buyer", "page_view", T0 + 20 * MIN),
        _event("b3", "buyer", "purchase", T0 + 30 * MIN),
        _event("b4", "buyer", "page_view", T0 + 90 * MIN),
        _event("h1", held, "page_view", T0, page_type="home"),
        _event("k1", kept, "page_view", T0, page_type="home"),
    ]
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
    for raw in lines:
        producer.produce(events, value=raw, key=orjson.loads(raw)["user_id"].encode())
    assert producer.flush(30) == 0

    flow = start_flow(
        kafka_bootstrap, events, api_url, redis_url, "--rules", str(rules_file),
        env={"NUDGEFLOW_KAFKA__DECISIONS_TOPIC": decisions_topic,
             "NUDGEFLOW_HEALTH_PORT": "0", "NUDGEFLOW_TEMPLATES": str(templates)},
    )
    try:
        decided = consume_all(kafka_bootstrap, decisions_topic, expected=8, timeout_s=60)
        deadline = time.monotonic() + 30
        while len(read_api_log(api_log)) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        sent = read_api_log(api_log)
    finally:
        flow.terminate()
        _, err = flow.communicate(timeout=30)

    outcomes = sorted(
        (d["user_id"], d["trigger_type"], d["decision"], d["reason"])
        for d in (orjson.loads(m.value()) for m in decided)
    )
    assert outcomes == sorted([
        ("reader", "long_read", "dispatched", None),
        ("reader", "long_read", "dispatched", None),
        ("reader", "long_read", "dispatched", None),
        ("reader", "long_read", "suppressed", "frequency_cap"),
        ("owl", "night_nudge", "dispatched", None),
        ("buyer", "cart_abandonment", "suppressed", "cancelled"),
        (held, "held_out", "suppressed", "holdout"),
        (kept, "held_out", "dispatched", None),
    ]), err.decode(errors="replace")[-2000:]
    assert sorted((row["user_id"], row["trigger_type"]) for row in sent) == sorted([
        ("reader", "long_read"), ("reader", "long_read"), ("reader", "long_read"),
        ("owl", "night_nudge"), (kept, "held_out"),
    ])
    owl = next(row for row in sent if row["user_id"] == "owl")
    assert (owl["channel"], owl["send_at"]) == ("sms", owl_resume)
    held_out = next(d for d in (orjson.loads(m.value()) for m in decided)
                    if d["user_id"] == kept)
    assert held_out["metadata"]["experiment"] == {
        "name": "home-test", "variant": None, "holdout": False}

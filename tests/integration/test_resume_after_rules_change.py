"""Stop a live flow, change its rules file, resume from the same recovery directory.

On real Kafka, Redis and a real bytewax recovery directory: a rule is added at
the top, one removed, two reordered, one window changed. What the resumed
flow decides is what operators/snapshot.py's policy says: unchanged rules keep
their state and pending timers, the changed one starts over, the new one
starts empty, the removed one is gone.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from kafka_helpers import TopicFactory, consume_all
from live_helpers import produce_by_partition, start_flow
from rule_texts import CART_ABANDONMENT

pytestmark = pytest.mark.integration

T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z: the past, read as a backlog
MIN = 60_000
RULES = """
policies: {{frequency_cap: {{per_day: 1000, per_week: 1000}}}}
rules:
{rules}
"""
CART = CART_ABANDONMENT
INTEREST = """
  - name: product_interest
    kind: count_in_window
    match: {event: page_view, where: {page_type: product}}
    window: %s
    min_count: 3
    scope: product_id
    cooldown: 24h
    channels: [email]"""
RETARGETING = """
  - name: product_retargeting
    kind: count_in_window
    match: {event: page_view, where: {page_type: product}}
    window: 24h
    min_count: 2
    scope: product_id
    cooldown: 24h
    channels: [email]"""
READER = """
  - name: engaged_reader
    kind: threshold
    match: {event: page_leave}
    field: dwell_ms
    above: 120000
    scope: url
    cooldown: 24h
    channels: [email]"""
LONG_READ = """
  - name: long_read
    kind: threshold
    match: {event: page_leave}
    field: dwell_ms
    above: 100000
    channels: [email]"""


def _event(n: int, kind: str, at: int, **fields: object) -> tuple[bytes, bytes]:
    return b"u1", orjson.dumps({"event_id": f"e{n}", "user_id": "u1", "type": kind,
                                "ts": T0 + at, **fields})


def _fired(bootstrap: str, topic: str) -> set[tuple[str, int]]:
    rows = [orjson.loads(m.value() or b"null") for m in consume_all(bootstrap, topic, 1000, 2.0)]
    return {(r["trigger_type"], (_ms(r["fired_at"]) - T0) // MIN) for r in rows}


def _ms(text: str) -> int:
    from nudgeflow.core.events import parse_ts

    value = parse_ts(text)
    assert isinstance(value, int)
    return value


def _wait_for(
    bootstrap: str, topic: str, wanted: set[tuple[str, int]], flow: subprocess.Popen[bytes]
) -> set[tuple[str, int]]:
    deadline = time.monotonic() + 60
    while not wanted <= (fired := _fired(bootstrap, topic)) and time.monotonic() < deadline:
        assert flow.poll() is None, "the flow stopped by itself"
    return fired


def test_resume_after_a_rules_change_follows_the_documented_policy(
    kafka_bootstrap: str,
    make_topic: TopicFactory,
    dispatch_api: tuple[str, Path],
    tmp_path: Path,
) -> None:
    api_url, _ = dispatch_api
    topic = make_topic(partitions=1, prefix="rules-change")
    decisions = make_topic(partitions=1, prefix="rules-change-decisions")
    recovery = tmp_path / "recovery"
    before, after = tmp_path / "before.yaml", tmp_path / "after.yaml"
    before.write_text(RULES.format(rules=CART + INTEREST % "10m" + RETARGETING + READER))
    after.write_text(RULES.format(rules=LONG_READ + READER + CART + INTEREST % "20m"))
    templates = tmp_path / "templates"
    templates.mkdir()
    for name in ("cart_abandonment", "product_interest", "product_retargeting",
                 "engaged_reader", "long_read"):
        (templates / f"{name}.email.j2").write_text("Subject: {{ trigger.type }}\nHello\n")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})

    def run(rules: Path) -> subprocess.Popen[bytes]:
        return start_flow(kafka_bootstrap, topic, api_url, "none", "--rules", str(rules),
                          "--recovery-dir", str(recovery), "--snapshot-interval", "0.5",
                          env={"NUDGEFLOW_KAFKA__DECISIONS_TOPIC": decisions,
                               "NUDGEFLOW_TEMPLATES": str(templates),
                               "NUDGEFLOW_HEALTH_PORT": "0"},
                          stdout=subprocess.DEVNULL)

    produce_by_partition(producer, topic, [
        _event(1, "add_to_cart", 0, product_id="p1", price=10.0),
        _event(2, "page_view", 1 * MIN, page_type="product", product_id="p1"),
        _event(3, "page_view", 2 * MIN, page_type="product", product_id="p1"),
        _event(4, "page_leave", 3 * MIN, url="/a", dwell_ms=200_000),
    ], 1)
    flow = run(before)
    try:
        first = _wait_for(kafka_bootstrap, decisions,
                          {("engaged_reader", 3), ("product_retargeting", 2)}, flow)
    finally:
        flow.send_signal(signal.SIGTERM)
        _, err = flow.communicate(timeout=60)
    assert flow.returncode == 0, err.decode(errors="replace")[-2000:]
    assert first == {("engaged_reader", 3), ("product_retargeting", 2)}

    produce_by_partition(producer, topic, [
        # The 3rd view of p1 within 10 min, but product_interest's window changed:
        # it counts from the restart, so only the 3rd view after it (at 7 min) fires.
        _event(5, "page_view", 5 * MIN, page_type="product", product_id="p1"),
        _event(6, "page_view", 6 * MIN, page_type="product", product_id="p1"),
        _event(7, "page_view", 7 * MIN, page_type="product", product_id="p1"),
        # engaged_reader moved, unchanged: its cooldown on /a holds. long_read is new.
        _event(8, "page_leave", 8 * MIN, url="/a", dwell_ms=200_000),
        # cart_abandonment moved, unchanged: its timer from before the stop fires.
        _event(9, "page_view", 20 * MIN, page_type="home"),
    ], 1)
    flow = run(after)
    expected = first | {("product_interest", 7), ("long_read", 8), ("cart_abandonment", 15)}
    try:
        fired = _wait_for(kafka_bootstrap, decisions, expected, flow)
    finally:
        flow.send_signal(signal.SIGTERM)
        _, err = flow.communicate(timeout=60)
    assert flow.returncode == 0, err.decode(errors="replace")[-2000:]
    assert fired == expected

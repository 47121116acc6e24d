"""Fault tests: the dispatch sink in a bytewax flow against the real reference API on loopback.

- The API answers 500 for a while, then recovers: every trigger arrives exactly
  once (one log line per idempotency key), none is dead-lettered, and the
  circuit breaker opened instead of hammering.
- The API stays down: every trigger ends in the Kafka dead-letter topic with the
  API's last error as its reason (real Kafka; `-m integration`).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bytewax.operators as op
import httpx
import orjson
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, run_main
from kafka_helpers import TopicFactory, consume_all

from nudgeflow.core.settings import DispatchSettings, KafkaSettings
from nudgeflow.core.triggers import Decision, Trigger, make_trigger_id
from nudgeflow.dispatch_api.server import ServerThread, create_app
from nudgeflow.sinks.circuit import CircuitBreaker
from nudgeflow.sinks.dead_letter import KafkaDeadLetterWriter
from nudgeflow.sinks.dispatch import DispatchResult, DispatchSink, make_breaker

FIRED_AT_MS = 1_772_359_200_000


def make_decisions(count: int) -> list[Decision]:
    decisions = []
    for n in range(count):
        trigger = Trigger(
            trigger_id=make_trigger_id("cart_abandonment", f"u{n}", FIRED_AT_MS + n),
            trigger_type="cart_abandonment",
            user_id=f"u{n}",
            fired_at_ms=FIRED_AT_MS + n,
            detected_at_ms=FIRED_AT_MS + n,
            segment="regular",
            metadata={"cart_value": 10.0, "items": [{"product_id": "p1", "quantity": 1}]},
        )
        decisions.append(Decision(trigger, "dispatched", None, "email", FIRED_AT_MS + n))
    return decisions


def settings(url: str, **overrides: Any) -> DispatchSettings:
    values: dict[str, Any] = {
        "url": url,
        "timeout_s": 2.0,
        "max_in_flight": 8,
        "max_attempts": 10,
        "backoff_base_s": 0.005,
        "backoff_max_s": 0.02,
        "circuit_failure_threshold": 3,
        "circuit_open_s": 0.05,
    }
    values.update(overrides)
    return DispatchSettings(**values)


class Recorder:
    """A failure callback (optionally in front of a real one) that counts what it gets."""

    def __init__(self, inner: Callable[[Decision, DispatchResult], None] | None = None) -> None:
        self.inner = inner
        self.items: list[tuple[Decision, DispatchResult]] = []

    def __call__(self, decision: Decision, result: DispatchResult) -> None:
        self.items.append((decision, result))
        if self.inner is not None:
            self.inner(decision, result)

    def flush(self, timeout: float) -> int:
        flush = getattr(self.inner, "flush", None)
        return int(flush(timeout)) if flush is not None else 0


def run_flow(decisions: list[Decision], sink: DispatchSink) -> None:
    flow = Dataflow("dispatch_faults")
    stream = op.input("in", flow, TestingSource(decisions, batch_size=10))
    op.output("dispatch", op.key_on("by_user", stream, lambda d: d.trigger.user_id), sink)
    run_main(flow)


def log_ids(path: Path) -> list[str]:
    return [orjson.loads(line)["trigger_id"] for line in path.read_bytes().splitlines()]


def test_api_fails_for_a_while_then_every_trigger_arrives_exactly_once(tmp_path: Path) -> None:
    decisions = make_decisions(40)
    log = tmp_path / "api.jsonl"
    failures = Recorder()
    breakers: list[CircuitBreaker] = []

    def breaker() -> CircuitBreaker:
        breakers.append(make_breaker(config))
        return breakers[-1]

    app = create_app(log, fail_first=20, scheduler_interval_s=0.01)
    with ServerThread(app) as server:
        config = settings(server.url)
        sink = DispatchSink(
            config, failure_factory=lambda: failures, breaker_factory=breaker
        )
        started = time.monotonic()

        run_flow(decisions, sink)

        elapsed = time.monotonic() - started
        with httpx.Client(base_url=server.url) as client:
            deadline = time.monotonic() + 10.0
            pending = {d.trigger.trigger_id for d in decisions}
            while pending and time.monotonic() < deadline:
                pending = {
                    tid for tid in pending
                    if client.get(f"/api/trigger/status/{tid}").json()["status"] != "sent"
                }
            assert pending == set()

    counts = Counter(log_ids(log))
    assert set(counts) == {d.trigger.trigger_id for d in decisions}
    assert set(counts.values()) == {1}
    assert failures.items == []
    [only] = breakers
    assert only.times_opened >= 1  # it waited instead of hammering
    assert elapsed < 20


@pytest.mark.integration
def test_api_stays_down_and_every_trigger_is_dead_lettered_on_kafka(
    kafka_bootstrap: str, make_topic: TopicFactory, tmp_path: Path
) -> None:
    decisions = make_decisions(6)
    dlq = make_topic(prefix="triggers.dlq")
    writers: list[Recorder] = []

    def dead_letters() -> Recorder:
        writer = KafkaDeadLetterWriter.from_settings(KafkaSettings(bootstrap=kafka_bootstrap), dlq)
        writers.append(Recorder(writer))
        return writers[-1]

    app = create_app(tmp_path / "api.jsonl", fail_first=10**9)
    with ServerThread(app) as server:
        sink = DispatchSink(
            settings(server.url, max_attempts=3, circuit_open_s=0.02),
            failure_factory=dead_letters,
        )

        run_flow(decisions, sink)

    messages = consume_all(kafka_bootstrap, dlq, expected=len(decisions), timeout_s=30)
    assert len(messages) == len(decisions)
    by_key = {}
    for message in messages:
        key = message.key()
        assert key is not None
        by_key[key.decode()] = message
    assert set(by_key) == {d.trigger.trigger_id for d in decisions}
    for decision in decisions:
        message = by_key[decision.trigger.trigger_id]
        value = message.value()
        assert value is not None
        letter = orjson.loads(value)
        assert letter["reason"] == "HTTP 500: injected failure (fail_first)"
        assert (letter["status"], letter["attempts"]) == (500, 3)
        assert letter["trigger"] == decision.to_json()
        assert dict(message.headers() or []) == {
            "reason": b"HTTP 500: injected failure (fail_first)"
        }
    assert sum(len(writer.items) for writer in writers) == len(decisions)
    assert not (tmp_path / "api.jsonl").exists()  # nothing was ever accepted

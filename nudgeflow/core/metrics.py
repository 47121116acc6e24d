"""Prometheus metrics of the live flow: latency where users feel it, and what became of everything.

Every series lives in prometheus-client's default registry, which is served
three ways: `nudgeflow run`'s health server (`/metrics` on
`NUDGEFLOW_HEALTH_PORT` + process id, `nudgeflow.core.observability`); bytewax's
own API (`BYTEWAX_DATAFLOW_API_ENABLED=true`, `/metrics` on port 3030 or
`BYTEWAX_DATAFLOW_API_PORT`), next to bytewax's per-step metrics; and
`serve_metrics(port)` for any other process. The Kafka consumer lag is
bytewax's gauge in the same registry (`bytewax_kafka_consumer_lag{step_id,
topic, partition}`, from librdkafka's statistics every second).

    series                                                labels
    nudgeflow_events_total                                outcome: applied|duplicate|late
    nudgeflow_dead_letters_total                          reason: invalid|late
    nudgeflow_triggers_detected_total                     rule
    nudgeflow_triggers_dispatched_total                   rule       (policy decision)
    nudgeflow_triggers_suppressed_total                   rule, reason
    nudgeflow_decided_total                               rule, variant, decision, reason
    nudgeflow_outcomes_total                              rule, variant, outcome:
                                                          converted|cart_recovered
    nudgeflow_outcome_value_total                         rule, variant  (purchase value)
    nudgeflow_dispatch_delivered_total                    rule       (the API answered 2xx)
    nudgeflow_dispatch_failures_total                     rule       (gave up: triggers.dlq)
    nudgeflow_dispatch_retries_total                      rule       (attempts after the first)
    nudgeflow_event_to_dispatch_seconds                   rule, since: kafka_ts|source_read
    nudgeflow_timer_lag_seconds                           rule
    nudgeflow_profile_lookups_total                       result: hit|miss (cache hit rate)
    nudgeflow_redis_outages_total

`variant` is the trigger's experiment arm (`nudgeflow.core.outcomes.arm_of`):
a variant's name, `holdout`, `treatment` (an experiment with a holdout and no
variants), or "" for a rule without an experiment. `decision` is `dispatched`
or `suppressed`, `reason` the suppression's (`none` when dispatched). A
conversion rate by arm is `outcomes_total{outcome="converted"}` over the
measured decisions: `decided_total` with `decision="dispatched"` or `reason`
`holdout`/`control`/`cancelled` (`nudgeflow.core.outcomes`). A converted cart
trigger whose cart was bought counts once more, as `cart_recovered`.

Latency is measured to the dispatch API's answer. A decision caused by an
event carries a `Cause` with the event's Kafka timestamp and the wall time the
source read it; a decision that a timer fired while the user was quiet carries
the wall time at which the user's watermark passed the deadline (`due_ms`).
Kafka timestamps come from the producer's clock: on another machine the
`kafka_ts` series includes the clock skew, the `source_read` one does not.

The functions are cheap (a dict lookup and a locked add) and never raise on
unknown labels: a rule added to the rules file appears as a new label value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

from nudgeflow.core.outcomes import arm_of
from nudgeflow.core.timeutil import now_ms

if TYPE_CHECKING:
    from nudgeflow.core.outcomes import Outcome
    from nudgeflow.core.triggers import Decision

__all__ = [
    "LATENCY_BUCKETS_S",
    "Cause",
    "Metrics",
    "metrics",
    "record_dead_letter",
    "record_decision",
    "record_dispatch",
    "record_event_outcome",
    "record_outcome",
    "serve_metrics",
    "timer_due_ms",
    "traced",
    "traced_timers",
]

# From 1 ms to a minute, dense around the 50 ms target and the 200 ms budget.
LATENCY_BUCKETS_S: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
EVENT_OUTCOMES: Final = ("applied", "duplicate", "late")
_NO_REASON: Final = "none"


# Made per event, so not frozen (the note in nudgeflow.core.envelope); never changed once made.
@dataclass(slots=True)
class Cause:
    """When what led to a decision entered the flow, in wall-clock epoch ms.

    `of_event` for decisions made while applying an event, `of_timer` for those a
    timer fired while the user was quiet (`_DetectLogic.on_notify`).
    """

    arrived_ms: int | None = None  # the source read the causing event (Envelope.arrived_ms)
    kafka_ts_ms: int | None = None  # the causing message's Kafka timestamp
    due_ms: int | None = None  # the user's watermark passed the timer's deadline

    @classmethod
    def of_event(cls, arrived_ms: int | None, kafka_ts_ms: int | None) -> Cause:
        return cls(arrived_ms=arrived_ms, kafka_ts_ms=kafka_ts_ms)

    @classmethod
    def of_timer(cls, due_ms: int | None) -> Cause:
        return cls(due_ms=due_ms)


# `Decision.cause` (nudgeflow.core.triggers): a copy of the decision that carries its cause.
_with_cause: Final[Callable[..., Decision]] = replace


def timer_due_ms(deadline_ms: int, *, lateness_ms: int, last_arrival_ms: int,
                 max_ts_ms: int) -> int:
    """The wall time at which a quiet user's watermark passed `deadline_ms`.

    Live mode advances a quiet user's event time with the wall clock from their
    last arrival (`nudgeflow.operators.detect`), so the watermark `max_ts - lateness` is
    strictly past the deadline from `last_arrival + (deadline + lateness + 1 - max_ts)`.
    """
    return last_arrival_ms + max(0, deadline_ms + lateness_ms + 1 - max_ts_ms)


class Metrics:
    """The series of one registry. The module-level `metrics` uses the default registry."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.events = Counter(
            "nudgeflow_events", "Valid events by admission outcome",
            ["outcome"], registry=registry,
        )
        self.dead_letters = Counter(
            "nudgeflow_dead_letters", "Messages sent to the dead-letter topic, by reason",
            ["reason"], registry=registry,
        )
        self.detected = Counter(
            "nudgeflow_triggers_detected", "Triggers detected (every decision)",
            ["rule"], registry=registry,
        )
        self.dispatched = Counter(
            "nudgeflow_triggers_dispatched", "Triggers the policies decided to dispatch",
            ["rule"], registry=registry,
        )
        self.suppressed = Counter(
            "nudgeflow_triggers_suppressed", "Triggers the policies suppressed, by reason",
            ["rule", "reason"], registry=registry,
        )
        self.decided = Counter(
            "nudgeflow_decided", "Decisions by rule, experiment arm, decision and reason",
            ["rule", "variant", "decision", "reason"], registry=registry,
        )
        self.outcomes = Counter(
            "nudgeflow_outcomes",
            "Trigger outcomes by rule and experiment arm (converted; cart_recovered)",
            ["rule", "variant", "outcome"], registry=registry,
        )
        self.outcome_value = Counter(
            "nudgeflow_outcome_value", "Value of the purchases that converted triggers",
            ["rule", "variant"], registry=registry,
        )
        self.delivered = Counter(
            "nudgeflow_dispatch_delivered", "Dispatches the API accepted (2xx)",
            ["rule"], registry=registry,
        )
        self.failures = Counter(
            "nudgeflow_dispatch_failures",
            "Dispatches given up after the last attempt (sent to triggers.dlq)",
            ["rule"], registry=registry,
        )
        self.retries = Counter(
            "nudgeflow_dispatch_retries", "Dispatch attempts after the first",
            ["rule"], registry=registry,
        )
        self.latency = Histogram(
            "nudgeflow_event_to_dispatch_seconds",
            "From the causing event entering the flow to the dispatch API's answer",
            ["rule", "since"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.timer_lag = Histogram(
            "nudgeflow_timer_lag_seconds",
            "Timer-fired triggers: from the wall moment the deadline passed to the API's answer",
            ["rule"], buckets=LATENCY_BUCKETS_S, registry=registry,
        )
        self.profile_lookups = Counter(
            "nudgeflow_profile_lookups", "Profile lookups by the per-worker cache's answer",
            ["result"], registry=registry,
        )
        self.redis_outages = Counter(
            "nudgeflow_redis_outages", "Times profile lookups found Redis down and waited",
            registry=registry,
        )
        self.key_mismatches = Counter(
            "nudgeflow_key_mismatches",
            "Events applied although their Kafka key is not their user_id (EVENTS.md 1)",
            ["topic", "partition"], registry=registry,
        )
        self._outcomes = {name: self.events.labels(name) for name in EVENT_OUTCOMES}

    def record_event_outcome(self, outcome: str, count: int = 1) -> None:
        """An event was admitted: `applied`, `duplicate` or `late` (`Admit.value`)."""
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self.events.labels(outcome)
        child.inc(count)

    def record_key_mismatch(self, topic: str, partition: int) -> None:
        self.key_mismatches.labels(topic, str(partition)).inc()

    def record_dead_letter(self, reason: str) -> None:
        """A message went to the dead-letter topic. Free-text reasons count as `invalid`."""
        self.dead_letters.labels("late" if reason == "late" else "invalid").inc()

    def record_decision(self, decision: Decision) -> None:
        """A trigger was detected and decided (one decision per trigger)."""
        rule = decision.trigger.trigger_type
        self.detected.labels(rule).inc()
        reason = decision.reason or _NO_REASON
        if decision.dispatched:
            self.dispatched.labels(rule).inc()
        else:
            self.suppressed.labels(rule, reason).inc()
        arm = arm_of(decision.trigger.metadata)
        self.decided.labels(rule, arm, decision.decision, reason).inc()

    def record_outcome(self, outcome: Outcome) -> None:
        """A trigger converted (`nudgeflow.operators.attribution`): once per trigger."""
        rule, arm = outcome.trigger_type, outcome.variant
        self.outcomes.labels(rule, arm, outcome.outcome).inc()
        if outcome.cart_recovered:
            self.outcomes.labels(rule, arm, "cart_recovered").inc()
        if outcome.value:
            self.outcome_value.labels(rule, arm).inc(outcome.value)

    def record_dispatch(
        self,
        decision: Decision,
        cause: Cause | None,
        *,
        ok: bool,
        attempts: int,
        answered_ms: int | None = None,
    ) -> None:
        """The dispatch of `decision` ended: delivered (`ok`) or given up after `attempts`.

        The latency series are observed for delivered decisions with a `cause`;
        `answered_ms` defaults to now.
        """
        rule = decision.trigger.trigger_type
        if attempts > 1:
            self.retries.labels(rule).inc(attempts - 1)
        if not ok:
            self.failures.labels(rule).inc()
            return
        self.delivered.labels(rule).inc()
        if cause is None:
            return
        answered = now_ms() if answered_ms is None else answered_ms
        if cause.due_ms is not None:
            self.timer_lag.labels(rule).observe(max(0, answered - cause.due_ms) / 1000.0)
        if cause.arrived_ms is not None:
            seconds = max(0, answered - cause.arrived_ms) / 1000.0
            self.latency.labels(rule, "source_read").observe(seconds)
        if cause.kafka_ts_ms is not None:
            seconds = max(0, answered - cause.kafka_ts_ms) / 1000.0
            self.latency.labels(rule, "kafka_ts").observe(seconds)


    def traced(self, decisions: Sequence[Decision], cause: Cause) -> list[Decision]:
        """Count `decisions` and give each the `cause` its dispatch latency is measured from."""
        out = []
        for decision in decisions:
            self.record_decision(decision)
            out.append(_with_cause(decision, cause=cause))
        return out

    def traced_timers(
        self,
        decisions: Sequence[Decision],
        *,
        lateness_ms: int,
        last_arrival_ms: int,
        max_ts_ms: int,
        delayed: Collection[str] = (),
    ) -> list[Decision]:
        """`traced` for what timers decided while the user was quiet (`on_notify`).

        Each decision's deadline is its `fired_at`, except a delayed send (its
        trigger id in `delayed`, the user's pending sends before the step), whose
        deadline is its `send_at`: the deliberate delay is not lag.
        """
        out = []
        for decision in decisions:
            deadline = decision.trigger.fired_at_ms
            if decision.trigger.trigger_id in delayed and decision.send_at_ms is not None:
                deadline = decision.send_at_ms
            due = timer_due_ms(deadline, lateness_ms=lateness_ms,
                               last_arrival_ms=last_arrival_ms, max_ts_ms=max_ts_ms)
            self.record_decision(decision)
            out.append(_with_cause(decision, cause=Cause.of_timer(due)))
        return out


metrics: Final = Metrics()
"""The series in prometheus-client's default registry (served by bytewax and `serve_metrics`)."""

record_event_outcome: Final = metrics.record_event_outcome
record_dead_letter: Final = metrics.record_dead_letter
record_decision: Final = metrics.record_decision
record_outcome: Final = metrics.record_outcome
record_dispatch: Final = metrics.record_dispatch
traced: Final = metrics.traced
traced_timers: Final = metrics.traced_timers

_served: dict[int, object] = {}
_served_lock = threading.Lock()


def serve_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Serve the default registry on `port` (`/metrics`) from a daemon thread; once per port.

    Not needed under `nudgeflow run` (its health server serves `/metrics`) or with
    bytewax's API on (`BYTEWAX_DATAFLOW_API_ENABLED`): both serve the same registry.
    Port 0 is refused: the scraper must know where to look.
    """
    if not 0 < port < 65536:
        msg = f"metrics port must be within 1..65535, got {port}"
        raise ValueError(msg)
    with _served_lock:
        if port not in _served:
            _served[port] = start_http_server(port, addr=addr)

"""The metric functions update the right series (each test on its own registry)."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from nudgeflow.core import metrics as metrics_module
from nudgeflow.core.metrics import Cause, Metrics, timer_due_ms
from nudgeflow.core.triggers import Decision, Outcome, Trigger


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def decision(rule: str = "product_interest", outcome: Outcome = "dispatched",
             reason: str | None = None) -> Decision:
    trigger = Trigger(
        trigger_id="t-1", trigger_type=rule, user_id="u1",
        fired_at_ms=1_000, detected_at_ms=1_000, segment="new",
    )
    return Decision(trigger, outcome, reason, channel="email" if reason is None else None)


def test_event_outcomes_count_by_label(m: Metrics, registry: CollectorRegistry) -> None:
    m.record_event_outcome("applied")
    m.record_event_outcome("applied", 4)
    m.record_event_outcome("duplicate")
    m.record_event_outcome("late")
    assert value(registry, "nudgeflow_events_total", outcome="applied") == 5
    assert value(registry, "nudgeflow_events_total", outcome="duplicate") == 1
    assert value(registry, "nudgeflow_events_total", outcome="late") == 1


def test_dead_letter_reasons_are_bounded_to_late_and_invalid(
    m: Metrics, registry: CollectorRegistry
) -> None:
    m.record_dead_letter("late")
    m.record_dead_letter("missing field 'product_id' (required for add_to_cart)")
    m.record_dead_letter("not valid JSON: unexpected character")
    assert value(registry, "nudgeflow_dead_letters_total", reason="late") == 1
    assert value(registry, "nudgeflow_dead_letters_total", reason="invalid") == 2


def test_decisions_count_detected_dispatched_and_suppressed_by_reason(
    m: Metrics, registry: CollectorRegistry
) -> None:
    m.record_decision(decision())
    m.record_decision(decision(outcome="suppressed", reason="frequency_cap"))
    m.record_decision(decision("cart_abandonment", "suppressed", "no_channel"))
    assert value(registry, "nudgeflow_triggers_detected_total", rule="product_interest") == 2
    assert value(registry, "nudgeflow_triggers_detected_total", rule="cart_abandonment") == 1
    assert value(registry, "nudgeflow_triggers_dispatched_total", rule="product_interest") == 1
    assert value(registry, "nudgeflow_triggers_suppressed_total",
                 rule="product_interest", reason="frequency_cap") == 1
    assert value(registry, "nudgeflow_triggers_suppressed_total",
                 rule="cart_abandonment", reason="no_channel") == 1


def test_a_delivered_event_caused_dispatch_observes_both_latencies(
    m: Metrics, registry: CollectorRegistry
) -> None:
    cause = Cause.of_event(arrived_ms=10_000, kafka_ts_ms=9_990)
    m.record_dispatch(decision(), cause, ok=True, attempts=1, answered_ms=10_030)
    hist = "nudgeflow_event_to_dispatch_seconds"
    rule = "product_interest"
    assert value(registry, f"{hist}_count", rule=rule, since="source_read") == 1
    assert value(registry, f"{hist}_sum", rule=rule, since="source_read") == pytest.approx(0.03)
    assert value(registry, f"{hist}_sum", rule=rule, since="kafka_ts") == pytest.approx(0.04)
    # 30 ms is in the 0.03 bucket, not in the 0.02 one.
    assert value(registry, f"{hist}_bucket", rule=rule, since="source_read", le="0.03") == 1
    assert value(registry, f"{hist}_bucket", rule=rule, since="source_read", le="0.02") == 0
    assert value(registry, "nudgeflow_dispatch_delivered_total", rule=rule) == 1
    assert value(registry, "nudgeflow_timer_lag_seconds_count", rule=rule) == 0


def test_a_timer_fired_dispatch_observes_the_timer_lag_only(
    m: Metrics, registry: CollectorRegistry
) -> None:
    rule = "cart_abandonment"
    m.record_dispatch(decision(rule), Cause.of_timer(due_ms=50_000), ok=True, attempts=1,
                      answered_ms=50_250)
    assert value(registry, "nudgeflow_timer_lag_seconds_count", rule=rule) == 1
    assert value(registry, "nudgeflow_timer_lag_seconds_sum", rule=rule) == pytest.approx(0.25)
    assert value(registry, "nudgeflow_event_to_dispatch_seconds_count",
                 rule=rule, since="source_read") == 0


def test_retries_and_failures_are_counted_and_failures_observe_no_latency(
    m: Metrics, registry: CollectorRegistry
) -> None:
    cause = Cause.of_event(arrived_ms=1, kafka_ts_ms=1)
    m.record_dispatch(decision(), cause, ok=True, attempts=3, answered_ms=5)
    m.record_dispatch(decision(), cause, ok=False, attempts=5, answered_ms=9)
    rule = "product_interest"
    assert value(registry, "nudgeflow_dispatch_retries_total", rule=rule) == 2 + 4
    assert value(registry, "nudgeflow_dispatch_failures_total", rule=rule) == 1
    assert value(registry, "nudgeflow_dispatch_delivered_total", rule=rule) == 1
    assert value(registry, "nudgeflow_event_to_dispatch_seconds_count",
                 rule=rule, since="source_read") == 1


def test_a_decision_without_cause_is_counted_without_latency(
    m: Metrics, registry: CollectorRegistry
) -> None:
    m.record_dispatch(decision(), None, ok=True, attempts=1)
    assert value(registry, "nudgeflow_dispatch_delivered_total", rule="product_interest") == 1
    assert value(registry, "nudgeflow_event_to_dispatch_seconds_count",
                 rule="product_interest", since="source_read") == 0


def test_the_module_functions_use_the_default_registry_that_bytewax_serves() -> None:
    before = value(REGISTRY, "nudgeflow_events_total", outcome="applied")
    metrics_module.record_event_outcome("applied")
    after = value(REGISTRY, "nudgeflow_events_total", outcome="applied")
    assert after == before + 1


def test_serve_metrics_exposes_the_default_registry() -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics_module.serve_metrics(port, addr="127.0.0.1")
    metrics_module.serve_metrics(port, addr="127.0.0.1")  # a second call is a no-op
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "nudgeflow_events_total" in body


@pytest.mark.parametrize("port", [0, -1, 70_000])
def test_serve_metrics_refuses_a_port_out_of_range(port: int) -> None:
    with pytest.raises(ValueError, match="metrics port"):
        metrics_module.serve_metrics(port)


def caused(rule: str = "product_interest", fired_at_ms: int = 1_000,
           send_at_ms: int | None = None, trigger_id: str = "t-1") -> Decision:
    trigger = Trigger(trigger_id=trigger_id, trigger_type=rule, user_id="u1",
                      fired_at_ms=fired_at_ms, detected_at_ms=fired_at_ms, segment="new")
    return Decision(trigger, "dispatched", None, channel="email", send_at_ms=send_at_ms)


def test_traced_counts_the_decisions_and_attaches_the_event_cause(
    m: Metrics, registry: CollectorRegistry
) -> None:
    cause = Cause.of_event(arrived_ms=5, kafka_ts_ms=4)
    out = m.traced([caused(), caused(trigger_id="t-2")], cause)
    assert [d.cause for d in out] == [cause, cause]
    assert value(registry, "nudgeflow_triggers_detected_total", rule="product_interest") == 2


def test_timer_due_is_when_the_quiet_users_watermark_passed_the_deadline() -> None:
    # Last event at wall 10 000 with ts 1 000; lateness 500; deadline ts 2 000:
    # the watermark passes it when event time reaches 2 501, 1 501 ms of wall time later.
    assert timer_due_ms(2_000, lateness_ms=500, last_arrival_ms=10_000, max_ts_ms=1_000) == 11_501
    # A deadline the watermark had already passed is due at the last arrival.
    assert timer_due_ms(0, lateness_ms=500, last_arrival_ms=10_000, max_ts_ms=1_000) == 10_000


def test_traced_timers_measure_a_delayed_send_from_its_send_time(m: Metrics) -> None:
    timer = caused("cart_abandonment", fired_at_ms=2_000, trigger_id="timer")
    delayed = caused("cart_abandonment", fired_at_ms=0, send_at_ms=2_000, trigger_id="late")
    out = m.traced_timers([timer, delayed], lateness_ms=500, last_arrival_ms=10_000,
                          max_ts_ms=1_000, delayed={"late"})
    assert [d.cause for d in out] == [Cause.of_timer(11_501)] * 2


def _in_arm(variant: str | None, holdout: bool, reason: str | None = None) -> Decision:
    trigger = Trigger(
        trigger_id="t-2", trigger_type="cart_abandonment", user_id="u1", fired_at_ms=1_000,
        detected_at_ms=1_000, segment="new",
        metadata={"experiment": {"name": "x", "variant": variant, "holdout": holdout}},
    )
    if reason is None:
        return Decision(trigger, "dispatched", None, channel="email")
    return Decision(trigger, "suppressed", reason)


def test_decisions_count_by_experiment_arm(m: Metrics, registry: CollectorRegistry) -> None:
    m.record_decision(_in_arm("now", holdout=False))
    m.record_decision(_in_arm(None, holdout=True, reason="holdout"))
    m.record_decision(decision())
    series = "nudgeflow_decided_total"
    assert value(registry, series, rule="cart_abandonment", variant="now",
                 decision="dispatched", reason="none") == 1
    assert value(registry, series, rule="cart_abandonment", variant="holdout",
                 decision="suppressed", reason="holdout") == 1
    assert value(registry, series, rule="product_interest", variant="",
                 decision="dispatched", reason="none") == 1


def test_outcomes_count_conversions_cart_recoveries_and_value_by_arm(
    m: Metrics, registry: CollectorRegistry
) -> None:
    from nudgeflow.core.outcomes import Outcome as Converted

    m.record_outcome(Converted("t1", "cart_abandonment", "u1", 0, 5, 30.0, "now", True))
    m.record_outcome(Converted("t2", "cart_abandonment", "u2", 0, 5, 12.5, "now", False))
    m.record_outcome(Converted("t3", "engaged_reader", "u3", 0, 5, None, "", None))
    labels = {"rule": "cart_abandonment", "variant": "now"}
    assert value(registry, "nudgeflow_outcomes_total", outcome="converted", **labels) == 2
    assert value(registry, "nudgeflow_outcomes_total", outcome="cart_recovered", **labels) == 1
    assert value(registry, "nudgeflow_outcome_value_total", **labels) == 42.5
    assert value(registry, "nudgeflow_outcomes_total", rule="engaged_reader", variant="",
                 outcome="converted") == 1
    assert value(registry, "nudgeflow_outcome_value_total", rule="engaged_reader",
                 variant="") == 0

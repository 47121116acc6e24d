"""The dashboard's summary: percentiles from buckets, events/s, triggers, lift (a registry each)."""

from __future__ import annotations

import math

import httpx
import pytest
from dashboard_helpers import record_arm
from prometheus_client import CollectorRegistry

from nudgeflow.core.dashboard import EventRate, histogram_quantile, summarise
from nudgeflow.core.metrics import Cause, Metrics
from nudgeflow.core.observability import Health, serve_health
from nudgeflow.core.triggers import Decision, Outcome, Trigger

INF = math.inf


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def m(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def decision(rule: str, outcome: Outcome = "dispatched", reason: str | None = None) -> Decision:
    trigger = Trigger(trigger_id="t", trigger_type=rule, user_id="u1", fired_at_ms=1_000,
                      detected_at_ms=1_000, segment="new")
    return Decision(trigger, outcome, reason, channel="email" if reason is None else None)



def test_quantiles_interpolate_within_the_bucket_as_promql_does() -> None:
    # 10 observations, all in (0.03, 0.05]: the p50 is halfway through that bucket.
    buckets = {0.02: 0, 0.03: 0, 0.05: 10, 0.1: 10, INF: 10}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.04)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.0498)
    # 4 at or below 0.1, 6 more up to 0.2: the p90 is at 9/10, 5/6 through (0.1, 0.2].
    spread = {0.1: 4, 0.2: 10, INF: 10}
    assert histogram_quantile(0.9, spread) == pytest.approx(0.1 + 0.1 * 5 / 6)
    # The first bucket starts at 0.
    assert histogram_quantile(0.5, {0.01: 2, INF: 2}) == pytest.approx(0.005)


def test_a_quantile_in_the_open_bucket_is_the_largest_finite_bound() -> None:
    assert histogram_quantile(0.99, {0.1: 1, 60.0: 1, INF: 100}) == 60.0


def test_no_observations_have_no_quantile() -> None:
    assert histogram_quantile(0.5, {0.1: 0, INF: 0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_events_per_second_over_the_window() -> None:
    rate = EventRate(window_ms=10_000, step_ms=1_000)
    assert rate.observe(0, at_ms=0) is None  # one sample is no rate yet
    assert rate.observe(500, at_ms=1_000) == pytest.approx(500.0)
    for second in range(2, 16):
        last = rate.observe(500 * second, at_ms=second * 1_000)
    # 500 events a second throughout: the same over any window.
    assert last == pytest.approx(500.0)
    # The flow stops: after a window the rate is 0, not the run's average.
    assert rate.observe(7_500, at_ms=26_000) == pytest.approx(0.0)


def test_several_pages_polling_do_not_shorten_the_window() -> None:
    rate = EventRate(window_ms=10_000, step_ms=1_000)
    for at in range(0, 20_000, 250):  # four polls a second, a sample kept once a second
        rate.observe(at // 10, at_ms=at)  # 100 events/s
    assert rate.observe(2_000, at_ms=20_000) == pytest.approx(100.0)


def test_a_counter_reset_starts_the_rate_again() -> None:
    rate = EventRate()
    rate.observe(1_000, at_ms=0)
    assert rate.observe(10, at_ms=2_000) is None


def test_summary_counts_events_triggers_and_dead_letters(
    m: Metrics, registry: CollectorRegistry
) -> None:
    m.record_event_outcome("applied", 7)
    m.record_event_outcome("late")
    m.record_dead_letter("late")
    m.record_dead_letter("not valid JSON")
    m.record_decision(decision("cart_abandonment"))
    m.record_decision(decision("cart_abandonment", "suppressed", "holdout"))
    m.record_decision(decision("cart_abandonment", "suppressed", "frequency_cap"))
    m.record_decision(decision("product_interest", "suppressed", "no_channel"))
    m.record_dispatch(decision("cart_abandonment"), None, ok=True, attempts=3)
    summary = summarise(registry, at_ms=5)
    assert summary["at_ms"] == 5
    assert summary["events"] == {
        "total": 8, "by_outcome": {"applied": 7, "duplicate": 0, "late": 1}, "per_s": None,
    }
    assert summary["dead_letters"] == {"invalid": 1, "late": 1}
    assert summary["triggers"] == [
        {"rule": "cart_abandonment", "detected": 3, "dispatched": 1,
         "suppressed": {"frequency_cap": 1, "holdout": 1}, "delivered": 1, "failed": 0,
         "retried": 2},
        {"rule": "product_interest", "detected": 1, "dispatched": 0,
         "suppressed": {"no_channel": 1}, "delivered": 0, "failed": 0, "retried": 0},
    ]


def test_latency_percentiles_and_budget_share_use_the_source_read_series(
    m: Metrics, registry: CollectorRegistry
) -> None:
    # 9 dispatches 40 ms after the read, one 300 ms: 90% within the 200 ms budget.
    for answered in [40] * 9 + [300]:
        # kafka_ts 10 s earlier (a skewed producer clock) must not show.
        cause = Cause.of_event(arrived_ms=1_000, kafka_ts_ms=-9_000)
        m.record_dispatch(decision("cart_abandonment"), cause, ok=True, attempts=1,
                          answered_ms=1_000 + answered)
    m.record_dispatch(decision("cart_abandonment"), Cause.of_timer(due_ms=0), ok=True,
                      attempts=1, answered_ms=1_000)
    summary = summarise(registry)
    latency = summary["latency"]
    assert latency["count"] == 10
    assert latency["within_budget"] == pytest.approx(0.9)
    assert latency["budget_ms"] == 200
    # rank 5 of 9 in (0.03, 0.05]; rank 9.9 is 0.9 of the one in (0.2, 0.3] (0.3 inclusive).
    assert latency["p50_ms"] == pytest.approx(30 + 20 * 5 / 9, abs=0.05)
    assert latency["p99_ms"] == pytest.approx(200 + 100 * 0.9, abs=0.05)
    assert [row["rule"] for row in latency["by_rule"]] == ["cart_abandonment"]
    assert summary["timer_lag"]["count"] == 1
    assert summary["timer_lag"]["p50_ms"] == pytest.approx(875.0)  # (0.75, 1.0], halfway


def test_no_outcome_counted_means_no_outcomes_yet(m: Metrics, registry: CollectorRegistry) -> None:
    assert summarise(registry)["experiments"] == {"available": False, "variants": []}
    # Decided, but nothing converted yet: still none, the arm's triggers counted.
    record_arm(m, "cart_abandonment", "holdout", suppressed={"holdout": 3})
    experiments = summarise(registry)["experiments"]
    assert experiments["available"] is False
    assert experiments["variants"][0]["attributed"] == 3


def test_an_arms_measured_triggers_are_those_the_report_measures(
    m: Metrics, registry: CollectorRegistry
) -> None:
    # Dispatched, held back (holdout, control) or cancelled count; what never reached
    # the experiment (a cap, a duplicate, no channel) does not (nudgeflow.core.outcomes).
    record_arm(m, "cart_abandonment", "after_1h", dispatched=50,
               suppressed={"cancelled": 10, "frequency_cap": 30, "duplicate": 5,
                           "no_channel": 5}, converted=6)
    record_arm(m, "cart_abandonment", "holdout",
               suppressed={"holdout": 40, "control": 2, "frequency_cap": 8}, converted=3)
    rows = {r["variant"]: r for r in summarise(registry)["experiments"]["variants"]}
    assert rows["after_1h"]["attributed"] == 60
    assert rows["after_1h"]["conversion_rate"] == pytest.approx(0.10)
    assert rows["holdout"]["attributed"] == 42
    assert rows["holdout"]["conversion_rate"] == pytest.approx(3 / 42)


def test_lift_is_absolute_and_relative_against_the_holdout(
    m: Metrics, registry: CollectorRegistry
) -> None:
    rule = "cart_abandonment"
    record_arm(m, rule, "holdout", suppressed={"holdout": 100}, converted=10)
    record_arm(m, rule, "now", dispatched=180, suppressed={"frequency_cap": 20},
               converted=27, cart_recovered=12, value_each=40.0)
    record_arm(m, rule, "after_1h", dispatched=200, converted=16)
    experiments = summarise(registry)["experiments"]
    assert experiments["available"] is True
    rows = {row["variant"]: row for row in experiments["variants"]}
    assert rows["holdout"]["baseline"] is True
    assert rows["holdout"]["conversion_rate"] == pytest.approx(0.10)
    assert rows["holdout"]["lift"] is None and rows["holdout"]["relative_lift"] is None
    now = rows["now"]
    assert now["baseline"] is False
    assert now["attributed"] == 180  # the capped 20 are not measured
    assert now["conversion_rate"] == pytest.approx(0.15)
    assert now["lift"] == pytest.approx(0.05)  # 15% against 10%: 5 percentage points
    assert now["relative_lift"] == pytest.approx(0.5)
    assert now["outcomes"] == {"converted": 27, "cart_recovered": 12}
    assert now["revenue"] == pytest.approx(27 * 40.0)
    assert rows["after_1h"]["lift"] == pytest.approx(-0.02)  # 8% against 10%
    assert rows["after_1h"]["relative_lift"] == pytest.approx(-0.2)


def test_a_holdout_that_never_converted_has_a_lift_but_no_relative_one(
    m: Metrics, registry: CollectorRegistry
) -> None:
    record_arm(m, "r", "holdout", suppressed={"holdout": 20})
    record_arm(m, "r", "treatment", dispatched=80, converted=4)
    rows = {r["variant"]: r for r in summarise(registry)["experiments"]["variants"]}
    assert rows["treatment"]["lift"] == pytest.approx(0.05)
    assert rows["treatment"]["relative_lift"] is None


def test_only_the_holdout_is_a_baseline_as_in_the_report(
    m: Metrics, registry: CollectorRegistry
) -> None:
    # A variant named "control" is an arm like any other: `nudgeflow report`
    # compares with the holdout alone, so without one there is no lift.
    record_arm(m, "r1", "control", dispatched=50, converted=5)
    record_arm(m, "r1", "fast", dispatched=50, converted=10)
    record_arm(m, "r2", "", dispatched=10, converted=1)  # no experiment
    record_arm(m, "r3", "holdout", suppressed={"frequency_cap": 5})  # none measured
    record_arm(m, "r3", "a", dispatched=10, converted=1)
    rows = {(r["rule"], r["variant"]): r for r in summarise(registry)["experiments"]["variants"]}
    for key in (("r1", "control"), ("r1", "fast"), ("r2", ""), ("r3", "a")):
        assert rows[key]["lift"] is None, key
    assert not any(rows[key]["baseline"] for key in (("r1", "control"), ("r1", "fast"), ("r2", "")))
    assert rows[("r2", "")]["conversion_rate"] == pytest.approx(0.1)
    assert rows[("r3", "holdout")]["attributed"] == 0
    assert rows[("r3", "holdout")]["conversion_rate"] is None


def test_the_health_server_serves_the_page_its_script_and_the_summary(
    m: Metrics, registry: CollectorRegistry
) -> None:
    m.record_event_outcome("applied", 3)
    server = serve_health(Health(), "127.0.0.1", 0, registry=registry)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        page = httpx.get(f"{base}/dashboard")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert '<script src="dashboard.js">' in page.text
        script = httpx.get(f"{base}/dashboard.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert "dashboard.json" in script.text
        summary = httpx.get(f"{base}/dashboard.json").json()
        assert summary["events"]["total"] == 3
        # /metrics reads the same registry.
        assert 'nudgeflow_events_total{outcome="applied"} 3.0' in httpx.get(
            f"{base}/metrics").text
    finally:
        server.shutdown()
        server.server_close()

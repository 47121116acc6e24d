"""The live dashboard in a real headless browser: what the page shows is what /metrics says.

Debian's chromium and chromedriver (`/usr/bin/…`, scripts/test.sh installs them)
drive the page; nothing downloads a browser. Each test waits for the page's own
"updated at" to pass the moment its metrics were recorded, then compares the
page's text with a parse of `/metrics` taken from the same server. Screenshots
go to `artifacts/` (or `$NUDGEFLOW_ARTIFACTS`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dashboard_helpers import (
    NO_VALUE,
    WAIT_S,
    Labels,
    Page,
    artifacts_dir,
    chromium,
    label_values,
    latency_buckets,
    number,
    open_and_wait,
    record_arm,
    scrape,
    scrape_registry,
    shown_ms,
    total,
)
from prometheus_client import REGISTRY, CollectorRegistry
from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait

from nudgeflow.app.demo import demo_rules
from nudgeflow.app.replay import run_replay
from nudgeflow.app.report import report_files
from nudgeflow.app.samples import SampleSpec, write_sample
from nudgeflow.core.dashboard import BUDGET_S
from nudgeflow.core.metrics import Metrics
from nudgeflow.core.observability import Health, serve_health
from nudgeflow.core.settings import DispatchSettings
from nudgeflow.core.timeutil import now_ms
from nudgeflow.dispatch_api.server import ServerThread, create_app
from nudgeflow.sinks.dispatch import DispatchSink


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    yield from chromium()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    return artifacts_dir()


def serve(registry: CollectorRegistry) -> tuple[str, object]:
    server = serve_health(Health(), "127.0.0.1", 0, registry=registry)
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_the_page_shows_what_metrics_says_after_a_real_run(
    browser: webdriver.Chrome, artifacts: Path, tmp_path: Path
) -> None:
    """A sample shop replayed through the real flow, dispatched to the reference API."""
    events, profiles = write_sample(tmp_path, SampleSpec(users=150, hours=1.0))
    before = scrape_registry(REGISTRY)  # other tests of this process may have counted here
    with ServerThread(create_app()) as api:
        sink = DispatchSink(DispatchSettings(url=api.url, timeout_s=2.0))
        # The demo's rules: two experiments with a holdout, so arms and lifts to show.
        summary = run_replay(events, tmp_path / "out.jsonl", profiles=profiles, dispatch=sink,
                             rules=demo_rules(), outcomes=tmp_path / "outcomes.jsonl",
                             record_metrics=True)
    assert summary.triggers > 0 and summary.invalid > 0  # the sample has both to show
    recorded = now_ms()
    base, server = serve(REGISTRY)  # where the flow records, as `nudgeflow run` serves it
    try:
        open_and_wait(browser, f"{base}/dashboard", recorded)
        scraped = scrape(base)
        page = Page(browser)
        browser.save_screenshot(str(artifacts / "dashboard.png"))
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]

    events_total = scraped["nudgeflow_events_total"]
    assert number(page["events-total"]) == total(events_total)
    for outcome in ("applied", "duplicate", "late"):
        assert number(page[f"events-{outcome}"]) == total(events_total, outcome=outcome)

    detected = scraped["nudgeflow_triggers_detected_total"]
    rules = label_values(detected, "rule")
    assert rules >= {t for t, _, _ in summary.decisions}
    assert page.rows("triggers", "rule") == rules
    for rule in rules:
        for col, name in (("detected", "nudgeflow_triggers_detected_total"),
                          ("dispatched", "nudgeflow_triggers_dispatched_total"),
                          ("suppressed", "nudgeflow_triggers_suppressed_total"),
                          ("delivered", "nudgeflow_dispatch_delivered_total")):
            expected = total(scraped[name], rule=rule)
            assert number(page.cell("triggers", col, rule=rule)) == expected, (rule, col)
        reasons = page.cell("triggers", "reasons", rule=rule)
        for reason in label_values(scraped["nudgeflow_triggers_suppressed_total"], "reason"):
            n = total(scraped["nudgeflow_triggers_suppressed_total"], rule=rule, reason=reason)
            if n:
                assert f"{reason} {int(n):,}" in reasons, (rule, reason)

    letters = scraped["nudgeflow_dead_letters_total"]
    for reason in label_values(letters, "reason"):
        shown = page.cell("dead-letters", "count", reason=reason)
        assert number(shown) == total(letters, reason=reason)

    buckets = latency_buckets(scraped)
    assert max(buckets.values()) > 0, "the run's dispatches are timed from each line's read"
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        assert page[f"latency-{name}"] == shown_ms(q, buckets)
    within = buckets[BUDGET_S] / buckets[float("inf")]
    assert page["latency-within"] == f"{within * 100:.1f}%"
    assert number(page["latency-count"]) == buckets[float("inf")]
    for rule in label_values(scraped["nudgeflow_event_to_dispatch_seconds_count"], "rule"):
        shown = page.cell("latency-rules", "p99", rule=rule)
        assert shown == shown_ms(0.99, latency_buckets(scraped, rule))

    # Replay decides timers by event time.
    timers = total(scraped["nudgeflow_timer_lag_seconds_count"])
    assert number(page["timer-count"]) == timers

    # The run attributed purchases to its triggers: the experiments table is /metrics'.
    assert page.hidden("experiments-empty") and not page.hidden("experiments")
    arms = arms_of(scraped)
    assert page.rows("experiments", "variant") == {v for _, v in arms}
    for rule, variant in arms:
        check_arm(page, scraped, rule, variant)
    lifts = [page.cell("experiments", "lift", rule=r, variant=v) for r, v in arms]
    assert any(lift.endswith(" pp") for lift in lifts), "an arm compared with its holdout"

    # What this run added to the counters is what `nudgeflow report` makes of its files.
    report = report_files(tmp_path / "out.jsonl", tmp_path / "outcomes.jsonl").to_json()
    after = scrape_registry(REGISTRY)
    assert sum(v["converted"] for v in report["rules"].values()) > 0
    for rule, entry in report["rules"].items():
        for variant, want in entry.get("variants", {"": entry}).items():
            added = {
                "attributed": measured(after, rule, variant) - measured(before, rule, variant),
                "converted": converted(after, rule, variant) - converted(before, rule, variant),
            }
            assert added == {"attributed": want["attributed"], "converted": want["converted"]}, (
                rule, variant)


# The report's measured triggers (nudgeflow.core.outcomes), spelled out here on purpose:
# the test states the definition rather than borrowing the code's.
MEASURED_REASONS = ("holdout", "control", "cancelled")


def measured(scraped: dict[str, dict[Labels, float]], rule: str, variant: str) -> float:
    decided = scraped.get("nudgeflow_decided_total", {})
    held = sum(total(decided, rule=rule, variant=variant, reason=r) for r in MEASURED_REASONS)
    return total(decided, rule=rule, variant=variant, decision="dispatched") + held


def converted(scraped: dict[str, dict[Labels, float]], rule: str, variant: str,
              outcome: str = "converted") -> float:
    return total(scraped.get("nudgeflow_outcomes_total", {}), rule=rule, variant=variant,
                 outcome=outcome)


def arms_of(scraped: dict[str, dict[Labels, float]]) -> set[tuple[str, str]]:
    found = set()
    for name in ("nudgeflow_decided_total", "nudgeflow_outcomes_total"):
        for labels in scraped.get(name, {}):
            found.add((dict(labels)["rule"], dict(labels)["variant"]))
    return found


def conversion(scraped: dict[str, dict[Labels, float]], rule: str, variant: str) -> float | None:
    n = measured(scraped, rule, variant)
    return converted(scraped, rule, variant) / n if n else None


def check_arm(page: Page, scraped: dict[str, dict[Labels, float]], rule: str,
              variant: str) -> None:
    """One row of the experiments table against /metrics, by the report's definitions."""
    row = {"rule": rule, "variant": variant}
    assert number(page.cell("experiments", "measured", **row)) == measured(
        scraped, rule, variant)
    assert number(page.cell("experiments", "converted", **row)) == converted(
        scraped, rule, variant)
    rate = conversion(scraped, rule, variant)
    shown = page.cell("experiments", "conversion", **row)
    if rate is None:
        assert shown == NO_VALUE
    else:
        assert number(shown) == pytest.approx(rate * 100, abs=0.051)  # one decimal shown
    outcomes = page.cell("experiments", "outcomes", **row)
    for outcome in ("converted", "cart_recovered"):
        n = converted(scraped, rule, variant, outcome)
        assert (f"{outcome} {int(n):,}" in outcomes) == (n > 0), (row, outcomes)
    worth = total(scraped.get("nudgeflow_outcome_value_total", {}), rule=rule, variant=variant)
    assert number(page.cell("experiments", "revenue", **row)) == pytest.approx(worth, abs=0.006)
    lift = page.cell("experiments", "lift", **row)
    relative = page.cell("experiments", "relative", **row)
    base = conversion(scraped, rule, "holdout") if (rule, "holdout") in arms_of(scraped) \
        else None
    if variant == "holdout":
        assert "(baseline)" in page.cell("experiments", "variant", **row)
        assert lift == relative == ""
    elif not variant or base is None or rate is None:
        assert lift == relative == NO_VALUE
    else:
        assert lift.endswith(" pp")
        assert number(lift.removesuffix(" pp")) == pytest.approx((rate - base) * 100,
                                                                 abs=0.0051)
        if base == 0:
            assert relative == NO_VALUE
        else:
            assert number(relative) == pytest.approx((rate / base - 1) * 100, abs=0.051)


def test_conversions_and_lift_by_variant_follow_the_counters_as_they_move(
    browser: webdriver.Chrome, artifacts: Path
) -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    rule = "cart_abandonment"
    record_arm(m, rule, "holdout", suppressed={"holdout": 40, "frequency_cap": 5}, converted=4)
    record_arm(m, rule, "now", dispatched=120, suppressed={"frequency_cap": 10}, converted=18,
               cart_recovered=7, value_each=52.75)
    record_arm(m, rule, "after_1h", dispatched=90, suppressed={"cancelled": 10}, converted=11)
    m.record_event_outcome("applied", 500)
    base, server = serve(registry)
    try:
        open_and_wait(browser, f"{base}/dashboard", now_ms())
        page = Page(browser)
        assert page.hidden("experiments-empty")
        assert page["triggers-empty"] == "no triggers yet"
        assert page["latency-empty"] == "no dispatch timed yet"
        scraped = scrape(base)
        assert page.rows("experiments", "variant") == {"holdout", "now", "after_1h"}
        for variant in ("holdout", "now", "after_1h"):
            check_arm(page, scraped, rule, variant)
        # 15% against 10%: five points, half as much again.
        assert page.cell("experiments", "lift", rule=rule, variant="now") == "+5.00 pp"
        assert page.cell("experiments", "relative", rule=rule, variant="now") == "+50.0%"

        # The page follows the counters without a reload.
        record_arm(m, rule, "after_1h", converted=9)
        m.record_event_outcome("applied", 300)

        def shows_new_count(d: webdriver.Chrome) -> bool:
            shown = Page(d).texts.get(f"experiments[rule={rule},variant=after_1h].converted")
            return shown == "20"

        WebDriverWait(browser, WAIT_S).until(shows_new_count)
        scraped = scrape(base)
        page = Page(browser)
        for variant in ("holdout", "now", "after_1h"):
            check_arm(page, scraped, rule, variant)
        assert page.cell("experiments", "lift", rule=rule, variant="after_1h") == "+10.00 pp"
        assert number(page["events-total"]) == total(scraped["nudgeflow_events_total"])
        # Two polls apart with 300 events between them: a rate above zero.
        assert number(page["events-per-s"]) > 0
        browser.save_screenshot(str(artifacts / "dashboard-experiments.png"))
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]

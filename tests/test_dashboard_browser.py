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
    WAIT_S,
    Labels,
    Page,
    artifacts_dir,
    attribution_counters,
    chromium,
    label_values,
    latency_buckets,
    number,
    open_and_wait,
    scrape,
    shown_ms,
    total,
)
from prometheus_client import REGISTRY, CollectorRegistry
from selenium import webdriver
from selenium.webdriver.support.ui import WebDriverWait

from nudgeflow.app.replay import run_replay
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
    with ServerThread(create_app()) as api:
        sink = DispatchSink(DispatchSettings(url=api.url, timeout_s=2.0))
        summary = run_replay(events, tmp_path / "out.jsonl", profiles=profiles, dispatch=sink,
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

    # Replay decides timers by event time, and no attribution ran: the page says so.
    timers = total(scraped["nudgeflow_timer_lag_seconds_count"])
    assert number(page["timer-count"]) == timers
    assert page["experiments-empty"] == "no outcomes yet"
    assert page.hidden("experiments") and not page.hidden("experiments-empty")


def conversion(scraped: dict[str, dict[Labels, float]], rule: str, variant: str) -> float:
    decided = total(scraped["nudgeflow_decided_total"], rule=rule, variant=variant)
    converted = total(scraped["nudgeflow_outcomes_total"], rule=rule, variant=variant,
                      outcome="converted")
    return converted / decided


def test_conversions_and_lift_by_variant_follow_the_counters_as_they_move(
    browser: webdriver.Chrome, artifacts: Path
) -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    decided, outcomes, value = attribution_counters(registry)
    rule = "cart_abandonment"
    decided.labels(rule, "holdout", "suppressed").inc(40)
    decided.labels(rule, "immediate", "dispatched").inc(120)
    decided.labels(rule, "one-hour", "dispatched").inc(100)
    outcomes.labels(rule, "holdout", "converted").inc(4)
    outcomes.labels(rule, "immediate", "converted").inc(18)
    outcomes.labels(rule, "immediate", "expired").inc(90)
    outcomes.labels(rule, "one-hour", "converted").inc(11)
    value.labels(rule, "immediate").inc(950.25)
    m.record_event_outcome("applied", 500)
    base, server = serve(registry)
    try:
        open_and_wait(browser, f"{base}/dashboard", now_ms())
        page = Page(browser)
        assert page.hidden("experiments-empty")
        assert page["triggers-empty"] == "no triggers yet"
        assert page["latency-empty"] == "no dispatch timed yet"
        check_variants(page, scrape(base), rule)

        # The page follows the counters without a reload.
        outcomes.labels(rule, "one-hour", "converted").inc(9)
        m.record_event_outcome("applied", 300)

        def shows_new_count(d: webdriver.Chrome) -> bool:
            shown = Page(d).texts.get(f"experiments[rule={rule},variant=one-hour].converted")
            return shown == "20"

        WebDriverWait(browser, WAIT_S).until(shows_new_count)
        scraped = scrape(base)
        page = Page(browser)
        check_variants(page, scraped, rule)
        assert number(page["events-total"]) == total(scraped["nudgeflow_events_total"])
        # Two polls apart with 300 events between them: a rate above zero.
        assert number(page["events-per-s"]) > 0
        browser.save_screenshot(str(artifacts / "dashboard-experiments.png"))
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]


def check_variants(page: Page, scraped: dict[str, dict[Labels, float]], rule: str) -> None:
    control = conversion(scraped, rule, "holdout")
    for variant in label_values(scraped["nudgeflow_decided_total"], "variant"):
        row = {"rule": rule, "variant": variant}
        decided = total(scraped["nudgeflow_decided_total"], rule=rule, variant=variant)
        assert number(page.cell("experiments", "decided", **row)) == decided
        rate = conversion(scraped, rule, variant)
        assert page.cell("experiments", "conversion", **row) == f"{rate * 100:.1f}%"
        lift = page.cell("experiments", "lift", **row)
        if variant == "holdout":
            assert lift == ""
            assert "(control)" in page.cell("experiments", "variant", **row)
        else:
            assert lift == f"{(rate / control - 1) * 100:+.1f}%"
        worth = total(scraped["nudgeflow_outcome_value_total"], rule=rule, variant=variant)
        assert number(page.cell("experiments", "value", **row)) == pytest.approx(worth)

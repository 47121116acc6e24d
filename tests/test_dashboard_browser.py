"""The live dashboard in a real headless browser: what the page shows is what /metrics says.

Debian's chromium and chromedriver (`/usr/bin/…`, scripts/test.sh installs them)
drive the page; nothing downloads a browser. Each test waits for the page's own
"updated at" to pass the moment its metrics were recorded, then compares the
page's text with a parse of `/metrics` taken from the same server. Screenshots
go to `artifacts/` (or `$NUDGEFLOW_ARTIFACTS`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dashboard_helpers import attribution_counters
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from nudgeflow.app.replay import run_replay
from nudgeflow.app.samples import SampleSpec, write_sample
from nudgeflow.core.dashboard import BUDGET_S, histogram_quantile
from nudgeflow.core.metrics import Metrics
from nudgeflow.core.observability import Health, serve_health
from nudgeflow.core.settings import DispatchSettings
from nudgeflow.core.timeutil import now_ms
from nudgeflow.dispatch_api.server import ServerThread, create_app
from nudgeflow.sinks.dispatch import DispatchSink

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NO_VALUE = "\u2013"  # the page's en dash for "nothing measured"
WAIT_S = 20  # the page polls every 2 s; a loaded CI machine may be slow to start chromium

Labels = frozenset[tuple[str, str]]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1300,1900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("NUDGEFLOW_ARTIFACTS", ROOT / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def serve(registry: CollectorRegistry) -> tuple[str, object]:
    server = serve_health(Health(), "127.0.0.1", 0, registry=registry)
    return f"http://127.0.0.1:{server.server_address[1]}", server


def scrape(base: str) -> dict[str, dict[Labels, float]]:
    """`/metrics` parsed: sample name -> {labels: value}."""
    out: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            out[sample.name][frozenset(sample.labels.items())] = sample.value
    return out


def total(samples: dict[Labels, float], **where: str) -> float:
    want = set(where.items())
    return sum(v for labels, v in samples.items() if want <= labels)


def label_values(samples: dict[Labels, float], label: str) -> set[str]:
    return {value for labels in samples for name, value in labels if name == label}


def text(driver: webdriver.Chrome, css: str) -> str:
    return str(driver.find_element(By.CSS_SELECTOR, css).text)


def number(shown: str) -> float:
    return float(shown.replace(",", "").removesuffix(" ms").removesuffix("%").lstrip("+"))


def open_and_wait(driver: webdriver.Chrome, url: str, after_ms: int) -> None:
    """Load the page and wait until it shows a summary computed at or after `after_ms`."""
    driver.get(url)
    wait_until_updated(driver, after_ms)


def wait_until_updated(driver: webdriver.Chrome, after_ms: int) -> None:
    def updated(d: webdriver.Chrome) -> bool:
        at = d.find_element(By.ID, "updated").get_attribute("data-at")
        return bool(at) and int(at) >= after_ms

    WebDriverWait(driver, WAIT_S).until(updated)


def shown_ms(q: float, buckets: dict[float, float]) -> str:
    value = histogram_quantile(q, buckets)
    return NO_VALUE if value is None else f"{value * 1000:.1f} ms"


def latency_buckets(scraped: dict[str, dict[Labels, float]], rule: str | None = None
                    ) -> dict[float, float]:
    buckets: dict[float, float] = defaultdict(float)
    for labels, value in scraped["nudgeflow_event_to_dispatch_seconds_bucket"].items():
        found = dict(labels)
        if found["since"] == "source_read" and rule in (None, found["rule"]):
            buckets[float(found["le"])] += value
    return dict(buckets)


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
        browser.save_screenshot(str(artifacts / "dashboard.png"))
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]

    events_total = scraped["nudgeflow_events_total"]
    assert number(text(browser, "#events-total")) == total(events_total)
    for outcome in ("applied", "duplicate", "late"):
        assert number(text(browser, f"#events-{outcome}")) == total(events_total, outcome=outcome)

    detected = scraped["nudgeflow_triggers_detected_total"]
    rules = label_values(detected, "rule")
    assert rules >= {t for t, _, _ in summary.decisions}
    shown_rules = {row.get_attribute("data-rule")
                   for row in browser.find_elements(By.CSS_SELECTOR, "#triggers tbody tr")}
    assert shown_rules == rules
    for rule in rules:
        row = f'#triggers tr[data-rule="{rule}"]'
        for col, name in (("detected", "nudgeflow_triggers_detected_total"),
                          ("dispatched", "nudgeflow_triggers_dispatched_total"),
                          ("suppressed", "nudgeflow_triggers_suppressed_total"),
                          ("delivered", "nudgeflow_dispatch_delivered_total")):
            expected = total(scraped[name], rule=rule)
            assert number(text(browser, f'{row} td[data-col="{col}"]')) == expected, (rule, col)
        reasons = text(browser, f'{row} td[data-col="reasons"]')
        for reason in label_values(scraped["nudgeflow_triggers_suppressed_total"], "reason"):
            n = total(scraped["nudgeflow_triggers_suppressed_total"], rule=rule, reason=reason)
            if n:
                assert f"{reason} {int(n):,}" in reasons, (rule, reason)

    letters = scraped["nudgeflow_dead_letters_total"]
    for reason in label_values(letters, "reason"):
        shown = text(browser, f'#dead-letters tr[data-reason="{reason}"] td[data-col="count"]')
        assert number(shown) == total(letters, reason=reason)

    buckets = latency_buckets(scraped)
    assert max(buckets.values()) > 0, "the run's dispatches are timed from each line's read"
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        assert text(browser, f"#latency-{name}") == shown_ms(q, buckets)
    within = buckets[BUDGET_S] / buckets[float("inf")]
    assert text(browser, "#latency-within") == f"{within * 100:.1f}%"
    assert number(text(browser, "#latency-count")) == buckets[float("inf")]
    for rule in label_values(scraped["nudgeflow_event_to_dispatch_seconds_count"], "rule"):
        shown = text(browser, f'#latency-rules tr[data-rule="{rule}"] td[data-col="p99"]')
        assert shown == shown_ms(0.99, latency_buckets(scraped, rule))

    # Replay decides timers by event time, and no attribution ran: the page says so.
    timers = total(scraped["nudgeflow_timer_lag_seconds_count"])
    assert number(text(browser, "#timer-count")) == timers
    assert text(browser, "#experiments-empty") == "no outcomes yet"
    assert not browser.find_element(By.ID, "experiments").is_displayed()



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
        assert not browser.find_element(By.ID, "experiments-empty").is_displayed()
        assert text(browser, "#triggers-empty") == "no triggers yet"
        assert text(browser, "#latency-empty") == "no dispatch timed yet"
        check_variants(browser, scrape(base), rule)

        # The page follows the counters without a reload.
        outcomes.labels(rule, "one-hour", "converted").inc(9)
        m.record_event_outcome("applied", 300)
        row = f'#experiments tr[data-rule="{rule}"][data-variant="one-hour"]'
        cell = f'{row} td[data-col="converted"]'

        def shows_new_count(d: webdriver.Chrome) -> bool:
            try:
                return text(d, cell) == "20"
            except NoSuchElementException:  # between two renders
                return False

        WebDriverWait(browser, WAIT_S).until(shows_new_count)
        scraped = scrape(base)
        check_variants(browser, scraped, rule)
        assert number(text(browser, "#events-total")) == total(scraped["nudgeflow_events_total"])
        # Two polls apart with 300 events between them: a rate above zero.
        assert number(text(browser, "#events-per-s")) > 0
        browser.save_screenshot(str(artifacts / "dashboard-experiments.png"))
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]


def check_variants(browser: webdriver.Chrome, scraped: dict[str, dict[Labels, float]],
                   rule: str) -> None:
    control = conversion(scraped, rule, "holdout")
    for variant in label_values(scraped["nudgeflow_decided_total"], "variant"):
        row = f'#experiments tr[data-rule="{rule}"][data-variant="{variant}"]'
        decided = total(scraped["nudgeflow_decided_total"], rule=rule, variant=variant)
        assert number(text(browser, f'{row} td[data-col="decided"]')) == decided
        rate = conversion(scraped, rule, variant)
        assert text(browser, f'{row} td[data-col="conversion"]') == f"{rate * 100:.1f}%"
        lift = text(browser, f'{row} td[data-col="lift"]')
        if variant == "holdout":
            assert lift == ""
            assert "(control)" in text(browser, f'{row} td[data-col="variant"]')
        else:
            assert lift == f"{(rate / control - 1) * 100:+.1f}%"
        worth = total(scraped["nudgeflow_outcome_value_total"], rule=rule, variant=variant)
        assert number(text(browser, f'{row} td[data-col="value"]')) == pytest.approx(worth)

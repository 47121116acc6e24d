"""The dashboard of `nudgeflow run` on real Kafka, Redis and the reference dispatch API.

The flow runs as a user runs it (a subprocess); events stamped now cause
triggers at once, a quiet user's cart reminder is fired by the wall clock (timer
lag), and a message that is not an event is dead-lettered. Once /metrics shows
all of it, the page in Debian's headless chromium must show the same numbers.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from confluent_kafka import Producer
from dashboard_helpers import (
    Labels,
    Page,
    artifacts_dir,
    buckets,
    chromium,
    label_values,
    latency_buckets,
    number,
    open_and_wait,
    scrape,
    shown_ms,
    total,
)
from kafka_helpers import TopicFactory
from live_helpers import start_flow
from rule_texts import LIVE_RULES
from selenium import webdriver

from nudgeflow.bench.services import free_port
from nudgeflow.core.timeutil import now_ms

pytestmark = pytest.mark.integration

RULES = LIVE_RULES
USERS = 4
WAIT_S = 60  # the flow's start (bytewax, Kafka metadata) on a loaded CI machine


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    yield from chromium()


def _event(event_id: str, user: str, kind: str, ts: int, **fields: Any) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": user, "type": kind, "ts": ts, **fields})


def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None  # not listening yet


def test_the_live_flows_dashboard_shows_what_its_metrics_say(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    make_topic: TopicFactory,
    dispatch_api: tuple[str, Path],
    browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    api_url, _ = dispatch_api
    topic = make_topic(partitions=1, prefix="events")
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(RULES)
    for n in range(USERS):
        redis_client.hset(f"profile:dash-{n}", mapping={"segment": "regular",
                                                         "opt_in": "email"})
    port = free_port()
    flow = start_flow(
        kafka_bootstrap, topic, api_url, redis_url, "--rules", str(rules_file),
        env={"NUDGEFLOW_HEALTH_HOST": "127.0.0.1", "NUDGEFLOW_HEALTH_PORT": str(port)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: (r := _get(f"{base}/readyz")) is not None and r.status_code == 200,
               "the flow is ready")
        start = now_ms()
        messages = [b"not json"]
        for n in range(USERS):  # three views of one product: product_interest, at once
            user = f"dash-{n}"
            messages += [_event(f"{user}-v{k}", user, "page_view", start + k,
                                page_type="product", product_id="p1") for k in range(3)]
        # A cart left: the reminder is the wall clock's to fire (2 s + 1 s lateness).
        messages.append(_event("dash-0-cart", "dash-0", "add_to_cart", start + 10,
                               product_id="p1", price=12.5))
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 0})
        for raw in messages:
            key = orjson.loads(raw)["user_id"].encode() if raw.startswith(b"{") else b"x"
            producer.produce(topic, value=raw, key=key)
        assert producer.flush(30) == 0

        def everything_counted() -> bool:
            scraped = scrape(base)
            return (total(scraped["nudgeflow_dispatch_delivered_total"]) == USERS + 1
                    and total(scraped["nudgeflow_timer_lag_seconds_count"]) == 1
                    and total(scraped["nudgeflow_dead_letters_total"]) == 1)

        _until(everything_counted, "the flow counted every dispatch and the dead letter")
        open_and_wait(browser, f"{base}/dashboard", now_ms())
        page = Page(browser)
        scraped = scrape(base)
        browser.save_screenshot(str(artifacts_dir() / "dashboard-live.png"))
    finally:
        flow.terminate()
        _, errors = flow.communicate(timeout=30)
    assert flow.returncode == 0, errors.decode(errors="replace")[-2000:]
    check_page(page, scraped)


def check_page(page: Page, scraped: dict[str, dict[Labels, float]]) -> None:
    assert number(page["events-total"]) == total(scraped["nudgeflow_events_total"]) == 3 * USERS + 1
    assert page.rows("triggers", "rule") == {"cart_abandonment", "product_interest"}
    for rule in ("cart_abandonment", "product_interest"):
        for col, name in (("detected", "nudgeflow_triggers_detected_total"),
                          ("dispatched", "nudgeflow_triggers_dispatched_total"),
                          ("delivered", "nudgeflow_dispatch_delivered_total")):
            assert number(page.cell("triggers", col, rule=rule)) == total(scraped[name],
                                                                          rule=rule)
    assert number(page.cell("triggers", "delivered", rule="product_interest")) == USERS
    assert page.rows("dead-letters", "reason") == {"invalid"}
    assert number(page.cell("dead-letters", "count", reason="invalid")) == 1

    # Event-caused dispatches are timed from the source's read of the event.
    latency = latency_buckets(scraped)
    assert latency[float("inf")] == USERS
    for q, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        assert page[f"latency-{name}"] == shown_ms(q, latency)
    for rule in label_values(scraped["nudgeflow_event_to_dispatch_seconds_count"], "rule"):
        assert page.cell("latency-rules", "p50", rule=rule) == shown_ms(
            0.5, latency_buckets(scraped, rule))
    # The quiet user's reminder: from the deadline passing to the API's answer.
    timers = buckets(scraped, "nudgeflow_timer_lag_seconds")
    assert number(page["timer-count"]) == timers[float("inf")] == 1
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        assert page[f"timer-{name}"] == shown_ms(q, timers)
    assert page["experiments-empty"] == "no outcomes yet"

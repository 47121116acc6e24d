"""The tracker in Debian's real headless chromium, end to end.

browser (a shop page on its own origin) -> the collector (CORS, write key in the
query) -> real Kafka -> `nudgeflow run` -> the reference dispatch API, which
receives the trigger the shopper's dwell on a product page fired. Nothing here
downloads a browser or a driver: /usr/bin/chromium through /usr/bin/chromedriver
(scripts/test.sh installs both with apt when they are missing).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from browser_helpers import chromium, shop, wait_for
from kafka_helpers import TopicFactory, consume_all
from live_helpers import read_api_log, start_flow

from nudgeflow.collect.server import CollectorThread, build_collector
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.settings import CollectSettings, load_settings

pytestmark = pytest.mark.integration

KEY = "wk_browser"

RULES = """
version: 1
time: {lateness: 1s, session_gap: 30m}
rules:
  - name: engaged_reader
    kind: threshold
    match: {event: page_leave, where: {page_type: product}}
    field: dwell_ms
    above: 0
    scope: url
    cooldown: 24h
    channels: [email]
"""


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def test_browser_to_collector_to_kafka_to_the_live_flow_to_the_dispatch_api(
    browser: Any,
    dispatch_api: tuple[str, Path],
    make_topic: TopicFactory,
    kafka_bootstrap: str,
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
) -> None:
    topic = make_topic(prefix="browser")
    api_url, api_log = dispatch_api
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    settings = load_settings(brokers=kafka_bootstrap, topic=topic,
                             dead_letter_topic=f"{topic}.dlq", redis_url=redis_url)
    settings = settings.model_copy(update={"collect": CollectSettings(write_keys=[KEY])})
    app, writer = build_collector(settings)
    flow = start_flow(kafka_bootstrap, topic, api_url, redis_url, "--rules", str(rules),
                      env={"NUDGEFLOW_HEALTH_PORT": "0"},
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    user = f"shopper-{uuid.uuid4().hex[:8]}"
    try:
        with CollectorThread(app) as collector, shop(collector.url, KEY, user) as site:
            browser.get(f"{site}/product.html")
            browser.find_element("id", "add").click()
            wait_for(lambda: browser.execute_script("return nudgeflow.pending()") == 0, 10,
                  "the tracker to send the product page's events")
            browser.find_element("id", "home").click()  # pagehide: page_leave by beacon
            wait_for(lambda: browser.current_url.endswith("/home.html"), 10, "the home page")
            wait_for(lambda: browser.execute_script("return nudgeflow.pending()") == 0, 10,
                  "the tracker to send the home page's view")

            messages = consume_all(kafka_bootstrap, topic, expected=4, timeout_s=20)
            rows = wait_for(lambda: [r for r in read_api_log(api_log) if r["user_id"] == user],
                         60, "the dispatch API to receive the trigger")
    finally:
        writer.close()
        flow.terminate()
        output, _ = flow.communicate(timeout=30)

    events = [decode_event(m.value()) for m in messages]
    assert all(isinstance(e, Event) for e in events)
    kinds = [(e.type, e.page_type) for e in events if isinstance(e, Event)]
    assert kinds == [("page_view", "product"), ("add_to_cart", None),
                     ("page_leave", "product"), ("page_view", "home")]
    assert all(m.key() == user.encode() for m in messages)
    cart, leave = events[1], events[2]
    assert isinstance(cart, Event) and isinstance(leave, Event)
    assert (cart.product_id, cart.quantity, cart.price) == ("p1", 2, 19.9)
    assert leave.dwell_ms is not None and leave.dwell_ms > 0
    # identify went through the collector into the profile the flow and the API read
    assert redis_client.hget(f"profile:{user}", "opt_in") == b"email"
    [row] = rows
    assert row["trigger_type"] == "engaged_reader", output.decode(errors="replace")[-2000:]
    assert row["channel"] == "email"
    assert row["metadata"] == {"dwell_ms": leave.dwell_ms, "url": f"{site}/product.html"}

"""The tracker in Debian's real headless chromium, end to end.

browser (a shop page on its own origin) -> the collector (CORS, write key in the
query) -> real Kafka -> `nudgeflow run` -> the reference dispatch API, which
receives the trigger the shopper's dwell on a product page fired. Nothing here
downloads a browser or a driver: /usr/bin/chromium through /usr/bin/chromedriver
(scripts/test.sh installs both with apt when they are missing).
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from kafka_helpers import TopicFactory, consume_all
from live_helpers import read_api_log, start_flow

from nudgeflow.collect.server import CollectorThread, build_collector
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.settings import CollectSettings, load_settings

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOP = Path(__file__).parent.parent / "fixtures" / "shop"
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


class _ShopHandler(BaseHTTPRequestHandler):
    pages: ClassVar[dict[str, str]] = {}

    def do_GET(self) -> None:
        page = self.pages.get(self.path.split("?", 1)[0])
        if page is None:
            self.send_error(404)
            return
        body = page.encode()
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def shop_pages() -> Iterator[tuple[ThreadingHTTPServer, dict[str, str]]]:
    pages: dict[str, str] = {}
    handler = type("ShopHandler", (_ShopHandler,), {"pages": pages})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, pages
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromedriver are missing: apt-get install chromium "
                    "chromium-driver (scripts/test.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager (which downloads) is never started.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling for an outcome, not waiting it into being


def test_browser_to_collector_to_kafka_to_the_live_flow_to_the_dispatch_api(
    browser: Any,
    shop_pages: tuple[ThreadingHTTPServer, dict[str, str]],
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
        with CollectorThread(app) as collector:
            server, pages = shop_pages
            for name in ("product.html", "home.html"):
                pages[f"/{name}"] = (SHOP / name).read_text().replace(
                    "{{COLLECTOR}}", collector.url).replace("{{KEY}}", KEY).replace(
                    "{{USER}}", user)
            shop = f"http://127.0.0.1:{server.server_address[1]}"

            browser.get(f"{shop}/product.html")
            browser.find_element("id", "add").click()
            _wait(lambda: browser.execute_script("return nudgeflow.pending()") == 0, 10,
                  "the tracker to send the product page's events")
            browser.find_element("id", "home").click()  # pagehide: page_leave by beacon
            _wait(lambda: browser.current_url.endswith("/home.html"), 10, "the home page")
            _wait(lambda: browser.execute_script("return nudgeflow.pending()") == 0, 10,
                  "the tracker to send the home page's view")

            messages = consume_all(kafka_bootstrap, topic, expected=4, timeout_s=20)
            rows = _wait(lambda: [r for r in read_api_log(api_log) if r["user_id"] == user],
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
    assert row["metadata"] == {"dwell_ms": leave.dwell_ms, "url": f"{shop}/product.html"}

"""Debian's headless chromium for the tracker's tests, and a loopback shop serving its pages.

Nothing here downloads a browser or a driver: /usr/bin/chromium is driven through
/usr/bin/chromedriver with an explicit path, so Selenium Manager never starts
(scripts/test.sh installs both with apt when they are missing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOP = Path(__file__).parent / "fixtures" / "shop"

T = TypeVar("T")


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium session (a Selenium WebDriver)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("chromium and chromedriver are missing: apt-get install chromium "
                    "chromium-driver (scripts/test.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


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


@contextmanager
def shop(collector_url: str, write_key: str, user: str) -> Iterator[str]:
    """The pages of tests/fixtures/shop on a loopback origin of their own; yields its URL."""
    pages = {
        f"/{path.name}": path.read_text().replace("{{COLLECTOR}}", collector_url)
        .replace("{{KEY}}", write_key).replace("{{USER}}", user)
        for path in SHOP.glob("*.html")
    }
    handler = type("ShopHandler", (_ShopHandler,), {"pages": pages})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wait_for(condition: Callable[[], T], timeout_s: float, what: str) -> T:
    """The first truthy value of `condition`, polled; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling for an outcome, not waiting it into being

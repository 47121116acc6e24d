"""The tracker's dwell time in Debian's headless chromium: visible time only, sent on hide.

A product page is read, hidden behind another tab for a while, shown again and
left. The first hide ends the view with a `page_leave` (sent by beacon, since
a hidden page may never run again); showing the page again starts a new view;
leaving it sends a second `page_leave` whose dwell holds none of the hidden time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from browser_helpers import chromium, shop, wait_for

from nudgeflow.collect.app import CollectorApp
from nudgeflow.collect.server import CollectorThread
from nudgeflow.core.events import Event

KEY = "wk_dwell"
HIDDEN_S = 1.5


@dataclass
class Taken:
    events: list[Event] = field(default_factory=list)
    healthy: bool = True

    async def write(self, events: Sequence[Event],
                    dead_letters: Sequence[tuple[bytes, str]]) -> None:
        self.events.extend(events)

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.type == kind]


def test_dwell_counts_visible_time_and_a_hidden_page_has_left() -> None:
    sink = Taken()
    app = CollectorApp(sink, write_keys=[KEY])  # no profiles: the page's identify is refused
    with CollectorThread(app) as collector, shop(collector.url, KEY, "u-dwell") as site, \
            chromium() as browser:
        loaded = time.monotonic()
        browser.get(f"{site}/product.html")
        product_tab = browser.current_window_handle
        browser.switch_to.new_window("tab")  # the product page is hidden now
        hidden_at = time.monotonic()
        [first] = wait_for(lambda: sink.of("page_leave"), 10, "the page_leave of the hide")
        while time.monotonic() - hidden_at < HIDDEN_S:  # the shopper is away for a while
            time.sleep(0.05)
        browser.switch_to.window(product_tab)
        shown_at = time.monotonic()
        wait_for(lambda: len(sink.of("page_view")) == 2, 10, "the view of the shown page")
        browser.get(f"{site}/home.html")
        left_at = time.monotonic()
        wait_for(lambda: len(sink.of("page_leave")) == 2, 10, "the page_leave of leaving")
    assert first.page_type == "product" and first.product_id == "p1"
    assert first.dwell_ms is not None
    assert 0 < first.dwell_ms <= (hidden_at - loaded) * 1000
    second = sink.of("page_leave")[1]
    assert second.dwell_ms is not None
    assert second.dwell_ms <= (left_at - shown_at) * 1000 + 50  # the page's clock, ±50 ms
    assert second.dwell_ms < HIDDEN_S * 1000  # the hidden time is not in it
    # Each of the first three was awaited before the next could happen, so they
    # arrive in order. Leaving a page races its beacon against the next page's own
    # view: their arrival order is the network's, and only their event times,
    # which the flow orders each user's events by, say which came first.
    assert [(e.type, e.page_type) for e in sink.events[:3]] == [
        ("page_view", "product"), ("page_leave", "product"), ("page_view", "product"),
    ]
    [home] = [e for e in sink.events if e.type == "page_view" and e.page_type == "home"]
    assert len(sink.events) == 5
    assert second.ts <= home.ts

"""The tracker in Debian's headless chromium: a call the collector did not take is sent again.

The collector is the real HTTP server; what stands behind it is in memory and
refuses the first call with 503 (as when Kafka cannot take it), so this checks
the tracker alone: it waits `Retry-After`, sends the same events with the same
ids (which the flow's dedup makes harmless), and keeps their order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from browser_helpers import chromium, shop, wait_for

from nudgeflow.collect.app import CollectorApp, Limits
from nudgeflow.collect.producer import KafkaUnavailableError
from nudgeflow.collect.server import CollectorThread
from nudgeflow.core.events import Event

KEY = "wk_retry"


@dataclass
class RefusesFirstCall:
    refusals: int = 1
    calls: list[list[Event]] = field(default_factory=list)
    taken: list[Event] = field(default_factory=list)
    healthy: bool = True

    async def write(self, events: Sequence[Event],
                    dead_letters: Sequence[tuple[bytes, str]]) -> None:
        self.calls.append(list(events))
        if self.refusals:
            self.refusals -= 1
            msg = "Kafka did not take the events: Local: Message timed out"
            raise KafkaUnavailableError(msg)
        self.taken.extend(events)


def test_a_refused_call_is_sent_again_with_the_same_event_ids() -> None:
    sink = RefusesFirstCall()
    app = CollectorApp(sink, write_keys=[KEY], limits=Limits(retry_after_s=1))
    with CollectorThread(app) as collector, shop(collector.url, KEY, "u-retry") as site, \
            chromium() as browser:
        browser.get(f"{site}/home.html")
        browser.execute_script("nudgeflow.addToCart('p9', 1, 5)")
        wait_for(lambda: browser.execute_script("return nudgeflow.pending()") == 0, 15,
                 "the tracker to have every event taken")
    assert sink.refusals == 0 and len(sink.calls) >= 2  # a 503 was answered, then a retry
    refused = sink.calls[0]
    assert [e.type for e in refused][:1] == ["page_view"]
    assert [e.event_id for e in sink.taken][:len(refused)] == [e.event_id for e in refused]
    assert [e.type for e in sink.taken] == ["page_view", "add_to_cart"]
    assert len({e.event_id for e in sink.taken}) == 2
    assert all(e.user_id == "u-retry" for e in sink.taken)

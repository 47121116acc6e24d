"""The paced producer of the latency phase, and latencies read from the dispatch API's log.

The paced producer replays the generated stream at a fixed rate with every
event's `ts` set to the moment it is produced (keeping the tracker's style:
epoch ms stays an integer, an RFC 3339 string becomes one in UTC). A trigger
that fires while its event is applied (`IMMEDIATE_RULES`) has `fired_at` = that
`ts`, so its latency is the API's `received_at` minus `fired_at`: produce to
answer, everything included (producer, broker, consumer, decode, Redis,
detection, policies, HTTP). A cart-abandonment trigger fires from a timer: its
deadline passed (by the wall clock) when the user's watermark passed `fired_at`,
that is at `fired_at + lateness`, and its lag is `received_at` minus that.

When the stream runs out it starts again with user ids prefixed `c1-`, `c2-`…,
whose profiles the harness writes too, so no event is ever a duplicate.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import orjson
from confluent_kafka import Producer

from nudgeflow.app.samples import SampleLine
from nudgeflow.core.timeutil import format_ms

__all__ = [
    "IMMEDIATE_RULES",
    "TIMER_RULES",
    "PacedStream",
    "Segment",
    "event_latencies",
    "pace",
    "timer_lags",
]

# Rules that fire while the event is applied, with fired_at = the event's ts.
IMMEDIATE_RULES: Final = frozenset({
    "product_interest", "product_retargeting", "engaged_reader", "pricing_revisit",
    "new_visitor_welcome",
})
# Rules whose firing is a timer on a deadline: fired_at = the deadline.
TIMER_RULES: Final = frozenset({"cart_abandonment"})


@dataclass(frozen=True)
class Segment:
    """One paced run: `sent` events produced between the wall times `start_ms` and `end_ms`."""

    label: str
    rate_eps: float
    start_ms: int
    end_ms: int
    sent: int


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class PacedStream:
    """The lines, over and over, each time under a new user-id prefix; ts rewritten to now."""

    def __init__(self, lines: Sequence[SampleLine]) -> None:
        if not lines:
            msg = "no lines to pace"
            raise ValueError(msg)
        self._lines = lines
        self._position = 0
        self._cycle = 0

    @staticmethod
    def prefix(cycle: int) -> str:
        return f"c{cycle}-" if cycle else ""

    @staticmethod
    def cycles_for(lines: int, events: int) -> int:
        return max(1, -(-events // lines))

    def next(self, now_ms: int) -> tuple[bytes, bytes]:
        """(key, value) of the next message, with `ts` = `now_ms`."""
        line = self._lines[self._position]
        self._position += 1
        if self._position == len(self._lines):
            self._position = 0
            self._cycle += 1
        prefix = self.prefix(self._cycle)
        key = (prefix + line.user_id).encode()
        if line.kind == "invalid":
            return key, line.data
        data = orjson.loads(line.data)
        data["ts"] = now_ms if isinstance(data.get("ts"), int) else format_ms(now_ms)
        if prefix:
            data["user_id"] = prefix + data["user_id"]
        return key, orjson.dumps(data)


def pace(producer: Producer, topic: str, stream: PacedStream, *, rate_eps: float,
         seconds: float, label: str) -> Segment:
    """Produce at `rate_eps` for `seconds`, in ticks of about a millisecond."""
    start = time.perf_counter()
    start_ms = _wall_ms()
    sent = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
        due = int(elapsed * rate_eps)
        while sent < due:
            key, value = stream.next(_wall_ms())
            while True:
                try:
                    producer.produce(topic, value=value, key=key)
                    break
                except BufferError:
                    producer.poll(0.001)
            sent += 1
        producer.poll(0)
        time.sleep(0.0005)
    producer.flush(10)
    return Segment(label, rate_eps, start_ms, _wall_ms(), sent)


def _ms(text: str) -> float:
    return datetime.fromisoformat(text).timestamp() * 1000.0


def event_latencies(rows: Iterable[dict[str, Any]], segment: Segment) -> list[float]:
    """Produce-to-answer ms of the immediate triggers of events produced during `segment`."""
    out = []
    for row in rows:
        if row.get("trigger_type") not in IMMEDIATE_RULES:
            continue
        fired = _ms(row["fired_at"])
        if segment.start_ms <= fired <= segment.end_ms:
            out.append(_ms(row["received_at"]) - fired)
    return out


def timer_lags(rows: Iterable[dict[str, Any]], segment: Segment, *, timeout_ms: int,
               lateness_ms: int) -> list[float]:
    """Deadline-passed-to-answer ms of cart abandonments whose cart was filled in `segment`."""
    out = []
    for row in rows:
        if row.get("trigger_type") not in TIMER_RULES:
            continue
        fired = _ms(row["fired_at"])
        if segment.start_ms <= fired - timeout_ms <= segment.end_ms:
            out.append(_ms(row["received_at"]) - (fired + lateness_ms))
    return out

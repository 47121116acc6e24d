"""Sessions derived from event time, with close timers (TRIGGERS.md "Sessions").

A session grows with each applied event whose `ts` is under `gap` after the
session's latest `ts`; an event `gap` or more after it starts a new one. Events
arriving out of order inside the gap join the current session. A session closes
when the watermark passes its latest `ts` + `gap`; the closed session is then
handed to the session rules and forgotten, so state is bounded by the sessions
still open (at most a couple per user).

We do not use bytewax's `SessionWindower`: its state is never freed (#577).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Session:
    """One session of one user, as much of it as the session rules need."""

    index: int
    start_ts: int
    latest_ts: int
    events: int = 0
    # bit i set: session matcher i (declared by the rules) was hit by some event
    matched: int = 0
    # product ids viewed, first view first (browse_abandonment's metadata); a tuple, as
    # sessions view few products: no spare slots, and no list at all while there is none
    products: tuple[str, ...] = ()

    def close_at(self, gap_ms: int) -> int:
        return self.latest_ts + gap_ms

    def to_data(self) -> tuple[int, int, int, int, int, list[str]]:
        return (self.index, self.start_ts, self.latest_ts, self.events, self.matched,
                list(self.products))

    @classmethod
    def from_data(cls, data: tuple[int, int, int, int, int, list[str]]) -> Session:
        index, start, latest, events, matched, products = data
        return cls(index, start, latest, events, matched, tuple(sys.intern(p) for p in products))


class SessionTracker:
    """The open sessions of one user: the current one and those waiting for their close."""

    __slots__ = ("_closing", "current", "gap_ms", "next_index")

    def __init__(self, gap_ms: int) -> None:
        self.gap_ms = gap_ms
        self.current: Session | None = None
        # Sessions ended but not yet closed: None while there are none (most of the time).
        self._closing: dict[int, Session] | None = None
        self.next_index = 0

    def place(self, ts: int) -> tuple[Session, Session | None]:
        """The session an applied event at `ts` belongs to, and the session it ended, if any."""
        current = self.current
        if current is not None and ts - current.latest_ts < self.gap_ms:
            current.latest_ts = max(current.latest_ts, ts)
            return current, None
        ended = current
        if ended is not None:
            if self._closing is None:
                self._closing = {}
            self._closing[ended.index] = ended
        session = Session(index=self.next_index, start_ts=ts, latest_ts=ts)
        self.next_index += 1
        self.current = session
        return session, ended

    def close(self, index: int) -> Session | None:
        """Forget the session `index` and return it (its close timer was decided)."""
        closing = self._closing
        if closing is not None:
            session = closing.pop(index, None)
            if not closing:
                self._closing = None
            if session is not None:
                return session
        if self.current is not None and self.current.index == index:
            session, self.current = self.current, None
            return session
        return None

    @property
    def open_sessions(self) -> int:
        return (0 if self._closing is None else len(self._closing)) + (self.current is not None)

    def to_data(self) -> tuple[Any, list[Any], int]:
        current = None if self.current is None else self.current.to_data()
        closing = () if self._closing is None else self._closing.values()
        return current, [s.to_data() for s in closing], self.next_index

    @classmethod
    def from_data(cls, gap_ms: int, data: tuple[Any, list[Any], int]) -> SessionTracker:
        tracker = cls(gap_ms)
        current, closing, tracker.next_index = data
        tracker.current = None if current is None else Session.from_data(current)
        if closing:
            tracker._closing = {}
            for item in closing:
                session = Session.from_data(item)
                tracker._closing[session.index] = session
        return tracker

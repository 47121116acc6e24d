"""The bytewax wrapper's live clock: notify times, wall-clock timers, snapshots, state freeing.

The wrapper logic is driven directly with an injected wall clock, so these
tests control time exactly instead of waiting for it.
"""

from __future__ import annotations

import pickle

import orjson

from nudgeflow.core.envelope import DeadLetter, Envelope, Origin
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import Profile
from nudgeflow.core.rules import parse_rules
from nudgeflow.core.timeutil import datetime_to_ms
from nudgeflow.operators.detect import Emitted, LiveClock, _DetectLogic
from nudgeflow.operators.detector import Detector

RULES = """
time: {lateness: 30s, dedup_retention: 1d}
rules:
  - name: cart_abandonment
    kind: absence
    after: {event: add_to_cart}
    timeout: 15m
    cancel_on: [{event: purchase}, {cart: empty}]
    metadata: cart
    channels: [email]
"""
MIN = 60_000
PROFILE = Profile(segment="regular", opt_in=("email",))


class FakeWall:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def envelope(event_id: str, kind: str, ts: int, **fields: object) -> Envelope:
    raw = orjson.dumps({"event_id": event_id, "user_id": "u1", "type": kind, "ts": ts, **fields})
    event = decode_event(raw)
    assert isinstance(event, Event)
    return Envelope(event, raw, Origin(topic="events", partition=0, offset=1), PROFILE)


def live_logic(wall: FakeWall) -> _DetectLogic:
    return _DetectLogic(Detector(parse_rules(RULES)), None, LiveClock(wall), end_bound=None)


def decisions(outputs: object) -> list[Emitted]:
    return [o for o in outputs if isinstance(o, Emitted)]  # type: ignore[attr-defined]


def test_a_quiet_users_timer_is_due_when_the_wall_clock_carries_the_watermark_past_d() -> None:
    wall = FakeWall(now=5_000_000)
    logic = live_logic(wall)
    event_ts = 1_000_000
    out, discard = logic.on_batch([envelope("a", "add_to_cart", event_ts, product_id="p1")])
    assert decisions(out) == [] and not discard

    # D = ts + 15 min; decided once max_ts - 30 s > D, i.e. 15 min 30 s + 1 ms of quiet.
    notify = logic.notify_at()
    assert notify is not None
    assert datetime_to_ms(notify) == wall.now + 15 * MIN + 30_000 + 1

    wall.now += 15 * MIN + 30_000  # watermark == D: not yet
    out, _ = logic.on_notify()
    assert decisions(out) == []

    wall.now += 1
    out, _ = logic.on_notify()
    fired = decisions(out)
    assert [e.decision.trigger.trigger_type for e in fired] == ["cart_abandonment"]
    assert fired[0].decision.trigger.fired_at_ms == event_ts + 15 * MIN
    assert fired[0].decision.trigger.detected_at_ms == wall.now


def test_a_purchase_before_the_wall_clock_deadline_cancels() -> None:
    wall = FakeWall(now=0)
    logic = live_logic(wall)
    logic.on_batch([envelope("a", "add_to_cart", 0, product_id="p1")])
    wall.now += 10 * MIN
    logic.on_batch([envelope("b", "purchase", 10 * MIN)])
    assert logic.notify_at() is not None  # no timer left: wakes only to free the state
    wall.now += 60 * MIN
    out, _ = logic.on_notify()
    assert decisions(out) == []


def test_late_events_come_out_as_dead_letters_with_their_bytes() -> None:
    logic = live_logic(FakeWall(now=0))
    logic.on_batch([envelope("a", "page_view", 10 * MIN)])
    late = envelope("b", "page_view", 0)
    out, _ = logic.on_batch([late])
    assert out == [DeadLetter(late.raw, late.origin, "late", None)]


def test_pending_timers_survive_a_snapshot_and_restore() -> None:
    wall = FakeWall(now=0)
    logic = live_logic(wall)
    logic.on_batch([envelope("a", "add_to_cart", 0, product_id="p1")])
    state, last_arrival = pickle.loads(logic.snapshot())
    restored = _DetectLogic(logic.detector, state, LiveClock(wall), end_bound=None)
    restored.last_arrival = last_arrival
    wall.now = 16 * MIN
    out, _ = restored.on_notify()
    assert [e.decision.trigger.trigger_type for e in decisions(out)] == ["cart_abandonment"]


def test_state_is_freed_once_nothing_can_matter_any_more() -> None:
    wall = FakeWall(now=0)
    logic = live_logic(wall)
    logic.on_batch([envelope("a", "page_view", 0)])
    expiry = logic.notify_at()
    assert expiry is not None
    wall.now = datetime_to_ms(expiry)
    _, discard = logic.on_notify()
    assert discard


def test_replay_mode_never_asks_for_the_wall_clock() -> None:
    logic = _DetectLogic(Detector(parse_rules(RULES)), None, None, end_bound=20 * MIN)
    logic.on_batch([envelope("a", "add_to_cart", 0, product_id="p1")])
    assert logic.notify_at() is None
    out, _ = logic.on_eof()
    fired = decisions(out)
    assert [e.decision.trigger.fired_at_ms for e in fired] == [15 * MIN]
    assert fired[0].decision.trigger.detected_at_ms == 20 * MIN

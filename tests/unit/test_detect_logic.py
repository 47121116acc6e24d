"""The bytewax wrapper's live clock: notify times, stream-clock timers, snapshots, state freeing.

The wrapper logic is driven directly with an injected wall clock, and every
envelope is stamped by a `StreamClock` as the source partition would stamp it,
so these tests control time exactly instead of waiting for it.
"""

from __future__ import annotations

import orjson
from rule_texts import CART_ABANDONMENT, rules_yaml

from nudgeflow.core.envelope import DeadLetter, Envelope, Origin
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import Profile
from nudgeflow.core.rules import parse_rules
from nudgeflow.core.stream_clock import PartitionClocks, StreamClock
from nudgeflow.core.timeutil import datetime_to_ms
from nudgeflow.operators import shard_snapshot
from nudgeflow.operators.detect import DEFAULT_SHARDS, Emitted, LiveClock, UserSlot, _DetectLogic
from nudgeflow.operators.detector import Detector

RULES = rules_yaml(CART_ABANDONMENT)
MIN = 60_000
PROFILE = Profile(segment="regular", opt_in=("email",))


class FakeWall:
    """The wall clock, and the stream clock of partition 0 that reads with it."""

    def __init__(self, now: int) -> None:
        self.now = now
        self.stream = StreamClock()
        self.partitions = PartitionClocks()

    def __call__(self) -> int:
        return self.now

    def read(self, ts: int) -> None:
        """Partition 0 reads another user's event at `ts` now (it moves the stream clock)."""
        self.stream.read(ts, self.now)
        assert self.stream.reading is not None
        self.partitions.publish("0-events", self.stream.reading)


def envelope(
    wall: FakeWall | None, event_id: str, kind: str, ts: int, **fields: object
) -> Envelope:
    """An event of u1 as partition 0 reads it now: stamped with the stream clock (live)."""
    raw = orjson.dumps({"event_id": event_id, "user_id": "u1", "type": kind, "ts": ts, **fields})
    event = decode_event(raw)
    assert isinstance(event, Event)
    stamp = None
    if wall is not None:
        stamp = wall.stream.read(ts, wall.now)
        assert wall.stream.reading is not None
        wall.partitions.publish("0-events", wall.stream.reading)
    return Envelope(
        event, raw, Origin(topic="events", partition=0, offset=1), PROFILE,
        arrived_ms=None if wall is None else wall.now, stream=stamp, key=b"u1",
    )


def live_logic(wall: FakeWall) -> _DetectLogic:
    # Not parking: these tests read the shard's wake-ups as its timers' alone (a parking
    # shard also wakes for its looks; tests/unit/test_parking.py).
    return _DetectLogic(
        Detector(parse_rules(RULES)), LiveClock(wall, wall.partitions), end_bound=None,
        park_after_ms=0,
    )


def decisions(outputs: object) -> list[Emitted]:
    return [o for o in outputs if isinstance(o, Emitted)]  # type: ignore[attr-defined]


def test_a_quiet_users_timer_is_due_when_the_wall_clock_carries_the_watermark_past_d() -> None:
    wall = FakeWall(now=5_000_000)
    logic = live_logic(wall)
    event_ts = 1_000_000
    out, discard = logic.on_batch([envelope(wall, "a", "add_to_cart", event_ts, product_id="p1")])
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
    logic.on_batch([envelope(wall, "a", "add_to_cart", 0, product_id="p1")])
    wall.now += 10 * MIN
    logic.on_batch([envelope(wall, "b", "purchase", 10 * MIN)])
    assert logic.notify_at() is not None  # no timer left: wakes only to free the state
    wall.now += 60 * MIN
    out, _ = logic.on_notify()
    assert decisions(out) == []


def test_late_events_come_out_as_dead_letters_with_their_bytes() -> None:
    wall = FakeWall(now=10 * MIN)
    logic = live_logic(wall)
    logic.on_batch([envelope(wall, "a", "page_view", 10 * MIN)])
    late = envelope(wall, "b", "page_view", 0)
    out, _ = logic.on_batch([late])
    assert out == [DeadLetter(late.raw, late.origin, "late", b"u1")]


def test_pending_timers_survive_a_snapshot_and_restore() -> None:
    wall = FakeWall(now=0)
    logic = live_logic(wall)
    logic.on_batch([envelope(wall, "a", "add_to_cart", 0, product_id="p1")])
    users = shard_snapshot.decode(logic.detector, logic.snapshot(), DEFAULT_SHARDS)
    # A new process: no partition has been read yet, the user's own stamp carries time.
    restored = _DetectLogic(logic.detector, LiveClock(wall), end_bound=None,
                            users=[UserSlot(*user) for user in users])
    wall.now = 16 * MIN
    out, _ = restored.on_notify()
    assert [e.decision.trigger.trigger_type for e in decisions(out)] == ["cart_abandonment"]


def test_state_is_freed_once_nothing_can_matter_any_more() -> None:
    wall = FakeWall(now=0)
    logic = live_logic(wall)
    logic.on_batch([envelope(wall, "a", "page_view", 0)])
    expiry = logic.notify_at()
    assert expiry is not None
    wall.now = datetime_to_ms(expiry)
    _, discard = logic.on_notify()
    assert discard


def test_replay_mode_never_asks_for_the_wall_clock() -> None:
    logic = _DetectLogic(Detector(parse_rules(RULES)), None, end_bound=20 * MIN)
    logic.on_batch([envelope(None, "a", "add_to_cart", 0, product_id="p1")])
    assert logic.notify_at() is None
    out, _ = logic.on_eof()
    fired = decisions(out)
    assert [e.decision.trigger.fired_at_ms for e in fired] == [15 * MIN]
    assert fired[0].decision.trigger.detected_at_ms == 20 * MIN


def test_a_backlog_read_fast_moves_a_quiet_users_watermark_at_the_streams_pace() -> None:
    """Catching up on past events: the partition's clock, not the wall clock, is due time."""
    wall = FakeWall(now=100 * MIN)  # the events are an hour and more in the past
    logic = live_logic(wall)
    logic.on_batch([envelope(wall, "a", "add_to_cart", 0, product_id="p1")])
    wall.now += 100
    wall.read(10 * MIN)  # other users' events, read 100 ms later, 10 minutes on
    notify = logic.notify_at()
    assert notify is not None
    # The backlog moves S faster than real time: look again soon, not in 5 minutes.
    assert datetime_to_ms(notify) <= wall.now + LiveClock.CATCH_UP_POLL_MS
    out, _ = logic.on_notify()
    assert decisions(out) == []  # watermark 10 min - 30 s: D = 15 min is not passed

    wall.now += 100
    wall.read(15 * MIN + 30_000)  # watermark == D: not yet
    out, _ = logic.on_notify()
    assert decisions(out) == []
    wall.now += 100
    wall.read(15 * MIN + 30_001)
    out, _ = logic.on_notify()
    fired = decisions(out)
    assert [e.decision.trigger.fired_at_ms for e in fired] == [15 * MIN]
    assert fired[0].decision.trigger.detected_at_ms == wall.now


def test_an_event_stamped_in_the_future_moves_the_stream_clock_no_further_than_now() -> None:
    wall = FakeWall(now=0)
    logic = live_logic(wall)
    logic.on_batch([envelope(wall, "a", "add_to_cart", 0, product_id="p1")])
    wall.now += 1_000
    wall.read(10 * 24 * 60 * MIN)  # another user's device is ten days ahead
    out, _ = logic.on_notify()
    assert decisions(out) == []
    notify = logic.notify_at()
    assert notify is not None
    assert datetime_to_ms(notify) == 15 * MIN + 30_001  # the wall clock's pace from `now`


"""Parking: a quiet user held as their snapshot behaves exactly as one held as objects.

The detect step's shards are driven directly over a generated shop's stream,
once parking every user it can (`park_after_ms=1`: at every look, every user
unused since the previous one) and once never parking, with the same injected
wall clock and the stream clocks the source partition stamps. Everything they
emit, and what they would store, must be the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest
from rule_texts import CART_ABANDONMENT, rules_yaml
from shard_helpers import Partition, fired

from nudgeflow.app.samples import SampleSpec, generate_lines
from nudgeflow.core.envelope import Envelope, Origin
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import Profile
from nudgeflow.core.rules import load_rules, parse_rules
from nudgeflow.core.settings import DEFAULT_RULES
from nudgeflow.core.stream_clock import ClockReading, PartitionClocks, StreamClock
from nudgeflow.operators import shard_snapshot
from nudgeflow.operators.detect import LiveClock, _DetectLogic, shard_key
from nudgeflow.operators.detector import Detector

MIN = 60_000
SHARDS = 4
PROFILE = Profile(segment="regular", opt_in=("email", "push"))


@dataclass
class Wall:
    now: int = 0

    def __call__(self) -> int:
        return self.now


@dataclass
class Shards:
    """A flow's detect step in miniature: one logic per shard, fed as bytewax feeds them."""

    detector: Detector
    park_after_ms: int
    live: bool
    end_bound: int
    wall: Wall = field(default_factory=Wall)
    partitions: PartitionClocks = field(default_factory=PartitionClocks)
    logics: dict[str, _DetectLogic] = field(default_factory=dict)
    out: list[str] = field(default_factory=list)
    most_parked: int = 0

    def logic(self, key: str) -> _DetectLogic:
        if key not in self.logics:
            clock = LiveClock(self.wall, self.partitions) if self.live else None
            end_bound = None if self.live else self.end_bound
            self.logics[key] = _DetectLogic(self.detector, clock, end_bound, shards=SHARDS,
                                            snapshots=True, park_after_ms=self.park_after_ms)
        return self.logics[key]

    def batch(self, key: str, envelopes: list[Envelope]) -> None:
        out, _ = self.logic(key).on_batch(envelopes)
        self.emit(out)

    def notify_all(self) -> None:
        for logic in self.logics.values():
            self.emit(logic.on_notify()[0])

    def eof(self) -> None:
        for logic in self.logics.values():
            self.emit(logic.on_eof()[0])

    def emit(self, out: object) -> None:
        self.out.extend(repr(o) for o in out)  # type: ignore[attr-defined]
        parked = sum(len(logic.parked) for logic in self.logics.values())
        self.most_parked = max(self.most_parked, parked)

    def stored(self) -> dict[str, object]:
        """Every user as the next epoch's snapshot would store them, read back."""
        users = {}
        for logic in self.logics.values():
            for user, wall, source in shard_snapshot.decode(self.detector, logic.snapshot(),
                                                            SHARDS):
                users[user.user_id] = (repr(user.timers.pending()), user.admission.to_data(),
                                       user.policy.to_data(), wall, source)
        return users


def stream(users: int, hours: float) -> Iterator[tuple[int, Envelope, ClockReading]]:
    """A generated shop's events as its one partition stamps them, with its clock after each."""
    clock = StreamClock()
    for offset, line in enumerate(generate_lines(SampleSpec(users=users, hours=hours, seed=11))):
        event = decode_event(line.data)
        if not isinstance(event, Event):
            continue
        stamp = clock.read(event.ts, line.arrival_ms)
        assert clock.reading is not None
        origin = Origin(topic="events", partition=0, offset=offset)
        yield line.arrival_ms, Envelope(event, line.data, origin, PROFILE,
                                        arrived_ms=line.arrival_ms, stream=stamp,
                                        key=event.user_id.encode()), replace(clock.reading)


def run(detector: Detector, park_after_ms: int, *, live: bool) -> Shards:
    lines = list(stream(users=60, hours=3.0))
    # replay: the input's end, a day past the last event (every timer is decided by then)
    end_bound = max(envelope.event.ts for _, envelope, _ in lines) + 24 * 60 * MIN
    shards = Shards(detector, park_after_ms, live, end_bound)
    key = shard_key(SHARDS)
    pending: dict[str, list[Envelope]] = {}
    for index, (arrival, envelope, reading) in enumerate(lines):
        shards.wall.now = arrival
        shards.partitions.publish("0-events", reading)
        pending.setdefault(key(envelope), []).append(envelope)
        if index % 7 == 6:  # a batch: each shard's share, in order
            for shard, envelopes in sorted(pending.items()):
                shards.batch(shard, envelopes)
            pending.clear()
            if live:
                shards.notify_all()
    for shard, envelopes in sorted(pending.items()):
        shards.batch(shard, envelopes)
    if live:  # the wall clock runs on past the stream's end: every timer comes due
        for _ in range(40):
            shards.wall.now += 2 * MIN
            shards.notify_all()
    shards.eof()
    return shards


@pytest.mark.parametrize("live", [True, False], ids=["live", "replay"])
def test_parked_users_emit_and_store_exactly_what_unparked_users_do(live: bool) -> None:
    detector = Detector(load_rules(DEFAULT_RULES))
    held = run(detector, park_after_ms=0, live=live)
    parked = run(detector, park_after_ms=1, live=live)
    assert held.most_parked == 0
    assert parked.most_parked > 10  # users were parked, and brought back, all along
    assert any("Emitted" in line for line in held.out)
    # Each output carries its place in the output (`order`), which the sinks sort by;
    # unparked users come back at the end of their shard's dict, so the end of input
    # meets them in another order.
    assert sorted(parked.out) == sorted(held.out)
    assert parked.stored() == held.stored()


def cart_shard(partition: Partition, park_after_ms: int) -> _DetectLogic:
    return _DetectLogic(Detector(parse_rules(rules_yaml(CART_ABANDONMENT))),
                        LiveClock(partition, partition.partitions), None, shards=SHARDS,
                        park_after_ms=park_after_ms)


def test_a_user_is_parked_after_one_to_two_quiet_periods_and_their_timer_still_fires() -> None:
    partition = Partition(now=0)
    logic = cart_shard(partition, park_after_ms=MIN)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p")])
    for minute in (1, 2):
        assert "alice" in logic.users  # used since the last look, or no look yet
        partition.now = minute * MIN
        logic.on_batch([partition.read("bob", f"b{minute}", "page_view", partition.now)])
    assert "alice" in logic.parked and "alice" not in logic.users
    assert "bob" in logic.users
    partition.now = 15 * MIN + 30_001  # alice's watermark passes her 15 minutes
    out, _ = logic.on_notify()
    assert fired(out) == [("alice", 15 * MIN)]
    assert "alice" in logic.users and "alice" not in logic.parked


def test_parking_off_holds_every_user_as_objects() -> None:
    partition = Partition(now=0)
    logic = cart_shard(partition, park_after_ms=0)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p")])
    for minute in range(1, 10):
        partition.now = minute * MIN
        logic.on_batch([partition.read("bob", f"b{minute}", "page_view", partition.now)])
    assert "alice" in logic.users and not logic.parked


def test_a_parked_users_timer_fires_when_a_backlog_moves_their_partitions_clock() -> None:
    partition = Partition(now=100 * MIN)  # a backlog: the events are far in the past
    logic = cart_shard(partition, park_after_ms=1)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p")])
    for step in (1, 2):  # two looks, a few ms apart: alice is parked
        partition.now += 2
        logic.on_batch([partition.read("carol", f"c{step}", "page_view", step * 1000)])
    assert "alice" in logic.parked
    # Carol's events move the partition's clock past alice's 15 minutes within ms of
    # wall time: her timer is due by the stream, long before the wall clock says so.
    partition.now += 2
    out, _ = logic.on_batch([partition.read("carol", "c3", "page_view", 15 * MIN + 30_001)])
    assert fired(out) == [("alice", 15 * MIN)]


def test_a_shard_no_event_activates_wakes_itself_to_park_its_users() -> None:
    partition = Partition(now=0)
    logic = cart_shard(partition, park_after_ms=MIN)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p")])
    for minute in (1, 2):  # the shard's looks, though no event comes
        wake = logic.notify_at()
        assert wake is not None and wake.timestamp() * 1000 == minute * MIN
        partition.now = minute * MIN
        logic.on_notify()
    assert "alice" in logic.parked
    wake = logic.notify_at()  # nobody left to park: only alice's own timer wakes the shard
    assert wake is not None and wake.timestamp() * 1000 == 15 * MIN + 30_001


def test_parked_users_are_freed_once_nothing_can_matter_and_the_shard_is_discarded() -> None:
    partition = Partition(now=0)
    logic = cart_shard(partition, park_after_ms=MIN)
    logic.on_batch([partition.read("alice", "a1", "page_view", 0)])
    discard = was_parked = False
    for _ in range(100):  # the shard's own wake-ups: its looks, then alice's horizon
        wake = logic.notify_at()
        if wake is None:
            break
        partition.now = int(wake.timestamp() * 1000)
        _, discard = logic.on_notify()
        was_parked = was_parked or "alice" in logic.parked
        if discard:
            break
    assert was_parked
    assert discard and not logic.users and not logic.parked

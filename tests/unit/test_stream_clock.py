"""The stream clock `S` (TRIGGERS.md "Time"), and the source that stamps events with it."""

from __future__ import annotations

import orjson
from bytewax.testing import TestingSource

from nudgeflow.core.envelope import DeadLetter, Envelope, Origin, open_envelope
from nudgeflow.core.stream_clock import (
    READING_MS,
    PartitionClocks,
    StreamClock,
    StreamStamp,
)
from nudgeflow.sources.stamped import StampedSource

MIN = 60_000


def test_replay_clock_is_the_largest_valid_ts_read_so_far() -> None:
    clock = StreamClock()
    assert clock.read(None, None) == StreamStamp(None, None)  # an invalid line first
    assert clock.read(10 * MIN, None) == StreamStamp(None, 10 * MIN)
    assert clock.read(5 * MIN, None) == StreamStamp(10 * MIN, 10 * MIN)  # never goes back
    assert clock.read(None, None) == StreamStamp(10 * MIN, 10 * MIN)
    assert clock.read(12 * MIN, None) == StreamStamp(10 * MIN, 12 * MIN)


def test_live_clock_moves_with_the_wall_while_quiet_and_never_ahead_of_it() -> None:
    clock = StreamClock()
    wall = 1_000 * MIN
    assert clock.read(100 * MIN, wall).after == 100 * MIN  # a past event: S is its ts
    assert clock.now(wall + 5 * MIN) == 105 * MIN  # quiet: S moves on with the wall
    # An event behind the moved-on clock leaves it where the wall took it.
    assert clock.read(101 * MIN, wall + 5 * MIN) == StreamStamp(105 * MIN, 105 * MIN)
    # An event stamped in the future: S = min(now, ...).
    now = wall + 6 * MIN
    assert clock.read(now + 60 * MIN, now).after == now
    assert clock.now(now + 1) == now + 1


def test_a_partition_whose_clock_outruns_the_wall_is_catching_up() -> None:
    clock = StreamClock()
    wall = 1_000 * MIN
    clock.read(0, wall)
    clock.read(10 * MIN, wall + 100)  # a backlog: ten minutes of events in 100 ms
    reading = clock.reading
    assert reading is not None and reading.catching_up(wall + 200)
    assert not reading.catching_up(wall + 100 + READING_MS)  # read it all

    # Events read as they happen, however far behind the wall clock they are stamped.
    lagging = StreamClock()
    for second in range(5):
        lagging.read(wall - 3 * MIN + second * 1_000, wall + second * 1_000)
        assert lagging.reading is not None
        assert not lagging.reading.catching_up(wall + second * 1_000 + 10)


def _line(event_id: str, user: str, ts: int) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": user, "type": "page_view", "ts": ts})


def _open(item: tuple[int, bytes], _now: int | None) -> Envelope | DeadLetter:
    return open_envelope(item[1], Origin(line=item[0]))


def test_the_source_stamps_every_event_in_read_order_and_resumes_its_clock() -> None:
    items = [(1, _line("a", "u1", 10 * MIN)), (2, b"{not json"), (3, _line("b", "u2", 5 * MIN)),
             (4, _line("c", "u1", 20 * MIN))]
    registry = PartitionClocks()
    source = StampedSource(TestingSource(items, batch_size=2), _open, registry=registry)
    (part_name,) = source.list_parts()
    part = source.build_part("lines", part_name, None)
    first = part.next_batch()
    assert isinstance(first[0], Envelope) and first[0].stream == StreamStamp(None, 10 * MIN)
    assert isinstance(first[1], DeadLetter)  # not an event: no stamp, no move
    snapshot = part.snapshot()
    reading = registry.get(part_name)
    assert reading is not None and reading.at(None) == 10 * MIN

    # A resumed partition goes on with the clock of its snapshot, not from nothing.
    resumed = source.build_part("lines", part_name, snapshot)
    rest = resumed.next_batch()
    stamps = [x.stream for x in rest if isinstance(x, Envelope)]
    assert stamps == [StreamStamp(10 * MIN, 10 * MIN), StreamStamp(10 * MIN, 20 * MIN)]


def test_a_snapshot_written_before_the_clock_was_kept_still_resumes() -> None:
    items = [(1, _line("a", "u1", 10 * MIN)), (2, _line("b", "u1", 11 * MIN))]
    source = StampedSource(TestingSource(items), _open)
    part = source.build_part("lines", source.list_parts()[0], 1)  # the bare inner state
    (item,) = part.next_batch()
    assert isinstance(item, Envelope) and item.event.event_id == "b"
    assert item.stream == StreamStamp(None, 11 * MIN)

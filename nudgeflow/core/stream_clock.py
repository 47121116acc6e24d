"""The stream clock `S` (TRIGGERS.md "Time"): how time passes for users who send nothing.

A user's watermark is `c + (S - S0) - L`: their own clock `c` (largest applied
`ts`), moved on by however far the stream clock went since their last applied
event (`S0`), minus the lateness. `S` exists only in the order messages are
read, so it is computed where they are read (a source partition), before the
exchange by user, and travels with each event as a `StreamStamp`.

- Replay: `S` is the largest `ts` of the valid lines read so far (duplicates
  and late lines included: validity is all the reader can know).
- Live, per input partition: `S = min(now, max(m, S_e + now - t_e))`, with `m`
  the largest valid `ts` read, `S_e` the partition's `S` when its latest valid
  event was read and `t_e` the wall time then. It moves with the wall clock
  while the partition is quiet and never runs ahead of the wall clock.

Plain logic, no bytewax import; `nudgeflow.sources.stream_clock` runs it
inside the input partitions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

# A partition read within this long is still being read (`ClockReading.catching_up`).
READING_MS: Final = 1_000


# Made per event, so not frozen (the note in nudgeflow.core.envelope); never changed once made.
@dataclass(slots=True)
class StreamStamp:
    """The stream clock around one message: before it was read, and after."""

    before: int | None  # None until a valid message was read
    after: int | None


# Made per event, so not frozen (the note in nudgeflow.core.envelope); never changed once made.
@dataclass(slots=True)
class ClockReading:
    """A partition's clock at one wall instant, enough to extend it to a later one."""

    largest_ts: int  # m
    stream_at_read: int  # S_e
    wall_at_read: int | None  # t_e; None in replay (no wall clock)
    # `S` moved faster than the wall clock over the latest second of reads (a backlog)
    fast: bool = False

    def at(self, now: int | None) -> int:
        """`S` at wall time `now` (replay: `m`)."""
        if now is None or self.wall_at_read is None:
            return self.largest_ts
        return min(now, max(self.largest_ts, self.stream_at_read + now - self.wall_at_read))

    def catching_up(self, now: int) -> bool:
        """Whether `S` may be moving faster than the wall clock now (a backlog being read)."""
        if self.wall_at_read is None or now - self.wall_at_read >= READING_MS:
            return False
        return self.fast


class StreamClock:
    """The stream clock of one input partition.

    `read(ts, now)` is called for every message in read order, with `ts=None`
    for a message that is not a valid event (it leaves `S` where it is, but the
    wall clock may still have moved it in live mode).
    """

    # The reading's fields are kept as plain values and made into a `ClockReading` only
    # when asked (for publishing, once a batch, and snapshots): two objects a message
    # were a tenth of what reading a message costs.
    __slots__ = ("_anchor", "_fast_now", "_largest", "_reading", "_stream", "_wall")

    # `S` is compared with the wall clock over windows of at least this long, and is
    # fast when it gained more than the slack on it.
    RATE_WINDOW_MS = 1_000
    RATE_SLACK_MS = 500

    def __init__(self, reading: ClockReading | None = None) -> None:
        self._reading = reading
        self._largest: int | None = None if reading is None else reading.largest_ts
        self._stream = 0 if reading is None else reading.stream_at_read
        self._wall = None if reading is None else reading.wall_at_read
        self._fast_now = False if reading is None else reading.fast
        self._anchor: tuple[int, int] | None = None  # (wall, S) where the window starts

    @property
    def reading(self) -> ClockReading | None:
        if self._reading is None and self._largest is not None:
            self._reading = ClockReading(self._largest, self._stream, self._wall,
                                         self._fast_now)
        return self._reading

    def now(self, now: int | None) -> int | None:
        largest = self._largest
        if largest is None:
            return None
        if now is None or self._wall is None:  # as `ClockReading.at`
            return largest
        return min(now, max(largest, self._stream + now - self._wall))

    def read(self, ts: int | None, now: int | None) -> StreamStamp:
        before = self.now(now)
        if ts is None:
            return StreamStamp(before, before)
        previous = self._largest
        largest = ts if previous is None or ts > previous else previous
        stream = largest if now is None else min(now, max(largest, before or largest))
        self._largest, self._stream, self._wall = largest, stream, now
        self._fast_now = self._fast(stream, now)
        self._reading = None
        return StreamStamp(before, stream)

    def _fast(self, stream: int, now: int | None) -> bool:
        if now is None:
            return False
        anchor = self._anchor
        if anchor is None:
            self._anchor = (now, stream)
            return False
        wall_from, stream_from = anchor
        fast = stream - stream_from > now - wall_from + self.RATE_SLACK_MS
        if now - wall_from >= self.RATE_WINDOW_MS:
            self._anchor = (now, stream)
        return fast


class PartitionClocks:
    """The latest clock reading of every input partition read in this process.

    A quiet user's timer is due when their partition's `S` moves their watermark
    past it. The detect step runs on whichever worker owns the user, so the
    partitions' readers publish their readings here (one immutable reading per
    partition, swapped whole) and the detect step reads them. A partition read
    by another process is not here: the detect step then extends the user's own
    last stamp at the wall clock's pace, which is never ahead of the true `S`.
    """

    def __init__(self) -> None:
        self._readings: dict[str, ClockReading] = {}
        self._lock = threading.Lock()

    def publish(self, partition: str, reading: ClockReading) -> None:
        with self._lock:
            self._readings[partition] = reading

    def get(self, partition: str) -> ClockReading | None:
        return self._readings.get(partition)

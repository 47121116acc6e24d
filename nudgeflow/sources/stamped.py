"""A source that opens each message where it is read and stamps it with the stream clock.

    inner partition items ──open──► Envelope (valid event) ──stamp S before/after──►
                                    DeadLetter (not an event)
                                    anything else the opener passes on (a consumer error)

The stream clock `S` (TRIGGERS.md "Time") is defined in read order per input
partition, so it can only be computed here, before the exchange by user; each
envelope carries it (`Envelope.stream`). The partition's snapshot is the inner
partition's snapshot and the clock's reading together, so a resumed flow goes
on with the clock it had at that epoch. Readings are also published to a
`PartitionClocks` registry, where the detect step finds the clock of a quiet
user's partition.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, TypeVar

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from nudgeflow.core.envelope import Envelope
from nudgeflow.core.stream_clock import ClockReading, PartitionClocks, StreamClock

X = TypeVar("X")
# The resume state: (the inner partition's snapshot, the clock's reading).
State = tuple[Any, ClockReading | None]
# Opens one raw item at wall time `now` (None in replay): an Envelope, or anything else.
Opener = Callable[[X, int | None], Any]


class _StampedPartition(StatefulSourcePartition[Any, State], Generic[X]):
    def __init__(
        self,
        inner: StatefulSourcePartition[X, Any],
        name: str,
        *,
        clock: StreamClock,
        opener: Opener[X],
        now: Callable[[], int] | None,
        registry: PartitionClocks | None,
        stop: threading.Event | None,
    ) -> None:
        self._inner = inner
        self._name = name
        self._clock = clock
        self._open = opener
        self._now = now
        self._registry = registry
        self._stop = stop

    def next_batch(self) -> list[Any]:
        if self._stop is not None and self._stop.is_set():
            raise StopIteration
        items = self._inner.next_batch()
        now = self._now() if self._now is not None else None
        clock = self._clock
        out: list[Any] = []
        for item in items:
            opened = self._open(item, now)
            if isinstance(opened, Envelope):
                stamp = clock.read(opened.event.ts, now)
                opened = opened.with_stream(stamp)
            out.append(opened)
        reading = clock.reading
        if self._registry is not None and reading is not None and items:
            self._registry.publish(self._name, reading)
        return out

    def next_awake(self) -> datetime | None:
        return self._inner.next_awake()

    def snapshot(self) -> State:
        return self._inner.snapshot(), self._clock.reading

    def close(self) -> None:
        self._inner.close()


class StampedSource(FixedPartitionedSource[Any, State], Generic[X]):
    """`inner`'s partitions, with every item opened by `opener` and stamped with `S`.

    `now` is the wall clock (live mode); without it the clock is replay's: the
    largest `ts` of the valid events read so far. Once `stop` is set every partition
    ends, so the flow runs out as at the end of its input (a graceful stop).
    """

    def __init__(
        self,
        inner: FixedPartitionedSource[X, Any],
        opener: Opener[X],
        *,
        now: Callable[[], int] | None = None,
        registry: PartitionClocks | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._inner = inner
        self._open = opener
        self._now = now
        self._registry = registry
        self._stop = stop

    def list_parts(self) -> list[str]:
        return self._inner.list_parts()

    def build_part(
        self, step_id: str, for_part: str, resume_state: State | None
    ) -> _StampedPartition[X]:
        inner_state: Any = None
        reading: ClockReading | None = None
        if isinstance(resume_state, tuple):
            inner_state, reading = resume_state
        elif resume_state is not None:  # a snapshot written before the clock was kept
            inner_state = resume_state
        inner = self._inner.build_part(step_id, for_part, inner_state)
        return _StampedPartition(
            inner, for_part, clock=StreamClock(reading), opener=self._open, now=self._now,
            registry=self._registry, stop=self._stop,
        )

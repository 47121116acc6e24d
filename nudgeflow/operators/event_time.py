"""Per-user event time: admission (duplicate, late) and the timer queue.

Plain logic, no bytewax import; `nudgeflow.operators.detect` wraps it. All times are
epoch milliseconds of event time. The rules it implements are TRIGGERS.md
"Time" and "Precise readings":

- an event below the user's clock (largest applied `ts`) minus the allowed
  lateness is late (equal is not); the stream clock never makes anyone late;
- a timer with deadline `D` is decided once the watermark (that bound, moved
  on by the stream clock, `operators.detector`) is *strictly* past `D`, in
  order of `D` and then of the rules' order;
- an `event_id` seen for the user within 24 h of event time is a duplicate,
  checked before lateness.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from enum import Enum
from typing import Final

from nudgeflow.core import digests
from nudgeflow.core.digests import digest64
from nudgeflow.core.timeutil import MS_PER_DAY

DEDUP_SPAN_MS: Final = MS_PER_DAY


class Admit(Enum):
    """What happens to an arriving valid event."""

    APPLY = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"


def id_hash(event_id: str) -> int:
    """The digest of an `event_id` as a signed 64-bit integer (what snapshots hold)."""
    return int.from_bytes(digest64(event_id), "big", signed=True)


class Admission:
    """Watermark and duplicate memory of one user.

    `retention_ms` bounds the memory of seen ids: an id is forgotten once the
    watermark is that far past its `ts`. Only a *late* repeat older than that
    is affected (it is then counted late instead of duplicate); anything at or
    above the watermark is more than 24 h from a forgotten occurrence anyway
    as long as `retention_ms` >= 24 h. Seen ids are (id digest, ts) records
    (`core.digests`): 16 bytes an event, in one `bytearray` per user.
    """

    __slots__ = ("_seen", "lateness_ms", "max_ts", "retention_ms")

    def __init__(self, lateness_ms: int, retention_ms: int) -> None:
        if retention_ms < DEDUP_SPAN_MS:
            msg = "dedup retention must be at least 24 h"
            raise ValueError(msg)
        self.lateness_ms = lateness_ms
        self.retention_ms = retention_ms
        self.max_ts: int | None = None
        self._seen = bytearray()

    @property
    def watermark(self) -> int | None:
        return None if self.max_ts is None else self.max_ts - self.lateness_ms

    def admit(self, event_id: str, ts: int) -> Admit:
        """Classify an arriving event and, when it is applied, remember it and move time."""
        digest = digest64(event_id)
        seen = self._seen
        index = digests.find(seen, digest)
        if index >= 0 and abs(ts - digests.time_at(seen, index)) <= DEDUP_SPAN_MS:
            return Admit.DUPLICATE
        watermark = self.watermark
        if watermark is not None and ts < watermark:
            return Admit.LATE
        if index >= 0:  # a new occurrence replaces the one remembered
            digests.set_time(seen, index, ts)
        else:
            digests.append(seen, digest, ts)
        if self.max_ts is None or ts > self.max_ts:
            self.max_ts = ts
        return Admit.APPLY

    def prune(self, watermark: int | None = None) -> None:
        """Forget ids whose `ts` is `retention_ms` behind `watermark` (default: `c - L`)."""
        if watermark is None:
            watermark = self.watermark
        if watermark is None or not self._seen:
            return
        kept = digests.kept_since(self._seen, watermark - self.retention_ms)
        if kept is not None:
            self._seen = kept

    @property
    def remembered(self) -> int:
        return len(self._seen) // digests.RECORD

    def to_data(self) -> tuple[int | None, bytes, bytes]:
        """(max_ts, id hashes, their ts): two native arrays of signed 64-bit integers."""
        ids, times = array("q"), array("q")
        for digest, ts in digests.each(self._seen):
            ids.append(int.from_bytes(digest, "big", signed=True))
            times.append(ts)
        return self.max_ts, ids.tobytes(), times.tobytes()

    @classmethod
    def from_data(
        cls, lateness_ms: int, retention_ms: int, data: tuple[int | None, bytes, bytes]
    ) -> Admission:
        admission = cls(lateness_ms, retention_ms)
        admission.max_ts = data[0]
        ids, times = array("q"), array("q")
        ids.frombytes(data[1])
        times.frombytes(data[2])
        seen = admission._seen
        for key, ts in zip(ids, times, strict=True):
            digests.append(seen, key.to_bytes(8, "big", signed=True), ts)
        return admission

    def expires_at(self) -> int | None:
        """The `max_ts` at which every remembered id is forgotten."""
        if not self._seen:
            return None
        return max(ts for _, ts in digests.each(self._seen)) + self.retention_ms + self.lateness_ms


@dataclass(frozen=True, slots=True, order=True)
class Timer:
    """A deadline. Ordering is the decision order: deadline, then rule order, then key."""

    deadline: int
    rule_order: int
    key: str
    rule: str


class TimerQueue:
    """Pending timers of one user, at most one per (rule, key).

    Users have a handful of timers at a time, so a plain list scanned in place
    beats a heap (lazy deletion) and a dict (224 bytes and a key tuple per
    timer) in speed and in memory: this is held for every active user.
    """

    __slots__ = ("_timers",)

    def __init__(self) -> None:
        self._timers: list[Timer] = []

    def _index(self, rule: str, key: str) -> int:
        for index, timer in enumerate(self._timers):
            if timer.rule == rule and timer.key == key:
                return index
        return -1

    def set(self, rule: str, rule_order: int, key: str, deadline: int) -> None:
        timer = Timer(deadline, rule_order, key, rule)
        index = self._index(rule, key)
        if not self._timers:
            self._timers = [timer]  # exactly one slot: an append would reserve four
        elif index < 0:
            self._timers.append(timer)
        else:
            self._timers[index] = timer

    def cancel(self, rule: str, key: str = "") -> None:
        index = self._index(rule, key)
        if index >= 0:
            del self._timers[index]

    def get(self, rule: str, key: str = "") -> Timer | None:
        for timer in self._timers:
            if timer.rule == rule and timer.key == key:
                return timer
        return None

    def pop_due(self, bound: int, *, inclusive: bool) -> Timer | None:
        """Remove and return the first timer due at `bound`, or None.

        Live and replay decide timers with `D < watermark`; the end of a replay
        decides those with `D <= the input's largest ts` (`inclusive`).
        """
        timers = self._timers
        if not timers:
            return None
        first = min(timers)
        due = first.deadline <= bound if inclusive else first.deadline < bound
        if not due:
            return None
        timers.remove(first)
        return first

    def pending(self) -> list[Timer]:
        """The pending timers in decision order (a copy)."""
        return sorted(self._timers)

    def next_deadline(self) -> int | None:
        if not self._timers:
            return None
        return min(t.deadline for t in self._timers)

    def __len__(self) -> int:
        return len(self._timers)

    def to_data(self) -> list[tuple[int, str, str]]:
        """(deadline, logic name, key) of every timer: the order is the rules' of the day."""
        return [(t.deadline, t.rule, t.key) for t in self._timers]

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
from hashlib import blake2b
from typing import Final

from nudgeflow.core.timeutil import MS_PER_DAY

DEDUP_SPAN_MS: Final = MS_PER_DAY


class Admit(Enum):
    """What happens to an arriving valid event."""

    APPLY = "applied"
    DUPLICATE = "duplicate"
    LATE = "late"


def id_hash(event_id: str) -> int:
    """A stable signed 64-bit hash of an `event_id` (stable across processes and restarts).

    Remembering 8-byte hashes instead of the id strings cuts the dedup memory
    several times; a false duplicate needs a 64-bit collision among one user's
    ids of the last days, about 1e-15 for a thousand ids.
    """
    return int.from_bytes(blake2b(event_id.encode(), digest_size=8).digest(), "big", signed=True)


class Admission:
    """Watermark and duplicate memory of one user.

    `retention_ms` bounds the memory of seen ids: an id is forgotten once the
    watermark is that far past its `ts`. Only a *late* repeat older than that
    is affected (it is then counted late instead of duplicate); anything at or
    above the watermark is more than 24 h from a forgotten occurrence anyway
    as long as `retention_ms` >= 24 h. Seen ids are kept as two parallel
    arrays of 64-bit integers (id hash, ts): 16 bytes an event.
    """

    __slots__ = ("_seen_ids", "_seen_ts", "lateness_ms", "max_ts", "retention_ms")

    def __init__(self, lateness_ms: int, retention_ms: int) -> None:
        if retention_ms < DEDUP_SPAN_MS:
            msg = "dedup retention must be at least 24 h"
            raise ValueError(msg)
        self.lateness_ms = lateness_ms
        self.retention_ms = retention_ms
        self.max_ts: int | None = None
        self._seen_ids = array("q")
        self._seen_ts = array("q")

    @property
    def watermark(self) -> int | None:
        return None if self.max_ts is None else self.max_ts - self.lateness_ms

    def admit(self, event_id: str, ts: int) -> Admit:
        """Classify an arriving event and, when it is applied, remember it and move time."""
        key = id_hash(event_id)
        index = self._find(key)
        if index is not None and abs(ts - self._seen_ts[index]) <= DEDUP_SPAN_MS:
            return Admit.DUPLICATE
        watermark = self.watermark
        if watermark is not None and ts < watermark:
            return Admit.LATE
        if index is not None:  # a new occurrence replaces the one remembered
            self._seen_ts[index] = ts
        else:
            self._seen_ids.append(key)
            self._seen_ts.append(ts)
        if self.max_ts is None or ts > self.max_ts:
            self.max_ts = ts
        return Admit.APPLY

    def _find(self, key: int) -> int | None:
        try:
            return self._seen_ids.index(key)
        except ValueError:
            return None

    def prune(self, watermark: int | None = None) -> None:
        """Forget ids whose `ts` is `retention_ms` behind `watermark` (default: `c - L`)."""
        if watermark is None:
            watermark = self.watermark
        if watermark is None or not self._seen_ts:
            return
        horizon = watermark - self.retention_ms
        if min(self._seen_ts) < horizon:
            keep = [i for i, ts in enumerate(self._seen_ts) if ts >= horizon]
            self._seen_ids = array("q", (self._seen_ids[i] for i in keep))
            self._seen_ts = array("q", (self._seen_ts[i] for i in keep))

    @property
    def remembered(self) -> int:
        return len(self._seen_ids)

    def to_data(self) -> tuple[int | None, bytes, bytes]:
        return self.max_ts, self._seen_ids.tobytes(), self._seen_ts.tobytes()

    @classmethod
    def from_data(
        cls, lateness_ms: int, retention_ms: int, data: tuple[int | None, bytes, bytes]
    ) -> Admission:
        admission = cls(lateness_ms, retention_ms)
        admission.max_ts = data[0]
        admission._seen_ids.frombytes(data[1])
        admission._seen_ts.frombytes(data[2])
        return admission

    def expires_at(self) -> int | None:
        """The `max_ts` at which every remembered id is forgotten."""
        if not self._seen_ts:
            return None
        return max(self._seen_ts) + self.retention_ms + self.lateness_ms


@dataclass(frozen=True, slots=True, order=True)
class Timer:
    """A deadline. Ordering is the decision order: deadline, then rule order, then key."""

    deadline: int
    rule_order: int
    key: str
    rule: str


class TimerQueue:
    """Pending timers of one user, at most one per (rule, key).

    Users have a handful of timers at a time, so a dict and a `min()` beat a
    heap with lazy deletion in both speed and clarity.
    """

    __slots__ = ("_timers",)

    def __init__(self) -> None:
        self._timers: dict[tuple[str, str], Timer] = {}

    def set(self, rule: str, rule_order: int, key: str, deadline: int) -> None:
        self._timers[(rule, key)] = Timer(deadline, rule_order, key, rule)

    def cancel(self, rule: str, key: str = "") -> None:
        self._timers.pop((rule, key), None)

    def get(self, rule: str, key: str = "") -> Timer | None:
        return self._timers.get((rule, key))

    def pop_due(self, bound: int, *, inclusive: bool) -> Timer | None:
        """Remove and return the first timer due at `bound`, or None.

        Live and replay decide timers with `D < watermark`; the end of a replay
        decides those with `D <= the input's largest ts` (`inclusive`).
        """
        if not self._timers:
            return None
        first = min(self._timers.values())
        due = first.deadline <= bound if inclusive else first.deadline < bound
        if not due:
            return None
        del self._timers[(first.rule, first.key)]
        return first

    def pending(self) -> list[Timer]:
        """The pending timers in decision order (a copy)."""
        return sorted(self._timers.values())

    def next_deadline(self) -> int | None:
        if not self._timers:
            return None
        return min(t.deadline for t in self._timers.values())

    def __len__(self) -> int:
        return len(self._timers)

    def to_data(self) -> list[tuple[int, str, str]]:
        """(deadline, logic name, key) of every timer: the order is the rules' of the day."""
        return [(t.deadline, t.rule, t.key) for t in self._timers.values()]

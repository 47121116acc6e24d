"""Tumbling per-user counts (events per hour, per day): features for an intent model.

A counter keeps only the current bucket and the last closed one, so its state
is two pairs of integers whatever the traffic. Buckets are aligned to the
epoch in UTC, by event time; an event older than the current bucket (out of
order, within the lateness) counts in the bucket it belongs to if that is the
previous one, and is otherwise only counted in the total.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TumblingCounter:
    size_ms: int
    start: int | None = None  # start of the current bucket
    count: int = 0
    previous_start: int | None = None
    previous_count: int = 0

    def add(self, ts: int) -> tuple[int, int] | None:
        """Count an event; return `(start, count)` of a bucket this event closed, if any."""
        bucket = ts - ts % self.size_ms
        if self.start is None or bucket == self.start:
            self.start = bucket
            self.count += 1
            return None
        if bucket < self.start:
            if bucket == self.previous_start:
                self.previous_count += 1
            return None
        closed = (self.start, self.count)
        self.previous_start, self.previous_count = closed
        self.start, self.count = bucket, 1
        return closed

    def current(self, at: int) -> int:
        """Events in the bucket that contains `at` (0 if that bucket has not started)."""
        bucket = at - at % self.size_ms
        if bucket == self.start:
            return self.count
        if bucket == self.previous_start:
            return self.previous_count
        return 0

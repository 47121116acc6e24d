"""A circuit breaker: stop hammering a dispatch API that is down, and probe it now and then.

    closed ──(failure_threshold consecutive failures)──► open
    open ──(open_interval_s passed on the clock)──► half-open: exactly one probe may go
    half-open ──probe succeeds──► closed        half-open ──probe fails──► open (again)

The breaker only keeps state; it never sleeps. Its user asks `acquire()` before
each real call: `0.0` means "go", a positive number is how long to wait before
asking again, and `math.inf` means "a probe is in flight: wait for its outcome".
After the call the user reports `record_success()` or `record_failure()`.

A *failure* is a sign that the API is unhealthy (5xx, 429, a timeout, a refused
connection). An answer that is the caller's fault (a 4xx) proves the API is
alive: report it as a success. Any success closes the breaker, whatever its
state: the API answered.

The clock is injected (`time.monotonic` by default) so tests move time by hand.
Not thread-safe: one breaker belongs to one event loop (one sink partition).
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable

__all__ = ["CircuitBreaker", "CircuitState"]


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Consecutive-failure circuit breaker with a fixed open interval and one half-open probe."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            msg = f"failure_threshold must be >= 1, got {failure_threshold}"
            raise ValueError(msg)
        if not (open_interval_s > 0 and math.isfinite(open_interval_s)):
            msg = f"open_interval_s must be a positive number, got {open_interval_s}"
            raise ValueError(msg)
        self._threshold = failure_threshold
        self._interval = open_interval_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self.times_opened = 0

    @property
    def state(self) -> CircuitState:
        """The state now; an open breaker whose interval has passed reads as half-open."""
        if self._state is CircuitState.OPEN and self._clock() >= self._opened_at + self._interval:
            self._state = CircuitState.HALF_OPEN
            self._probe_in_flight = False
        return self._state

    @property
    def open_interval_s(self) -> float:
        return self._interval

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def acquire(self) -> float:
        """May a call go now? `0.0`: yes (half-open: it is the probe). Else seconds to wait."""
        state = self.state
        if state is CircuitState.CLOSED:
            return 0.0
        if state is CircuitState.OPEN:
            return max(self._opened_at + self._interval - self._clock(), 0.0)
        if self._probe_in_flight:
            return math.inf
        self._probe_in_flight = True
        return 0.0

    def release(self) -> None:
        """The probe ended without an outcome (cancelled): let another one go."""
        self._probe_in_flight = False

    def record_success(self) -> None:
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._probe_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        state = self.state
        if state is CircuitState.HALF_OPEN or (
            state is CircuitState.CLOSED and self._failures >= self._threshold
        ):
            self._open()
        # Already open: a late answer of a call sent before it opened changes nothing.

    def _open(self) -> None:
        self._state = CircuitState.OPEN
        self._opened_at = self._clock()
        self._probe_in_flight = False
        self.times_opened += 1

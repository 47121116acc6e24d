"""The per-write-key rate limit: a token bucket counted in events, on an injected clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RateLimiter"]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class RateLimiter:
    """`rate` events a second per key, in bursts of up to `burst`.

    `take(key, n)` spends `n` tokens and answers None, or leaves the bucket as
    it is and answers the seconds after which `n` tokens will be there. A call
    is taken whole or not at all, so a refused batch can be retried whole.
    """

    rate: float
    burst: int
    clock: Callable[[], float]
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, key: str, n: int) -> float | None:
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if n <= bucket.tokens:
            bucket.tokens -= n
            return None
        return (min(n, self.burst) - bucket.tokens) / self.rate

"""Sliding counts and cooldowns per scope key: the state behind the count rules.

Both are plain, bounded structures: `prune(horizon)` drops what no future
check can see, so a scope that goes quiet costs nothing once time moves on.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, insort


class SlidingCounter:
    """Event times per scope key; counts those in `[t - window, t]` (both ends included).

    Times arrive almost in order, so `insort` is an append in the common case;
    an out-of-order time still lands in its place and counts for later checks.
    Memory matters here (one counter per active user): a scope seen once holds
    a plain int, and only a scope seen again gets an `array` of 64-bit times
    (8 bytes a time instead of 40 for a list of Python ints).
    """

    __slots__ = ("_times",)

    def __init__(self) -> None:
        self._times: dict[str, int | array[int]] = {}

    def add(self, scope: str, ts: int) -> None:
        times = self._times.get(scope)
        if times is None:
            # Interned: scopes (product ids, urls) repeat across users.
            self._times[sys.intern(scope)] = ts
        elif isinstance(times, int):
            self._times[scope] = array("q", sorted((times, ts)))
        elif times[-1] <= ts:
            times.append(ts)
        else:
            insort(times, ts)

    def count(self, scope: str, start: int, end: int) -> int:
        """How many times of `scope` lie in `[start, end]`."""
        times = self._times.get(scope)
        if times is None:
            return 0
        if isinstance(times, int):
            return int(start <= times <= end)
        return bisect_left(times, end + 1) - bisect_left(times, start)

    def prune(self, horizon: int) -> None:
        """Forget times before `horizon`: no window that a future check opens reaches them."""
        for scope in list(self._times):
            times = self._times[scope]
            if isinstance(times, int):
                if times < horizon:
                    del self._times[scope]
            elif times[0] < horizon:
                cut = bisect_left(times, horizon)
                if cut == len(times):
                    del self._times[scope]
                else:
                    del times[:cut]

    def __len__(self) -> int:
        return sum(1 if isinstance(t, int) else len(t) for t in self._times.values())

    def to_data(self) -> dict[str, int | bytes]:
        return {s: t if isinstance(t, int) else t.tobytes() for s, t in self._times.items()}

    @classmethod
    def from_data(cls, data: dict[str, int | bytes]) -> SlidingCounter:
        counter = cls()
        for scope, times in data.items():
            if isinstance(times, int):
                counter._times[sys.intern(scope)] = times
            else:
                restored = array("q")
                restored.frombytes(times)
                counter._times[sys.intern(scope)] = restored
        return counter

    @property
    def empty(self) -> bool:
        return not self._times


class Cooldowns:
    """The last `fired_at` per scope; a scope is blocked until exactly `fired_at + cooldown`.

    A firing at `t` is blocked when some earlier firing `f` of the scope has
    `t < f + cooldown` ("not again until fired_at + X"); a blocked condition
    does not restart the cooldown, since only firings are recorded.
    """

    __slots__ = ("_last", "cooldown_ms")

    def __init__(self, cooldown_ms: int) -> None:
        self.cooldown_ms = cooldown_ms
        # None until the first firing: most rules of most users never fire.
        self._last: dict[str, int] | None = None

    def blocked(self, scope: str, at: int) -> bool:
        if self._last is None:
            return False
        last = self._last.get(scope)
        return last is not None and at < last + self.cooldown_ms

    def record(self, scope: str, fired_at: int) -> None:
        if self._last is None:
            self._last = {}
        last = self._last.get(scope)
        if last is None or fired_at > last:
            self._last[sys.intern(scope)] = fired_at

    def prune(self, horizon: int) -> None:
        """Forget cooldowns that reopened before `horizon`: no future check can be blocked."""
        if self._last is None:
            return
        expired = [s for s, last in self._last.items() if last + self.cooldown_ms <= horizon]
        for scope in expired:
            del self._last[scope]
        if not self._last:
            self._last = None

    def to_data(self) -> dict[str, int]:
        return {} if self._last is None else dict(self._last)

    @classmethod
    def from_data(cls, cooldown_ms: int, data: dict[str, int]) -> Cooldowns:
        cooldowns = cls(cooldown_ms)
        if data:
            cooldowns._last = {sys.intern(scope): last for scope, last in data.items()}
        return cooldowns

    @property
    def empty(self) -> bool:
        return not self._last

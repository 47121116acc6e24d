"""Sliding counts and cooldowns per scope key: the state behind the count rules.

Both are plain, bounded structures: `prune(horizon)` drops what no future
check can see, so a scope that goes quiet costs nothing once time moves on.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_left, insort
from typing import Final


class SlidingCounter:
    """Event times per scope key; counts those in `[t - window, t]` (both ends included).

    Memory matters here (one counter per active user), so a counter has two
    forms. While it holds at most `FLAT_MAX` times (nearly every user), they
    are two parallel flat sequences, scope and time, in arrival order: 16
    bytes a time, where a dict of Python ints costs ~70 a scope; a count is a
    scan of those few. Past that, times are kept per scope key, a scope seen
    once as a plain int and a scope seen again as a sorted `array` of 64-bit
    times (`insort`: an append in the common, in-order case), and a count is
    two bisections.
    """

    FLAT_MAX: Final = 16

    __slots__ = ("_by_scope", "_scopes", "_times")

    def __init__(self) -> None:
        self._scopes: list[str] = []  # the flat form: scope of each time
        self._times: array[int] = array("q")
        self._by_scope: dict[str, int | array[int]] | None = None  # the keyed form

    def add(self, scope: str, ts: int) -> None:
        by_scope = self._by_scope
        if by_scope is None:
            # Interned: scopes (product ids, urls) repeat across users.
            self._scopes.append(sys.intern(scope))
            self._times.append(ts)
            if len(self._times) > self.FLAT_MAX:
                self._to_keyed()
            return
        times = by_scope.get(scope)
        if times is None:
            by_scope[sys.intern(scope)] = ts
        elif isinstance(times, int):
            by_scope[scope] = array("q", sorted((times, ts)))
        elif times[-1] <= ts:
            times.append(ts)
        else:
            insort(times, ts)

    def _to_keyed(self) -> None:
        by_scope: dict[str, int | array[int]] = {}
        for scope, times in self._grouped().items():
            by_scope[scope] = times[0] if len(times) == 1 else array("q", times)
        self._by_scope = by_scope
        self._scopes, self._times = [], array("q")

    def _grouped(self) -> dict[str, list[int]]:
        """The flat form's times by scope, each sorted."""
        grouped: dict[str, list[int]] = {}
        for scope, ts in zip(self._scopes, self._times, strict=True):
            grouped.setdefault(scope, []).append(ts)
        for times in grouped.values():
            times.sort()
        return grouped

    def count(self, scope: str, start: int, end: int) -> int:
        """How many times of `scope` lie in `[start, end]`."""
        by_scope = self._by_scope
        if by_scope is None:
            scopes, flat = self._scopes, self._times
            if scope not in scopes:  # scans in C: a new scope, or every time in the window
                return 0
            if start <= min(flat) and max(flat) <= end:
                return scopes.count(scope)
            count = 0
            for s, t in zip(scopes, flat, strict=True):
                if s == scope and start <= t <= end:
                    count += 1
            return count
        times = by_scope.get(scope)
        if times is None:
            return 0
        if isinstance(times, int):
            return int(start <= times <= end)
        return bisect_left(times, end + 1) - bisect_left(times, start)

    def prune(self, horizon: int) -> None:
        """Forget times before `horizon`: no window that a future check opens reaches them."""
        by_scope = self._by_scope
        if by_scope is None:
            if self._times and min(self._times) < horizon:
                kept = [(s, t) for s, t in zip(self._scopes, self._times, strict=True)
                        if t >= horizon]
                self._scopes = [s for s, _ in kept]
                self._times = array("q", (t for _, t in kept))
            return
        for scope in list(by_scope):
            times = by_scope[scope]
            if isinstance(times, int):
                if times < horizon:
                    del by_scope[scope]
            elif times[0] < horizon:
                cut = bisect_left(times, horizon)
                if cut == len(times):
                    del by_scope[scope]
                else:
                    del times[:cut]
        if len(self) <= self.FLAT_MAX // 2:  # back to the small form once the burst is over
            for scope, times in by_scope.items():
                for ts in [times] if isinstance(times, int) else times:
                    self._scopes.append(scope)
                    self._times.append(ts)
            self._by_scope = None

    def __len__(self) -> int:
        if self._by_scope is None:
            return len(self._times)
        return sum(1 if isinstance(t, int) else len(t) for t in self._by_scope.values())

    def to_data(self) -> dict[str, int | bytes]:
        if self._by_scope is None:
            return {s: t[0] if len(t) == 1 else array("q", t).tobytes()
                    for s, t in self._grouped().items()}
        return {s: t if isinstance(t, int) else t.tobytes() for s, t in self._by_scope.items()}

    @classmethod
    def from_data(cls, data: dict[str, int | bytes]) -> SlidingCounter:
        counter = cls()
        for scope, times in data.items():
            if isinstance(times, int):
                counter.add(scope, times)
            else:
                restored = array("q")
                restored.frombytes(times)
                for ts in restored:
                    counter.add(scope, ts)
        return counter

    @property
    def empty(self) -> bool:
        return not self._times if self._by_scope is None else not self._by_scope


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

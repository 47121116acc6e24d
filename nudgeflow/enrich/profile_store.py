"""Live profiles from Redis (`profile:<user_id>` hashes), batched and cached per worker.

One round trip per batch of events for the users not in the cache, a bounded
TTL cache in front of it, and no crash when Redis is down: the lookup retries
with backoff and the flow waits (back-pressure) instead of deciding triggers
with a wrong segment.

The round trip is one EVAL of a small Lua script that runs HGETALL for every
key and returns the whole batch as one JSON string: orjson parses it in C,
where redis-py's pure-Python reply parser reads every field of every hash
one by one (a pipeline of 500 HGETALLs measured 78 µs per profile here, the
script 29 µs: `nudgeflow bench --levers`). A server that refuses the script
(scripting disabled, keys across cluster slots) is asked with a pipeline of
HGETALLs instead, from then on; so is a batch whose values are not UTF-8.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import orjson
import redis

from nudgeflow.core.metrics import metrics
from nudgeflow.core.profiles import NO_PROFILE, Profile, profile_from_mapping

log = logging.getLogger(__name__)

PROFILE_KEY = "profile:{}"

# Every hash of KEYS, in order, as one JSON array (an empty hash is encoded `{}`).
_HGETALL_ALL = """
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('HGETALL', key)
end
return cjson.encode(out)
"""


class ProfileCache:
    """Profiles for `ttl_s` after they were read, at most `max_size` of them (oldest out first).

    In place of cachetools' TTLCache, whose lookup cost 3.3 µs of CPU per event
    here (a timer context, a linked list kept in recency order): this one is a
    dict in insertion order, read with one clock reading per batch (0.3 µs). An
    entry is never refreshed by being read, so the oldest inserted is also the
    first to expire: expired and surplus entries are dropped from the front.
    """

    def __init__(self, ttl_s: float, max_size: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._clock = clock
        self._entries: dict[str, tuple[Profile, float]] = {}  # uid -> (profile, expires at)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def now(self) -> float:
        return self._clock()

    def get(self, uid: str, now: float) -> Profile | None:
        entry = self._entries.get(uid)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def put(self, uid: str, profile: Profile, now: float) -> None:
        entries = self._entries
        entries.pop(uid, None)  # a re-read profile moves to the back, in expiry order
        entries[uid] = (profile, now + self._ttl_s)
        while entries:
            oldest = next(iter(entries))
            if len(entries) <= self._max_size and entries[oldest][1] > now:
                break
            del entries[oldest]


class ProfileLookup(Protocol):
    def lookup(self, user_ids: Iterable[str]) -> dict[str, Profile]: ...


class StaticProfiles:
    """Profiles known up front (replay, demo, tests); unknown users have no profile."""

    def __init__(self, profiles: dict[str, Profile] | None = None) -> None:
        self._profiles = profiles or {}

    def lookup(self, user_ids: Iterable[str]) -> dict[str, Profile]:
        return {uid: self._profiles.get(uid, NO_PROFILE) for uid in user_ids}


class RedisProfiles:
    """Batched, cached profile lookups that survive a Redis outage by waiting."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_s: float = 60.0,
        max_size: int = 100_000,
        backoff_s: float = 0.1,
        backoff_max_s: float = 5.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._client = client
        self._cache = ProfileCache(ttl_s, max_size)
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._sleep = sleep
        self.hits = 0
        self.misses = 0
        self.outages = 0
        register = getattr(client, "register_script", None)
        self._script: Callable[..., bytes] | None = (
            register(_HGETALL_ALL) if callable(register) else None
        )

    @classmethod
    def from_url(cls, url: str, *, ttl_s: float, max_size: int) -> RedisProfiles:
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return cls(client, ttl_s=ttl_s, max_size=max_size)

    def lookup(self, user_ids: Iterable[str]) -> dict[str, Profile]:
        found: dict[str, Profile] = {}
        missing: dict[str, None] = {}  # ordered, and a set: batches repeat users
        cache = self._cache
        now = cache.now()
        for uid in user_ids:
            if uid in found or uid in missing:
                continue
            cached = cache.get(uid, now)
            if cached is None:
                missing[uid] = None
            else:
                found[uid] = cached
        self.hits += len(found)
        metrics.profile_lookups.labels("hit").inc(len(found))
        if missing:
            self.misses += len(missing)
            metrics.profile_lookups.labels("miss").inc(len(missing))
            wanted = list(missing)
            fetched = self._fetch(wanted)
            now = cache.now()
            for uid, profile in zip(wanted, fetched, strict=True):
                cache.put(uid, profile, now)
                found[uid] = profile
        return found

    def _fetch(self, user_ids: list[str]) -> list[Profile]:
        delay = self._backoff_s
        failing = False
        while True:
            try:
                rows = self._query([PROFILE_KEY.format(uid) for uid in user_ids])
            except redis.RedisError as exc:
                if not failing:
                    self.outages += 1
                    metrics.redis_outages.inc()
                    log.warning("redis unavailable, profile lookups wait and retry: %s", exc)
                    failing = True
                self._sleep(delay)
                delay = min(delay * 2, self._backoff_max_s)
                continue
            if failing:
                log.warning("redis is back, profile lookups resumed")
            return [profile_from_mapping(row) if row else NO_PROFILE for row in rows]

    def _query(self, keys: list[str]) -> list[dict[str, str]]:
        """The hashes at `keys`, in order ({} for a missing key)."""
        if self._script is not None:
            try:
                rows = orjson.loads(self._script(keys=keys))
            except redis.ResponseError as exc:
                log.info("redis refused the lookup script (%s): using pipelines", exc)
                self._script = None
            except orjson.JSONDecodeError:
                pass  # values that are not UTF-8: the pipeline decodes them as before
            else:
                if isinstance(rows, list) and len(rows) == len(keys):
                    return [_pairs(row) for row in rows]
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        return [_decode(row) for row in pipe.execute()]


def _pairs(row: object) -> dict[str, str]:
    """HGETALL's flat [field, value, …] as a dict; `{}` (cjson's empty table) as no fields."""
    if not isinstance(row, list):
        return {}
    return dict(zip(row[::2], row[1::2], strict=True))


def _decode(row: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in row.items()
    }

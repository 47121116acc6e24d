"""Live profiles from Redis (`profile:<user_id>` hashes), batched and cached per worker.

One round trip per batch of events (a pipeline of HGETALLs for the users not
in the cache), a bounded TTL cache in front of it, and no crash when Redis is
down: the lookup retries with backoff and the flow waits (back-pressure)
instead of deciding triggers with a wrong segment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import redis
from cachetools import TTLCache

from nudgeflow.profiles import NO_PROFILE, Profile, profile_from_mapping

log = logging.getLogger(__name__)

PROFILE_KEY = "profile:{}"


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
        self._cache: TTLCache[str, Profile] = TTLCache(maxsize=max_size, ttl=ttl_s)
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._sleep = sleep
        self.hits = 0
        self.misses = 0
        self.outages = 0

    @classmethod
    def from_url(cls, url: str, *, ttl_s: float, max_size: int) -> RedisProfiles:
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        return cls(client, ttl_s=ttl_s, max_size=max_size)

    def lookup(self, user_ids: Iterable[str]) -> dict[str, Profile]:
        found: dict[str, Profile] = {}
        missing: list[str] = []
        for uid in user_ids:
            if uid in found:
                continue
            cached = self._cache.get(uid)
            if cached is None:
                if uid not in missing:
                    missing.append(uid)
            else:
                found[uid] = cached
        self.hits += len(found)
        if missing:
            self.misses += len(missing)
            for uid, profile in zip(missing, self._fetch(missing), strict=True):
                self._cache[uid] = profile
                found[uid] = profile
        return found

    def _fetch(self, user_ids: list[str]) -> list[Profile]:
        delay = self._backoff_s
        failing = False
        while True:
            try:
                pipe = self._client.pipeline(transaction=False)
                for uid in user_ids:
                    pipe.hgetall(PROFILE_KEY.format(uid))
                rows = pipe.execute()
            except redis.RedisError as exc:
                if not failing:
                    self.outages += 1
                    log.warning("redis unavailable, profile lookups wait and retry: %s", exc)
                    failing = True
                self._sleep(delay)
                delay = min(delay * 2, self._backoff_max_s)
                continue
            if failing:
                log.warning("redis is back, profile lookups resumed")
            return [
                profile_from_mapping(_decode(row)) if row else NO_PROFILE for row in rows
            ]


def _decode(row: dict[bytes | str, bytes | str]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in row.items()
    }

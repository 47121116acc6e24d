"""Live profile lookups: batched, cached, and waiting out a Redis outage instead of failing."""

from __future__ import annotations

from typing import Any

import redis

from nudgeflow.core.metrics import metrics
from nudgeflow.core.profiles import NO_PROFILE, Profile
from nudgeflow.enrich.profile_store import ProfileCache, RedisProfiles


class FlakyRedis:
    """A stand-in client whose pipelines fail `failures` times, then answer from `hashes`."""

    def __init__(self, hashes: dict[str, dict[str, str]], failures: int) -> None:
        self.hashes = hashes
        self.failures = failures
        self.round_trips = 0

    def pipeline(self, transaction: bool = False) -> Any:
        client = self

        class Pipe:
            def __init__(self) -> None:
                self.keys: list[str] = []

            def hgetall(self, key: str) -> None:
                self.keys.append(key)

            def execute(self) -> list[dict[str, str]]:
                client.round_trips += 1
                if client.failures:
                    client.failures -= 1
                    msg = "connection refused"
                    raise redis.ConnectionError(msg)
                return [client.hashes.get(k, {}) for k in self.keys]

        return Pipe()


def test_an_outage_is_waited_out_with_backoff_and_counted() -> None:
    client = FlakyRedis({"profile:u1": {"segment": "vip", "opt_in": "sms,email"}}, failures=3)
    sleeps: list[float] = []
    outages_before = metrics.redis_outages._value.get()
    store = RedisProfiles(client, backoff_s=0.1, backoff_max_s=0.3,  # type: ignore[arg-type]
                          sleep=sleeps.append)
    found = store.lookup(["u1", "u2", "u1"])
    assert found == {"u1": Profile(segment="vip", opt_in=("email", "sms")), "u2": NO_PROFILE}
    assert sleeps == [0.1, 0.2, 0.3]  # doubling, capped
    assert store.outages == 1
    assert metrics.redis_outages._value.get() == outages_before + 1


def test_cached_profiles_cost_no_round_trip() -> None:
    client = FlakyRedis({"profile:u1": {"segment": "regular"}}, failures=0)
    store = RedisProfiles(client)  # type: ignore[arg-type]
    store.lookup(["u1"])
    store.lookup(["u1", "u1"])
    assert client.round_trips == 1
    assert (store.hits, store.misses) == (1, 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_cached_profile_expires_ttl_after_it_was_read() -> None:
    clock = Clock()
    cache = ProfileCache(ttl_s=60.0, max_size=10, clock=clock)
    cache.put("u1", Profile(segment="vip"), clock())
    clock.now = 59.9
    assert cache.get("u1", clock()) == Profile(segment="vip")
    clock.now = 60.0
    assert cache.get("u1", clock()) is None


def test_the_cache_keeps_at_most_max_size_dropping_the_oldest() -> None:
    clock = Clock()
    cache = ProfileCache(ttl_s=60.0, max_size=2, clock=clock)
    for i, uid in enumerate(["u1", "u2", "u3"]):
        clock.now = float(i)
        cache.put(uid, Profile(segment=uid), clock())
    assert len(cache) == 2
    assert cache.get("u1", clock()) is None
    assert cache.get("u3", clock()) == Profile(segment="u3")


def test_expired_entries_are_dropped_as_new_ones_come() -> None:
    clock = Clock()
    cache = ProfileCache(ttl_s=10.0, max_size=100, clock=clock)
    cache.put("u1", NO_PROFILE, clock())
    cache.put("u2", NO_PROFILE, clock())
    clock.now = 11.0
    cache.put("u3", NO_PROFILE, clock())
    assert len(cache) == 1  # memory is not held by profiles no lookup can return


def test_a_profile_read_again_gets_a_new_lease() -> None:
    clock = Clock()
    client = FlakyRedis({"profile:u1": {"segment": "regular"}}, failures=0)
    store = RedisProfiles(client, ttl_s=60.0)  # type: ignore[arg-type]
    store._cache = ProfileCache(60.0, 100, clock=clock)
    store.lookup(["u1"])
    clock.now = 61.0
    store.lookup(["u1"])  # expired: read again
    clock.now = 100.0
    store.lookup(["u1"])  # within the new lease
    assert client.round_trips == 2

"""Live profile lookups: batched, cached, and waiting out a Redis outage instead of failing."""

from __future__ import annotations

from typing import Any

import redis

from nudgeflow.core.metrics import metrics
from nudgeflow.core.profiles import NO_PROFILE, Profile
from nudgeflow.enrich.profile_store import RedisProfiles


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

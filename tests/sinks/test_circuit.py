"""The circuit breaker, alone and inside the Dispatcher, on a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any

import httpx
import pytest

from nudgeflow.core.settings import DispatchSettings
from nudgeflow.core.triggers import Decision, Trigger, make_trigger_id
from nudgeflow.sinks.circuit import CircuitBreaker, CircuitState
from nudgeflow.sinks.dispatch import Dispatcher, DispatchResult

FIRED_AT_MS = 1_772_359_200_000


class FakeTime:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def make_decision(n: int) -> Decision:
    trigger = Trigger(
        trigger_id=make_trigger_id("cart_abandonment", f"u{n}", FIRED_AT_MS + n),
        trigger_type="cart_abandonment",
        user_id=f"u{n}",
        fired_at_ms=FIRED_AT_MS + n,
        detected_at_ms=FIRED_AT_MS + n,
        segment="regular",
        metadata={},
    )
    return Decision(trigger, "dispatched", None, channel="email", send_at_ms=FIRED_AT_MS)


# -- the state machine -----------------------------------------------------------------------


def test_opens_after_threshold_consecutive_failures() -> None:
    time = FakeTime()
    breaker = CircuitBreaker(failure_threshold=3, open_interval_s=2.0, clock=time.clock)

    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # resets the count
    breaker.record_failure()
    breaker.record_failure()
    assert (breaker.state, breaker.acquire()) == (CircuitState.CLOSED, 0.0)

    breaker.record_failure()

    assert breaker.state is CircuitState.OPEN
    assert breaker.acquire() == 2.0
    time.now = 1.5
    assert breaker.acquire() == pytest.approx(0.5)


def test_half_open_lets_exactly_one_probe_through() -> None:
    time = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, open_interval_s=1.0, clock=time.clock)
    breaker.record_failure()
    time.now = 1.0

    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.acquire() == 0.0  # the probe
    assert breaker.acquire() == math.inf  # everyone else waits for its outcome

    breaker.record_failure()  # the probe failed: open again, for a full interval

    assert breaker.state.value == "open"  # (mypy keeps the narrowing from above)
    assert breaker.acquire() == 1.0
    assert breaker.times_opened == 2
    time.now = 2.0
    assert breaker.acquire() == 0.0
    breaker.record_success()
    assert breaker.state.value == "closed"
    assert breaker.acquire() == 0.0


def test_release_frees_an_abandoned_probe() -> None:
    time = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, open_interval_s=1.0, clock=time.clock)
    breaker.record_failure()
    time.now = 1.0
    assert breaker.acquire() == 0.0

    breaker.release()

    assert breaker.acquire() == 0.0


def test_a_late_failure_while_open_does_not_extend_it() -> None:
    time = FakeTime()
    breaker = CircuitBreaker(failure_threshold=1, open_interval_s=1.0, clock=time.clock)
    breaker.record_failure()
    time.now = 0.5

    breaker.record_failure()  # a request sent before it opened

    assert breaker.acquire() == pytest.approx(0.5)
    assert breaker.times_opened == 1


@pytest.mark.parametrize(
    "kwargs", [{"failure_threshold": 0}, {"open_interval_s": 0}, {"open_interval_s": math.inf}]
)
def test_bad_parameters_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(**kwargs)


# -- inside the Dispatcher -------------------------------------------------------------------


class FlakyApi:
    """Answers `status` to the first `failures` requests, then 202; records when each came."""

    def __init__(self, time: FakeTime, failures: float, status: int = 503) -> None:
        self.time = time
        self.failures = failures
        self.status = status
        self.calls: list[tuple[float, int]] = []
        self.keys: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        failing = len(self.calls) < self.failures
        status = self.status if failing else 202
        self.calls.append((self.time.now, status))
        self.keys.append(request.headers["Idempotency-Key"])
        return httpx.Response(status, json={"error": "down"} if failing else {})


def run(
    api: FlakyApi,
    decisions: list[Decision],
    *,
    threshold: int,
    max_attempts: int,
    max_in_flight: int = 4,
) -> tuple[list[DispatchResult], list[DispatchResult], CircuitBreaker]:
    settings = DispatchSettings(
        url="http://api.test",
        max_in_flight=max_in_flight,
        max_attempts=max_attempts,
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        timeout_s=5.0,
    )
    breaker = CircuitBreaker(
        failure_threshold=threshold, open_interval_s=1.0, clock=api.time.clock
    )
    failed: list[DispatchResult] = []

    async def go() -> list[DispatchResult]:
        async with Dispatcher(
            settings,
            transport=httpx.MockTransport(api),
            on_failure=lambda _d, r: failed.append(r),
            sleep=api.time.sleep,
            rand=lambda: 0.5,
            breaker=breaker,
        ) as dispatcher:
            return await dispatcher.send_all(decisions)

    return asyncio.run(go()), failed, breaker


def test_an_outage_opens_the_circuit_then_everything_is_delivered() -> None:
    time = FakeTime()
    api = FlakyApi(time, failures=6)
    decisions = [make_decision(n) for n in range(8)]

    results, failed, breaker = run(api, decisions, threshold=3, max_attempts=10)

    assert all(result.ok for result in results)
    assert failed == []
    assert breaker.state is CircuitState.CLOSED
    assert breaker.times_opened >= 1
    # every trigger once, plus exactly the failures the API chose to answer
    assert len(api.calls) == len(decisions) + 6
    # waited out an open interval (1 s) instead of hammering; backoffs alone are <= 0.02 s
    assert max(time.sleeps) > 0.5


def test_while_open_only_one_probe_per_interval_reaches_the_api() -> None:
    time = FakeTime()
    api = FlakyApi(time, failures=math.inf)
    decisions = [make_decision(n) for n in range(3)]

    results, failed, breaker = run(
        api, decisions, threshold=1, max_attempts=3, max_in_flight=3
    )

    # The first failure opened the circuit; every later request was a probe, one at a
    # time, each at least one open interval after the one before.
    times = [at for at, _ in api.calls]
    assert len(times) == 9
    assert times[0] == 0.0
    assert all(later - earlier >= 1.0 for earlier, later in itertools.pairwise(times))
    # each trigger got its max_attempts real attempts, then the failure callback
    assert [result.attempts for result in results] == [3, 3, 3]
    assert sorted(r.trigger_id for r in failed) == sorted(r.trigger_id for r in results)
    assert all(result.error == "HTTP 503: down" for result in failed)
    assert breaker.state is CircuitState.OPEN


def test_client_errors_prove_the_api_alive_and_keep_the_circuit_closed() -> None:
    time = FakeTime()
    api = FlakyApi(time, failures=math.inf, status=400)
    decisions = [make_decision(n) for n in range(5)]

    results, failed, breaker = run(api, decisions, threshold=1, max_attempts=3)

    assert [result.attempts for result in results] == [1] * 5
    assert len(failed) == 5
    assert breaker.state is CircuitState.CLOSED
    assert breaker.times_opened == 0
    assert time.sleeps == []


def test_waiters_go_together_once_the_probe_succeeds() -> None:
    time = FakeTime()
    in_flight = 0
    calls: list[tuple[float, int, int]] = []  # (time, status, requests in flight at its start)

    async def slow_api(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight
        in_flight += 1
        failing = len(calls) < 6
        calls.append((time.now, 503 if failing else 202, in_flight))
        for _ in range(5):  # stay in flight while the others run
            await asyncio.sleep(0)
        in_flight -= 1
        return httpx.Response(503 if failing else 202, json={})

    settings = DispatchSettings(url="http://api.test", max_in_flight=6, max_attempts=5,
                                backoff_base_s=0.01, backoff_max_s=0.01, timeout_s=5.0)
    breaker = CircuitBreaker(failure_threshold=2, open_interval_s=1.0, clock=time.clock)

    async def go() -> list[DispatchResult]:
        async with Dispatcher(settings, transport=httpx.MockTransport(slow_api),
                              sleep=time.sleep, rand=lambda: 0.5, breaker=breaker) as dispatcher:
            return await dispatcher.send_all([make_decision(n) for n in range(6)])

    results = asyncio.run(go())

    assert all(result.ok for result in results)
    # The first wave of six went out while closed, and all failed: the circuit opened.
    assert [status for _, status, _ in calls[:6]] == [503] * 6
    assert len(calls) == 12
    # After the open interval one probe went alone ...
    probe_at, probe_status, probe_in_flight = calls[6]
    assert probe_at >= 1.0
    assert (probe_status, probe_in_flight) == (202, 1)
    # ... and its success woke the other five at once (no further wait), concurrently.
    assert [at for at, _, _ in calls[7:]] == [probe_at] * 5
    assert max(in_flight for _, _, in_flight in calls[7:]) > 1
    assert breaker.state is CircuitState.CLOSED


def test_probes_take_turns_so_no_trigger_spends_the_others_attempts() -> None:
    time = FakeTime()
    api = FlakyApi(time, failures=math.inf)
    decisions = [make_decision(n) for n in range(4)]

    results, failed, _ = run(api, decisions, threshold=1, max_attempts=4, max_in_flight=1)

    assert [result.attempts for result in results] == [4, 4, 4, 4]
    assert len(failed) == 4
    # After the first request opened the circuit, the probes went round the waiters:
    # in every window of four consecutive probes each trigger probed once.
    probes = api.keys[1:]
    for start in range(0, len(probes) - 3, 4):
        assert len(set(probes[start : start + 4])) == 4, probes

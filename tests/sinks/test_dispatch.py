"""The dispatch sink against `httpx.MockTransport`: headers, concurrency, retries, failures."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import bytewax.operators as op
import httpx
import orjson
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSource, cluster_main, run_main
from pydantic import SecretStr

from nudgeflow.core.errors import DispatchError, ServiceError
from nudgeflow.core.settings import DispatchSettings
from nudgeflow.core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, signature_problem
from nudgeflow.core.triggers import Decision, Trigger, make_trigger_id
from nudgeflow.sinks.dead_letter import KafkaDeadLetterWriter
from nudgeflow.sinks.dispatch import Dispatcher, DispatchResult, DispatchSink, make_breaker

API = "http://dispatch.test"
FIRED_AT_MS = 1_772_359_200_000  # 2026-03-01T10:00:00Z

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def make_decision(n: int = 0, *, dispatched: bool = True) -> Decision:
    user_id = f"u{n}"
    fired_at_ms = FIRED_AT_MS + n
    trigger = Trigger(
        trigger_id=make_trigger_id("cart_abandonment", user_id, fired_at_ms),
        trigger_type="cart_abandonment",
        user_id=user_id,
        fired_at_ms=fired_at_ms,
        detected_at_ms=fired_at_ms + 12,
        segment="vip",
        metadata={"cart_value": 150.0, "items": [{"product_id": "p1", "quantity": 1}]},
    )
    if not dispatched:
        return Decision(trigger, "suppressed", "quiet_hours")
    return Decision(trigger, "dispatched", None, channel="email", send_at_ms=fired_at_ms)


def make_settings(**overrides: Any) -> DispatchSettings:
    values: dict[str, Any] = {
        "url": API,
        "max_in_flight": 4,
        "timeout_s": 1.0,
        "max_attempts": 4,
        "backoff_base_s": 0.1,
        "backoff_max_s": 0.3,
    }
    values.update(overrides)
    return DispatchSettings(**values)


class FakeSleep:
    """Records the backoff delays instead of waiting them; `now` is the time they add up to."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.now = 0.0

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


class Failures:
    """A failure callback that keeps what it is given, with a `flush` like the Kafka writer."""

    def __init__(self) -> None:
        self.items: list[tuple[Decision, DispatchResult]] = []
        self.flushes = 0

    def __call__(self, decision: Decision, result: DispatchResult) -> None:
        self.items.append((decision, result))

    def flush(self, timeout: float) -> int:
        self.flushes += 1
        return 0


class Api:
    """A scripted dispatch API: answers from `script` per trigger_id, then 202.

    It has no batch endpoint (404, not recorded), like an API that speaks only
    EVENTS.md 3: the sink then sends every trigger on its own.
    """

    def __init__(self, script: dict[str, list[httpx.Response | Exception]] | None = None) -> None:
        self.script = script or {}
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/triggers":
            return httpx.Response(404, json={"error": "not found"})
        self.requests.append(request)
        trigger_id = request.headers["Idempotency-Key"]
        planned = self.script.get(trigger_id)
        if planned:
            step = planned.pop(0)
            if isinstance(step, Exception):
                raise step
            return step
        return httpx.Response(202, json={"trigger_id": trigger_id, "status": "accepted"})

    def sent_ids(self) -> list[str]:
        return [request.headers["Idempotency-Key"] for request in self.requests]


def dispatch(
    decisions: list[Decision],
    handler: Handler,
    *,
    settings: DispatchSettings | None = None,
    failures: Failures | None = None,
    sleep: FakeSleep | None = None,
) -> list[DispatchResult]:
    sleep = sleep or FakeSleep()
    settings = settings or make_settings()

    async def go() -> list[DispatchResult]:
        async with Dispatcher(
            settings,
            breaker=make_breaker(settings, clock=sleep.clock),
            transport=httpx.MockTransport(handler),
            on_failure=failures if failures is not None else Failures(),
            sleep=sleep,
            rand=fixed_rand,
            clock=sleep.clock,
        ) as dispatcher:
            return await dispatcher.send_all(decisions)

    return asyncio.run(go())


def fixed_rand() -> float:
    return 0.5


def test_sends_body_and_idempotency_key() -> None:
    api = Api()
    decision = make_decision()

    [result] = dispatch([decision], api)

    [request] = api.requests
    assert request.method == "POST"
    assert str(request.url) == f"{API}/api/trigger"
    assert request.headers["Idempotency-Key"] == decision.trigger.trigger_id
    assert request.headers["Content-Type"] == "application/json"
    assert "Authorization" not in request.headers
    assert orjson.loads(request.content) == decision.dispatch_body()
    assert result.ok
    assert (result.trigger_id, result.status, result.attempts, result.error) == (
        decision.trigger.trigger_id,
        202,
        1,
        None,
    )
    assert result.latency_ms >= 0


def test_bearer_token_is_sent_and_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    api = Api()
    decision = make_decision()
    api.script[decision.trigger.trigger_id] = [httpx.Response(401, json={"error": "nope"})]
    settings = make_settings(token=SecretStr("s3cret-token"))

    with caplog.at_level(logging.DEBUG):
        dispatch([decision], api, settings=settings)

    assert api.requests[0].headers["Authorization"] == "Bearer s3cret-token"
    assert "s3cret-token" not in caplog.text


def test_concurrency_never_exceeds_max_in_flight() -> None:
    in_flight = 0
    peak = 0

    async def slow_api(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(5):  # yield to the loop so the other requests get to start
            await asyncio.sleep(0)
        in_flight -= 1
        return httpx.Response(202, json={})

    results = dispatch(
        [make_decision(n) for n in range(20)], slow_api, settings=make_settings(max_in_flight=3)
    )

    assert all(result.ok for result in results)
    assert peak == 3


def test_results_follow_input_order_and_skip_suppressed() -> None:
    api = Api()
    decisions = [make_decision(0), make_decision(1, dispatched=False), make_decision(2)]

    results = dispatch(decisions, api)

    sent = [decisions[0].trigger.trigger_id, decisions[2].trigger.trigger_id]
    assert [result.trigger_id for result in results] == sent
    assert sorted(api.sent_ids()) == sorted(sent)


def test_server_error_then_accepted_is_retried() -> None:
    decision = make_decision()
    api = Api({decision.trigger.trigger_id: [httpx.Response(500, json={"error": "boom"})]})
    failures, sleep = Failures(), FakeSleep()

    [result] = dispatch([decision], api, failures=failures, sleep=sleep)

    assert result.ok
    assert (result.status, result.attempts, result.error) == (202, 2, None)
    assert sleep.calls == [pytest.approx(0.05)]  # full jitter: 0.5 * base 0.1
    assert failures.items == []


def test_retry_after_is_honoured() -> None:
    decision = make_decision()
    busy = httpx.Response(429, headers={"Retry-After": "1.5"}, json={"error": "slow down"})
    api = Api({decision.trigger.trigger_id: [busy]})
    sleep = FakeSleep()

    [result] = dispatch([decision], api, sleep=sleep)

    assert result.ok
    assert result.attempts == 2
    assert sleep.calls == [1.5]


def test_client_error_is_not_retried_and_goes_to_on_failure() -> None:
    decision = make_decision()
    bad = httpx.Response(400, json={"error": "unknown channel"})
    api = Api({decision.trigger.trigger_id: [bad]})
    failures, sleep = Failures(), FakeSleep()

    [result] = dispatch([decision], api, failures=failures, sleep=sleep)

    assert len(api.requests) == 1
    assert sleep.calls == []
    assert not result.ok
    assert (result.status, result.attempts, result.error) == (400, 1, "HTTP 400: unknown channel")
    assert failures.items == [(decision, result)]


def test_persistent_server_error_gives_up_after_max_attempts() -> None:
    decision = make_decision()
    unavailable: list[httpx.Response | Exception] = [
        httpx.Response(503, text=f"down {i}") for i in range(10)
    ]
    api = Api({decision.trigger.trigger_id: unavailable})
    failures, sleep = Failures(), FakeSleep()

    [result] = dispatch([decision], api, failures=failures, sleep=sleep)

    assert len(api.requests) == 4
    assert (result.ok, result.status, result.attempts) == (False, 503, 4)
    assert result.error == "HTTP 503: down 3"  # the last attempt's
    # full jitter on base 0.1 doubling, capped at 0.3; no sleep after the last attempt
    assert sleep.calls == [pytest.approx(0.05), pytest.approx(0.1), pytest.approx(0.15)]
    assert failures.items == [(decision, result)]


def test_transport_timeout_is_retried() -> None:
    decision = make_decision()
    api = Api({decision.trigger.trigger_id: [httpx.ReadTimeout("read timed out")]})

    [result] = dispatch([decision], api)

    assert result.ok
    assert result.attempts == 2


def test_whole_attempt_is_bounded_by_timeout() -> None:
    calls = 0

    async def stalls_once(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(10)  # cancelled by the attempt timeout long before
        return httpx.Response(202, json={})

    [result] = dispatch([make_decision()], stalls_once, settings=make_settings(timeout_s=0.02))

    assert result.ok
    assert result.attempts == 2


def test_an_unreachable_api_is_waited_out_without_spending_attempts() -> None:
    decision = make_decision()
    # Three times max_attempts: an outage, not a refusal.
    api = Api({decision.trigger.trigger_id: [httpx.ConnectError("refused")] * 12})
    failures = Failures()

    [result] = dispatch([decision], api, failures=failures)

    assert (result.ok, result.status, result.attempts) == (True, 202, 13)
    assert failures.items == []


def test_an_api_that_never_answers_is_dead_lettered_after_give_up_after_s() -> None:
    decision = make_decision()
    api = Api({decision.trigger.trigger_id: [httpx.ConnectError("refused")] * 1000})
    failures = Failures()
    sleep = FakeSleep()

    [result] = dispatch([decision], api, failures=failures, sleep=sleep,
                        settings=make_settings(give_up_after_s=5.0))

    assert not result.ok and result.status is None
    assert result.error is not None and result.error.startswith("no answer for 5 s")
    assert "ConnectError: refused" in result.error
    assert 5.0 <= sleep.now < 5.0 + 1.5  # one wait (backoff or circuit) past the bound at most
    assert failures.items == [(decision, result)]


def test_refusals_count_and_silences_do_not() -> None:
    decision = make_decision()
    script: list[httpx.Response | Exception] = [
        httpx.ConnectError("refused"), httpx.Response(503), httpx.ReadTimeout("slow"),
        httpx.Response(500), httpx.Response(503), httpx.ConnectError("refused"),
        httpx.Response(502),
    ]
    api = Api({decision.trigger.trigger_id: script})
    failures = Failures()

    [result] = dispatch([decision], api, failures=failures)

    # The 4th refusal (max_attempts=4) ends it; the three silences in between did not count.
    assert (result.ok, result.status, result.attempts) == (False, 502, 7)
    assert failures.items == [(decision, result)]


def test_default_failure_callback_raises_dispatch_error() -> None:
    decision = make_decision()
    api = Api({decision.trigger.trigger_id: [httpx.Response(422, json={"error": "bad"})]})

    async def go() -> None:
        async with Dispatcher(make_settings(), transport=httpx.MockTransport(api)) as dispatcher:
            await dispatcher.send_all([decision])

    with pytest.raises(DispatchError, match="HTTP 422: bad") as caught:
        asyncio.run(go())
    assert caught.value.trigger_id == decision.trigger.trigger_id


# -- the bytewax sink ----------------------------------------------------------------


@pytest.fixture
def decisions() -> list[Decision]:
    return [make_decision(n, dispatched=n % 3 != 0) for n in range(30)]


def build_flow(decisions: list[Decision], sink: DispatchSink) -> Dataflow:
    flow = Dataflow("dispatch_sink_test")
    stream = op.input("in", flow, TestingSource(decisions, batch_size=4))
    # Spread the items so that on a cluster every worker's partition writes some.
    stream = op.redistribute("spread", stream)
    op.output("out", op.key_on("by_user", stream, lambda d: d.trigger.user_id), sink)
    return flow


class SinkHarness:
    """A DispatchSink over one shared scripted Api; records the failure callbacks it built."""

    def __init__(self, api: Api, partitions: int = 1) -> None:
        self.api = api
        self.failures: list[Failures] = []
        self.sink = self.with_partitions(partitions)

    def with_partitions(self, partitions: int) -> DispatchSink:
        self.sink = DispatchSink(
            make_settings(),
            partitions=partitions,
            client_factory=self.client,
            failure_factory=self.failure_callback,
            sleep=FakeSleep(),
        )
        return self.sink

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.api))

    def failure_callback(self) -> Failures:
        failures = Failures()
        self.failures.append(failures)
        return failures

    def failed(self) -> list[tuple[Decision, DispatchResult]]:
        return [item for failures in self.failures for item in failures.items]


@pytest.fixture
def harness(decisions: list[Decision]) -> Iterator[SinkHarness]:
    # One refused trigger and one that needs a retry, to see both paths in a flow.
    refused, flaky = decisions[1], decisions[2]
    script: dict[str, list[httpx.Response | Exception]] = {
        refused.trigger.trigger_id: [httpx.Response(400, json={"error": "bad"})],
        flaky.trigger.trigger_id: [httpx.Response(502)],
    }
    api = Api(script)
    yield SinkHarness(api)


def check_delivery(decisions: list[Decision], harness: SinkHarness) -> None:
    dispatched = {d.trigger.trigger_id for d in decisions if d.dispatched}
    refused = decisions[1]
    delivered = {request.headers["Idempotency-Key"] for request in harness.api.requests}
    assert delivered == dispatched
    # the refused one once, the flaky one twice, every other once
    assert len(harness.api.requests) == len(dispatched) + 1
    [(failed, result)] = harness.failed()
    assert failed == refused
    assert result.status == 400
    # dead letters are flushed after the failing batch and at close
    assert sum(failures.flushes for failures in harness.failures) >= 2


def test_sink_in_a_flow_delivers_every_dispatched_decision(
    decisions: list[Decision], harness: SinkHarness
) -> None:
    run_main(build_flow(decisions, harness.sink))

    check_delivery(decisions, harness)


def test_sink_on_two_workers_delivers_every_dispatched_decision(
    decisions: list[Decision], harness: SinkHarness
) -> None:
    sink = harness.with_partitions(2)
    cluster_main(build_flow(decisions, sink), [], 0, worker_count_per_proc=2)

    check_delivery(decisions, harness)
    assert len(harness.failures) == 2  # two partitions (one per worker), a callback each


# -- dead letters --------------------------------------------------------------------


class FakeProducer:
    def __init__(self, delivery_error: str | None = None) -> None:
        self.produced: list[dict[str, Any]] = []
        self.delivery_error = delivery_error
        self._pending: list[Any] = []

    def produce(self, topic: str, value: Any = None, key: Any = None, **kwargs: Any) -> None:
        self.produced.append({"topic": topic, "value": value, "key": key, **kwargs})
        self._pending.append(kwargs["on_delivery"])

    def poll(self, timeout: float = -1) -> int:
        return 0

    def flush(self, timeout: float = -1) -> int:
        for on_delivery in self._pending:
            on_delivery(self.delivery_error, None)
        self._pending.clear()
        return 0


def failed_result(decision: Decision) -> DispatchResult:
    return DispatchResult(
        decision.trigger.trigger_id, False, 503, 5, "HTTP 503: down", latency_ms=12.5
    )


def test_dead_letter_writer_produces_reason_status_attempts_and_trigger() -> None:
    producer = FakeProducer()
    writer = KafkaDeadLetterWriter(producer)
    decision = make_decision()

    writer(decision, failed_result(decision))
    assert writer.flush(1.0) == 0

    [message] = producer.produced
    assert message["topic"] == "triggers.dlq"
    assert message["key"] == decision.trigger.trigger_id.encode()
    assert message["headers"] == [("reason", b"HTTP 503: down")]
    assert orjson.loads(message["value"]) == {
        "reason": "HTTP 503: down",
        "status": 503,
        "attempts": 5,
        "trigger": decision.to_json(),
    }


def test_dead_letter_writer_flush_raises_when_not_delivered() -> None:
    writer = KafkaDeadLetterWriter(FakeProducer(delivery_error="broker down"), "dlq")
    decision = make_decision()

    writer(decision, failed_result(decision))

    with pytest.raises(ServiceError, match="broker down"):
        writer.flush(1.0)


# -- HMAC signatures -----------------------------------------------------------------------


def test_hmac_signature_covers_timestamp_and_exact_body(caplog: pytest.LogCaptureFixture) -> None:
    decision = make_decision()
    api = Api({decision.trigger.trigger_id: [httpx.Response(503), httpx.Response(401)]})
    settings = make_settings(hmac_secret=SecretStr("hm4c-secret"))
    stamps = iter([1_772_359_200.7, 1_772_359_205.2])
    failures = Failures()

    async def go() -> list[DispatchResult]:
        async with Dispatcher(
            settings,
            transport=httpx.MockTransport(api),
            on_failure=failures,
            sleep=FakeSleep(),
            rand=fixed_rand,
            wall_clock=lambda: next(stamps),
        ) as dispatcher:
            return await dispatcher.send_all([decision])

    with caplog.at_level(logging.DEBUG):
        [result] = asyncio.run(go())

    assert result.attempts == 2
    first, second = api.requests
    # signed afresh per attempt: a retry carries its own timestamp
    assert first.headers[TIMESTAMP_HEADER] == "1772359200"
    assert second.headers[TIMESTAMP_HEADER] == "1772359205"
    for request in api.requests:
        timestamp = request.headers[TIMESTAMP_HEADER]
        assert request.headers[SIGNATURE_HEADER] == sign(b"hm4c-secret", timestamp, request.content)
        assert signature_problem(
            b"hm4c-secret", timestamp, request.headers[SIGNATURE_HEADER], request.content,
            now_s=float(timestamp),
        ) is None
        assert "Authorization" not in request.headers
    assert "hm4c-secret" not in caplog.text
    assert "hm4c-secret" not in repr(settings)


# -- batches ---------------------------------------------------------------------------


class BatchApi(Api):
    """The scripted API with `POST /api/triggers` too (or, with `has_batches=False`, a 404)."""

    def __init__(self, *, has_batches: bool = True, batch_status: int = 202) -> None:
        super().__init__()
        self.has_batches = has_batches
        self.batch_status = batch_status
        self.batches: list[list[str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path != "/api/triggers":
            return await super().__call__(request)
        self.requests.append(request)
        if not self.has_batches:
            return httpx.Response(404, json={"error": "not found"})
        ids = [body["trigger_id"] for body in orjson.loads(request.content)]
        self.batches.append(ids)
        if self.batch_status != 202:
            return httpx.Response(self.batch_status, json={"error": "down"})
        return httpx.Response(202, json={"results": [
            {"trigger_id": tid, "status": "accepted"} for tid in ids]})


def _flow_through_sink(api: Api, decisions: list[Decision], **settings: Any) -> list[Failures]:
    failures: list[Failures] = []

    def failure_callback() -> Failures:
        failures.append(Failures())
        return failures[-1]

    sink = DispatchSink(
        make_settings(**settings),
        client_factory=lambda: httpx.AsyncClient(transport=httpx.MockTransport(api)),
        failure_factory=failure_callback,
        sleep=FakeSleep(),
    )
    run_main(build_flow(decisions, sink))
    return failures


def test_decisions_waiting_together_go_out_in_batches() -> None:
    api = BatchApi()
    decisions = [make_decision(n) for n in range(300)]

    failures = _flow_through_sink(api, decisions, batch_max=50)

    batched = [tid for batch in api.batches for tid in batch]
    singles = [r.headers.get("Idempotency-Key") for r in api.requests
               if r.url.path == "/api/trigger"]
    assert sorted(batched + singles) == sorted(d.trigger.trigger_id for d in decisions)
    assert api.batches and max(len(batch) for batch in api.batches) <= 50
    assert len(api.requests) < len(decisions)  # fewer requests than triggers
    assert all(not f.items for f in failures)


def test_an_api_without_the_batch_endpoint_gets_single_requests() -> None:
    api = BatchApi(has_batches=False)
    decisions = [make_decision(n) for n in range(60)]

    failures = _flow_through_sink(api, decisions, batch_max=50)

    batch_calls = [r for r in api.requests if r.url.path == "/api/triggers"]
    assert len(batch_calls) <= 8  # those in flight when the first 404 came, then never again
    singles = [r.headers["Idempotency-Key"] for r in api.requests
               if r.url.path == "/api/trigger"]
    assert sorted(singles) == sorted(d.trigger.trigger_id for d in decisions)
    assert all(not f.items for f in failures)


def test_a_refused_batch_falls_back_to_single_requests_with_their_retries() -> None:
    api = BatchApi(batch_status=503)
    decisions = [make_decision(n) for n in range(40)]

    failures = _flow_through_sink(api, decisions, batch_max=50)

    singles = {r.headers["Idempotency-Key"] for r in api.requests
               if r.url.path == "/api/trigger"}
    assert singles == {d.trigger.trigger_id for d in decisions}
    assert all(not f.items for f in failures)


def _sink_partition(
    api: Api, failure_factory: Callable[[], Callable[[Decision, DispatchResult], None]]
    | None = None, **settings: Any,
) -> Any:
    sink = DispatchSink(
        make_settings(**settings),
        client_factory=lambda: httpx.AsyncClient(transport=httpx.MockTransport(api)),
        failure_factory=failure_factory,
        sleep=FakeSleep(),
    )
    return sink.build_part("dispatch", "dispatch-0", None)


def test_a_batch_written_together_goes_out_as_one_request() -> None:
    api = BatchApi()
    decisions = [make_decision(n) for n in range(40)]
    partition = _sink_partition(api, batch_max=50)
    try:
        partition.write_batch(decisions)
        partition.snapshot()  # the epoch's barrier: every one answered
    finally:
        partition.close()

    assert api.batches == [[d.trigger.trigger_id for d in decisions]]
    assert [r.url.path for r in api.requests] == ["/api/triggers"]


def test_a_batch_larger_than_the_queue_waits_for_room_and_loses_nothing() -> None:
    api = BatchApi()
    decisions = [make_decision(n) for n in range(25)]
    partition = _sink_partition(api, batch_max=50, max_queued=10)
    try:
        partition.write_batch(decisions)
        partition.snapshot()
    finally:
        partition.close()

    sent = [tid for batch in api.batches for tid in batch] + [
        r.headers["Idempotency-Key"] for r in api.requests if r.url.path == "/api/trigger"]
    assert sorted(sent) == sorted(d.trigger.trigger_id for d in decisions)
    assert max(len(batch) for batch in api.batches) <= 10  # never more than max_queued held


def test_a_failure_callback_that_raises_skips_no_other_failure_of_its_batch() -> None:
    decisions = [make_decision(n) for n in range(6)]
    refused = [decisions[1], decisions[4]]
    api = Api({d.trigger.trigger_id: [httpx.Response(400, json={"error": "bad"})]
               for d in refused})
    seen: list[Decision] = []

    def stop_on_first(decision: Decision, result: DispatchResult) -> None:
        seen.append(decision)
        if len(seen) == 1:
            raise DispatchError(decision.trigger.trigger_id, result.error or "")

    partition = _sink_partition(api, lambda: stop_on_first, batch_max=50)
    try:
        partition.write_batch(decisions)
        with pytest.raises(DispatchError):  # the flow stops, as the callback asked
            partition.snapshot()
    finally:
        partition.close()

    assert seen == refused  # the second refusal still reached the callback

"""The dispatch sink: POST every dispatched decision to the dispatch API (EVENTS.md §3).

Stream in: `nudgeflow.core.triggers.Decision` items, `dispatched` and `suppressed`
mixed. The dispatched ones are sent with their `dispatch_body()`; the
suppressed ones are ignored here (the decisions topic already records them).
Nothing comes out: each dispatched decision ends either delivered (a 2xx) or
handed to the failure callback, which in live mode writes it to the
`triggers.dlq` topic (`nudgeflow.sinks.dead_letter`). Nothing is dropped silently.

Why it is built this way:

- `Dispatcher` is plain asyncio and httpx with no bytewax in it, so tests drive it
  with `httpx.MockTransport`, an instant `sleep` and a fixed random source.
- One bytewax batch is sent concurrently, at most `max_in_flight` requests at a
  time over pooled keep-alive connections: a batch of 100 costs about
  100 / `max_in_flight` round trips, not 100.
- `write_batch` returns only when every decision of the batch is delivered or
  handed over as failed. With the `Idempotency-Key` set to the deterministic
  `trigger_id`, a batch replayed after a crash never becomes a second message to a
  customer: at-least-once processing, at-most-once delivery.
- Retries (5xx, 429, timeouts, connection errors) use exponential backoff with full
  jitter, so a recovering API is not hit by every worker in lockstep. A 4xx other
  than 429 is our bug or bad data: retrying cannot help, it goes straight to the
  failure callback. Only refusals (5xx, 429: the API is up and says no) count
  towards `max_attempts`; an API that does not answer at all (down, unreachable,
  timing out) is waited out for `give_up_after_s` (10 minutes by default)
  before the trigger is dead-lettered.
- Each partition owns one event loop and one client for its whole life: a loop or
  a pool per batch would throw the keep-alive connections away on every batch.
- A circuit breaker (`nudgeflow.sinks.circuit`) watches the attempts. After
  `circuit_failure_threshold` consecutive failures it opens: no request goes out,
  and `write_batch` waits (the flow back-pressures; Kafka keeps the input) instead
  of dropping or dead-lettering anything. Every `circuit_open_s` one probe goes;
  its success lets everything through again. Only real attempts count towards
  `max_attempts`: a trigger is dead-lettered because the API kept failing *it*,
  never because the sink was waiting. A 4xx proves the API is alive and closes
  the breaker.
- Authentication: a bearer token (`token`) and/or an HMAC-SHA256 signature of the
  exact body bytes (`hmac_secret`, see `nudgeflow.core.signing`), signed afresh on
  every attempt. Neither is ever logged.
- Personalisation: an optional `render(decision) -> {"subject"?, "body"}` (for
  example `nudgeflow.enrich.messages.MessageRenderer.for_profiles`) is added to the body
  as `message`. A decision that cannot be rendered goes to the failure callback
  without an attempt, like a body that is not JSON.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import heapq
import itertools
import logging
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar, runtime_checkable

import httpx
import orjson
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from nudgeflow.core.errors import DispatchError
from nudgeflow.core.metrics import metrics
from nudgeflow.core.settings import DispatchSettings
from nudgeflow.core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from nudgeflow.core.timeutil import now_ms
from nudgeflow.core.triggers import Decision
from nudgeflow.sinks.circuit import CircuitBreaker, CircuitState

__all__ = [
    "TRIGGER_PATH",
    "DispatchResult",
    "DispatchSink",
    "Dispatcher",
    "FailureCallback",
    "Render",
    "make_breaker",
    "make_client",
    "raise_dispatch_error",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

TRIGGER_PATH: Final = "/api/trigger"
BATCH_PATH: Final = "/api/triggers"
# Batch requests of one partition in flight at once.
_BATCHES_IN_FLIGHT: Final = 8
# A Retry-After beyond this is clamped: one trigger must not stall a worker for minutes.
DEFAULT_MAX_RETRY_AFTER_S: Final = 30.0
# 2**60 times any sane base is far beyond any cap; it keeps the float finite.
_MAX_BACKOFF_EXPONENT: Final = 60
_ERROR_TEXT_LIMIT: Final = 200

# Worth another attempt: the request may not have arrived, or the server may recover.
_RETRYABLE_TRANSPORT: Final = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


@dataclass(frozen=True, slots=True)
class DispatchResult:
    """How the dispatch of one trigger ended."""

    trigger_id: str
    ok: bool
    status: int | None  # HTTP status of the last attempt; None if no response came back
    attempts: int
    error: str | None  # why the last attempt failed; None when ok
    latency_ms: float  # first attempt start to the end, backoff sleeps included


FailureCallback = Callable[[Decision, DispatchResult], None]
Sleep = Callable[[float], Awaitable[None]]
ClientFactory = Callable[[], httpx.AsyncClient]


class Render(Protocol):
    """Adds the personalised message, `{"subject"?: str, "body": str}`, to bodies."""

    def many(self, decisions: Sequence[Decision]) -> list[dict[str, str]]:
        """The messages of a batch request's decisions, in order (one lookup for them all)."""
        ...


def raise_dispatch_error(decision: Decision, result: DispatchResult) -> None:
    """The failure callback of last resort: stop loudly rather than lose a trigger."""
    raise DispatchError(decision.trigger.trigger_id, result.error or "unknown failure")


def make_client(
    settings: DispatchSettings, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """An AsyncClient whose keep-alive pool matches `max_in_flight`.

    With a custom `transport` httpx ignores `limits`; the transport owns its pool.
    """
    limits = httpx.Limits(
        max_connections=settings.max_in_flight,
        max_keepalive_connections=settings.max_in_flight,
    )
    return httpx.AsyncClient(transport=transport, limits=limits, timeout=settings.timeout_s)


def make_breaker(
    settings: DispatchSettings, clock: Callable[[], float] = time.monotonic
) -> CircuitBreaker:
    """The circuit breaker that `settings` describe."""
    return CircuitBreaker(
        failure_threshold=settings.circuit_failure_threshold,
        open_interval_s=settings.circuit_open_s,
        clock=clock,
    )


@dataclass(frozen=True, slots=True)
class _Attempt:
    status: int | None
    error: str | None
    retryable: bool
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def refused(self) -> bool:
        """The API answered, and refused for now (5xx, 429): it is up, and said no."""
        return self.retryable and self.status is not None


class Dispatcher:
    """Sends decisions to the dispatch API, concurrently, with retries.

    `client` is used as given and not closed here; without it the dispatcher
    builds one (over `transport` if given) and closes it in `aclose()`.
    Not bound to bytewax: any asyncio code can use it.

    `render` adds a personalised `message` to each body. `breaker` defaults to
    `make_breaker(settings)`; tests pass one on a fake clock and a `sleep` that
    moves that clock. `wall_clock` (Unix seconds) stamps HMAC signatures.
    """

    def __init__(
        self,
        settings: DispatchSettings,
        client: httpx.AsyncClient | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        on_failure: FailureCallback = raise_dispatch_error,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.perf_counter,
        max_retry_after_s: float = DEFAULT_MAX_RETRY_AFTER_S,
        render: Render | None = None,
        breaker: CircuitBreaker | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if client is not None and transport is not None:
            msg = "give either a client or a transport, not both"
            raise ValueError(msg)
        self._owns_client = client is None
        self._client = client if client is not None else make_client(settings, transport)
        self._url = settings.url.rstrip("/") + TRIGGER_PATH
        self._batch_url = settings.url.rstrip("/") + BATCH_PATH
        # Cleared for good when the API has no batch endpoint.
        self.batches = settings.batch_max > 1
        self._timeout_s = settings.timeout_s
        self._max_in_flight = settings.max_in_flight
        self._max_attempts = settings.max_attempts
        self._give_up_after_s = settings.give_up_after_s
        self._backoff_base_s = settings.backoff_base_s
        self._backoff_max_s = settings.backoff_max_s
        self._max_retry_after_s = max_retry_after_s
        # Sent with every request, so it also applies to an injected client; never logged.
        self._auth: dict[str, str] = (
            {"Authorization": f"Bearer {settings.token.get_secret_value()}"}
            if settings.token is not None
            else {}
        )
        self._hmac_secret: bytes | None = (
            settings.hmac_secret.get_secret_value().encode()
            if settings.hmac_secret is not None
            else None
        )
        self._render = render
        self._breaker = breaker if breaker is not None else make_breaker(settings)
        self._wall_clock = wall_clock
        self._on_failure = on_failure
        self._sleep = sleep
        self._rand = rand
        self._clock = clock
        # A semaphore binds to the loop that first waits on it; keep one per loop.
        self._semaphore: asyncio.Semaphore | None = None
        self._semaphore_loop: asyncio.AbstractEventLoop | None = None
        # Set (and replaced) whenever an attempt reports to the breaker: wakes the waiters.
        self._circuit_changed = asyncio.Event()
        # Tickets of the triggers waiting for the circuit, smallest first: the probe order.
        self._tickets = itertools.count()
        self._queue: list[int] = []

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def send_all(self, decisions: Sequence[Decision]) -> list[DispatchResult]:
        """Send every dispatched decision; one result each, in input order.

        Suppressed decisions are skipped and have no result. The failed ones are
        handed to `on_failure` once all are done, in input order; if the callback
        raises, the exception leaves here.
        """
        to_send = [decision for decision in decisions if decision.dispatched]
        if not to_send:
            return []
        results = await asyncio.gather(*(self.send_one(d) for d in to_send))
        for decision, result in zip(to_send, results, strict=True):
            if not result.ok:
                self.fail(decision, result)
        return list(results)

    async def send_one(self, decision: Decision) -> DispatchResult:
        """Send one dispatched decision until the API takes it, keeps refusing it, or never answers.

        The failure callback is not called here (see `fail`).
        """
        return await self._send_one(decision, self._loop_semaphore())

    async def send_batch(self, decisions: Sequence[Decision]) -> list[DispatchResult] | None:
        """Send many decisions in one `POST /api/triggers`, or None if that did not work out.

        Only the happy path: on anything but a 2xx with one accepted result per
        decision (a refusal, an error, an open circuit, a render failure) the
        caller sends them one by one, with every retry and breaker rule of
        `send_one`. A 404 or 405 means the API has no batch endpoint: batching
        stops for good.
        """
        if not self.batches or self._breaker.state is not CircuitState.CLOSED:
            return None
        start = self._clock()
        try:
            bodies = self._bodies(decisions)
            content = orjson.dumps(bodies)
        except Exception:  # the single path reports it, decision by decision
            return None
        headers = self._headers("", content)
        del headers["Idempotency-Key"]  # each body's trigger_id is its key
        try:
            async with self._loop_semaphore(), asyncio.timeout(self._timeout_s):
                response = await self._client.post(
                    self._batch_url, content=content, headers=headers, timeout=self._timeout_s
                )
        except Exception:  # whatever went wrong, the single path does it properly
            return None
        if response.status_code in {404, 405}:
            self.batches = False
            logger.info("dispatch API has no %s: sending triggers one by one", BATCH_PATH)
            return None
        if not 200 <= response.status_code < 300:
            return None
        try:
            answered = orjson.loads(response.content)["results"]
            ids = [item["trigger_id"] for item in answered]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        if ids != [decision.trigger.trigger_id for decision in decisions]:
            return None
        latency_ms = (self._clock() - start) * 1000.0
        return [DispatchResult(tid, True, response.status_code, 1, None, latency_ms)
                for tid in ids]

    def _bodies(self, decisions: Sequence[Decision]) -> list[dict[str, Any]]:
        bodies = [decision.dispatch_body() for decision in decisions]
        if self._render is not None:
            for body, message in zip(bodies, self._render.many(decisions), strict=True):
                body["message"] = message
        return bodies

    def fail(self, decision: Decision, result: DispatchResult) -> None:
        """Hand a decision the API did not take to the failure callback."""
        logger.warning(
            "dispatch of %s failed after %d attempt(s): %s",
            result.trigger_id,
            result.attempts,
            result.error,
        )
        self._on_failure(decision, result)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> Dispatcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _loop_semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._semaphore is None or self._semaphore_loop is not loop:
            self._semaphore = asyncio.Semaphore(self._max_in_flight)
            self._circuit_changed = asyncio.Event()
            self._semaphore_loop = loop
        return self._semaphore

    async def _send_one(self, decision: Decision, semaphore: asyncio.Semaphore) -> DispatchResult:
        trigger_id = decision.trigger.trigger_id
        start = self._clock()
        try:
            (body,) = self._bodies([decision])
        except Exception as exc:  # a template or lookup problem: no retry can fix it
            why = f"message not rendered: {_describe(exc)}"
            return DispatchResult(trigger_id, False, None, 0, why, 0.0)
        try:
            content = orjson.dumps(body)
        except orjson.JSONEncodeError as exc:
            # Bad metadata never gets better: no attempt, straight to the failure path.
            return DispatchResult(trigger_id, False, None, 0, f"body is not JSON: {exc}", 0.0)
        attempts = refusals = 0
        while True:
            # Outside the semaphore: a trigger waiting for the circuit holds no slot,
            # so the half-open probe always finds one.
            await self._await_circuit()
            attempts += 1
            # The semaphore is held per attempt, not across backoff sleeps: a
            # waiting retry must not keep a fresh trigger from being sent.
            reported = False
            try:
                async with semaphore:
                    attempt = await self._attempt(content, self._headers(trigger_id, content))
                self._report(attempt)
                reported = True
            finally:
                if not reported:  # cancelled mid-attempt: free the probe slot if it was ours
                    self._breaker.release()
            # Only refusals count against max_attempts: an API that is down, unreachable
            # or not answering is waited out, up to give_up_after_s.
            refusals += attempt.refused
            elapsed_s = self._clock() - start
            gave_up = attempt.retryable and not attempt.refused and (
                elapsed_s >= self._give_up_after_s
            )
            done = (attempt.ok or not attempt.retryable or refusals >= self._max_attempts
                    or gave_up)
            if done:
                error = attempt.error
                if gave_up:
                    error = f"no answer for {elapsed_s:.0f} s (last: {attempt.error})"
                return DispatchResult(
                    trigger_id, attempt.ok, attempt.status, attempts, error, elapsed_s * 1000.0
                )
            delay = self._backoff_s(attempts, attempt.retry_after_s)
            logger.debug(
                "dispatch of %s: attempt %d failed (%s); retrying in %.3f s",
                trigger_id,
                attempts,
                attempt.error,
                delay,
            )
            await self._sleep(delay)

    def _headers(self, trigger_id: str, content: bytes) -> dict[str, str]:
        headers = {
            "Idempotency-Key": trigger_id,
            "Content-Type": "application/json",
            **self._auth,
        }
        if self._hmac_secret is not None:
            # Signed per attempt: a retry after a long wait still has a fresh timestamp.
            timestamp = str(int(self._wall_clock()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(self._hmac_secret, timestamp, content)
        return headers

    async def _await_circuit(self) -> None:
        """Return once the breaker lets an attempt go; wait (never fail) while it is open.

        Waiters queue in arrival order for the half-open probe, and a trigger whose
        probe failed queues again at the back: while the API is down, every trigger
        spends its attempts at the same pace instead of one using them all up.
        """
        initial = self._breaker.state
        if initial is CircuitState.CLOSED:
            return
        ticket = next(self._tickets)
        heapq.heappush(self._queue, ticket)
        try:
            while True:
                state = self._breaker.state
                if state is CircuitState.CLOSED:
                    return
                if state is CircuitState.HALF_OPEN and self._queue[0] != ticket:
                    wait_s = math.inf  # not our turn to probe: wait for the probe's outcome
                else:
                    wait_s = self._breaker.acquire()
                    if wait_s == 0.0:
                        return
                await self._wait_for_circuit(wait_s)
        finally:
            first = self._queue[0] == ticket
            self._queue.remove(ticket)
            heapq.heapify(self._queue)
            if first:  # the next in line may be waiting for its turn
                self._notify_circuit()

    async def _wait_for_circuit(self, wait_s: float) -> None:
        """Until the breaker changes, or `wait_s` passes (on the injected sleep)."""
        changed = self._circuit_changed
        if math.isinf(wait_s):
            await changed.wait()
            return
        waiters = [
            asyncio.ensure_future(changed.wait()),
            asyncio.ensure_future(self._sleep(wait_s)),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def _notify_circuit(self) -> None:
        changed, self._circuit_changed = self._circuit_changed, asyncio.Event()
        changed.set()

    def _report(self, attempt: _Attempt) -> None:
        """Tell the breaker how the API did, and wake whoever waits on it."""
        before = self._breaker.state
        if attempt.retryable:
            self._breaker.record_failure()
        elif attempt.status is not None:  # 2xx or a 4xx: the API is alive
            self._breaker.record_success()
        else:  # a bad URL or protocol: says nothing about the API's health
            self._breaker.release()
        after = self._breaker.state
        if before is CircuitState.CLOSED and after is CircuitState.CLOSED:
            return  # the common case: nobody can be waiting on a closed circuit
        if after is not before:
            if after is CircuitState.OPEN and before is CircuitState.CLOSED:
                logger.warning(
                    "dispatch API failing (%s): circuit open, waiting %.3g s between probes",
                    attempt.error,
                    self._breaker.open_interval_s,
                )
            elif after is CircuitState.CLOSED:
                logger.warning("dispatch API answers again: circuit closed")
        self._notify_circuit()

    async def _attempt(self, content: bytes, headers: dict[str, str]) -> _Attempt:
        try:
            # httpx's timeout is per phase (connect, write, read); this bounds the whole attempt.
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.post(
                    self._url, content=content, headers=headers, timeout=self._timeout_s
                )
        except TimeoutError:
            return _Attempt(None, f"timeout after {self._timeout_s} s", retryable=True)
        except _RETRYABLE_TRANSPORT as exc:
            return _Attempt(None, _describe(exc), retryable=True)
        except httpx.HTTPError as exc:  # a bad URL or protocol: another try cannot help
            return _Attempt(None, _describe(exc), retryable=False)
        status = response.status_code
        if 200 <= status < 300:
            return _Attempt(status, None, retryable=False)
        retryable = status == 429 or status >= 500
        retry_after = self._retry_after_s(response) if retryable else None
        return _Attempt(status, _http_error(response), retryable, retry_after)

    def _backoff_s(self, attempts: int, retry_after_s: float | None) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempts-1))), unless the server said."""
        if retry_after_s is not None:
            return retry_after_s
        exponent = min(attempts - 1, _MAX_BACKOFF_EXPONENT)
        ceiling = min(self._backoff_max_s, self._backoff_base_s * 2.0**exponent)
        return self._rand() * ceiling

    def _retry_after_s(self, response: httpx.Response) -> float | None:
        # Only the delta-seconds form; an HTTP-date falls back to our own backoff.
        raw = response.headers.get("Retry-After")
        if raw is None:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            return None
        if not math.isfinite(seconds) or seconds < 0:
            return None
        return min(seconds, self._max_retry_after_s)


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _http_error(response: httpx.Response) -> str:
    """`HTTP 400: unknown channel`, using the API's `{"error": ...}` when it sent one."""
    reason = response.text[:_ERROR_TEXT_LIMIT]
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        pass
    else:
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            reason = body["error"]
    return f"HTTP {response.status_code}: {reason}" if reason else f"HTTP {response.status_code}"


@runtime_checkable
class _Flushable(Protocol):
    def flush(self, timeout: float) -> int: ...


class _BackgroundLoop:
    """An event loop on a thread of its own, for the partition's whole life."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class _Batcher:
    """Gathers the decisions waiting on one loop into batch requests; one alone goes single.

    Nothing waits to fill a batch: a decision that finds no batch forming and
    a free slot goes out at once (as a single request when it is alone), and
    whatever arrives while requests are in flight makes up the next ones, so
    batches grow only with the load. Up to `_BATCHES_IN_FLIGHT` at once.
    """

    def __init__(self, dispatcher: Dispatcher, batch_max: int) -> None:
        self._dispatcher = dispatcher
        self._batch_max = batch_max
        self._waiting: list[tuple[Decision, asyncio.Future[DispatchResult]]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def deliver_all(self, decisions: Sequence[Decision]) -> list[DispatchResult]:
        """Each decision's result, in order, once all of them are answered."""
        if not self._dispatcher.batches:
            return list(await asyncio.gather(*(self._dispatcher.send_one(d) for d in decisions)))
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in decisions]
        self._waiting.extend(zip(decisions, futures, strict=True))
        self._start()
        return list(await asyncio.gather(*futures))

    def _start(self) -> None:
        while self._waiting and self._in_flight < _BATCHES_IN_FLIGHT:
            taken = self._waiting[: self._batch_max]
            del self._waiting[: self._batch_max]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(taken))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, taken: list[tuple[Decision, asyncio.Future[DispatchResult]]]) -> None:
        decisions = [decision for decision, _ in taken]
        try:
            results = None
            if len(decisions) > 1:
                results = await self._dispatcher.send_batch(decisions)
            if results is None:  # alone, or the batch did not work out: one by one
                results = list(await asyncio.gather(
                    *(self._dispatcher.send_one(decision) for decision in decisions)))
            for (_, future), result in zip(taken, results, strict=True):
                if not future.done():
                    future.set_result(result)
        except BaseException as exc:
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
            raise
        finally:
            self._in_flight -= 1
            self._start()


class _DispatchPartition(StatefulSinkPartition[Decision, None]):
    """One sink partition: requests go out in the background, the flow never waits for them.

    `write_batch` hands each dispatched decision to the partition's own event
    loop and returns at once; the flow waits only when `max_queued` decisions
    are not answered yet (back-pressure: Kafka keeps the input). At-least-once:
    bytewax takes every step's snapshot before it commits an epoch, and this
    partition's `snapshot()` returns only once every decision it was handed in
    the epoch is delivered or dead-lettered (and the dead letters flushed). A
    crash before that commit re-reads the epoch's input, and the same
    `trigger_id`s are sent again, which the API's idempotency absorbs.
    """

    def __init__(
        self,
        dispatcher_factory: Callable[[httpx.AsyncClient, FailureCallback], Dispatcher],
        client_factory: Callable[[], httpx.AsyncClient],
        on_failure: FailureCallback,
        flush_timeout_s: float,
        max_queued: int,
        *,
        batch_max: int = 1,
    ) -> None:
        self._background = _BackgroundLoop("nudgeflow-dispatch")
        self._client = self._background.run(_create(client_factory))
        self._on_failure = on_failure
        self._flush_timeout_s = flush_timeout_s
        self._dispatcher = dispatcher_factory(self._client, on_failure)
        self._batcher = _Batcher(self._dispatcher, batch_max)
        self._slots = threading.BoundedSemaphore(max_queued)
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[list[DispatchResult]]] = set()
        self._idle = threading.Event()
        self._idle.set()
        self._failed_here = False
        # A failure callback that raised (the default: stop rather than lose a trigger)
        # raised on the loop's thread; it is raised again on the worker's.
        self._errors: list[BaseException] = []

    def write_batch(self, values: list[Decision]) -> None:
        self._raise_errors()
        # One hand-over per batch, not per decision: each wakes the loop's thread, and
        # decisions handed over together can share a batch request.
        group: list[Decision] = []
        for decision in values:
            if not decision.dispatched:
                continue
            if not self._slots.acquire(blocking=False):
                self._hand_over(group)  # what already has its slots goes first
                group = []
                self._slots.acquire()
            group.append(decision)
        self._hand_over(group)

    def _hand_over(self, decisions: list[Decision]) -> None:
        if not decisions:
            return
        future = self._background.submit(self._batcher.deliver_all(decisions))
        with self._lock:
            self._pending.add(future)
            self._idle.clear()
        future.add_done_callback(functools.partial(self._answered, decisions))

    def _answered(
        self, decisions: list[Decision],
        future: concurrent.futures.Future[list[DispatchResult]],
    ) -> None:
        results: list[DispatchResult] = []
        try:
            results = future.result()
        except BaseException as exc:  # re-raised on the worker's thread
            self._errors.append(exc)
        try:
            answered_ms = now_ms()
            for decision, result in zip(decisions[: len(results)], results, strict=True):
                try:  # each on its own: one failure callback that raises skips no other
                    metrics.record_dispatch(decision, decision.cause, ok=result.ok,
                                            attempts=result.attempts, answered_ms=answered_ms)
                    if not result.ok:
                        self._failed_here = True
                        self._dispatcher.fail(decision, result)
                except BaseException as exc:
                    self._errors.append(exc)
        finally:
            with self._lock:
                self._pending.discard(future)
                if not self._pending:
                    self._idle.set()
            self._slots.release(len(decisions))

    def snapshot(self) -> None:
        """The epoch's barrier: every decision handed over so far is answered or dead-lettered."""
        self._drain()

    def close(self) -> None:
        try:
            self._drain()
            self._background.run(self._client.aclose())
            self._flush_failures()
        finally:
            self._background.stop()

    def _drain(self) -> None:
        self._idle.wait()
        if self._failed_here:
            # Dead letters must be durable before bytewax counts the epoch as written.
            self._failed_here = False
            self._flush_failures()
        self._raise_errors()

    def _raise_errors(self) -> None:
        if self._errors:
            raise self._errors.pop(0)

    def _flush_failures(self) -> None:
        if isinstance(self._on_failure, _Flushable):
            self._on_failure.flush(self._flush_timeout_s)


async def _create(factory: Callable[[], httpx.AsyncClient]) -> httpx.AsyncClient:
    return factory()  # on the loop that will use it


class DispatchSink(FixedPartitionedSink[Decision, None]):
    """Bytewax sink: `(user_id, decision)` in; dispatched decisions go to the dispatch API.

    Decisions are routed by user to `partitions` sink partitions (each an event
    loop and a keep-alive pool, see `_DispatchPartition`); the partition state
    is nothing, its `snapshot()` is the epoch's barrier.

    `client_factory` builds each partition's AsyncClient (default: `make_client`);
    tests pass one over an `httpx.MockTransport`. `failure_factory` builds each
    partition's failure callback (live mode: a `KafkaDeadLetterWriter`); the
    default raises `DispatchError`, stopping the flow rather than losing a
    trigger. A callback with a `flush(timeout)` method is flushed before an
    epoch's snapshot completes when it was used, and at close.

    `render_factory` builds each partition's `Render` (personalised `message`);
    `breaker_factory` each partition's circuit breaker (default:
    `make_breaker(settings)`). While a partition's breaker is open its requests
    wait, its queue fills, and then the flow waits: it back-pressures instead
    of dropping.
    """

    def __init__(
        self,
        settings: DispatchSettings,
        *,
        partitions: int = 1,
        client_factory: ClientFactory | None = None,
        failure_factory: Callable[[], FailureCallback] | None = None,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
        flush_timeout_s: float = 10.0,
        render_factory: Callable[[], Render] | None = None,
        breaker_factory: Callable[[], CircuitBreaker] | None = None,
    ) -> None:
        self._settings = settings
        self._partitions = settings.partitions or partitions
        self._render_factory = render_factory
        self._breaker_factory = breaker_factory
        self._client_factory = client_factory
        self._failure_factory = failure_factory
        self._sleep = sleep
        self._rand = rand
        self._flush_timeout_s = flush_timeout_s

    def list_parts(self) -> list[str]:
        return [f"dispatch-{index}" for index in range(self._partitions)]

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> _DispatchPartition:
        on_failure = (
            self._failure_factory() if self._failure_factory is not None else raise_dispatch_error
        )
        clients = self._client_factory or functools.partial(make_client, self._settings)
        return _DispatchPartition(
            self._dispatcher, clients, on_failure, self._flush_timeout_s,
            self._settings.max_queued, batch_max=self._settings.batch_max,
        )

    def _dispatcher(self, client: httpx.AsyncClient, on_failure: FailureCallback) -> Dispatcher:
        return Dispatcher(
            self._settings,
            client,
            on_failure=on_failure,
            sleep=self._sleep,
            rand=self._rand,
            render=self._render_factory() if self._render_factory is not None else None,
            breaker=self._breaker_factory() if self._breaker_factory is not None else None,
        )

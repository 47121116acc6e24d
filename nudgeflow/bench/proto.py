"""Prototypes of sink changes, measured by `nudgeflow.bench.levers` (not used by the shipped flow).

- `BackgroundDispatchSink`: the shipped `DispatchSink` blocks the worker in
  `write_batch` for an HTTP round trip whenever a batch holds a dispatched
  decision. This one runs the same `nudgeflow.sinks.dispatch.Dispatcher` on an event loop
  in a thread of its own: `write_batch` hands the batch over and returns, at
  most `max_pending` batches are in flight (then it waits for the oldest:
  back-pressure), `close` waits for all of them.
- `TunedKafkaSink`: bytewax's `KafkaSink` calls `producer.flush()` after every
  batch, and librdkafka waits `linger.ms` (5 ms by default) before sending, so
  each batch with a decision or a dead letter waits ≥ 5 ms plus a broker round
  trip. This sink sets `linger.ms` and flushes per batch or only at close.

What the prototypes skip and a real change must keep: with recovery enabled, a
batch handed to the background loop (or not yet flushed) must be finished
before bytewax commits its epoch, e.g. with a stateful sink partition that
waits in `snapshot()`.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer

from nudgeflow.core.settings import DispatchSettings
from nudgeflow.core.triggers import Decision
from nudgeflow.sinks.dispatch import Dispatcher, FailureCallback, make_client, raise_dispatch_error

__all__ = ["BackgroundDispatchSink", "TunedKafkaSink"]


class _BackgroundPartition(StatelessSinkPartition[Decision]):
    def __init__(self, settings: DispatchSettings, on_failure: FailureCallback,
                 max_pending: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dispatch",
                                        daemon=True)
        self._thread.start()
        self._client = make_client(settings)
        self._dispatcher = Dispatcher(settings, self._client, on_failure=on_failure)
        self._pending: deque[Future[Any]] = deque()
        self._max_pending = max_pending

    def write_batch(self, items: list[Decision]) -> None:
        batch = [decision for decision in items if decision.dispatched]
        pending = self._pending
        while pending and (pending[0].done() or len(pending) >= self._max_pending):
            pending.popleft().result()  # re-raises a failure callback's exception
        if batch:
            pending.append(
                asyncio.run_coroutine_threadsafe(self._dispatcher.send_all(batch), self._loop)
            )

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
            asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


class BackgroundDispatchSink(DynamicSink[Decision]):
    def __init__(self, settings: DispatchSettings, *,
                 failure_factory: Callable[[], FailureCallback] | None = None,
                 max_pending: int = 64) -> None:
        self._settings = settings
        self._failure_factory = failure_factory
        self._max_pending = max_pending

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _BackgroundPartition:
        on_failure = (
            self._failure_factory() if self._failure_factory is not None else raise_dispatch_error
        )
        return _BackgroundPartition(self._settings, on_failure, self._max_pending)


class _TunedKafkaPartition(StatelessSinkPartition[Any]):
    def __init__(self, producer: Producer, topic: str, convert: Callable[[Any], Any] | None,
                 flush_each_batch: bool) -> None:
        self._producer = producer
        self._topic = topic
        self._convert = convert
        self._flush_each_batch = flush_each_batch

    def write_batch(self, items: list[Any]) -> None:
        producer = self._producer
        for item in items:
            msg = self._convert(item) if self._convert is not None else item
            while True:
                try:
                    producer.produce(self._topic, value=msg.value, key=msg.key,
                                     headers=msg.headers)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.poll(0)
        if self._flush_each_batch:
            producer.flush()

    def close(self) -> None:
        self._producer.flush()


class TunedKafkaSink(DynamicSink[Any]):
    def __init__(self, brokers: str, topic: str, *, linger_ms: int = 0,
                 flush_each_batch: bool = True,
                 convert: Callable[[Any], Any] | None = None) -> None:
        self._config = {"bootstrap.servers": brokers, "linger.ms": linger_ms}
        self._topic = topic
        self._flush_each_batch = flush_each_batch
        self._convert = convert

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TunedKafkaPartition:
        return _TunedKafkaPartition(Producer(self._config), self._topic, self._convert,
                                    self._flush_each_batch)

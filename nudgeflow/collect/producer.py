"""Writing a call's events to Kafka, answered only once Kafka holds every one of them.

`EventWriter.write(events, dead_letters)` produces the accepted events to the
input topic (key = `user_id`) and the refused items to the dead-letter topic
(the raw bytes, the reason in a header), and returns when the broker has
acknowledged all of them (`acks=all`, idempotent producer). When Kafka cannot
take them (the local queue is full, a delivery failed or timed out) it raises
`KafkaUnavailableError`, and the call answers 503 with `Retry-After`: the tracker
sends the same events again, and the flow's dedup by `event_id` drops the
copies of those that did arrive.

librdkafka reports deliveries from `poll()`: one background thread polls, and
the last delivery of a call wakes the call's coroutine through
`call_soon_threadsafe` (once per call, not per event).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any, Final, Protocol

from nudgeflow.collect import metrics
from nudgeflow.core.errors import ServiceError
from nudgeflow.core.events import Event, encode_event

__all__ = ["EventWriter", "KafkaUnavailableError", "producer_config"]

_POLL_S: Final = 0.05
# A call waits for its deliveries at most this much past librdkafka's own timeout.
_GRACE_S: Final = 1.0


class KafkaUnavailableError(ServiceError):
    """Kafka did not take a call's events; the caller should retry after a while."""


class _Producer(Protocol):
    """The part of `confluent_kafka.Producer` used here; unit tests pass a fake."""

    def produce(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, *,
        headers: Any = None, on_delivery: Any = None,
    ) -> None: ...

    def poll(self, timeout: float = -1) -> int: ...

    def flush(self, timeout: float = -1) -> int: ...


def producer_config(bootstrap: str, *, delivery_timeout_s: float, linger_ms: float) -> dict[
    str, Any
]:
    """An idempotent producer that fails a delivery after `delivery_timeout_s`."""
    return {
        "bootstrap.servers": bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": linger_ms,
        "message.timeout.ms": int(delivery_timeout_s * 1000),
        "compression.type": "lz4",
        # The Java clients' partitioner: a shop's own producers and the collector then put
        # one user on one partition, which keeps that user's events in order.
        "partitioner": "murmur2_random",
        "client.id": "nudgeflow-collect",
    }


class _Pending:
    """The deliveries one call waits for. Touched only by the polling thread, then the loop."""

    __slots__ = ("error", "future", "loop", "remaining")

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop) -> None:
        self.remaining = count
        self.error: str | None = None
        self.loop = loop
        self.future: asyncio.Future[str | None] = loop.create_future()

    def delivered(self, err: Any, _msg: Any) -> None:
        if err is not None and self.error is None:
            self.error = str(err)
        self.remaining -= 1
        if self.remaining == 0:
            self.loop.call_soon_threadsafe(_resolve, self.future, self.error)


def _resolve(future: asyncio.Future[str | None], error: str | None) -> None:
    if not future.done():
        future.set_result(error)


class EventWriter:
    """The input and dead-letter topics behind one idempotent producer, polled by a thread."""

    def __init__(
        self, producer: _Producer, *, topic: str, dead_letter_topic: str,
        delivery_timeout_s: float, source: str = "collect",
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._dead_letter_topic = dead_letter_topic
        self._wait_s = delivery_timeout_s + _GRACE_S
        self._source = source.encode()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="collect-poll", daemon=True)
        self._thread.start()
        # False after a failed delivery, True again after a good one: what /readyz says.
        self.healthy = True

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(_POLL_S)

    async def write(self, events: Sequence[Event], dead_letters: Sequence[tuple[bytes, str]]) -> (
        None
    ):
        """Return once Kafka holds every event and dead letter, else raise KafkaUnavailableError."""
        count = len(events) + len(dead_letters)
        if count == 0:
            return
        pending = _Pending(count, asyncio.get_running_loop())
        started = time.perf_counter()
        produce = self._producer.produce
        delivered = pending.delivered
        try:
            for event in events:
                produce(self._topic, encode_event(event), event.user_id.encode(),
                        on_delivery=delivered)
            for raw, reason in dead_letters:
                produce(self._dead_letter_topic, raw, None, on_delivery=delivered,
                        headers=[("reason", reason.encode()), ("source", self._source)])
        except BufferError:
            # Those already queued are still delivered; the retry's copies are deduplicated.
            self.healthy = False
            msg = "Kafka's local queue is full"
            raise KafkaUnavailableError(msg) from None
        except Exception as exc:  # KafkaException: the producer refuses new messages
            self.healthy = False
            msg = f"Kafka refused the events: {exc}"
            raise KafkaUnavailableError(msg) from None
        try:
            error = await asyncio.wait_for(asyncio.shield(pending.future), self._wait_s)
        except TimeoutError:
            error = "no acknowledgement from Kafka in time"
        metrics.produce_seconds.observe(time.perf_counter() - started)
        if error is not None:
            self.healthy = False
            msg = f"Kafka did not take the events: {error}"
            raise KafkaUnavailableError(msg)
        self.healthy = True

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (up to `timeout_s`) and stop the polling thread."""
        self._producer.flush(timeout_s)
        self._stop.set()
        self._thread.join(timeout=1.0)

"""Dead letters of dispatch: triggers the dispatch API refused or kept failing.

`KafkaDeadLetterWriter` is a `nudgeflow.sinks.dispatch.FailureCallback`. Each failed
decision becomes one message on the dead-letter topic (default `triggers.dlq`):

- key: the `trigger_id` (UTF-8), so every failure of one trigger lands in one partition;
- value: JSON `{"reason", "status", "attempts", "trigger"}`, where `trigger` is
  `Decision.to_json()`: everything needed to re-send it later;
- header `reason`: the same reason, readable without parsing the value.

Producing is asynchronous; `flush()` waits for the broker and raises
`ServiceError` if a dead letter could not be written, so a failure is never lost
without someone hearing about it.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

import orjson

from nudgeflow.core.errors import ServiceError
from nudgeflow.core.settings import KafkaSettings
from nudgeflow.core.triggers import Decision
from nudgeflow.sinks.dispatch import DispatchResult

__all__ = ["DEFAULT_TOPIC", "KafkaDeadLetterWriter"]

DEFAULT_TOPIC: Final = "triggers.dlq"
# How long `produce` may wait for room in a full local queue before giving up.
_QUEUE_FULL_WAIT_S: Final = 1.0
_QUEUE_FULL_TRIES: Final = 10


class _Producer(Protocol):
    """The part of `confluent_kafka.Producer` used here; tests pass a fake."""

    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        *,
        headers: Any = None,
        on_delivery: Any = None,
    ) -> None: ...

    def poll(self, timeout: float = -1) -> int: ...

    def flush(self, timeout: float = -1) -> int: ...


def dead_letter_value(decision: Decision, result: DispatchResult) -> bytes:
    """The JSON value of one dead letter."""
    return orjson.dumps(
        {
            "reason": result.error,
            "status": result.status,
            "attempts": result.attempts,
            "trigger": decision.to_json(),
        }
    )


class KafkaDeadLetterWriter:
    """Writes failed dispatches to a Kafka topic; a `FailureCallback`."""

    def __init__(self, producer: _Producer, topic: str = DEFAULT_TOPIC) -> None:
        self._producer = producer
        self._topic = topic
        self._delivery_errors: list[str] = []

    @classmethod
    def from_settings(
        cls, kafka: KafkaSettings, topic: str | None = None
    ) -> KafkaDeadLetterWriter:
        # Imported here so that modules using only the protocol do not load librdkafka.
        from confluent_kafka import Producer

        producer = Producer(
            {
                "bootstrap.servers": kafka.bootstrap,
                "client.id": "nudgeflow-dispatch-dlq",
                # No duplicate dead letters when librdkafka retries a produce.
                "enable.idempotence": True,
                "linger.ms": 5,
            }
        )
        return cls(producer, topic or kafka.triggers_dlq_topic)

    @property
    def topic(self) -> str:
        return self._topic

    def __call__(self, decision: Decision, result: DispatchResult) -> None:
        reason = result.error or "unknown failure"
        kwargs: dict[str, Any] = {
            "value": dead_letter_value(decision, result),
            "key": decision.trigger.trigger_id.encode(),
            "headers": [("reason", reason.encode())],
            "on_delivery": self._on_delivery,
        }
        for _ in range(_QUEUE_FULL_TRIES):
            try:
                self._producer.produce(self._topic, **kwargs)
            except BufferError:
                # The local queue is full: serve delivery reports to make room, then try again.
                self._producer.poll(_QUEUE_FULL_WAIT_S)
            else:
                self._producer.poll(0)
                return
        msg = f"dead-letter topic {self._topic}: local queue stays full"
        raise ServiceError(msg)

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for every dead letter to reach the broker; raise ServiceError if one did not."""
        remaining = self._producer.flush(timeout)
        if self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            msg = f"dead-letter topic {self._topic}: {len(errors)} not written: {errors[0]}"
            raise ServiceError(msg)
        if remaining:
            msg = f"dead-letter topic {self._topic}: {remaining} still queued after {timeout} s"
            raise ServiceError(msg)
        return remaining

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self._delivery_errors.append(str(err))

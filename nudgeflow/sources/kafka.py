"""bytewax's Kafka source, handing on confluent-kafka's own messages.

`bytewax.connectors.kafka.KafkaSource` wraps every message it reads in a
`KafkaSourceMessage`, a frozen dataclass of eight fields: about 3 µs of CPU per
message here, more than decoding the event takes, for an object the flow
drops as soon as it has opened the message. This source is bytewax's (the
same partitions, consumer configuration, offsets as resume state, end of
partition, metrics), except that a batch holds the `confluent_kafka.Message`s
themselves; errors stay bytewax's `KafkaError`s around a `KafkaSourceMessage`.

It relies on bytewax's private partition class, pinned with bytewax 0.21.1
(the last release): `tests/integration/test_kafka_message_source.py` checks it against
`KafkaSource` on a real broker.
"""

from __future__ import annotations

from typing import Any

from bytewax.connectors.kafka import (
    KafkaError,
    KafkaSource,
    KafkaSourceMessage,
    _KafkaSourcePartition,
)
from confluent_kafka import KafkaError as ConfluentKafkaError
from confluent_kafka import Message

__all__ = ["KafkaMessageSource", "Message", "source_message"]


def source_message(msg: Message) -> KafkaSourceMessage[bytes | None, bytes | None]:
    """What bytewax's source would have made of `msg`."""
    headers: Any = msg.headers() or []
    return KafkaSourceMessage(
        key=msg.key(), value=msg.value(), topic=msg.topic(), headers=headers,
        latency=msg.latency(), offset=msg.offset(), partition=msg.partition(),
        timestamp=msg.timestamp(),
    )


class _MessagePartition(_KafkaSourcePartition):
    def next_batch(self) -> list[Any]:
        if self._eof:
            raise StopIteration
        msgs = self._consumer.consume(self._batch_size, 0.001)
        batch: list[Any] = []
        last_offset = None
        for msg in msgs:
            error = msg.error()
            if error is None:
                batch.append(msg)
            elif error.code() == ConfluentKafkaError._PARTITION_EOF:
                # As bytewax: emit this batch, end at the next call.
                self._eof = True
                break
            elif self._raise_on_errors:
                err_msg = f"error consuming from Kafka topic `{self._topic!r}`: {error}"
                raise RuntimeError(err_msg)
            else:
                batch.append(KafkaError(error, source_message(msg)))
            last_offset = msg.offset()
        if last_offset is not None:
            self._offset = last_offset + 1  # resume from the next message, not this one
        return batch


class KafkaMessageSource(KafkaSource):
    """`KafkaSource` whose batches hold `confluent_kafka.Message`s (and `KafkaError`s)."""

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _KafkaSourcePartition:
        part = super().build_part(step_id, for_part, resume_state)
        # bytewax's partition as built (consumer, offsets, metrics), with our `next_batch`:
        # copying its construction instead would fork its consumer configuration.
        part.__class__ = _MessagePartition
        return part

"""The ceiling, a plain consumer loop.

    python -m nudgeflow.bench.ceiling BOOTSTRAP TOPIC RESULT.json [BATCH] [BACKOFF_MS] [MAX]


A plain confluent-kafka loop, no framework: consume the whole topic from the
beginning in batches with the flow's consumer settings, decode every value with
`orjson.loads`, stop when every partition reported its end. What Python on this
machine can do with these messages at best; the flow's throughput is reported
as a ratio to it.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

__all__ = ["drain", "main"]


def drain(bootstrap: str, topic: str, *, batch_size: int = 500,
          fetch_queue_backoff_ms: int = 10, max_events: int = 0) -> dict[str, float | int]:
    """Read `topic` to its end (or `max_events`, if > 0); wall times of the first and the end."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"bench-ceiling-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "fetch.queue.backoff.ms": fetch_queue_backoff_ms,
    })
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = list(metadata.topics[topic].partitions)
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])  # 0: the beginning
        open_partitions = set(partitions)
        first: float | None = None
        events = decoded = 0
        loads = orjson.loads
        while open_partitions and not (max_events and events >= max_events):
            batch = consumer.consume(batch_size, 0.001)
            if first is None and batch:
                first = time.time()
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_partitions.discard(msg.partition())
                        continue
                    raise KafkaException(err)
                events += 1
                try:
                    loads(msg.value() or b"")
                    decoded += 1
                except orjson.JSONDecodeError:
                    pass
        end = time.time()
    finally:
        consumer.close()
    return {"first_read": first or end, "end": end, "events": events, "decoded": decoded}


def main(argv: list[str]) -> int:
    bootstrap, topic, result = argv[0], argv[1], Path(argv[2])
    batch = int(argv[3]) if len(argv) > 3 else 500
    backoff = int(argv[4]) if len(argv) > 4 else 10
    cap = int(argv[5]) if len(argv) > 5 else 0
    result.write_text(json.dumps(drain(bootstrap, topic, batch_size=batch,
                                       fetch_queue_backoff_ms=backoff, max_events=cap)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What a hop through a Kafka topic adds to a trigger's latency.

    python -m nudgeflow.bench.topic_hop BOOTSTRAP [--rate R] [--seconds S] [--json FILE]

The dispatch could run in a flow of its own, reading the decisions topic the
detecting flow writes (ARCHITECTURE.md "At least once"). That flow would add
one produce and one consume to every trigger's path. This measures exactly
that on the machine: a producer with the decisions sink's settings (bytewax's
`KafkaSink`: librdkafka defaults) sends messages stamped with their send time
at a paced `rate` to a fresh topic, a consumer with the flow's settings tails
it, and each message's latency is its receipt minus its stamp. It prints
p50/p99/max in ms and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from nudgeflow.bench.stats import percentile

__all__ = ["main", "measure"]


def measure(bootstrap: str, *, rate: float = 1000.0, seconds: float = 10.0) -> dict[str, Any]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = f"bench-hop-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=30)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic,
                         "enable.auto.commit": False, "fetch.queue.backoff.ms": 10})
    consumer.assign([TopicPartition(topic, 0, 0)])
    producer = Producer({"bootstrap.servers": bootstrap})
    total = int(rate * seconds)
    latencies: list[float] = []
    done = threading.Event()

    def consume() -> None:
        while len(latencies) < total and not done.is_set():
            for msg in consumer.consume(500, 0.001):  # as bytewax's source polls
                if msg.error() is None:
                    latencies.append(time.perf_counter() * 1000.0 - float(msg.value() or 0))

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        time.sleep(1.0)  # the consumer's first fetch is not what a running flow pays
        started = time.perf_counter()
        for i in range(total):
            due = started + i / rate
            while (delay := due - time.perf_counter()) > 0:
                time.sleep(min(delay, 0.001))
            producer.produce(topic, str(time.perf_counter() * 1000.0).encode())
            producer.poll(0)
        producer.flush(30)
        reader.join(timeout=30)
    finally:
        done.set()
        consumer.close()
        admin.delete_topics([topic])
    return {
        "rate": rate, "messages": total, "received": len(latencies),
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 2) if latencies else None,
        "max_ms": round(max(latencies), 2) if latencies else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nudgeflow.bench.topic_hop")
    parser.add_argument("bootstrap")
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.bootstrap, rate=args.rate, seconds=args.seconds)
    print(f"topic hop at {result['rate']:,.0f}/s: p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms, max {result['max_ms']} ms "
          f"({result['received']:,}/{result['messages']:,} received)")
    if args.json is not None:
        args.json.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

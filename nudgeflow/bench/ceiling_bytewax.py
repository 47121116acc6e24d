"""The bytewax ceiling: the least keyed, stateful bytewax flow over the same topic.

    python -m nudgeflow.bench.ceiling_bytewax BOOTSTRAP TOPIC RESULT.json [BATCH] [BACKOFF_MS] [MAX]

bytewax's `KafkaSource(tail=False)` from the beginning (the flow's consumer
settings, batches of BATCH) → key by `user_id` (`orjson.loads` of the value; a
line that is not a JSON object with a string `user_id` is keyed "") → a
`stateful_map` counting each user's events → a sink that drops everything.
1 worker, no recovery. It stops when every partition reached its end (or after
MAX events, if > 0). What bytewax itself costs a keyed, stateful job on this
machine: the flow's throughput divided by it is `ratio_bytewax`. The result is
`{"first_read", "end", "events", ...}` as `nudgeflow.bench.flowproc` writes it;
events/s = events / (end - first_read).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import orjson

from nudgeflow.bench.flowproc import counting_kafka_source, null_sink, write_result

__all__ = ["build", "main"]


def _key(message: Any) -> tuple[str, int]:
    try:
        data = orjson.loads(message.value or b"")
    except orjson.JSONDecodeError:
        return "", 1
    user = data.get("user_id") if isinstance(data, dict) else None
    return (user if isinstance(user, str) else ""), 1


def _count(state: int | None, _value: int) -> tuple[int, int]:
    count = (state or 0) + 1
    return count, count


def build(bootstrap: str, topic: str, *, batch_size: int = 500,
          fetch_queue_backoff_ms: int = 10, max_events: int | None = None) -> Any:
    """The dataflow: Kafka → (user_id, 1) → per-user counter → nowhere."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow

    flow = Dataflow("bench_ceiling_bytewax")
    messages = op.input("in", flow, counting_kafka_source(
        bootstrap, topic, batch_size=batch_size, fetch_queue_backoff_ms=fetch_queue_backoff_ms,
        max_events=max_events, bytewax_messages=True,  # bytewax as it comes
    ))
    keyed = op.map("key", messages, _key)
    counts = op.stateful_map("count", keyed, _count)
    op.output("out", counts, null_sink())
    return flow


def main(argv: list[str]) -> int:
    from bytewax.run import cli_main

    bootstrap, topic, result = argv[0], argv[1], Path(argv[2])
    batch = int(argv[3]) if len(argv) > 3 else 500
    backoff = int(argv[4]) if len(argv) > 4 else 10
    cap = int(argv[5]) if len(argv) > 5 else 0
    flow = build(bootstrap, topic, batch_size=batch, fetch_queue_backoff_ms=backoff,
                 max_events=cap or None)
    started = time.time()
    cli_main(flow, workers_per_process=1)
    write_result(result, 0, started)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One process of the live flow under benchmark.

    python -m nudgeflow.bench.flowproc JOB.json PROCESS_ID


Two modes:

- `drain`: the full default live flow (`nudgeflow.flows.live.build_live_flow`: Redis
  profiles, detection, the decisions and dead-letter topics, the dispatch API)
  with the input replaced by the flow's `KafkaMessageSource(tail=False)` on the
  pre-filled topic, so the run ends when every partition reaches its end, or
  after `max_events` (split over the partitions), or `max_seconds` after the
  first message was read, whichever comes first. The source is wrapped to note
  when the first message was read; the process writes
  `{"first_read": …, "end": …, "events": …}` (wall seconds) to
  `<result>.<process_id>.json` after the flow returned: events/s is
  events / (end - first_read), the flow's final flushes included.
- `tail`: exactly `nudgeflow run`'s flow on the job's topic, until stopped by a
  signal (the latency phase).

With `addresses`, the process is `process_id` of a bytewax cluster.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["FlowJob", "counting_kafka_source", "main", "null_sink", "write_result"]


@dataclass(frozen=True)
class FlowJob:
    """What one flow run is; written as JSON by the harness, read by every process."""

    mode: str  # "drain" or "tail"
    bootstrap: str
    topic: str
    redis_url: str
    api_url: str
    dead_letter_topic: str
    decisions_topic: str
    result: str  # path prefix of the per-process result files
    rules: str | None = None
    addresses: list[str] = field(default_factory=list)
    workers_per_process: int = 1
    batch_size: int = 500
    fetch_queue_backoff_ms: int = 10
    gc_freeze: bool = True  # as `run_live` does once the flow is built
    full_collections: bool = False  # `run_live` turns them off (`no_full_collections`)
    max_events: int | None = None  # drain: stop after about this many (split over partitions)
    max_seconds: float | None = None  # drain: stop this long after the first message read
    max_in_flight: int | None = None
    dispatch_timeout_s: float | None = None
    # Levers and attributions (nudgeflow.bench.levers); the defaults are the flow as shipped.
    null_dispatch: bool = False  # decisions go nowhere instead of the dispatch API
    null_kafka_sinks: bool = False  # no decisions / dead-letter topics
    profiles_file: str | None = None  # profiles from this JSONL file instead of Redis
    background_dispatch: bool = False  # nudgeflow.bench.proto.BackgroundDispatchSink
    pipeline_profiles: bool = False  # Redis lookups as a pipeline of HGETALLs (no script)
    kafka_sinks: str = "default"  # or "linger0" / "noflush": nudgeflow.bench.proto.TunedKafkaSink

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> FlowJob:
        return cls(**json.loads(path.read_text()))

    def result_path(self, process_id: int) -> Path:
        return Path(f"{self.result}.{process_id}.json")


class _Clock:
    """What the counting source saw, per process."""

    first_read: float | None = None
    eof: float | None = None
    events = 0


def counting_kafka_source(bootstrap: str, topic: str, *, batch_size: int = 500,
                          fetch_queue_backoff_ms: int = 10, max_events: int | None = None,
                          max_seconds: float | None = None, bytewax_messages: bool = False,
                          ) -> Any:
    """The flow's `KafkaMessageSource(tail=False)` from the beginning, counting into `_Clock`.

    With `bytewax_messages`, bytewax's own `KafkaSource` (its `KafkaSourceMessage`s).

    Ends at the end of every partition, after `max_events` (split evenly over the
    partitions), or once `max_seconds` have passed since this process read its
    first message, whichever comes first.
    """
    from bytewax.connectors.kafka import KafkaSource
    from bytewax.inputs import StatefulSourcePartition
    from confluent_kafka import OFFSET_BEGINNING

    from nudgeflow.sources.kafka import KafkaMessageSource

    class CountingPartition(StatefulSourcePartition[Any, Any]):
        def __init__(self, inner: StatefulSourcePartition[Any, Any], cap: int | None) -> None:
            self._inner = inner
            self._left = cap

        def _stop(self) -> bool:
            if self._left is not None and self._left <= 0:
                return True
            first = _Clock.first_read
            return max_seconds is not None and first is not None and (
                time.time() - first >= max_seconds
            )

        def next_batch(self) -> list[Any]:
            if self._stop():
                _Clock.eof = time.time()
                raise StopIteration
            try:
                batch = list(self._inner.next_batch())
            except StopIteration:
                _Clock.eof = time.time()
                raise
            if self._left is not None:
                batch = batch[: self._left]
                self._left -= len(batch)
            if batch:
                if _Clock.first_read is None:
                    _Clock.first_read = time.time()
                _Clock.events += len(batch)
            return batch

        def next_awake(self) -> datetime | None:
            return self._inner.next_awake()

        def snapshot(self) -> Any:
            return self._inner.snapshot()

        def close(self) -> None:
            self._inner.close()

    base = KafkaSource if bytewax_messages else KafkaMessageSource

    class CountingKafkaSource(base):  # type: ignore[valid-type,misc]
        def build_part(self, step_id: str, for_part: str, resume_state: Any) -> Any:
            cap = None
            if max_events is not None:
                cap = -(-max_events // len(self.list_parts()))
            return CountingPartition(super().build_part(step_id, for_part, resume_state), cap)

    return CountingKafkaSource(
        [bootstrap], [topic], tail=False, starting_offset=OFFSET_BEGINNING,
        add_config={"fetch.queue.backoff.ms": str(fetch_queue_backoff_ms)},
        batch_size=batch_size,
    )


def _counting_source(job: FlowJob) -> Any:
    return counting_kafka_source(
        job.bootstrap, job.topic, batch_size=job.batch_size,
        fetch_queue_backoff_ms=job.fetch_queue_backoff_ms, max_events=job.max_events,
        max_seconds=job.max_seconds,
    )


def write_result(path: Path, process_id: int, started: float) -> None:
    """What the counting source saw, with the flow's end (now), as JSON at `path`."""
    result = {
        "process_id": process_id,
        "started": started,
        "first_read": _Clock.first_read,
        "eof": _Clock.eof,
        "end": time.time(),
        "events": _Clock.events,
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    path.write_text(json.dumps(result))


def build(job: FlowJob) -> Any:
    """The dataflow of `job` (also importable: `nudgeflow.bench.flowproc:build`)."""
    from nudgeflow.core.profiles import load_profiles
    from nudgeflow.core.rules import load_rules
    from nudgeflow.core.settings import (
        DEFAULT_RULES,
        DispatchSettings,
        KafkaSettings,
        RedisSettings,
        Settings,
    )
    from nudgeflow.enrich.profile_store import StaticProfiles
    from nudgeflow.flows.live import LiveParts, build_live_flow

    dispatch = DispatchSettings(url=job.api_url)
    if job.max_in_flight is not None:
        dispatch = dispatch.model_copy(update={"max_in_flight": job.max_in_flight})
    if job.dispatch_timeout_s is not None:
        dispatch = dispatch.model_copy(update={"timeout_s": job.dispatch_timeout_s})
    settings = Settings(
        kafka=KafkaSettings(
            bootstrap=job.bootstrap, input_topic=job.topic,
            dead_letter_topic=job.dead_letter_topic, decisions_topic=job.decisions_topic,
            fetch_queue_backoff_ms=job.fetch_queue_backoff_ms,
        ),
        redis=RedisSettings(url=job.redis_url),
        dispatch=dispatch,
        rules=Path(job.rules) if job.rules else DEFAULT_RULES,
        workers=job.workers_per_process,
    )
    rules = load_rules(settings.rules)
    source = _counting_source(job) if job.mode == "drain" else None
    dispatch_sink: Any = None
    dead_letters: Any = None
    decisions: Any = None
    outcomes: Any = None
    if job.null_dispatch:
        dispatch_sink = _NullSink()
    elif job.background_dispatch:
        from nudgeflow.bench.proto import BackgroundDispatchSink

        dispatch_sink = BackgroundDispatchSink(settings.dispatch)
    if job.null_kafka_sinks:
        dead_letters, decisions, outcomes = _NullSink(), _NullSink(), _NullSink()
    elif job.kafka_sinks != "default":
        from nudgeflow.bench.proto import TunedKafkaSink
        from nudgeflow.flows.live import decision_message

        flush = job.kafka_sinks == "linger0"
        dead_letters = TunedKafkaSink(job.bootstrap, job.dead_letter_topic, flush_each_batch=flush)
        decisions = TunedKafkaSink(job.bootstrap, job.decisions_topic, flush_each_batch=flush,
                                   convert=decision_message)
    parts = LiveParts(
        source=source,
        dispatch=dispatch_sink,
        dead_letters=dead_letters,
        decisions=decisions,
        outcomes=outcomes,
        profiles=(
            StaticProfiles(load_profiles(Path(job.profiles_file))) if job.profiles_file else None
        ),
    )
    return build_live_flow(settings, rules=rules, parts=parts)


def _null_sink_class() -> Any:
    from bytewax.outputs import DynamicSink, StatelessSinkPartition

    class Partition(StatelessSinkPartition[Any]):
        def write_batch(self, items: list[Any]) -> None:
            pass

    class NullSink(DynamicSink[Any]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> Partition:
            return Partition()

    return NullSink


def null_sink() -> Any:
    """A bytewax sink that drops every item."""
    return _null_sink_class()()


_NullSink = null_sink  # reads as the class it builds, in `build`


def main(argv: list[str]) -> int:
    from bytewax.run import cli_main

    job = FlowJob.load(Path(argv[0]))
    process_id = int(argv[1]) if len(argv) > 1 else 0
    if job.pipeline_profiles:
        import redis

        redis.Redis.register_script = None  # type: ignore[assignment,method-assign]
    flow = build(job)
    if job.gc_freeze:
        gc.collect()
        gc.freeze()
    if not job.full_collections:
        from nudgeflow.flows.live import no_full_collections

        no_full_collections()
    started = time.time()
    if job.addresses:
        cli_main(flow, workers_per_process=job.workers_per_process, process_id=process_id,
                 addresses=job.addresses)
    else:
        cli_main(flow, workers_per_process=job.workers_per_process)
    write_result(job.result_path(process_id), process_id, started)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

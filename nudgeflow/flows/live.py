"""The live dataflow: Kafka in, triggers decided per user, the dispatch API called.

    Kafka `events` ─► decode ─┬─ invalid ─────────────────────────────────► Kafka `events.dlq`
                              └─ valid ─► profiles (Redis, batched) ─► key by user ─► detect
    detect ─┬─ decisions ─┬─► dispatch API (httpx, retries) ─ failures ─► Kafka `triggers.dlq`
            │             └─► Kafka `triggers.decisions` (every decision, with its reason)
            ├─ outcomes ──────► Kafka `triggers.outcomes` (each converted trigger, once)
            └─ late ───────────────────────────────────────────────────────► Kafka `events.dlq`

The flow is a factory: tests and tools pass their own source, sinks, profile
lookup and clock. A dead letter keeps the original message bytes as its value
and its key, with the reason and the source topic/partition/offset in headers,
so a fixed message can be replayed from the dead-letter topic as it was.
"""

from __future__ import annotations

import gc
import logging
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import bytewax.operators as op
import orjson
from bytewax.connectors.kafka import KafkaError, KafkaSinkMessage, KafkaSourceMessage
from bytewax.connectors.kafka import operators as kop
from bytewax.dataflow import Dataflow, Stream
from bytewax.inputs import FixedPartitionedSource
from bytewax.outputs import Sink
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Message

from nudgeflow.core.envelope import DeadLetter, Envelope, Origin, open_envelope
from nudgeflow.core.errors import ConfigError, ServiceError
from nudgeflow.core.metrics import metrics
from nudgeflow.core.observability import Health, configure_logging, serve_health
from nudgeflow.core.outcomes import Outcome
from nudgeflow.core.rules import RulesConfig, load_rules
from nudgeflow.core.settings import Settings
from nudgeflow.core.stream_clock import PartitionClocks
from nudgeflow.core.timeutil import now_ms
from nudgeflow.core.triggers import Decision
from nudgeflow.enrich.messages import MessageRenderer
from nudgeflow.enrich.profile_store import ProfileLookup, RedisProfiles, StaticProfiles
from nudgeflow.operators.detect import (
    DETECT_STEP,
    Emitted,
    EmittedOutcome,
    LiveClock,
    detect,
    shard_key,
)
from nudgeflow.operators.detector import Detector
from nudgeflow.operators.shard_snapshot import check_layout, first_user
from nudgeflow.operators.snapshot import check_recovery
from nudgeflow.sinks.dead_letter import KafkaDeadLetterWriter
from nudgeflow.sinks.dispatch import DispatchSink
from nudgeflow.sources.kafka import KafkaMessageSource
from nudgeflow.sources.stamped import StampedSource

log = logging.getLogger(__name__)

RawMessage = KafkaSourceMessage[bytes | None, bytes | None]
LIVE_FLOW_ID = "nudgeflow_live"


@dataclass(frozen=True)
class LiveParts:
    """What a live flow is made of; tests replace any part."""

    # default: the input topic; any partitioned source of Kafka messages (tests)
    source: FixedPartitionedSource[Any, Any] | None = None
    # default: DispatchSink to settings.dispatch.url; it gets (user_id, Decision) pairs
    dispatch: Sink[tuple[str, Decision]] | None = None
    dead_letters: Sink[Any] | None = None  # default: the dead-letter topic
    decisions: Sink[Any] | None = None  # default: the decisions topic
    outcomes: Sink[Any] | None = None  # default: the outcomes topic; gets (user_id, Outcome)
    profiles: ProfileLookup | None = None  # default: Redis (or none, with redis url 'none')
    clock: Callable[[], int] = now_ms


def _origin(msg: RawMessage) -> Origin:
    timestamp = msg.timestamp[1] if msg.timestamp is not None else None
    return Origin(
        topic=msg.topic, partition=msg.partition, offset=msg.offset, timestamp_ms=timestamp
    )


_mismatch_warned: dict[str, int] = {}
MISMATCH_WARNING_EVERY_MS = 60_000


def _open_message(msg: Message | RawMessage | KafkaError[Any, Any], now: int | None) -> Any:
    """A Kafka message -> an Envelope or a DeadLetter (a consumer error passes through).

    `msg` is confluent-kafka's own (`KafkaMessageSource`), or bytewax's wrapper
    of one (a source of `KafkaSourceMessage`s: tests, tools).
    """
    if type(msg) is Message:
        key = msg.key()
        timestamp = msg.timestamp()
        origin = Origin(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                        timestamp_ms=timestamp[1] if timestamp is not None else None)
        opened = open_envelope(msg.value(), origin, now, key)
    elif isinstance(msg, KafkaSourceMessage):
        key = msg.key
        opened = open_envelope(msg.value, _origin(msg), now, key)
    else:
        return msg
    if isinstance(opened, Envelope) and key != opened.event.user_id.encode():
        _key_mismatch(opened.origin, now)
    return opened


def _key_mismatch(origin: Origin, now: int | None) -> None:
    # Applied all the same (EVENTS.md 1), but its user's order across partitions is
    # not guaranteed: count every one, warn once a minute per partition.
    partition = -1 if origin.partition is None else origin.partition
    metrics.record_key_mismatch(origin.topic or "", partition)
    where = origin.source
    wall = now or 0
    if wall - _mismatch_warned.get(where, -MISMATCH_WARNING_EVERY_MS) >= MISMATCH_WARNING_EVERY_MS:
        _mismatch_warned[where] = wall
        log.warning("key mismatch: an event's Kafka key is not its user_id; it is applied, "
                    "but its user's order across partitions is not guaranteed",
                    extra={"topic": origin.topic, "partition": origin.partition,
                           "offset": origin.offset})


def dead_letter_message(letter: DeadLetter) -> KafkaSinkMessage[bytes | None, bytes | None]:
    """The original bytes and key, the reason and source position as headers."""
    metrics.record_dead_letter(letter.reason)
    origin = letter.origin
    headers = [("reason", letter.reason.encode())]
    if origin.topic is not None:
        headers += [
            ("source.topic", origin.topic.encode()),
            ("source.partition", str(origin.partition).encode()),
            ("source.offset", str(origin.offset).encode()),
        ]
    return KafkaSinkMessage(key=letter.key, value=letter.raw, headers=headers)


def decision_message(item: tuple[str, Emitted]) -> KafkaSinkMessage[bytes, bytes]:
    decision = item[1].decision
    return KafkaSinkMessage(
        key=decision.trigger.user_id.encode(), value=orjson.dumps(decision.to_json())
    )


def counted_outcome(item: tuple[str, EmittedOutcome]) -> tuple[str, Outcome]:
    """Count an outcome in the metrics on its way out."""
    outcome = item[1].outcome
    metrics.record_outcome(outcome)
    return item[0], outcome


def outcome_message(item: tuple[str, Outcome]) -> KafkaSinkMessage[bytes, bytes]:
    outcome = item[1]
    return KafkaSinkMessage(key=outcome.user_id.encode(), value=orjson.dumps(outcome.to_json()))


def build_live_flow(
    settings: Settings,
    *,
    rules: RulesConfig | None = None,
    parts: LiveParts | None = None,
    start_at_end: bool = False,
    stop: threading.Event | None = None,
) -> Dataflow:
    """The live dataflow. Once `stop` is set, the input ends and the flow runs out."""
    parts = parts or LiveParts()
    config = rules or load_rules(settings.rules)
    detector = Detector(config)
    kafka = settings.kafka
    brokers = [kafka.bootstrap]
    clock = parts.clock
    profiles = parts.profiles or _default_profiles(settings)

    flow = Dataflow(LIVE_FLOW_ID)
    partitions = PartitionClocks()
    inner: FixedPartitionedSource[Any, Any] = parts.source or KafkaMessageSource(
        brokers, [kafka.input_topic],
        starting_offset=OFFSET_END if start_at_end else OFFSET_BEGINNING,
        add_config={"fetch.queue.backoff.ms": str(kafka.fetch_queue_backoff_ms)},
        batch_size=500, raise_on_errors=False,
    )
    # Opened and stamped with the partition's stream clock where it is read.
    read = op.input("events", flow, StampedSource(
        inner, _open_message, now=clock, registry=partitions, stop=stop,
    ))
    consumer = op.branch("consumer_errors", read, lambda x: isinstance(x, KafkaError))
    op.inspect("log_consumer_errors", consumer.trues, lambda _step, err: log.error("%s", err.err))

    def with_profiles(batch: list[Envelope | DeadLetter]) -> Iterable[Envelope | DeadLetter]:
        valid = [x.event.user_id for x in batch if isinstance(x, Envelope)]
        found = profiles.lookup(valid) if valid else {}
        return [
            x.with_profile(found[x.event.user_id]) if isinstance(x, Envelope) else x
            for x in batch
        ]

    opened = op.flat_map_batch("profiles", consumer.falses, with_profiles)
    split = op.branch("valid", opened, lambda x: isinstance(x, Envelope))
    valid: Stream[Any] = split.trues
    invalid: Stream[Any] = split.falses
    keyed = op.key_on("by_shard", valid, shard_key(settings.detect_shards))
    detected = detect(DETECT_STEP, keyed, detector, clock=LiveClock(clock, partitions),
                      snapshots=settings.recovery_dir is not None,
                      shards=settings.detect_shards,
                      park_after_ms=round(settings.detect_park_after_s * 1000))

    late: Stream[Any] = op.map("late_letters", detected.late, lambda kv: kv[1])
    letters = op.merge("dead_letters", invalid, late)
    dlq_messages = op.map("dlq_message", letters, dead_letter_message)
    if parts.dead_letters is not None:
        op.output("dead_letter_out", dlq_messages, parts.dead_letters)
    else:
        kop.output("dead_letter_out", dlq_messages, brokers=brokers,
                   topic=kafka.dead_letter_topic)

    decisions = op.map_value("decision", detected.decisions, lambda emitted: emitted.decision)
    if parts.decisions is not None:
        op.output("decisions_out", detected.decisions, parts.decisions)
    else:
        kop.output("decisions_out", op.map("decision_message", detected.decisions,
                                           decision_message),
                   brokers=brokers, topic=kafka.decisions_topic)
    outcomes = op.map("outcome_counted", detected.outcomes, counted_outcome)
    if parts.outcomes is not None:
        op.output("outcomes_out", outcomes, parts.outcomes)
    else:
        kop.output("outcomes_out", op.map("outcome_message", outcomes, outcome_message),
                   brokers=brokers, topic=kafka.outcomes_topic)
    if parts.dispatch is not None:
        dispatch: Sink[tuple[str, Decision]] = parts.dispatch
    else:
        # Templates are checked now: a missing variable refuses to start, not to send.
        renderer = MessageRenderer.load(settings.templates, config)
        dispatch = DispatchSink(
            settings.dispatch,
            partitions=settings.workers * max(1, len(settings.addresses or [])),
            failure_factory=lambda: KafkaDeadLetterWriter.from_settings(kafka),
            # one profile lookup per sink partition: the Redis cache is not thread-safe
            render_factory=lambda: renderer.for_profiles(
                parts.profiles or _default_profiles(settings)
            ),
        )
    op.output("dispatch", decisions, dispatch)
    return flow


def _default_profiles(settings: Settings) -> ProfileLookup:
    if settings.redis.url.lower() in {"", "none"}:
        return StaticProfiles()
    return RedisProfiles.from_url(
        settings.redis.url,
        ttl_s=settings.redis.profile_cache_ttl_s,
        max_size=settings.redis.profile_cache_size,
    )


def check_kafka(bootstrap: str, topic: str, timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when the broker cannot be reached or the topic is missing."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 3000})
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        msg = f"cannot reach Kafka at {bootstrap}: {exc.args[0].str() if exc.args else exc}"
        raise ServiceError(msg) from None
    if topic not in metadata.topics:
        msg = f"input topic {topic!r} does not exist on {bootstrap}"
        raise ServiceError(msg)


def _start_health(health: Health, settings: Settings) -> None:
    if settings.health_port == 0:
        return
    port = settings.health_port + (settings.process_id or 0)
    try:
        serve_health(health, settings.health_host, port)
    except OSError as exc:
        # A busy port must not stop the flow: it is an operator aid, not the product.
        log.warning("health endpoints not served", extra={"port": port, "error": str(exc)})


def recovery_config(settings: Settings) -> RecoveryConfig | None:
    """Bytewax recovery for `settings.recovery_dir`, initialising the directory when absent."""
    directory = settings.recovery_dir
    if directory is None:
        return None
    if directory.exists():
        # A snapshot this version cannot read is refused now, not when its user shows up.
        check_recovery(directory, f"{LIVE_FLOW_ID}.{DETECT_STEP}", first_user)
        check_layout(directory, f"{LIVE_FLOW_ID}.{DETECT_STEP}", settings.detect_shards)
    if not directory.exists() or not any(directory.glob("*.sqlite3")):
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cannot create recovery directory {directory}: {exc.strerror or exc}"
            raise ConfigError(msg) from None
        init_db_dir(directory, settings.recovery_partitions)
    return RecoveryConfig(str(directory))


# More collections of the middle generation than can happen: no automatic full one.
_NEVER: Final = 2**31 - 1


def no_full_collections() -> None:
    """Leave the oldest generation alone: only young objects are collected for cycles.

    A full collection scans every object the users' state is made of, and holds
    the GIL while it does: 84 ms at 102,000 users held here (`nudgeflow bench`,
    "full_gc_ms"; 1.3 to 1.9 s before the compact state), growing with the
    users, all of it added to the latency of every event in flight. The state is
    freed by reference counting (it holds no cycles); what this gives up is
    collecting a cycle that became garbage after surviving two younger
    collections, such as a request that waited out a long outage. Measured: the
    same peak RSS (194 MB) with and without, for the whole default flow over the
    bench's 200,000-event topic.
    """
    threshold0, threshold1, _ = gc.get_threshold()
    gc.set_threshold(threshold0, threshold1, _NEVER)


def run_live(settings: Settings, *, start_at_end: bool = False) -> None:
    """`nudgeflow run`: check the services, then run the live flow until stopped."""
    configure_logging(settings.log_level)
    health = Health()
    _start_health(health, settings)
    rules = load_rules(settings.rules)
    check_kafka(settings.kafka.bootstrap, settings.kafka.input_topic)
    # SIGTERM (a container stop) or Ctrl-C ends the input: every step finishes what it
    # holds, the sinks close, and the command exits (0, or 130 for Ctrl-C).
    stop = threading.Event()
    flow = build_live_flow(settings, rules=rules, start_at_end=start_at_end, stop=stop)
    # Everything built so far lives as long as the process: keep the collector from
    # scanning it again and again (+29% throughput measured, bench --levers).
    gc.collect()
    gc.freeze()
    no_full_collections()
    health.detail = "running"
    health.ready.set()
    log.info("flow started", extra={"topic": settings.kafka.input_topic,
                                    "workers": settings.workers,
                                    "process_id": settings.process_id})
    recovery = recovery_config(settings)
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        received.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, on_signal)
                for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        cli_main(
            flow,
            workers_per_process=settings.workers,
            process_id=settings.process_id,
            addresses=settings.addresses,
            epoch_interval=timedelta(seconds=settings.snapshot_interval_s),
            recovery_config=recovery,
        )
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("flow stopped", extra={"signal": received[0] if received else None})
    if received and received[0] == signal.SIGINT:
        raise KeyboardInterrupt  # the command's exit code says it was interrupted (130)


def run_local_cluster(argv: list[str], processes: int) -> int:
    """`nudgeflow run --processes P`: P local processes as one bytewax cluster on loopback.

    Each child is `nudgeflow run` with `--process-id i --addresses …`; a signal to
    the parent is passed on to every child, and the exit code is the worst of theirs.
    """
    ports = _free_ports(processes)
    addresses = ",".join(f"127.0.0.1:{port}" for port in ports)
    base = _without_flag(argv, "--processes")
    children = [
        subprocess.Popen(  # our own command line, re-run with the cluster flags
            [sys.executable, "-m", "nudgeflow", *base,
             "--process-id", str(index), "--addresses", addresses]
        )
        for index in range(processes)
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    return max(child.wait() for child in children)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _without_flag(argv: list[str], flag: str) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == flag:
            skip = True
            continue
        if arg.startswith(flag + "="):
            continue
        out.append(arg)
    return out

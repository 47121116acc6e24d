"""The collector's throughput in batches and its latency for single events, on one core.

    nudgeflow bench --collector [--json FILE] [--runs R]
    python -m nudgeflow.bench.collector [--seconds S] [--runs R] [--stacks auto,h11]
                                        [--json FILE]

Each run starts the collector in a subprocess pinned to one CPU
(`sched_setaffinity`: its event loop, its polling thread and librdkafka's
threads all share that core), writing to a fresh topic of the bench's Kafka,
and drives it from this process with minimal keep-alive HTTP/1.1 clients
(`nudgeflow.bench.api_rps.RawConnection`, ~10x cheaper than httpx):

- batches: `connections` clients, each sending `POST /v1/events` with
  `batch_size` canonical events and waiting for the answer, for S seconds;
  events/s counts the events answered `accepted` inside the window;
- single events: one client, one event a request, paced at `single_rate`
  requests/s; p50/p99 of the time from writing the request to its answer
  (the answer comes after Kafka acknowledged the event with `acks=all`).

Afterwards the topic must hold exactly the accepted events (its offsets): a
run that lost or invented one fails. `stacks` compares the HTTP server stacks
the collector can run on: `auto` (uvloop + httptools, what `nudgeflow collect`
uses) and `h11` (asyncio + h11).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from nudgeflow.bench.api_rps import RawConnection, free_port
from nudgeflow.bench.stats import machine_info, percentile, spread
from nudgeflow.core.errors import ServiceError

Stack = Literal["auto", "h11"]

_HOST: Final = "127.0.0.1"
_KEY: Final = "bench-key"
_AUTH: Final = base64.b64encode(f"{_KEY}:".encode()).decode()


@dataclass(frozen=True, slots=True)
class CollectorBench:
    seconds: float = 10.0
    runs: int = 3
    batch_size: int = 100
    connections: int = 4
    single_requests: int = 2000
    single_rate: float = 200.0
    stacks: tuple[Stack, ...] = ("auto",)


QUICK: Final = CollectorBench()
SMOKE: Final = CollectorBench(seconds=1.0, runs=1, single_requests=100)


def _request(body: bytes) -> bytes:
    return (
        f"POST /v1/events HTTP/1.1\r\nHost: {_HOST}\r\nAuthorization: Basic {_AUTH}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class _Events:
    """Realistic canonical events with fresh ids, cheap to make."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._n = 0

    def batch(self, size: int) -> bytes:
        events = []
        for _ in range(size):
            n = self._n
            self._n += 1
            user = f"u{n % 5000}"
            if n % 4 == 3:
                events.append({"event_id": f"{self._prefix}-{n}", "user_id": user,
                               "type": "add_to_cart", "ts": int(time.time() * 1000),
                               "product_id": f"p{n % 300}", "quantity": 1, "price": 19.9,
                               "session_id": f"s-{user}"})
            else:
                events.append({"event_id": f"{self._prefix}-{n}", "user_id": user,
                               "type": "page_view", "ts": int(time.time() * 1000),
                               "page_type": "product", "product_id": f"p{n % 300}",
                               "url": f"https://shop.example/p/{n % 300}",
                               "session_id": f"s-{user}"})
        return orjson.dumps(events if size > 1 else events[0])


async def _batches(port: int, config: CollectorBench, prefix: str) -> tuple[int, float]:
    """Accepted events inside the window, and the window's length."""
    connections = [await RawConnection.open(_HOST, port) for _ in range(config.connections)]
    accepted = 0
    started = time.perf_counter()
    end = started + config.seconds

    async def client(connection: RawConnection, index: int) -> None:
        nonlocal accepted
        events = _Events(f"{prefix}-b{index}")
        while time.perf_counter() < end:
            status, body = await connection.request(_request(events.batch(config.batch_size)))
            if status != 200:
                msg = f"collector answered {status}: {body[:200]!r}"
                raise ServiceError(msg)
            if time.perf_counter() <= end:
                accepted += orjson.loads(body)["accepted"]
        # answers after the window are not counted, but their events are in the topic

    try:
        await asyncio.gather(*(client(c, i) for i, c in enumerate(connections)))
    finally:
        for connection in connections:
            connection.close()
    return accepted, config.seconds


async def _singles(port: int, config: CollectorBench, prefix: str) -> list[float]:
    connection = await RawConnection.open(_HOST, port)
    events = _Events(f"{prefix}-s")
    latencies: list[float] = []
    interval = 1.0 / config.single_rate
    next_at = time.perf_counter()
    try:
        for _ in range(config.single_requests):
            request = _request(events.batch(1))
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the offered load
            sent = time.perf_counter()
            status, body = await connection.request(request)
            latencies.append((time.perf_counter() - sent) * 1000)
            if status != 200:
                msg = f"collector answered {status}: {body[:200]!r}"
                raise ServiceError(msg)
            next_at += interval
    finally:
        connection.close()
    return latencies


def _cpu_s(pid: int) -> float:
    """utime + stime of a process and all its threads (Linux), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _topic_size(bootstrap: str, topic: str) -> int:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4()}"})
    try:
        meta = consumer.list_topics(topic, timeout=10)
        total = 0
        for partition in meta.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            total += high - low
        return total
    finally:
        consumer.close()


def _make_topic(bootstrap: str, topic: str, partitions: int = 3) -> None:
    from confluent_kafka.admin import (  # type: ignore[attr-defined]  # NewTopic: stub gap
        AdminClient,
        NewTopic,
    )

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                            replication_factor=1)])
    futures[topic].result(timeout=30)


def _delete_topics(bootstrap: str, topics: Sequence[str]) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.delete_topics(list(topics)).values():
        future.result(timeout=30)


def _start(bootstrap: str, topic: str, port: int, stack: Stack) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NUDGEFLOW_REDIS__URL": "none",
           "NUDGEFLOW_COLLECT__WRITE_KEYS": orjson.dumps([_KEY]).decode(),
           # the bench offers more than the default per-key limit on purpose
           "NUDGEFLOW_COLLECT__RATE_PER_KEY": "1000000000",
           "NUDGEFLOW_KAFKA__DEAD_LETTER_TOPIC": f"{topic}.dlq"}
    process = subprocess.Popen(
        [sys.executable, "-m", "nudgeflow.bench.collector", "--serve", "--stack", stack,
         "--port", str(port), "--brokers", bootstrap, "--topic", topic],
        env=env, stderr=subprocess.PIPE,
    )
    os.sched_setaffinity(process.pid, {sorted(os.sched_getaffinity(0))[-1]})
    return process


async def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            connection = await RawConnection.open(_HOST, port)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stderr = process.stderr.read().decode() if process.stderr else ""
                msg = f"the collector did not start: {stderr[-500:]}"
                raise ServiceError(msg) from None
            await asyncio.sleep(0.1)
            continue
        connection.close()
        return


def _one_run(bootstrap: str, config: CollectorBench, stack: Stack) -> dict[str, Any]:
    topic = f"bench-collect-{uuid.uuid4().hex[:12]}"
    _make_topic(bootstrap, topic)
    port = free_port()
    process = _start(bootstrap, topic, port, stack)
    try:
        asyncio.run(_wait_listening(port, process))
        # one warm-up request: connections to the brokers, the producer's first batch
        asyncio.run(_singles(port, CollectorBench(single_requests=20), "warm"))
        cpu_before, wall_before = _cpu_s(process.pid), time.perf_counter()
        accepted, seconds = asyncio.run(_batches(port, config, topic))
        cpu_used = _cpu_s(process.pid) - cpu_before
        cpu_batch = cpu_used / (time.perf_counter() - wall_before)
        latencies = asyncio.run(_singles(port, config, topic))
    finally:
        process.terminate()
        process.communicate(timeout=30)
    held = _topic_size(bootstrap, topic)
    _delete_topics(bootstrap, [topic])
    sent_singles = config.single_requests + 20
    if held < accepted + sent_singles:
        msg = f"the topic holds {held} events, fewer than the {accepted + sent_singles} accepted"
        raise ServiceError(msg)
    return {
        "stack": stack,
        "batch_events_per_s": accepted / seconds,
        "batch_server_cpu": cpu_batch,
        # CPU the collector spent per accepted event (answers after the window included, so
        # an upper bound): what bounds one saturated core
        "batch_cpu_us_per_event": cpu_used / accepted * 1e6 if accepted else None,
        "single_p50_ms": percentile(latencies, 50),
        "single_p99_ms": percentile(latencies, 99),
        "single_max_ms": max(latencies),
        "topic_messages": held,
    }


def run(config: CollectorBench, *, bootstrap: str) -> dict[str, Any]:
    """Every run of every stack, interleaved, and their medians."""
    runs: list[dict[str, Any]] = []
    for index in range(config.runs):
        for stack in config.stacks:
            print(f"collector bench: {stack} run {index + 1}/{config.runs}", file=sys.stderr)
            runs.append(_one_run(bootstrap, config, stack))
    stacks: dict[str, Any] = {}
    for stack in config.stacks:
        mine = [r for r in runs if r["stack"] == stack]
        stacks[stack] = {
            "batch_events_per_s": spread([r["batch_events_per_s"] for r in mine], 0),
            "batch_server_cpu_cores": spread([r["batch_server_cpu"] for r in mine], 2),
            "batch_cpu_us_per_event": spread(
                [r["batch_cpu_us_per_event"] for r in mine if r["batch_cpu_us_per_event"]], 1),
            "single_p50_ms": spread([r["single_p50_ms"] for r in mine], 2),
            "single_p99_ms": spread([r["single_p99_ms"] for r in mine], 2),
        }
    return {
        "bench": "collector",
        "config": {"seconds": config.seconds, "runs": config.runs,
                   "batch_size": config.batch_size, "connections": config.connections,
                   "single_requests": config.single_requests, "single_rate": config.single_rate,
                   "cores": 1},
        "machine": machine_info(),
        "stacks": stacks,
        "runs": runs,
        "targets": {"batch_events_per_s": 5000, "single_p99_ms": 20},
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "| collector on one core | stack | median | min-max | target |",
        "|---|---|---:|---:|---:|",
    ]
    for stack, s in result["stacks"].items():
        rows = [
            (f"batches of {result['config']['batch_size']} (events/s)", s["batch_events_per_s"],
             "≥ 5,000"),
            ("server CPU in batches (cores)", s["batch_server_cpu_cores"], ""),
            ("server CPU per event in batches (µs)", s["batch_cpu_us_per_event"], ""),
            (f"single events at {result['config']['single_rate']:g}/s, p50 (ms)",
             s["single_p50_ms"], ""),
            ("single events, p99 (ms)", s["single_p99_ms"], "< 20"),
        ]
        for label, value, target in rows:
            lines.append(f"| {label} | {stack} | {value['median']:,} | "
                         f"{value['min']:,}-{value['max']:,} | {target} |")
    return "\n".join(lines)


def _serve(args: argparse.Namespace) -> None:
    """The collector on the stack asked for (what `nudgeflow collect` runs is `auto`)."""
    import signal

    import uvicorn

    from nudgeflow.collect.server import build_collector
    from nudgeflow.core.settings import load_settings

    settings = load_settings(brokers=args.brokers, topic=args.topic)
    app, writer = build_collector(settings)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.run(app, host=_HOST, port=args.port, log_level="warning", access_log=False,
                    ws="none", lifespan="on", proxy_headers=False,
                    loop="auto" if args.stack == "auto" else "asyncio",
                    http="auto" if args.stack == "auto" else "h11")
    except KeyboardInterrupt:
        pass
    finally:
        writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nudgeflow.bench.collector")
    parser.add_argument("--seconds", type=float, default=QUICK.seconds)
    parser.add_argument("--runs", type=int, default=QUICK.runs)
    parser.add_argument("--stacks", default="auto", help="comma-separated: auto, h11")
    parser.add_argument("--connections", type=int, default=QUICK.connections)
    parser.add_argument("--batch-size", type=int, default=QUICK.batch_size)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json")
    parser.add_argument("--brokers", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stack", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args)
        return 0
    stacks: tuple[Stack, ...] = ()
    for name in (part.strip() for part in args.stacks.split(",") if part.strip()):
        if name not in ("auto", "h11"):
            parser.error("--stacks: auto and/or h11")
        stacks += ("auto",) if name == "auto" else ("h11",)
    base = SMOKE if args.smoke else QUICK
    config = CollectorBench(seconds=args.seconds if not args.smoke else base.seconds,
                            runs=args.runs if not args.smoke else 1,
                            single_requests=base.single_requests,
                            connections=args.connections, batch_size=args.batch_size,
                            stacks=stacks)
    result = run(config, bootstrap=args.brokers)
    print(render(result))
    if args.json:
        with open(args.json, "wb") as handle:
            handle.write(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`nudgeflow bench --levers`: each lever of issue 4 measured against the shipped flow.

Flow levers run the drain throughput (1 worker, `runs` rounds, every variant
once per round so that they share the machine's conditions) and, for the ones
that matter for latency, a tail run at a fixed rate. Each variant is reported
as events/s and as a ratio to the shipped flow of the same round.

Micro-levers are measured in this process on the generated events:

- decode: `orjson.loads` only vs `nudgeflow.core.events.decode_event` (pydantic);
- bytewax's cost per item and step: a chain of `map` steps over a
  `TestingSource`, per item, against a single `flat_map_batch`;
- Redis: one HGETALL round trip per profile vs one pipeline per batch of 500;
- httpx: requests/s and latency to the reference API at 1..32 in flight;
- `gc.freeze()` is a flow lever (`gc_freeze`, on by default as in `run_live`).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import orjson
from confluent_kafka import Producer

from nudgeflow.app.samples import generate_profiles
from nudgeflow.bench import harness
from nudgeflow.bench.flowproc import FlowJob
from nudgeflow.bench.pacing import PacedStream, event_latencies, pace
from nudgeflow.bench.services import DispatchApi, child_env, processes, stop_process
from nudgeflow.bench.stats import machine_info, percentile, spread

__all__ = ["FLOW_VARIANTS", "render", "run"]

FLOW_VARIANTS: Final[dict[str, dict[str, Any]]] = {
    "shipped": {},
    "Redis: pipeline of HGETALLs (before the lookup script)": {"pipeline_profiles": True},
    "without gc.freeze()": {"gc_freeze": False},
    "fetch.queue.backoff.ms=1000": {"fetch_queue_backoff_ms": 1000},
    "Kafka sinks flush at close": {"kafka_sinks": "noflush"},
    "background dispatch": {"background_dispatch": True},
    "background dispatch + Kafka sinks flush at close": {
        "background_dispatch": True, "kafka_sinks": "noflush",
    },
    "(no dispatch)": {"null_dispatch": True},
    "(profiles from memory, no Redis)": {"profiles_file": True},
    "(no dispatch, no Kafka sinks, profiles from memory)": {
        "null_dispatch": True, "null_kafka_sinks": True, "profiles_file": True,
    },
}
TAIL_VARIANTS: Final[dict[str, dict[str, Any]]] = {
    "shipped": {},
    "Kafka sinks flush at close": {"kafka_sinks": "noflush"},
    "background dispatch + Kafka sinks flush at close": {
        "background_dispatch": True, "kafka_sinks": "noflush",
    },
}


def _flow_levers(run: Any, prefill: dict[str, Any], api_url: str) -> dict[str, Any]:
    config = run.config
    dlq = run.topics.create("dlq", 1)
    decisions = run.topics.create("decisions", 1)
    base = FlowJob(
        mode="drain", bootstrap=run.bootstrap, topic=prefill["topic_1p"],
        redis_url=run.redis_url, api_url=api_url, dead_letter_topic=dlq,
        decisions_topic=decisions, result="", batch_size=config.batch_size,
        fetch_queue_backoff_ms=config.fetch_queue_backoff_ms,
        dispatch_timeout_s=config.dispatch_timeout_s, max_events=config.max_events,
        max_seconds=config.max_seconds,
    )
    timeout_s = 60.0 + prefill["messages"] / 500.0
    profiles_file = run.workdir / "profiles.jsonl"
    with profiles_file.open("wb") as handle:
        for profile in generate_profiles(run.spec):
            handle.write(orjson.dumps(profile) + b"\n")
    eps: dict[str, list[float]] = {name: [] for name in FLOW_VARIANTS}
    ratios: dict[str, list[float]] = {name: [] for name in FLOW_VARIANTS}
    ceiling: dict[str, list[float]] = {"backoff 10 ms": [], "backoff 1000 ms": []}
    for index in range(config.runs):
        ceiling["backoff 10 ms"].append(harness._ceiling_run(run, prefill["topic_1p"]))
        slow = replace(run.config, fetch_queue_backoff_ms=1000)
        run.config, saved = slow, run.config
        try:
            ceiling["backoff 1000 ms"].append(harness._ceiling_run(run, prefill["topic_1p"]))
        finally:
            run.config = saved
        shipped = 0.0
        for name, variant in FLOW_VARIANTS.items():
            overrides = dict(variant)
            if overrides.get("profiles_file"):
                overrides["profiles_file"] = str(profiles_file)
            value = harness._flow_run(run, replace(base, **overrides), 1, timeout_s)
            eps[name].append(value)
            if name == "shipped":
                shipped = value
            ratios[name].append(value / shipped if shipped else float("nan"))
            run.log(f"round {index + 1}: {name}: {value:,.0f} events/s")
    return {
        "events_per_run": min(prefill["messages"], config.max_events or prefill["messages"]),
        "ceiling": {name: spread(values, 0) for name, values in ceiling.items()},
        "flow": {
            name: {"eps": spread(eps[name], 0), "vs_shipped": spread(ratios[name], 3)}
            for name in FLOW_VARIANTS
        },
    }


def _tail_latency(run: Any, rate_eps: float, overrides: dict[str, Any]) -> dict[str, Any]:
    config = run.config
    topic = run.topics.create("lever-tail", 1)
    dlq = run.topics.create("lever-dlq", 1)
    decisions = run.topics.create("lever-decisions", 1)
    job = FlowJob(
        mode="tail", bootstrap=run.bootstrap, topic=topic, redis_url=run.redis_url,
        api_url="", dead_letter_topic=dlq, decisions_topic=decisions,
        result=str(run.workdir / "lever-tail"), batch_size=config.batch_size,
        fetch_queue_backoff_ms=config.fetch_queue_backoff_ms,
        dispatch_timeout_s=config.dispatch_timeout_s, **overrides,
    )
    producer = Producer({"bootstrap.servers": run.bootstrap, "linger.ms": 1, "acks": 1})
    p50: list[float] = []
    p99: list[float] = []
    with DispatchApi(run.workdir / f"lever-api-{time.time_ns()}.jsonl") as api, \
            processes() as started:
        path = run.job_file(replace(job, api_url=api.url))
        started.append(subprocess.Popen(
            run.python("nudgeflow.bench.flowproc", str(path), "0"), env=child_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))
        try:
            harness._warm_up(run, producer, topic, api)
            stream = PacedStream(run.lines)
            segments = [pace(producer, topic, stream, rate_eps=rate_eps,
                             seconds=config.latency_seconds, label=str(i))
                        for i in range(config.runs)]
            harness.wait_quiet(api, settle_s=2.0)
        finally:
            stop_process(started.pop())
        rows = api.rows()
    for segment in segments:
        latencies = event_latencies(rows, segment)
        if latencies:
            p50.append(percentile(latencies, 50))
            p99.append(percentile(latencies, 99))
    return {"rate_eps": round(rate_eps), "p50_ms": spread(p50, 1) if p50 else None,
            "p99_ms": spread(p99, 1) if p99 else None}


# --- micro-levers -------------------------------------------------------------------


def _per_item_us(fn: Callable[[], int], repeat: int = 3) -> float:
    best = []
    for _ in range(repeat):
        started = time.perf_counter()
        count = fn()
        best.append((time.perf_counter() - started) / count * 1e6)
    return round(statistics.median(best), 2)


def _decode_levers(lines: list[bytes]) -> dict[str, float]:
    from nudgeflow.core.events import decode_event

    def orjson_only() -> int:
        for raw in lines:
            with contextlib.suppress(orjson.JSONDecodeError):
                orjson.loads(raw)
        return len(lines)

    def full() -> int:
        for raw in lines:
            decode_event(raw)
        return len(lines)

    return {"orjson_loads_us": _per_item_us(orjson_only), "decode_event_us": _per_item_us(full)}


def _bytewax_levers(count: int = 50_000) -> dict[str, float]:
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import TestingSource, run_main

    class _Null(StatelessSinkPartition[Any]):
        def write_batch(self, items: list[Any]) -> None:
            pass

    class _NullSink(DynamicSink[Any]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> _Null:
            return _Null()

    def chain(steps: int, stateful: bool) -> float:
        flow = Dataflow("levers")
        stream: Any = op.input("in", flow, TestingSource(range(count), batch_size=500))
        for index in range(steps):
            stream = op.map(f"m{index}", stream, lambda x: x)
        if stateful:
            keyed = op.key_on("key", stream, lambda x: str(x % 1000))
            stream = op.stateful_map("s", keyed, lambda s, v: ((s or 0) + 1, v))
        op.output("out", stream, _NullSink())
        started = time.perf_counter()
        run_main(flow)
        return (time.perf_counter() - started) / count * 1e6

    base = statistics.median(chain(0, False) for _ in range(3))
    five = statistics.median(chain(5, False) for _ in range(3))
    keyed = statistics.median(chain(0, True) for _ in range(3))
    return {
        "input_output_us_per_item": round(base, 2),
        "map_step_us_per_item": round((five - base) / 5, 2),
        "key_on_plus_stateful_map_us_per_item": round(keyed - base, 2),
    }


def _redis_levers(redis_url: str, users: list[str]) -> dict[str, float]:
    import redis

    from nudgeflow.enrich.profile_store import RedisProfiles

    client = redis.Redis.from_url(redis_url)
    try:
        def one_by_one() -> int:
            for uid in users:
                client.hgetall(f"profile:{uid}")
            return len(users)

        def lookups(store: RedisProfiles) -> Callable[[], int]:
            def batches() -> int:
                store._cache.clear()
                for start in range(0, len(users), 500):
                    store.lookup(users[start : start + 500])
                return len(users)
            return batches

        scripted = RedisProfiles(client)
        pipelined = RedisProfiles(client)
        pipelined._script = None
        return {"hgetall_each_us": _per_item_us(one_by_one),
                "lookup_pipeline_of_hgetall_500_us": _per_item_us(lookups(pipelined)),
                "lookup_one_script_500_us": _per_item_us(lookups(scripted))}
    finally:
        client.close()


def _httpx_levers(api: DispatchApi, requests: int = 400) -> dict[str, Any]:
    import httpx

    body = orjson.dumps({
        "trigger_type": "product_interest", "user_id": "u1", "segment": "new",
        "fired_at": "2026-03-01T10:00:00Z", "detected_at": "2026-03-01T10:00:00Z",
        "metadata": {}, "channel": "email", "send_at": None,
    })

    async def burst(in_flight: int) -> tuple[float, float]:
        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        latencies: list[float] = []
        semaphore = asyncio.Semaphore(in_flight)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            async def one(index: int) -> None:
                trigger_id = f"lever-{in_flight}-{index}-{time.time_ns()}"
                async with semaphore:
                    started = time.perf_counter()
                    content = body[:-1] + b',"trigger_id":"' + trigger_id.encode() + b'"}'
                    await client.post(f"{api.url}/api/trigger", content=content,
                                      headers={"Idempotency-Key": trigger_id,
                                               "Content-Type": "application/json"})
                    latencies.append((time.perf_counter() - started) * 1000)

            await asyncio.gather(*(one(i) for i in range(20)))  # warm the pool
            latencies.clear()
            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(requests)))
            elapsed = time.perf_counter() - started
        return requests / elapsed, percentile(latencies, 99)

    out: dict[str, Any] = {}
    for in_flight in (1, 4, 8, 16, 32):
        rps, p99 = asyncio.run(burst(in_flight))
        out[f"in_flight_{in_flight}"] = {"requests_per_s": round(rps), "p99_ms": round(p99, 1)}
    return out


def run(config: harness.BenchConfig, *, bootstrap: str, redis_url: str,
        log: harness.Log = lambda text: print(text, file=sys.stderr, flush=True),
        ) -> dict[str, Any]:
    machine = machine_info()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nudgeflow-levers-") as tmp:
        current = harness._Run(config, bootstrap, redis_url, Path(tmp), log)
        current.topics.check()
        current.profiles.check()
        try:
            prefill = harness._prefill(current)
            micro: dict[str, Any] = {
                "decode": _decode_levers([line.data for line in current.lines[:50_000]]),
                "bytewax": _bytewax_levers(),
                "redis": _redis_levers(
                    current.redis_url,
                    sorted({line.user_id for line in current.lines[:20_000]})[:5000],
                ),
            }
            log(f"micro-levers: {micro}")
            with DispatchApi(current.workdir / "levers-api.jsonl") as api:
                micro["httpx"] = _httpx_levers(api)
                log(f"httpx: {micro['httpx']}")
                flow = _flow_levers(current, prefill, api.url)
            shipped = flow["flow"]["shipped"]["eps"]["median"]
            tail: dict[str, dict[str, Any]] = {}
            for rate_name, rate in (("200/s", 200.0), ("50% of shipped", 0.5 * shipped)):
                for name, overrides in TAIL_VARIANTS.items():
                    key = f"{name} at {rate_name}"
                    tail[key] = _tail_latency(current, rate, overrides)
                    log(f"tail {key}: {tail[key]}")
        finally:
            current.topics.delete_all()
            current.profiles.delete_all()
            current.profiles.close()
    return {"micro": micro, "flow": flow, "tail_latency": tail,
            "config": {"users": config.users, "runs": config.runs,
                       "events_per_run": flow["events_per_run"]},
            "machine": machine, "duration_s": round(time.perf_counter() - started, 1)}


def render(result: dict[str, Any]) -> str:
    lines = ["| lever | events/s (median, min-max) | vs shipped (median) |", "|---|---:|---:|"]
    for name, entry in result["flow"]["flow"].items():
        eps = entry["eps"]
        lines.append(f"| {name} | {eps['median']:,.0f} ({eps['min']:,.0f}-{eps['max']:,.0f}) "
                     f"| {entry['vs_shipped']['median']:.2f}x |")
    for name, entry in result["flow"]["ceiling"].items():
        lines.append(f"| ceiling, {name} | {entry['median']:,.0f} "
                     f"({entry['min']:,.0f}-{entry['max']:,.0f}) | |")
    lines += ["", "| tail latency (produce to API answer) | p50 ms | p99 ms |", "|---|---:|---:|"]
    for name, entry in result["tail_latency"].items():
        p50 = entry["p50_ms"]["median"] if entry["p50_ms"] else float("nan")
        p99 = entry["p99_ms"]["median"] if entry["p99_ms"] else float("nan")
        lines.append(f"| {name} ({entry['rate_eps']:,}/s) | {p50:,.1f} | {p99:,.1f} |")
    lines += ["", "micro: " + orjson.dumps(result["micro"]).decode()]
    return "\n".join(lines)

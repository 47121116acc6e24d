"""The benchmark, phase by phase, against the Kafka and Redis of scripts/services.sh.

1. **Pre-fill.** `nudgeflow.app.samples` generates the stream of `users` shoppers
   (arrival order, with its duplicates, out-of-order and invalid lines); it goes
   to a 1-partition and a 4-partition topic keyed by user, and the profiles to
   Redis (database `redis_db` of REDIS_URL's server, never the tests' one).
2. **Throughput**, in `runs` rounds; each round runs, one after the other so that
   they share the machine's conditions: the ceiling (`nudgeflow.bench.ceiling`), the full
   live flow with 1 worker on the 1-partition topic, with 2 processes on it, and
   with 2 processes on the 4-partition topic (`nudgeflow.bench.flowproc`, drain mode).
   Throughput is events read / (end of the flow - first message read): process
   start-up is not counted, the final flushes are. `max_events` caps each run to
   the first events of the topic (the full run's 1.9 M events would take an
   hour of flow runs).
3. **Latency** (`nudgeflow.bench.pacing`): one live flow tails a fresh topic exactly as
   `nudgeflow run` does, with the default rules except a 2 s cart timeout and
   1 s lateness so that cart abandonments fire by the wall clock within the run.
   `runs` paced segments at 50% of the 1-worker median throughput, then `runs`
   at 80%; per segment the p50/p95/p99 of produce→API-answer for immediate
   triggers and the p99 timer lag.
4. **Memory** (`nudgeflow.bench.memory`): state bytes per active user, in a process of
   its own, `memory_runs` times; with `memory_clones` the held states are
   copied to reach users * clones.

Everything started is stopped and everything created (topics, profiles) deleted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
from confluent_kafka import Producer

from nudgeflow.app.samples import SampleLine, SampleSpec, generate_lines, generate_profiles
from nudgeflow.bench.flowproc import FlowJob
from nudgeflow.bench.pacing import PacedStream, Segment, event_latencies, pace, timer_lags
from nudgeflow.bench.services import (
    DispatchApi,
    Profiles,
    Topics,
    bench_redis_url,
    child_env,
    free_port,
    processes,
    produce_lines,
    stop_process,
)
from nudgeflow.bench.stats import machine_info, percentile, spread, table
from nudgeflow.core.errors import ServiceError
from nudgeflow.core.rules import load_rules
from nudgeflow.core.settings import DEFAULT_RULES

__all__ = ["FULL", "QUICK", "BenchConfig", "render", "run", "wait_quiet"]

Log = Callable[[str], None]

TIMER_TIMEOUT_MS: Final = 2_000
TIMER_LATENESS_MS: Final = 1_000
TARGETS: Final = {
    "ratio_min": 0.3,
    "latency_p99_ms_max": 50.0,
    "timer_lag_p99_ms_max": 1000.0,
    "bytes_per_user_max": 1024.0,
}


@dataclass(frozen=True)
class BenchConfig:
    """What a bench run does. `QUICK` and `FULL` are the two documented ones."""

    name: str
    users: int
    hours: float = 4.0
    runs: int = 3
    max_events: int | None = None  # per throughput run; None: the whole topic
    latency_seconds: float = 3.0  # per paced segment
    memory_users: int = 3000
    memory_clones: int = 1
    memory_runs: int = 3
    # The default 0.15 s is for an API on its own machine; here it shares 2 cores with
    # Kafka and the flow, and a descheduled API would open the circuit breaker.
    dispatch_timeout_s: float = 1.0
    redis_db: int = 15
    batch_size: int = 500
    fetch_queue_backoff_ms: int = 10
    seed: int = 7


QUICK: Final = BenchConfig(name="quick", users=1000, latency_seconds=3.0, memory_users=3000)
FULL: Final = BenchConfig(
    name="full", users=100_000, max_events=200_000, latency_seconds=20.0,
    memory_users=100_000, memory_clones=10, memory_runs=1,
)


class _Run:
    """State shared by the phases of one bench run."""

    def __init__(self, config: BenchConfig, bootstrap: str, redis_url: str, workdir: Path,
                 log: Log) -> None:
        self.config = config
        self.bootstrap = bootstrap
        self.redis_url = bench_redis_url(redis_url, config.redis_db)
        self.workdir = workdir
        self.log = log
        self.topics = Topics(bootstrap)
        self.profiles = Profiles(self.redis_url)
        self.lines: list[SampleLine] = []
        self.spec = SampleSpec(users=config.users, hours=config.hours, seed=config.seed)
        self._jobs = 0

    def python(self, *args: str) -> list[str]:
        return [sys.executable, "-m", *args]

    def job_file(self, job: FlowJob) -> Path:
        self._jobs += 1
        path = self.workdir / f"job{self._jobs}.json"
        job.save(path)
        return path


# --- phases -------------------------------------------------------------------------


def _prefill(run: _Run) -> dict[str, Any]:
    started = time.perf_counter()
    run.lines = list(generate_lines(run.spec))
    generated = time.perf_counter() - started
    run.log(f"generated {len(run.lines):,} lines for {run.config.users:,} users "
            f"in {generated:.1f} s")
    one = run.topics.create("events-1p", 1)
    four = run.topics.create("events-4p", 4)
    produce_lines(run.bootstrap, [one, four], run.lines)
    written = run.profiles.write(generate_profiles(run.spec))
    run.log(f"pre-filled {one} and {four}; {written:,} profiles in Redis "
            f"({time.perf_counter() - started:.1f} s)")
    kinds: dict[str, int] = {}
    for line in run.lines:
        kinds[line.kind] = kinds.get(line.kind, 0) + 1
    return {"topic_1p": one, "topic_4p": four, "messages": len(run.lines), "kinds": kinds,
            "profiles": written}


def _ceiling_run(run: _Run, topic: str) -> float:
    out = run.workdir / "ceiling.json"
    cap = run.config.max_events or 0
    subprocess.run(
        run.python("nudgeflow.bench.ceiling", run.bootstrap, topic, str(out),
                   str(run.config.batch_size),
                   str(run.config.fetch_queue_backoff_ms), str(cap)),
        env=child_env(), check=True, timeout=600,
    )
    result = json.loads(out.read_text())
    return float(result["events"]) / max(1e-9, float(result["end"]) - float(result["first_read"]))


def _flow_run(run: _Run, job: FlowJob, processes_count: int, timeout_s: float) -> float:
    """One drain run of `processes_count` processes; events/s from first read to the end."""
    addresses = (
        [f"127.0.0.1:{free_port()}" for _ in range(processes_count)]
        if processes_count > 1 else []
    )
    job = replace(job, addresses=addresses, result=str(run.workdir / f"flow{run._jobs}"))
    path = run.job_file(job)
    errors = run.workdir / f"flow{run._jobs}.stderr"
    with processes() as started, errors.open("wb") as stderr:
        for process_id in range(processes_count):
            started.append(subprocess.Popen(
                run.python("nudgeflow.bench.flowproc", str(path), str(process_id)),
                env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr,
            ))
        deadline = time.monotonic() + timeout_s
        for proc in started:
            remaining = max(1.0, deadline - time.monotonic())
            try:
                code = proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                msg = f"flow run did not finish within {timeout_s:.0f} s (see {errors})"
                raise ServiceError(msg) from None
            if code != 0:
                tail = errors.read_text(errors="replace")[-1500:]
                msg = f"flow process exited with {code}: {tail}"
                raise ServiceError(msg)
    results = [json.loads(job.result_path(i).read_text()) for i in range(processes_count)]
    events = sum(r["events"] for r in results)
    first = min(r["first_read"] for r in results if r["first_read"] is not None)
    end = max(float(r["end"]) for r in results)
    return float(events) / max(1e-9, end - float(first))


def _throughput(run: _Run, topics: dict[str, Any], api_url: str) -> dict[str, Any]:
    config = run.config
    dlq = run.topics.create("dlq", 1)
    decisions = run.topics.create("decisions", 1)
    base = FlowJob(
        mode="drain", bootstrap=run.bootstrap, topic=topics["topic_1p"],
        redis_url=run.redis_url, api_url=api_url, dead_letter_topic=dlq,
        decisions_topic=decisions, result="", batch_size=config.batch_size,
        fetch_queue_backoff_ms=config.fetch_queue_backoff_ms,
        dispatch_timeout_s=config.dispatch_timeout_s, max_events=config.max_events,
    )
    per_run_events = min(topics["messages"], config.max_events or topics["messages"])
    # Generous: a run at 500 events/s, plus start-up.
    timeout_s = 60.0 + per_run_events / 500.0
    ceiling: list[float] = []
    flows: dict[str, list[float]] = {"1w_1p": [], "2p_1p": [], "2p_4p": []}
    for index in range(config.runs):
        ceiling.append(_ceiling_run(run, topics["topic_1p"]))
        flows["1w_1p"].append(_flow_run(run, base, 1, timeout_s))
        flows["2p_1p"].append(_flow_run(run, base, 2, timeout_s))
        flows["2p_4p"].append(
            _flow_run(run, replace(base, topic=topics["topic_4p"]), 2, timeout_s)
        )
        run.log(
            f"round {index + 1}/{config.runs}: ceiling {ceiling[-1]:,.0f}/s, flow 1 worker "
            f"{flows['1w_1p'][-1]:,.0f}/s, 2 processes {flows['2p_1p'][-1]:,.0f}/s, "
            f"2 processes 4 partitions {flows['2p_4p'][-1]:,.0f}/s"
        )
    ratios = [f / c for f, c in zip(flows["1w_1p"], ceiling, strict=True)]
    return {
        "events_per_run": per_run_events,
        "ceiling": spread(ceiling, 0),
        "throughput": {name: spread(values, 0) for name, values in flows.items()},
        "ratio_detail": spread(ratios, 4),
    }


def _timer_rules(workdir: Path) -> Path:
    text = DEFAULT_RULES.read_text()
    text = text.replace("lateness: 30s", f"lateness: {TIMER_LATENESS_MS}ms", 1)
    text = text.replace("timeout: 15m", f"timeout: {TIMER_TIMEOUT_MS}ms", 1)
    path = workdir / "rules-timers.yaml"
    path.write_text(text)
    rules = load_rules(path)
    cart = next(r for r in rules.rules if r.name == "cart_abandonment")
    if rules.time.lateness != TIMER_LATENESS_MS or getattr(cart, "timeout", None) != (
        TIMER_TIMEOUT_MS
    ):
        msg = "could not derive the timer rules from config/rules.yaml"
        raise ServiceError(msg)
    return path


def _warm_up(run: _Run, producer: Producer, topic: str, api: DispatchApi) -> None:
    """Until the flow answers: a user who views one product three times, now."""
    run.profiles.write([{"user_id": "bench-warmup", "segment": "regular", "opt_in": ["email"]}])
    deadline = time.monotonic() + 90
    attempt = 0
    while time.monotonic() < deadline:
        attempt += 1
        now = time.time_ns() // 1_000_000
        for k in range(3):
            producer.produce(topic, key=b"bench-warmup", value=orjson.dumps({
                "event_id": f"warmup-{attempt}-{k}", "user_id": "bench-warmup",
                "type": "page_view", "ts": now + k, "page_type": "product",
                "product_id": f"warmup-{attempt}",
            }))
        producer.flush(10)
        wait_until = time.monotonic() + 5
        while time.monotonic() < wait_until:
            if any(row.get("user_id") == "bench-warmup" for row in api.rows()):
                return
            time.sleep(0.1)
    msg = "the live flow did not dispatch the warm-up trigger within 90 s"
    raise ServiceError(msg)


def wait_quiet(api: DispatchApi, *, settle_s: float, quiet_s: float = 2.0,
               max_s: float = 180.0) -> None:
    """Wait `settle_s`, then until the API has received nothing new for `quiet_s`.

    A flow that fell behind the paced producer is still answering for the last
    segment: stopping it then would cut the slowest triggers out of the p99.
    """
    time.sleep(settle_s)
    deadline = time.monotonic() + max_s
    count = len(api.rows())
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now_count = len(api.rows())
        if now_count != count:
            count, quiet_since = now_count, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return


def _latency(run: _Run, sustained_eps: float) -> dict[str, Any]:
    config = run.config
    topic = run.topics.create("latency", 1)
    dlq = run.topics.create("latency-dlq", 1)
    decisions = run.topics.create("latency-decisions", 1)
    rates = {"50": 0.5 * sustained_eps, "80": 0.8 * sustained_eps}
    needed = sum(rate * config.latency_seconds * config.runs for rate in rates.values())
    cycles = PacedStream.cycles_for(len(run.lines), int(needed * 1.1) + 100)
    for cycle in range(1, cycles):
        run.profiles.write(generate_profiles(run.spec), user_prefix=PacedStream.prefix(cycle))
    rules = _timer_rules(run.workdir)
    job = FlowJob(
        mode="tail", bootstrap=run.bootstrap, topic=topic, redis_url=run.redis_url,
        api_url="", dead_letter_topic=dlq, decisions_topic=decisions,
        result=str(run.workdir / "tail"), rules=str(rules),
        batch_size=config.batch_size, fetch_queue_backoff_ms=config.fetch_queue_backoff_ms,
        dispatch_timeout_s=config.dispatch_timeout_s,
    )
    segments: list[Segment] = []
    producer = Producer({"bootstrap.servers": run.bootstrap, "linger.ms": 1, "acks": 1})
    with DispatchApi(run.workdir / "latency-api.jsonl") as api, processes() as started:
        path = run.job_file(replace(job, api_url=api.url))
        errors = (run.workdir / "tail.stderr").open("wb")
        started.append(subprocess.Popen(
            run.python("nudgeflow.bench.flowproc", str(path), "0"), env=child_env(),
            stdout=subprocess.DEVNULL, stderr=errors,
        ))
        try:
            _warm_up(run, producer, topic, api)
            stream = PacedStream(run.lines)
            for name, rate in rates.items():
                for index in range(config.runs):
                    segments.append(pace(producer, topic, stream, rate_eps=rate,
                                         seconds=config.latency_seconds,
                                         label=f"{name}/{index}"))
                    run.log(f"paced {segments[-1].sent:,} events at {rate:,.0f}/s ({name}%)")
            # The last carts' timers (deadline + lateness), and a flow that fell behind.
            wait_quiet(api, settle_s=(TIMER_TIMEOUT_MS + TIMER_LATENESS_MS) / 1000 + 3.0)
        finally:
            stop_process(started.pop())
            errors.close()
        rows = api.rows()
    out: dict[str, Any] = {}
    for name, rate in rates.items():
        mine = [s for s in segments if s.label.startswith(f"{name}/")]
        per_run: dict[str, list[float]] = {"p50": [], "p95": [], "p99": [], "timer_p99": []}
        samples = timers = 0
        for segment in mine:
            latencies = event_latencies(rows, segment)
            lags = timer_lags(rows, segment, timeout_ms=TIMER_TIMEOUT_MS,
                              lateness_ms=TIMER_LATENESS_MS)
            samples += len(latencies)
            timers += len(lags)
            for q in (50, 95, 99):
                if latencies:
                    per_run[f"p{q}"].append(percentile(latencies, q))
            if lags:
                per_run["timer_p99"].append(percentile(lags, 99))
        entry: dict[str, Any] = {
            "rate_eps": round(rate),
            "sent": sum(s.sent for s in mine),
            "triggers_measured": samples,
            "timers_measured": timers,
        }
        for key, values in per_run.items():
            entry[key] = spread(values, 1) if values else None
        out[f"at_{name}pct"] = entry
    return out


def _write_memory_input(run: _Run, users: int) -> tuple[Path, Path]:
    spec = replace(run.spec, users=users)
    lines_path = run.workdir / f"memory-{users}.lines"
    profiles_path = run.workdir / f"memory-{users}.profiles"
    source: Sequence[SampleLine] | Any = (
        run.lines if users == run.config.users else generate_lines(spec)
    )
    with lines_path.open("wb", buffering=1 << 20) as handle:
        for line in source:
            handle.write(f"{line.arrival_ms} {line.user_id} ".encode() + line.data + b"\n")
    with profiles_path.open("wb") as handle:
        for profile in generate_profiles(spec):
            handle.write(orjson.dumps(profile) + b"\n")
    return lines_path, profiles_path


def _memory(run: _Run) -> dict[str, Any]:
    config = run.config
    lines_path, profiles_path = _write_memory_input(run, config.memory_users)
    results = []
    for index in range(config.memory_runs):
        out = run.workdir / f"memory{index}.json"
        clones = config.memory_clones if index == 0 else 1
        subprocess.run(
            run.python("nudgeflow.bench.memory", str(lines_path), str(profiles_path), str(out),
                       str(clones)),
            env=child_env(), check=True, timeout=3600,
        )
        results.append(json.loads(out.read_text()))
        run.log(f"memory run {index + 1}/{config.memory_runs}: "
                f"{results[-1]['rss_per_user']:,.0f} B/user RSS, "
                f"{results[-1]['pickled_per_user']:,.0f} B/user pickled "
                f"({results[-1]['users']:,} users)")
    users = results[0]["users"]
    memory: dict[str, Any] = {
        f"users_{users}": {
            "rss": spread([r["rss_per_user"] for r in results], 0),
            "pickled": spread([r["pickled_per_user"] for r in results], 0),
            "events": results[0]["events"],
        }
    }
    first = results[0]
    if "scaled_users" in first:
        memory[f"users_{first['scaled_users']}"] = {
            "rss": spread([first["scaled_rss_per_user"]], 0),
            "pickled": spread([first["pickled_per_user"]], 0),
            "cloned_from": users,
        }
    return memory


# --- the run ------------------------------------------------------------------------


def run(config: BenchConfig, *, bootstrap: str, redis_url: str,
        log: Log = lambda text: print(text, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Run every phase of `config`; the result dict (see bench/README.md for the fields)."""
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="nudgeflow-bench-") as tmp:
        current = _Run(config, bootstrap, redis_url, Path(tmp), log)
        current.topics.check()
        current.profiles.check()
        try:
            prefill = _prefill(current)
            with DispatchApi(current.workdir / "throughput-api.jsonl") as api:
                throughput = _throughput(current, prefill, api.url)
            sustained = throughput["throughput"]["1w_1p"]["median"]
            latency = _latency(current, sustained)
            memory = _memory(current)
        finally:
            current.topics.delete_all()
            current.profiles.delete_all()
            current.profiles.close()
    return _summary(config, machine, started_at, seconds=time.perf_counter() - started,
                    prefill=prefill, throughput=throughput, latency=latency, memory=memory)


def _headline(entry: dict[str, Any] | None) -> float | None:
    return None if not entry else entry["median"]


def _summary(config: BenchConfig, machine: dict[str, Any], started_at: datetime, *,
             seconds: float, prefill: dict[str, Any], throughput: dict[str, Any],
             latency: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any]:
    flow = throughput["throughput"]["1w_1p"]["median"]
    ceiling = throughput["ceiling"]["median"]
    at50 = latency.get("at_50pct") or {}
    main_memory = memory[min(memory, key=lambda k: int(k.removeprefix("users_")))]
    bytes_per_user = main_memory["rss"]["median"]
    ratio = round(flow / ceiling, 4) if ceiling else math.nan
    p99 = _headline(at50.get("p99"))
    timer_p99 = _headline(at50.get("timer_p99"))
    targets = {
        "ratio_at_least_0.3": ratio >= TARGETS["ratio_min"],
        "latency_p99_under_50ms_at_50pct": p99 is not None
        and p99 < TARGETS["latency_p99_ms_max"],
        "timer_lag_p99_under_1s": timer_p99 is not None
        and timer_p99 < TARGETS["timer_lag_p99_ms_max"],
        "at_most_1KB_per_user": bytes_per_user <= TARGETS["bytes_per_user_max"],
    }
    return {
        "throughput_eps": flow,
        "ceiling_eps": ceiling,
        "ratio": ratio,
        "latency_ms": {
            "p50": _headline(at50.get("p50")),
            "p95": _headline(at50.get("p95")),
            "p99": p99,
        },
        "timer_lag_ms": {"p99": timer_p99},
        "bytes_per_user": bytes_per_user,
        "targets": targets,
        "throughput": throughput["throughput"],
        "ceiling": throughput["ceiling"],
        "ratio_detail": throughput["ratio_detail"],
        "events_per_run": throughput["events_per_run"],
        "latency": latency,
        "memory": memory,
        "stream": {k: v for k, v in prefill.items() if not k.startswith("topic")},
        "config": asdict(config),
        "machine": machine,
        "started_at": started_at.isoformat(timespec="seconds"),
        "duration_s": round(seconds, 1),
    }


def render(result: dict[str, Any]) -> str:
    """The printed report: what ran where, the table, the targets."""
    machine = result["machine"]
    config = result["config"]
    lines = [
        f"nudgeflow bench ({config['name']}): {config['users']:,} users, "
        f"{result['stream']['messages']:,} messages, {config['runs']} runs each, "
        f"{result['events_per_run']:,} events per throughput run, "
        f"{result['duration_s']:.0f} s",
        f"machine: {machine['nproc']} x {machine['cpu_model']}, {machine['memory_gb']} GB, "
        f"Python {machine['python']}, bytewax {machine['bytewax']}",
        "",
        table(result),
        "",
        "targets: " + ", ".join(
            f"{name} {'MET' if met else 'not met'}" for name, met in result["targets"].items()
        ),
    ]
    return "\n".join(lines)

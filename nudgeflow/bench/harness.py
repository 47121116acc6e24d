"""The benchmark, phase by phase, against the Kafka and Redis of scripts/services.sh.

1. **Pre-fill.** `nudgeflow.app.samples` generates the stream of `users` shoppers
   (arrival order, with its duplicates, out-of-order and invalid lines); it goes
   to a 1-partition topic (and, with `multi_process`, a 4-partition one) keyed
   by user, and the profiles to Redis (database `redis_db` of REDIS_URL's
   server, never the tests' one). Every throughput run reads this same topic.
2. **Throughput**, in `runs` rounds; each round runs every set-up once, one
   after the other (the order rotated by one each round), so that each round's
   ratios compare runs made under the same conditions:
   - `ceiling_plain` (`nudgeflow.bench.ceiling`): a plain confluent-kafka loop
     decoding with orjson, the whole topic;
   - `ceiling_bytewax` (`nudgeflow.bench.ceiling_bytewax`): bytewax's
     KafkaSource → key by user_id → `stateful_map` counter → null sink, the
     whole topic;
   - `flow_default_1w`: the full live flow, default rules, 1 worker, against the
     reference dispatch API (`nudgeflow.bench.flowproc`, drain mode);
   - `flow_cart_1w`: the same with a rules file holding only `cart_abandonment`;
   - `flow_no_intent_1w`: the default rules less `high_intent` (what scoring the
     intent model costs the flow);
   - `flow_instant_api_1w` / `flow_slow_api_1w`: the default flow against the
     bench's loopback API (`nudgeflow.bench.slow_api`) answering at once / after
     `slow_api_delay_ms`: `slow_api_ratio`;
   - with `multi_process`: 2 processes on the 1-partition and on the
     4-partition topic.
   Throughput is events read / (end of the run - first message read): process
   start-up is not counted, the final flushes are. A flow run reads at most
   `max_events` events of the topic and stops `max_seconds` after its first
   read, whichever comes first; the ceilings read the whole topic.
3. **Dispatch API** (`nudgeflow.bench.api_rps`, when present): accepted
   triggers/s of the reference API on its own.
4. **Latency** (`nudgeflow.bench.pacing`): one live flow tails a fresh topic
   exactly as `nudgeflow run` does, with the default rules except a 2 s cart
   timeout and 1 s lateness so that cart abandonments fire by the wall clock
   within the run. A paced producer sweeps the offered rate upwards over
   `sweep_pct` percent of the 1-worker median throughput: `runs` segments of
   `latency_seconds` at 50% and 80% (the headline figures), `sweep_runs` of
   `sweep_seconds` at the others; after each rate the producer waits until
   the flow has caught up, and past 80% the sweep stops after the first rate
   whose p99 is over `SWEEP_STOP_MS`. Per segment the p50/p95/p99 of
   produce→API-answer for immediate triggers and the p99 timer lag; per rate
   their medians.
5. **Memory** (`nudgeflow.bench.memory`): state bytes per active user, in a process of
   its own, `memory_runs` times; with `memory_clones` the held states are
   copied to reach users * clones. Each run holds the users as the flow does
   (the quiet ones parked), and is paired with one where none is parked.
6. **Snapshots** (`nudgeflow.bench.snapshots`): the detect step's snapshot time
   and bytes per epoch when `snapshot_users` users were touched in it, from the
   memory measure's users (copied up to N); the real SQLite recovery store's
   growth for `snapshot_sqlite_users`.

Everything started is stopped and everything created (topics, profiles) deleted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
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
import yaml
from confluent_kafka import Producer

from nudgeflow.app.samples import SampleLine, SampleSpec, generate_lines, generate_profiles
from nudgeflow.bench.flowproc import FlowJob
from nudgeflow.bench.pacing import (
    IMMEDIATE_RULES,
    PacedStream,
    Segment,
    event_latencies,
    pace,
    timer_lags,
)
from nudgeflow.bench.plot import BUDGET_MS, knee
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
from nudgeflow.bench.slow_api import LoopbackApi
from nudgeflow.bench.snapshots import users_label
from nudgeflow.bench.stats import machine_info, percentile, spread, sweep_table, table
from nudgeflow.core.errors import ServiceError
from nudgeflow.core.rules import load_rules
from nudgeflow.core.settings import DEFAULT_RULES, DEFAULT_TEMPLATES

__all__ = ["FULL", "QUICK", "SMOKE", "BenchConfig", "render", "run", "wait_quiet"]

Log = Callable[[str], None]

TIMER_TIMEOUT_MS: Final = 2_000
TIMER_LATENESS_MS: Final = 1_000
CART_RULE: Final = "cart_abandonment"
HEADLINE_PCT: Final = (50.0, 80.0)
# Past 80%, the sweep stops after the first rate whose p99 is over this (5x the budget).
SWEEP_STOP_MS: Final = 1_000.0
TARGETS: Final = {
    "ratio_min": 0.3,
    "latency_p99_ms_max": 50.0,
    "timer_lag_p99_ms_max": 1000.0,
    "bytes_per_user_max": 1024.0,
}


@dataclass(frozen=True)
class BenchConfig:
    """What a bench run does. `QUICK` and `FULL` are the documented ones, `SMOKE` is CI's."""

    name: str
    users: int
    hours: float = 4.0
    runs: int = 3
    max_events: int | None = None  # per flow run; None: the whole topic
    max_seconds: float | None = None  # per flow run, from its first read; None: no limit
    multi_process: bool = False  # also 2 processes on the 1- and the 4-partition topic
    slow_api_delay_ms: float = 50.0
    latency_seconds: float = 3.0  # per paced segment at 50% and 80%
    sweep_pct: tuple[float, ...] = (20.0, 35.0, 50.0, 65.0, 80.0, 95.0, 110.0, 130.0, 160.0,
                                    200.0, 250.0)
    sweep_runs: int = 1  # segments per rate other than 50% and 80%
    sweep_seconds: float = 2.0  # per segment of those
    memory_users: int = 3000
    memory_clones: int = 1
    memory_runs: int = 3
    snapshot_users: tuple[int, ...] = (100_000,)
    snapshot_sqlite_users: tuple[int, ...] = (10_000,)
    snapshot_runs: int = 3
    # `api_rps`'s own: 3 runs of 10 s, single and batch; `--client raw` so that the
    # server, not an httpx client on the same two cores, is what is measured.
    api_rps_args: tuple[str, ...] = ()
    # The default 0.15 s is for an API on its own machine; here it shares 2 cores with
    # Kafka and the flow, and a descheduled API would open the circuit breaker.
    dispatch_timeout_s: float = 1.0
    redis_db: int = 15
    batch_size: int = 500
    fetch_queue_backoff_ms: int = 10
    seed: int = 7


# 10,600 users over 4 h: 201,007 messages, so that the ceilings (which read the whole
# topic) are not start-up bound. Each flow run reads the first 20,000 of them (or
# stops 10 s after its first read): at today's ~2,000 events/s end to end (the
# dispatch queue drained, included) that is ~10 s a run, 12 flow runs in 3 rounds.
QUICK: Final = BenchConfig(
    name="quick", users=10_600, max_events=20_000, max_seconds=10.0, latency_seconds=3.0,
    memory_users=3000, memory_clones=10,
    api_rps_args=("--seconds", "2", "--warmup", "0.5", "--mode", "single", "--client", "raw"),
)
FULL: Final = BenchConfig(
    name="full", users=100_000, max_events=200_000, max_seconds=30.0, multi_process=True,
    latency_seconds=20.0, sweep_runs=3, sweep_seconds=10.0,
    memory_users=100_000, memory_clones=10, memory_runs=1,
    snapshot_users=(100_000, 1_000_000), snapshot_sqlite_users=(100_000,),
    api_rps_args=("--client", "raw"),
)
# CI's: every phase and every field, as small and short as they go. Its numbers mean
# nothing (start-up bound ceilings, 1 run); it checks that the bench works.
SMOKE: Final = BenchConfig(
    name="smoke", users=300, runs=1, max_seconds=3.0, latency_seconds=3.0,
    sweep_pct=(35.0, 50.0, 80.0), sweep_seconds=2.0, memory_users=300, memory_runs=1,
    snapshot_users=(2_000,), snapshot_sqlite_users=(2_000,), snapshot_runs=1,
    api_rps_args=("--seconds", "1", "--warmup", "0.5", "--runs", "1", "--mode", "single",
                  "--client", "raw"),
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


def _prefill(run: _Run, *, four_partitions: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    run.lines = list(generate_lines(run.spec))
    generated = time.perf_counter() - started
    run.log(f"generated {len(run.lines):,} lines for {run.config.users:,} users "
            f"in {generated:.1f} s")
    one = run.topics.create("events-1p", 1)
    four = run.topics.create("events-4p", 4) if four_partitions else None
    produce_lines(run.bootstrap, [one] + ([four] if four else []), run.lines)
    written = run.profiles.write(generate_profiles(run.spec))
    run.log(f"pre-filled {one}{f' and {four}' if four else ''}; {written:,} profiles in "
            f"Redis ({time.perf_counter() - started:.1f} s)")
    kinds: dict[str, int] = {}
    for line in run.lines:
        kinds[line.kind] = kinds.get(line.kind, 0) + 1
    return {"topic_1p": one, "topic_4p": four, "messages": len(run.lines), "kinds": kinds,
            "profiles": written}


def _rate(result: dict[str, Any]) -> float:
    return float(result["events"]) / max(1e-9, float(result["end"]) - float(result["first_read"]))


def _ceiling_run(run: _Run, topic: str) -> float:
    """The plain confluent-kafka + orjson loop over the whole topic: events/s."""
    out = run.workdir / "ceiling.json"
    subprocess.run(
        run.python("nudgeflow.bench.ceiling", run.bootstrap, topic, str(out),
                   str(run.config.batch_size), str(run.config.fetch_queue_backoff_ms), "0"),
        env=child_env(), check=True, timeout=600,
    )
    return _rate(json.loads(out.read_text()))


def _ceiling_bytewax_run(run: _Run, topic: str) -> float:
    """The keyed `stateful_map` counter in bytewax over the whole topic: events/s."""
    out = run.workdir / "ceiling-bytewax.json"
    errors = run.workdir / "ceiling-bytewax.stderr"
    with errors.open("wb") as stderr:
        code = subprocess.run(
            run.python("nudgeflow.bench.ceiling_bytewax", run.bootstrap, topic, str(out),
                       str(run.config.batch_size), str(run.config.fetch_queue_backoff_ms), "0"),
            check=False, env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr,
            timeout=900,
        ).returncode
    if code != 0:
        msg = f"the bytewax ceiling exited with {code}: {errors.read_text()[-1500:]}"
        raise ServiceError(msg)
    return _rate(json.loads(out.read_text()))


def _flow_run_detail(run: _Run, job: FlowJob, processes_count: int,
                     timeout_s: float) -> tuple[float, int]:
    """One drain run of `processes_count` processes: (events/s first read to end, events)."""
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
    return float(events) / max(1e-9, end - float(first)), int(events)


def _flow_run(run: _Run, job: FlowJob, processes_count: int, timeout_s: float) -> float:
    """One drain run of `processes_count` processes; events/s from first read to the end."""
    return _flow_run_detail(run, job, processes_count, timeout_s)[0]


def _cart_rules(workdir: Path) -> Path:
    """The packaged rules file with only `cart_abandonment` (its templates checked)."""
    data = yaml.safe_load(DEFAULT_RULES.read_text())
    data["rules"] = [rule for rule in data["rules"] if rule.get("name") == CART_RULE]
    if len(data["rules"]) != 1:
        msg = f"{DEFAULT_RULES} has no single {CART_RULE} rule"
        raise ServiceError(msg)
    missing = [
        channel for channel in data["rules"][0].get("channels", [])
        if not (DEFAULT_TEMPLATES / f"{CART_RULE}.{channel}.j2").is_file()
    ]
    if missing:
        msg = f"no template for {CART_RULE} on {', '.join(missing)} in {DEFAULT_TEMPLATES}"
        raise ServiceError(msg)
    path = workdir / "rules-cart.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    names = [rule.name for rule in load_rules(path).rules]
    if names != [CART_RULE]:
        msg = f"the cart-only rules file loads as {names}"
        raise ServiceError(msg)
    return path


def _rules_without_intent(workdir: Path) -> Path:
    """The packaged rules file less its `high_intent` rules."""
    data = yaml.safe_load(DEFAULT_RULES.read_text())
    data["rules"] = [rule for rule in data["rules"] if rule.get("kind") != "high_intent"]
    path = workdir / "rules-no-intent.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_rules(path)  # checked as the flow will check it
    return path


# The throughput set-ups of a round, in the order of round 1.
_SETUPS: Final = ("ceiling_plain", "ceiling_bytewax", "flow_default_1w", "flow_cart_1w",
                  "flow_no_intent_1w", "flow_instant_api_1w", "flow_slow_api_1w",
                  "flow_default_2p_1p", "flow_default_2p_4p")


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
        max_seconds=config.max_seconds,
    )
    per_run_events = min(topics["messages"], config.max_events or topics["messages"])
    # Generous: a run at 500 events/s (or its time cap), plus start-up.
    timeout_s = 60.0 + per_run_events / 500.0
    if config.max_seconds is not None:
        timeout_s = min(timeout_s, 120.0 + 2 * config.max_seconds)
    cart = replace(base, rules=str(_cart_rules(run.workdir)))
    no_intent = replace(base, rules=str(_rules_without_intent(run.workdir)))
    setups = [name for name in _SETUPS if config.multi_process or "_2p_" not in name]
    eps: dict[str, list[float]] = {name: [] for name in setups}
    events: dict[str, list[int]] = {name: [] for name in setups if name.startswith("flow")}
    requests: dict[str, list[int]] = {"instant": [], "slow": []}
    with LoopbackApi(0.0) as instant, LoopbackApi(config.slow_api_delay_ms) as slow:
        jobs: dict[str, tuple[FlowJob, int]] = {
            "flow_default_1w": (base, 1),
            "flow_cart_1w": (cart, 1),
            "flow_no_intent_1w": (no_intent, 1),
            "flow_instant_api_1w": (replace(base, api_url=instant.url), 1),
            "flow_slow_api_1w": (replace(base, api_url=slow.url), 1),
            "flow_default_2p_1p": (base, 2),
            "flow_default_2p_4p": (replace(base, topic=topics["topic_4p"] or ""), 2),
        }
        for index in range(config.runs):
            order = setups[index % len(setups):] + setups[: index % len(setups)]
            for name in order:
                if name == "ceiling_plain":
                    eps[name].append(_ceiling_run(run, topics["topic_1p"]))
                    continue
                if name == "ceiling_bytewax":
                    eps[name].append(_ceiling_bytewax_run(run, topics["topic_1p"]))
                    continue
                job, count = jobs[name]
                api = {"flow_instant_api_1w": instant, "flow_slow_api_1w": slow}.get(name)
                before = api.requests() if api is not None else 0
                value, read = _flow_run_detail(run, job, count, timeout_s)
                eps[name].append(value)
                events[name].append(read)
                if api is not None:
                    requests["instant" if api is instant else "slow"].append(
                        api.requests() - before)
            run.log(f"round {index + 1}/{config.runs}: " + ", ".join(
                f"{name} {eps[name][-1]:,.0f}/s" for name in setups))
    by_round = {
        "ratio": [f / c for f, c in zip(eps["flow_default_1w"], eps["ceiling_plain"],
                                        strict=True)],
        "ratio_bytewax": [f / c for f, c in zip(eps["flow_default_1w"], eps["ceiling_bytewax"],
                                                strict=True)],
        "slow_api_ratio": [s / i for s, i in zip(eps["flow_slow_api_1w"],
                                                 eps["flow_instant_api_1w"], strict=True)],
    }
    return {
        "events_per_run": per_run_events,
        "events_read": {name: spread(values, 0) for name, values in events.items()},
        "throughput": {name: spread(values, 0) for name, values in eps.items()},
        "ratios": {name: spread(values, 4) for name, values in by_round.items()},
        "api_requests": requests,
    }


def _api_rps(run: _Run) -> dict[str, Any]:
    """`python -m nudgeflow.bench.api_rps --json F`: the reference API's accepted/s, or why not."""
    args = list(run.config.api_rps_args)
    entry: dict[str, Any] = {"accepted_per_s": None, "args": args, "error": None}
    if importlib.util.find_spec("nudgeflow.bench.api_rps") is None:
        entry["error"] = "nudgeflow.bench.api_rps is not there"
        return entry
    out = run.workdir / "api-rps.json"
    errors = run.workdir / "api-rps.stderr"
    started = time.perf_counter()
    try:
        with errors.open("wb") as stderr:
            code = subprocess.run(
                run.python("nudgeflow.bench.api_rps", *args, "--json", str(out)),
                check=False, env=child_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                timeout=900,
            ).returncode
    except subprocess.TimeoutExpired:
        entry["error"] = "api_rps did not finish within 900 s"
        return entry
    entry["seconds"] = round(time.perf_counter() - started, 1)
    if code != 0 or not out.exists():
        tail = errors.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        entry["error"] = f"api_rps exited with {code}: {tail[0][:300]}"
        return entry
    document = json.loads(out.read_text())
    summary = document.get("summary") if isinstance(document, dict) else None
    entry["summary"] = summary
    single: dict[str, Any] = {}
    if isinstance(summary, dict) and isinstance(summary.get("single"), dict):
        single = summary["single"]
    value = single.get("accepted_per_s_median")
    if isinstance(value, int | float) and math.isfinite(value):
        entry["accepted_per_s"] = round(float(value), 1)
        entry["min"] = single.get("accepted_per_s_min")
        entry["max"] = single.get("accepted_per_s_max")
        entry["runs"] = len([r for r in document.get("runs", []) if r.get("mode") == "single"])
    else:
        entry["error"] = "api_rps wrote no summary.single.accepted_per_s_median"
    return entry


def _timer_rules(workdir: Path) -> Path:
    text = DEFAULT_RULES.read_text()
    text = text.replace("lateness: 30s", f"lateness: {TIMER_LATENESS_MS}ms", 1)
    text = text.replace("timeout: 15m", f"timeout: {TIMER_TIMEOUT_MS}ms", 1)
    path = workdir / "rules-timers.yaml"
    path.write_text(text)
    rules = load_rules(path)
    cart = next(r for r in rules.rules if r.name == CART_RULE)
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


def wait_caught_up(api: DispatchApi, segment: Segment, *, within_ms: float = 500.0,
                   max_s: float = 30.0) -> float:
    """Until the API answered an immediate trigger of the segment's last `within_ms`.

    The flow applies a partition's events in order: once a trigger of an event
    produced that close to the segment's end is answered, the backlog is gone
    and the next rate starts from an idle flow. Returns the seconds waited.
    """
    started = time.monotonic()
    deadline = started + max_s
    threshold = segment.end_ms - within_ms
    while time.monotonic() < deadline:
        for row in reversed(api.rows()):
            if row.get("trigger_type") in IMMEDIATE_RULES and (
                datetime.fromisoformat(row["fired_at"]).timestamp() * 1000.0 >= threshold
            ):
                return time.monotonic() - started
        time.sleep(0.1)
    return time.monotonic() - started


def _past_knee(rows: list[dict[str, Any]], segments: list[Segment]) -> bool:
    """Whether these segments' median p99 is over `SWEEP_STOP_MS`: higher rates add nothing."""
    p99s = [percentile(lat, 99) for s in segments if (lat := event_latencies(rows, s))]
    return bool(p99s) and statistics.median(p99s) > SWEEP_STOP_MS


def _sweep_plan(config: BenchConfig) -> list[tuple[float, int, float]]:
    """(percent, segments, seconds) per offered rate, ascending."""
    plan = []
    for pct in sorted(set(config.sweep_pct) | set(HEADLINE_PCT)):
        if pct in HEADLINE_PCT:
            plan.append((pct, config.runs, config.latency_seconds))
        else:
            plan.append((pct, config.sweep_runs, config.sweep_seconds))
    return plan


def _pct_label(pct: float) -> str:
    return f"{pct:g}"


def _latency(run: _Run, sustained_eps: float) -> dict[str, Any]:
    config = run.config
    topic = run.topics.create("latency", 1)
    dlq = run.topics.create("latency-dlq", 1)
    decisions = run.topics.create("latency-decisions", 1)
    plan = _sweep_plan(config)
    needed = sum(pct / 100 * sustained_eps * seconds * n for pct, n, seconds in plan)
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
    caught_up: dict[str, float] = {}
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
            for pct, count, seconds in plan:
                rate = pct / 100 * sustained_eps
                for index in range(count):
                    segments.append(pace(producer, topic, stream, rate_eps=rate,
                                         seconds=seconds, label=f"{_pct_label(pct)}/{index}"))
                    run.log(f"paced {segments[-1].sent:,} events at {rate:,.0f}/s ({pct:g}%)")
                caught_up[_pct_label(pct)] = round(wait_caught_up(api, segments[-1]), 2)
                if pct > max(HEADLINE_PCT) and _past_knee(api.rows(), segments[-count:]):
                    run.log(f"p99 over {SWEEP_STOP_MS:,.0f} ms at {pct:g}%: the sweep stops")
                    break
            # The last carts' timers (deadline + lateness), and a flow that fell behind.
            wait_quiet(api, settle_s=(TIMER_TIMEOUT_MS + TIMER_LATENESS_MS) / 1000 + 1.0)
        finally:
            stop_process(started.pop())
            errors.close()
        rows = api.rows()
    return _latency_results(plan, segments, rows, caught_up, sustained_eps)


def _latency_results(plan: list[tuple[float, int, float]], segments: list[Segment],
                     rows: list[dict[str, Any]], caught_up: dict[str, float],
                     sustained_eps: float) -> dict[str, Any]:
    out: dict[str, Any] = {"sustained_eps": round(sustained_eps), "sweep": []}
    for pct, _count, seconds in plan:
        label = _pct_label(pct)
        rate = pct / 100 * sustained_eps
        mine = [s for s in segments if s.label.startswith(f"{label}/")]
        if not mine:  # the sweep stopped before this rate
            continue
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
        sent = sum(s.sent for s in mine)
        duration = sum(max(1, s.end_ms - s.start_ms) for s in mine) / 1000
        entry: dict[str, Any] = {
            "rate_eps": round(rate),
            "sent": sent,
            "triggers_measured": samples,
            "timers_measured": timers,
        }
        for key, values in per_run.items():
            entry[key] = spread(values, 1) if values else None
        if pct in HEADLINE_PCT:
            out[f"at_{label}pct"] = entry
        point: dict[str, Any] = {
            "pct": pct, "rate_eps": round(rate), "achieved_eps": round(sent / duration),
            "segments": len(mine), "seconds_per_segment": seconds, "sent": sent,
            "triggers_measured": samples, "caught_up_after_s": caught_up.get(label),
        }
        for key, values in per_run.items():
            point[key] = round(statistics.median(values), 1) if values else None
        out["sweep"].append(point)
    return out


def _write_memory_input(run: _Run, users: int) -> tuple[Path, Path]:
    spec = replace(run.spec, users=users)
    lines_path = run.workdir / f"memory-{users}.lines"
    profiles_path = run.workdir / f"memory-{users}.profiles"
    if lines_path.exists() and profiles_path.exists():
        return lines_path, profiles_path
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


def _memory_run(run: _Run, lines_path: Path, profiles_path: Path, name: str, *, clones: int,
                park_after_ms: int | None) -> dict[str, Any]:
    out = run.workdir / f"{name}.json"
    args = [str(lines_path), str(profiles_path), str(out), str(clones)]
    if park_after_ms is not None:
        args.append(str(park_after_ms))
    subprocess.run(run.python("nudgeflow.bench.memory", *args), env=child_env(), check=True,
                   timeout=3600)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _memory(run: _Run) -> dict[str, Any]:
    """State per held user as the flow holds them (quiet users parked), and with none parked.

    The two interleave, so that the time parking costs compares like with like.
    With clones, every run also measures the copied total; the headline
    `bytes_per_user` is the largest population's (the target is "at 1M users":
    what a shard's fixed costs add per user shrinks as users grow).
    """
    config = run.config
    lines_path, profiles_path = _write_memory_input(run, config.memory_users)
    results: list[dict[str, Any]] = []
    unparked: list[dict[str, Any]] = []
    clones = config.memory_clones
    for index in range(config.memory_runs):
        results.append(_memory_run(run, lines_path, profiles_path, f"memory{index}",
                                   clones=clones, park_after_ms=None))
        # Not copied: with none parked it is a comparison, not the target, and copying
        # 27,000 users held as objects would take a quick run past its 5 minutes.
        unparked.append(_memory_run(run, lines_path, profiles_path, f"memory{index}-held",
                                    clones=1, park_after_ms=0))
        run.log(f"memory run {index + 1}/{config.memory_runs}: "
                f"{results[-1]['rss_per_user']:,.0f} B/user RSS "
                f"({results[-1]['parked']:,} of {results[-1]['users']:,} users parked), "
                f"{unparked[-1]['rss_per_user']:,.0f} B/user with none parked; "
                f"{results[-1]['pickled_per_user']:,.0f} B/user snapshot")
    users = results[0]["users"]
    memory: dict[str, Any] = {
        f"users_{users}": {
            "rss": spread([r["rss_per_user"] for r in results], 0),
            "pickled": spread([r["pickled_per_user"] for r in results], 0),
            "full_gc_ms": spread([r["full_gc_ms"] for r in results], 1),
            "events": results[0]["events"],
            "parked_share": spread([r["parked"] / r["users"] for r in results], 3),
            "seconds": spread([r["seconds"] for r in results], 2),
            "unparked": {
                "rss": spread([r["rss_per_user"] for r in unparked], 0),
                "full_gc_ms": spread([r["full_gc_ms"] for r in unparked], 1),
                "seconds": spread([r["seconds"] for r in unparked], 2),
            },
        }
    }
    if clones > 1:
        memory[f"users_{results[0]['scaled_users']}"] = {
            "rss": spread([r["scaled_rss_per_user"] for r in results], 0),
            "pickled": spread([r["pickled_per_user"] for r in results], 0),
            "full_gc_ms": spread([r["scaled_full_gc_ms"] for r in results], 1),
            "cloned_from": users,
        }
    return memory


def _snapshots(run: _Run) -> dict[str, Any]:
    config = run.config
    lines_path, profiles_path = _write_memory_input(run, config.memory_users)
    out = run.workdir / "snapshots.json"
    args = [str(lines_path), str(profiles_path), str(out), "--runs", str(config.snapshot_runs),
            "--workdir", str(run.workdir)]
    for users in config.snapshot_users:
        args += ["--users", str(users)]
    for users in config.snapshot_sqlite_users:
        args += ["--users", str(users), "--sqlite-users", str(users)]
    subprocess.run(run.python("nudgeflow.bench.snapshots", *args), env=child_env(), check=True,
                   timeout=7200)
    result: dict[str, Any] = json.loads(out.read_text())
    for label, entry in result["users"].items():
        sqlite = entry.get("sqlite_growth_bytes")
        run.log(f"snapshots, {label}: {entry['ms']['median']:,.0f} ms per epoch, "
                f"{entry['bytes'] / 1e6:,.1f} MB"
                + (f", SQLite +{sqlite['median'] / 1e6:,.1f} MB" if sqlite else "")
                + f"; by shard {entry['shards']['ms']['median']:,.0f} ms "
                f"({entry['shards']['ms_unchanged']['median']:,.0f} ms unchanged"
                + (f", {entry['shards']['parked']['ms']['median']:,.0f} ms and "
                   f"{entry['shards']['parked']['bytes'] / 1e6:,.1f} MB parked"
                   if "parked" in entry["shards"] else "") + ")")
    return result


# --- the run ------------------------------------------------------------------------


def run(config: BenchConfig, *, bootstrap: str, redis_url: str,
        log: Log = lambda text: print(text, file=sys.stderr, flush=True)) -> dict[str, Any]:
    """Run every phase of `config`; the result dict (see bench/README.md for the fields)."""
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    machine = machine_info()
    phases: dict[str, float] = {}

    def timed(name: str, since: float) -> None:
        phases[name] = round(time.perf_counter() - since, 1)

    with tempfile.TemporaryDirectory(prefix="nudgeflow-bench-") as tmp:
        current = _Run(config, bootstrap, redis_url, Path(tmp), log)
        current.topics.check()
        current.profiles.check()
        try:
            mark = time.perf_counter()
            prefill = _prefill(current, four_partitions=config.multi_process)
            timed("prefill", mark)
            mark = time.perf_counter()
            with DispatchApi(current.workdir / "throughput-api.jsonl") as api:
                throughput = _throughput(current, prefill, api.url)
            timed("throughput", mark)
            mark = time.perf_counter()
            dispatch_api = _api_rps(current)
            timed("dispatch_api", mark)
            log(f"dispatch API: {dispatch_api['accepted_per_s']} accepted/s"
                + (f" ({dispatch_api['error']})" if dispatch_api["error"] else ""))
            sustained = throughput["throughput"]["flow_default_1w"]["median"]
            mark = time.perf_counter()
            latency = _latency(current, sustained)
            timed("latency", mark)
            mark = time.perf_counter()
            memory = _memory(current)
            timed("memory", mark)
            mark = time.perf_counter()
            snapshots = _snapshots(current)
            timed("snapshots", mark)
        finally:
            current.topics.delete_all()
            current.profiles.delete_all()
            current.profiles.close()
    return _summary(config, machine, started_at, seconds=time.perf_counter() - started,
                    prefill=prefill, throughput=throughput, latency=latency, memory=memory,
                    snapshots=snapshots, dispatch_api=dispatch_api, phases=phases)


def _headline(entry: dict[str, Any] | None) -> float | None:
    return None if not entry else entry["median"]


def _summary(config: BenchConfig, machine: dict[str, Any], started_at: datetime, *,
             seconds: float, prefill: dict[str, Any], throughput: dict[str, Any],
             latency: dict[str, Any], memory: dict[str, Any], snapshots: dict[str, Any],
             dispatch_api: dict[str, Any], phases: dict[str, float]) -> dict[str, Any]:
    tp = throughput["throughput"]
    ratios = throughput["ratios"]
    flow = tp["flow_default_1w"]["median"]
    ceiling = tp["ceiling_plain"]["median"]
    at50 = latency.get("at_50pct") or {}
    at80 = latency.get("at_80pct") or {}
    memory_users = max(int(k.removeprefix("users_")) for k in memory)
    bytes_per_user = memory[f"users_{memory_users}"]["rss"]["median"]
    ratio = ratios["ratio"]["median"]
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
    snap_users = snapshots["users"]
    headline_snapshots = [users_label(n) for n in config.snapshot_users]
    return {
        "throughput_eps": flow,
        "ceiling_eps": ceiling,
        "ratio": ratio,
        "ratio_bytewax": ratios["ratio_bytewax"]["median"],
        "slow_api_ratio": ratios["slow_api_ratio"]["median"],
        "events_per_s": {
            "flow_default_1w": flow,
            "flow_cart_1w": tp["flow_cart_1w"]["median"],
            "flow_no_intent_1w": tp["flow_no_intent_1w"]["median"],
            "ceiling_plain": ceiling,
            "ceiling_bytewax": tp["ceiling_bytewax"]["median"],
        },
        "latency_ms": {
            "p50": _headline(at50.get("p50")),
            "p95": _headline(at50.get("p95")),
            "p99": p99,
            "p99_80pct": _headline(at80.get("p99")),
        },
        "timer_lag_ms": {"p99": timer_p99},
        "bytes_per_user": bytes_per_user,
        "bytes_per_user_users": memory_users,
        "dispatch_api_rps": dispatch_api["accepted_per_s"],
        "snapshot_ms_per_epoch": {
            label: snap_users[label]["ms"]["median"] for label in headline_snapshots
            if label in snap_users
        },
        # Keyed by shard, every shard touched in the epoch: all users changed, or none.
        "snapshot_ms_per_epoch_shards": {
            label: {"changed": snap_users[label]["shards"]["ms"]["median"],
                    "unchanged": snap_users[label]["shards"]["ms_unchanged"]["median"]}
            for label in headline_snapshots if label in snap_users
        },
        "recovery_bytes_per_epoch": {
            label: snap_users[label]["bytes"] for label in headline_snapshots
            if label in snap_users
        },
        "latency_sweep": latency["sweep"],
        "latency_knee": knee(latency["sweep"]),
        "latency_budget_ms": BUDGET_MS,
        "targets": targets,
        "throughput": tp,
        "ratios": ratios,
        "ratio_detail": ratios["ratio"],
        "events_per_run": throughput["events_per_run"],
        "events_read": throughput["events_read"],
        "slow_api": {
            "delay_ms": config.slow_api_delay_ms,
            "requests_per_run": throughput["api_requests"],
        },
        "dispatch_api": dispatch_api,
        "latency": {k: v for k, v in latency.items() if k != "sweep"},
        "memory": memory,
        "snapshots": snapshots,
        "stream": {k: v for k, v in prefill.items() if not k.startswith("topic")},
        "config": asdict(config),
        "machine": machine,
        "started_at": started_at.isoformat(timespec="seconds"),
        "phases_s": phases,
        "duration_s": round(seconds, 1),
    }


def render(result: dict[str, Any]) -> str:
    """The printed report: what ran where, the tables, the targets."""
    machine = result["machine"]
    config = result["config"]
    cap = f"at most {result['events_per_run']:,} events"
    if config.get("max_seconds"):
        cap += f" or {config['max_seconds']:g} s"
    lines = [
        f"nudgeflow bench ({config['name']}): {config['users']:,} users, "
        f"{result['stream']['messages']:,} messages, {config['runs']} rounds, "
        f"flow runs read {cap} (ceilings: the whole topic), "
        f"{result['duration_s']:.0f} s",
        f"machine: {machine['nproc']} x {machine['cpu_model']}, {machine['memory_gb']} GB, "
        f"Python {machine['python']}, bytewax {machine['bytewax']}, "
        f"load {machine.get('load_average_at_start')}, detection "
        f"{'compiled (NUDGEFLOW_MYPYC=1)' if machine.get('detection_compiled') else 'pure Python'}",
        "",
        table(result),
        "",
        sweep_table(result),
        "",
        "targets: " + ", ".join(
            f"{name} {'MET' if met else 'not met'}" for name, met in result["targets"].items()
        ),
    ]
    if result["dispatch_api"].get("error"):
        lines.append(f"dispatch_api_rps: null ({result['dispatch_api']['error']})")
    if result.get("plot_note"):
        lines.append(f"plot: {result['plot_note']}")
    return "\n".join(lines)

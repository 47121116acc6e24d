"""The dispatch sink's overhead per trigger, against the reference API on loopback.

    python -m nudgeflow.bench.dispatch_overhead [--triggers N] [--mock-triggers M] [--runs R]

Two targets:

- `reference`: `nudgeflow.dispatch_api.server.serve` in a subprocess on a free
  loopback port; N fresh triggers a run (new ids every run, so the API always
  takes the full accept path). End to end, and the server (pure-Python h11,
  one process) is the bottleneck: the difference between the two clients is
  within its noise.
- `mock`: the same clients over `httpx.MockTransport` answering 202 at once:
  no network and no server, so the difference is the sink's own CPU cost.

Each target is sent the triggers in two ways, at each concurrency:

- `raw`: the least a client can do: an httpx AsyncClient, a semaphore, one
  `orjson.dumps(decision.dispatch_body())` and one POST per trigger;
- `dispatcher`: `nudgeflow.sinks.dispatch.Dispatcher.send_all` with the same pool size:
  headers, attempt timeout, circuit breaker, retry loop, results.

Runs alternate between the two; each figure is the median of R runs. The
difference of the µs/trigger columns is the sink's own cost; the CPU columns
(this client process's CPU time) are the steadier measure on a shared machine. Prints a table and
writes JSON (default `bench/results/dispatch_overhead.json`).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from nudgeflow.core.settings import DispatchSettings
from nudgeflow.core.triggers import Decision, Trigger
from nudgeflow.sinks.dispatch import Dispatcher, make_client

FIRED_AT_MS = 1_772_359_200_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def start_api(port: int) -> subprocess.Popen[bytes]:
    code = f"from nudgeflow.dispatch_api.server import serve; serve('127.0.0.1', {port}, None)"
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            msg = f"the API exited with {process.returncode}"
            raise RuntimeError(msg)
        try:
            httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=0.5)
        except httpx.HTTPError:
            time.sleep(0.05)
        else:
            return process
    process.kill()
    msg = "the API did not start"
    raise RuntimeError(msg)


def make_decisions(count: int) -> list[Decision]:
    run = uuid.uuid4().hex[:8]
    out = []
    for n in range(count):
        trigger = Trigger(
            trigger_id=f"{run}-{n:06d}",
            trigger_type="cart_abandonment",
            user_id=f"u{n}",
            fired_at_ms=FIRED_AT_MS,
            detected_at_ms=FIRED_AT_MS + 12,
            segment="regular",
            metadata={"cart_value": 113.4, "items": [{"product_id": "p-1042", "quantity": 1,
                                                       "price": 113.4}]},
        )
        out.append(Decision(trigger, "dispatched", None, "email", FIRED_AT_MS))
    return out


async def accept(request: httpx.Request) -> httpx.Response:
    return httpx.Response(202, json={"trigger_id": request.headers["Idempotency-Key"],
                                     "status": "accepted"})


def transport(mock: bool) -> httpx.AsyncBaseTransport | None:
    return httpx.MockTransport(accept) if mock else None


async def run_raw(
    settings: DispatchSettings, decisions: list[Decision], mock: bool
) -> tuple[float, float]:
    url = settings.url + "/api/trigger"
    semaphore = asyncio.Semaphore(settings.max_in_flight)
    async with make_client(settings, transport(mock)) as client:

        async def one(decision: Decision) -> None:
            content = orjson.dumps(decision.dispatch_body())
            headers = {"Idempotency-Key": decision.trigger.trigger_id,
                       "Content-Type": "application/json"}
            for attempt in range(3):  # a dropped keep-alive connection: try again
                try:
                    async with semaphore:
                        response = await client.post(url, content=content, headers=headers)
                except httpx.TransportError:
                    if attempt == 2:
                        raise
                    continue
                if response.status_code != 202:
                    msg = f"HTTP {response.status_code}"
                    raise RuntimeError(msg)
                return

        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(d) for d in decisions))
        return time.perf_counter() - start, time.process_time() - cpu


async def run_dispatcher(
    settings: DispatchSettings, decisions: list[Decision], mock: bool
) -> tuple[float, float]:
    async with Dispatcher(settings, transport=transport(mock)) as dispatcher:
        start, cpu = time.perf_counter(), time.process_time()
        results = await dispatcher.send_all(decisions)
        elapsed = time.perf_counter() - start, time.process_time() - cpu
    if not all(result.ok for result in results):
        msg = "a dispatch failed"
        raise RuntimeError(msg)
    return elapsed


def measure(
    target: str, url: str, triggers: int, runs: int, concurrency: int
) -> dict[str, Any]:
    mock = target == "mock"
    settings = DispatchSettings(url=url, max_in_flight=concurrency, timeout_s=5.0)
    # warm-up: connections, imports, the server's code paths
    asyncio.run(run_raw(settings, make_decisions(200), mock))
    asyncio.run(run_dispatcher(settings, make_decisions(200), mock))
    times: dict[str, list[tuple[float, float]]] = {"raw": [], "dispatcher": []}
    for _ in range(runs):
        times["raw"].append(asyncio.run(run_raw(settings, make_decisions(triggers), mock)))
        times["dispatcher"].append(
            asyncio.run(run_dispatcher(settings, make_decisions(triggers), mock))
        )
    out: dict[str, Any] = {
        "target": target, "concurrency": concurrency, "triggers": triggers, "runs": runs
    }
    for mode, samples in times.items():
        median = statistics.median(wall for wall, _ in samples)
        cpu = statistics.median(cpu for _, cpu in samples)
        out[mode] = {
            "seconds_median": median,
            "triggers_per_s": triggers / median,
            "us_per_trigger": median / triggers * 1e6,
            # CPU time of this (client) process: barely moved by other load on the machine
            "cpu_us_per_trigger": cpu / triggers * 1e6,
            "seconds_all": [wall for wall, _ in samples],
            "cpu_seconds_all": [cpu for _, cpu in samples],
        }
    out["overhead_us_per_trigger"] = (
        out["dispatcher"]["us_per_trigger"] - out["raw"]["us_per_trigger"]
    )
    out["cpu_overhead_us_per_trigger"] = (
        out["dispatcher"]["cpu_us_per_trigger"] - out["raw"]["cpu_us_per_trigger"]
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triggers", type=int, default=500, help="per run, reference API")
    parser.add_argument("--mock-triggers", type=int, default=3000, help="per run, mock")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--out", type=Path, default=Path("bench/results/dispatch_overhead.json"))
    args = parser.parse_args()

    rows = [
        measure("mock", "http://bench.mock", args.mock_triggers, args.runs, concurrency)
        for concurrency in args.concurrency
    ]
    port = free_port()
    api = start_api(port)
    try:
        rows += [
            measure("reference", f"http://127.0.0.1:{port}", args.triggers, args.runs,
                    concurrency)
            for concurrency in args.concurrency
        ]
    finally:
        api.terminate()
        api.wait(timeout=10)

    header = (f"{'target':<10} {'in flight':>9}  {'client':<10}  {'triggers/s':>10}  "
              f"{'us/trigger':>10}  {'overhead us':>11}  {'cpu us':>7}  {'cpu overhead':>12}")
    print(f"dispatch overhead: median of {args.runs} runs; mock: {args.mock_triggers} "
          f"triggers a run, reference API on loopback: {args.triggers}")
    print(header)
    print("-" * len(header))
    for row in rows:
        for mode in ("raw", "dispatcher"):
            figures = row[mode]
            dispatcher = mode == "dispatcher"
            overhead = f"{row['overhead_us_per_trigger']:>11.1f}" if dispatcher else " " * 11
            cpu_overhead = f"{row['cpu_overhead_us_per_trigger']:>12.1f}" if dispatcher else ""
            print(f"{row['target']:<10} {row['concurrency']:>9}  {mode:<10}  "
                  f"{figures['triggers_per_s']:>10.0f}  {figures['us_per_trigger']:>10.1f}  "
                  f"{overhead}  {figures['cpu_us_per_trigger']:>7.1f}  {cpu_overhead}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps({"python": sys.version.split()[0], "results": rows},
                                      option=orjson.OPT_INDENT_2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Accepted triggers per second of the reference dispatch API: one server process, on loopback.

    python -m nudgeflow.bench.api_rps [--seconds S] [--concurrency C] [--redis-url URL]
                                      [--json FILE] [--runs R] [--warmup W] [--clients N]
                                      [--batch-size B] [--mode single|batch|both]

Each run starts `nudgeflow dispatch-api` in a subprocess on a free loopback port,
with `--log` and, when `--redis-url` is given, Redis idempotency (use a
database of your own: the tests flush database 0). Clients then drive it with
an `httpx.AsyncClient` each (keep-alive pool of C connections per client, C
requests in flight, a fresh trigger id every request) for W seconds of
warm-up and S seconds measured; a trigger counts when its 202 arrives inside
the measured window.

- `single`: `POST /api/trigger`, one trigger a request, `Idempotency-Key` set;
- `batch`: `POST /api/triggers`, B triggers a request, `--batch-concurrency`
  requests in flight a client (skipped when the server's OpenAPI document has
  no such operation).

Afterwards every trigger sent must have been answered 202 `accepted` and
appear exactly once in the server's JSON-lines log: a run that loses,
duplicates or refuses one fails. Meanwhile a reader polls the log every 5 ms
(`LogTail`): the "in the log" figures are how long sampled triggers (one in
50) took to appear there after their answer arrived, 0 or less when they were
there first (an upper bound: the reader is late when the machine is busy).
The keys a run left in Redis are deleted.

`--clients N` drives the server from N client processes at once (each with C
connections): on a small machine one Python client may be the limit, which
the client CPU column shows (% of one core, like the server's). httpx costs
about 1 ms of CPU a request on the project's 2-core machine, so no number of
httpx clients there can load a server that takes a fraction of that:
`--client raw` sends the same requests, checked the same way, with a minimal
HTTP/1.1 keep-alive client (`RawConnection`, ~10x cheaper). Prints a table of
the medians of R runs and writes every run as JSON with `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

import httpx
import orjson

Mode = Literal["single", "batch"]
ClientKind = Literal["httpx", "raw"]

_HOST: Final = "127.0.0.1"
_FIRED_AT: Final = "2026-03-01T10:00:00Z"
_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_SAMPLE_EVERY: Final = 50  # triggers whose log delay is measured: `<prefix>-<n>`, n % 50 == 0
_TAIL_EVERY_S: Final = 0.005
_REDIS_PREFIX: Final = "nudgeflow:dispatch"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
    return port


def body_template() -> tuple[bytes, bytes]:
    """The parts of one JSON body around its trigger id: prefix + id + suffix."""
    marker = "@@ID@@"
    body = {
        "trigger_id": marker,
        "trigger_type": "cart_abandonment",
        "user_id": "u1042",
        "fired_at": _FIRED_AT,
        "detected_at": "2026-03-01T10:00:00.012Z",
        "segment": "regular",
        "metadata": {
            "cart_value": 113.4,
            "items": [{"product_id": "p-1042", "quantity": 1, "price": 113.4}],
        },
        "channel": "email",
        "send_at": _FIRED_AT,
    }
    prefix, suffix = orjson.dumps(body).split(marker.encode())
    return prefix, suffix


# --- one client ----------------------------------------------------------------------------


@dataclass
class ClientResult:
    """What one client saw: counts of triggers (not requests)."""

    sent: int = 0  # trigger ids used: `<prefix>-0` … `<prefix>-<sent-1>`
    accepted: int = 0  # answered 202 accepted
    in_window: int = 0  # of those, answered inside the measured window
    requests_in_window: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # requests inside the window
    # wall-clock time each sampled trigger's 202 arrived (every `_SAMPLE_EVERY`th id)
    answered_at: dict[str, float] = field(default_factory=dict)


class RawConnection(asyncio.Protocol):
    """The least an HTTP/1.1 keep-alive client can do: one request at a time, on one socket.

    For `--client raw`: measures the server when one Python httpx client cannot
    load it (httpx costs ~1 ms of CPU a request on a small machine). Expects
    `Content-Length` framed answers, as the reference API sends.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> RawConnection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None:
            return
        head = bytes(self._buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self._fail(ConnectionError("an answer without Content-Length"))
            return
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop > 0 else len(head)])
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        waiter, self._waiter = self._waiter, None
        if not waiter.done():
            waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("the server closed the connection"))

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self._transport is None or self._transport.is_closing():
            msg = "connection closed"
            raise ConnectionError(msg)
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


Sender = Callable[[str, bytes, dict[str, str]], Awaitable[tuple[int, bytes]]]


@contextlib.asynccontextmanager
async def senders(url: str, kind: ClientKind, count: int) -> AsyncIterator[list[Sender]]:
    """`count` ways to send a request, each on its own keep-alive connection."""
    if kind == "httpx":
        # A client a worker, each with its one connection: httpcore's pool costs O(connections)
        # of CPU a request, which would make one shared client of C connections the
        # bottleneck. One TLS context for all (building one takes ~40 ms; none is used).
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        tls = ssl.create_default_context()
        clients = [
            httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0, verify=tls)
            for _ in range(count)
        ]

        def httpx_sender(client: httpx.AsyncClient) -> Sender:
            async def post(path: str, content: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
                response = await client.post(path, content=content, headers=headers)
                return response.status_code, response.content

            return post

        try:
            yield [httpx_sender(client) for client in clients]
        finally:
            for client in clients:
                await client.aclose()
        return
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    connections = [await RawConnection.open(host, port) for _ in range(count)]

    def raw_sender(connection: RawConnection) -> Sender:
        async def post(path: str, content: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
            lines = [f"POST {path} HTTP/1.1", f"host: {host}:{port}",
                     f"content-length: {len(content)}"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            return await connection.request(head + content)

        return post

    try:
        yield [raw_sender(connection) for connection in connections]
    finally:
        for connection in connections:
            connection.close()


async def drive(
    url: str,
    *,
    mode: Mode,
    concurrency: int,
    batch_size: int,
    id_prefix: str,
    start_at: float,
    warmup_s: float,
    seconds: float,
    client: ClientKind = "httpx",
) -> ClientResult:
    """Send until the window ends; `start_at` is a wall-clock time shared by all clients."""
    result = ClientResult()
    failures: Counter[str] = Counter()
    prefix, suffix = body_template()
    per_request = 1 if mode == "single" else batch_size
    path = "/api/trigger" if mode == "single" else "/api/triggers"
    # The shared wall-clock start, on this process's monotonic clock.
    begin = time.monotonic() + (start_at - time.time())
    window_start = begin + warmup_s
    window_end = window_start + seconds
    next_id = 0

    async def worker(send: Sender) -> None:
        nonlocal next_id
        while time.monotonic() < window_end:
            first = next_id
            next_id += per_request
            ids = [f"{id_prefix}-{n}" for n in range(first, first + per_request)]
            if mode == "single":
                content = prefix + ids[0].encode() + suffix
                headers = {"Idempotency-Key": ids[0], "Content-Type": "application/json"}
            else:
                content = b"[" + b",".join(prefix + i.encode() + suffix for i in ids) + b"]"
                headers = {"Content-Type": "application/json"}
            sent_at = time.perf_counter()
            try:
                status, answer = await send(path, content, headers)
            except (httpx.HTTPError, OSError) as exc:
                failures[type(exc).__name__] += per_request
                continue
            done = time.monotonic()
            accepted = _accepted(mode, status, answer, ids)
            if accepted < per_request:
                failures[f"HTTP {status}"] += per_request - accepted
            result.accepted += accepted
            if accepted == per_request:
                now = time.time()
                for n in range(first + (-first % _SAMPLE_EVERY), first + per_request,
                               _SAMPLE_EVERY):
                    result.answered_at[f"{id_prefix}-{n}"] = now
            if window_start <= done < window_end:
                result.in_window += accepted
                result.requests_in_window += 1
                result.latencies_ms.append((time.perf_counter() - sent_at) * 1000)

    async with senders(url, client, concurrency) as workers:
        await asyncio.sleep(max(0.0, begin - time.monotonic()))
        await asyncio.gather(*(worker(send) for send in workers))
    result.sent = next_id
    result.failures = dict(failures)
    return result


def _accepted(mode: Mode, status: int, content: bytes, ids: list[str]) -> int:
    if status != 202:
        return 0
    body = orjson.loads(content)
    if mode == "single":
        return int(body == {"trigger_id": ids[0], "status": "accepted"})
    answers = body.get("results") if isinstance(body, dict) else None
    if not isinstance(answers, list) or len(answers) != len(ids):
        return 0
    return sum(
        1
        for answer, trigger_id in zip(answers, ids, strict=True)
        if answer == {"trigger_id": trigger_id, "status": "accepted"}
    )


def _client_main(args: argparse.Namespace) -> int:
    """A client process of `--clients N`: drives, then prints its ClientResult as JSON."""
    result = asyncio.run(
        drive(
            args.client_of,
            mode=args.client_mode,
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            id_prefix=args.id_prefix,
            start_at=args.start_at,
            warmup_s=args.warmup,
            seconds=args.seconds,
            client=args.client,
        )
    )
    sys.stdout.buffer.write(orjson.dumps(asdict(result)) + b"\n")
    return 0


# --- one run -------------------------------------------------------------------------------


class LogTail:
    """Reads the API's log as it grows, like a reader of it: when each sampled id appeared."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset, partial = 0, b""
        while not self._stop.wait(_TAIL_EVERY_S):
            try:
                with self._path.open("rb") as file:
                    file.seek(offset)
                    data = file.read()
            except FileNotFoundError:
                continue
            now = time.time()
            offset += len(data)
            lines = (partial + data).split(b"\n")
            partial = lines.pop()
            for line in lines:
                trigger_id = str(orjson.loads(line)["trigger_id"])
                if int(trigger_id.rsplit("-", 1)[1]) % _SAMPLE_EVERY == 0:
                    self.seen.setdefault(trigger_id, now)

    def stop(self) -> None:
        time.sleep(2 * _TAIL_EVERY_S)  # a last look
        self._stop.set()
        self._thread.join()

    def delays_ms(self, answered_at: Mapping[str, float]) -> list[float]:
        """How long each sampled trigger took to appear after its answer (< 0: before), sorted.

        An upper bound: the reader itself may be late (it polls every 5 ms, and
        shares a loaded machine).
        """
        return sorted(
            (self.seen.get(trigger_id, float("inf")) - at) * 1000
            for trigger_id, at in answered_at.items()
        )


@dataclass
class RunResult:
    mode: Mode
    run: int
    accepted_per_s: float
    triggers_in_window: int
    requests_in_window: int
    triggers_total: int
    server_cpu_pct: float  # of one core, during the window
    client_cpu_pct: float  # all client processes together, of one core
    p50_ms: float
    p99_ms: float
    # how long sampled triggers took to appear in the log after their 202 arrived, as a
    # reader polling every 5 ms saw it (<= 0: it was there before the answer)
    log_delay_ms_p50: float
    log_delay_ms_max: float


def _cpu_s(pid: int) -> float | None:
    """utime + stime of a process (Linux), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


class CpuSampler:
    """CPU seconds of each of some processes at two wall-clock times (the window's edges)."""

    def __init__(self, pids: Sequence[int], at: tuple[float, float]) -> None:
        self._pids = list(pids)
        self._at = at
        self._samples: list[list[float | None]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for at in self._at:
            time.sleep(max(0.0, at - time.time()))
            self._samples.append([_cpu_s(pid) for pid in self._pids])

    def percents(self, seconds: float) -> list[float]:
        """Per process, % of one core over the window (NaN when unknown)."""
        self._thread.join(timeout=seconds + 30)
        if len(self._samples) != 2:
            return [float("nan")] * len(self._pids)
        return [
            100.0 * (end - start) / seconds if start is not None and end is not None
            else float("nan")
            for start, end in zip(*self._samples, strict=True)
        ]


@contextlib.contextmanager
def running_api(log_path: Path, redis_url: str | None) -> Iterator[tuple[str, int]]:
    """`nudgeflow dispatch-api` in a subprocess: (base URL, pid)."""
    port = free_port()
    command = [sys.executable, "-m", "nudgeflow", "dispatch-api", "--host", _HOST,
               "--port", str(port), "--log", str(log_path)]
    if redis_url is not None:
        command += ["--redis-url", redis_url]
    process = subprocess.Popen(command)
    url = f"http://{_HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                msg = f"the API exited with {process.returncode}"
                raise RuntimeError(msg)
            try:
                if httpx.get(f"{url}/healthz", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                msg = "the API did not start"
                raise RuntimeError(msg)
            time.sleep(0.05)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def has_batch_endpoint(url: str) -> bool:
    document = httpx.get(f"{url}/openapi.json", timeout=10).json()
    return "/api/triggers" in document.get("paths", {})


def _concurrency(args: argparse.Namespace, mode: Mode) -> int:
    return int(args.concurrency if mode == "single" else args.batch_concurrency)


def _spawn_clients(
    url: str, args: argparse.Namespace, mode: Mode, prefixes: list[str], start_at: float
) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "nudgeflow.bench.api_rps", "--client-of", url,
             "--client-mode", mode, "--id-prefix", prefix, "--start-at", repr(start_at),
             "--concurrency", str(_concurrency(args, mode)), "--batch-size", str(args.batch_size),
             "--warmup", repr(args.warmup), "--seconds", repr(args.seconds),
             "--client", args.client],
            stdout=subprocess.PIPE,
        )
        for prefix in prefixes
    ]


def run_once(args: argparse.Namespace, mode: Mode, run: int, tmp: Path) -> RunResult:
    log_path = tmp / f"api-{mode}-{run}.jsonl"
    run_id = uuid.uuid4().hex[:10]
    prefixes = [f"{run_id}-c{n}" for n in range(args.clients)]
    with running_api(log_path, args.redis_url) as (url, server_pid):
        if mode == "batch" and not has_batch_endpoint(url):
            msg = "the server has no POST /api/triggers"
            raise LookupError(msg)
        start_at = time.time() + (1.5 if args.clients > 1 else 0.2)
        window = (start_at + args.warmup, start_at + args.warmup + args.seconds)
        tail = LogTail(log_path)
        if args.clients == 1:
            sampler = CpuSampler([server_pid, os.getpid()], window)
            results = [asyncio.run(drive(
                url, mode=mode, concurrency=_concurrency(args, mode), batch_size=args.batch_size,
                id_prefix=prefixes[0], start_at=start_at, warmup_s=args.warmup,
                seconds=args.seconds, client=args.client,
            ))]
        else:
            clients = _spawn_clients(url, args, mode, prefixes, start_at)
            sampler = CpuSampler([server_pid, *(c.pid for c in clients)], window)
            results = []
            for client in clients:
                out, _ = client.communicate(timeout=args.warmup + args.seconds + 120)
                if client.returncode != 0:
                    msg = f"a client process exited with {client.returncode}"
                    raise RuntimeError(msg)
                results.append(ClientResult(**orjson.loads(out)))
        server_cpu, *client_cpu = sampler.percents(args.seconds)
        tail.stop()
        verify(log_path, results, prefixes)
    delays = tail.delays_ms({k: v for r in results for k, v in r.answered_at.items()})
    if args.redis_url is not None:
        cleanup_redis(args.redis_url, run_id)
    latencies = sorted(ms for r in results for ms in r.latencies_ms)
    in_window = sum(r.in_window for r in results)
    return RunResult(
        mode=mode,
        run=run,
        accepted_per_s=in_window / args.seconds,
        triggers_in_window=in_window,
        requests_in_window=sum(r.requests_in_window for r in results),
        triggers_total=sum(r.sent for r in results),
        server_cpu_pct=server_cpu,
        client_cpu_pct=sum(client_cpu),
        p50_ms=_quantile(latencies, 0.5),
        p99_ms=_quantile(latencies, 0.99),
        log_delay_ms_p50=_quantile(delays, 0.5),
        log_delay_ms_max=delays[-1] if delays else float("nan"),
    )


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def verify(log_path: Path, results: list[ClientResult], prefixes: list[str]) -> None:
    """Every trigger sent was accepted, and is in the log exactly once."""
    failures: Counter[str] = Counter()
    for result in results:
        failures.update(result.failures)
        if result.accepted != result.sent:
            failures["not accepted"] += result.sent - result.accepted - sum(
                result.failures.values()
            )
    if +failures:
        msg = f"not every trigger was accepted: {dict(+failures)}"
        raise AssertionError(msg)
    expected = {
        f"{prefix}-{n}" for prefix, result in zip(prefixes, results, strict=True)
        for n in range(result.sent)
    }
    data = log_path.read_bytes() if log_path.exists() else b""
    logged = Counter(orjson.loads(line)["trigger_id"] for line in data.splitlines())
    missing = expected - set(logged)
    extra = set(logged) - expected
    twice = [trigger_id for trigger_id, count in logged.items() if count > 1]
    if missing or extra or twice:
        msg = (f"log mismatch: {len(missing)} missing, {len(extra)} unexpected, "
               f"{len(twice)} logged more than once")
        raise AssertionError(msg)


def cleanup_redis(redis_url: str, run_id: str) -> None:
    """Delete what a run left in Redis (its triggers, their states, queue entries)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        for kind in ("trigger", "state"):
            batch: list[bytes] = []
            for key in client.scan_iter(match=f"{_REDIS_PREFIX}:{kind}:{run_id}-*", count=5000):
                batch.append(key)
                if len(batch) >= 5000:
                    client.unlink(*batch)
                    batch.clear()
            if batch:
                client.unlink(*batch)
        members = [m for m, _ in client.zscan_iter(f"{_REDIS_PREFIX}:due", match=f"{run_id}-*")]
        if members:
            client.zrem(f"{_REDIS_PREFIX}:due", *members)
    finally:
        client.close()


# --- the command ---------------------------------------------------------------------------


def summarize(runs: list[RunResult]) -> dict[str, dict[str, float]]:
    summary: dict[str, dict[str, float]] = {}
    for mode in ("single", "batch"):
        of_mode = [r for r in runs if r.mode == mode]
        if not of_mode:
            continue
        rates = [r.accepted_per_s for r in of_mode]
        summary[mode] = {
            "accepted_per_s_median": statistics.median(rates),
            "accepted_per_s_min": min(rates),
            "accepted_per_s_max": max(rates),
            "server_cpu_pct_median": statistics.median(r.server_cpu_pct for r in of_mode),
            "client_cpu_pct_median": statistics.median(r.client_cpu_pct for r in of_mode),
            "p50_ms_median": statistics.median(r.p50_ms for r in of_mode),
            "p99_ms_median": statistics.median(r.p99_ms for r in of_mode),
            "log_delay_ms_p50_median": statistics.median(r.log_delay_ms_p50 for r in of_mode),
            "log_delay_ms_max": max(r.log_delay_ms_max for r in of_mode),
        }
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nudgeflow.bench.api_rps",
        description="accepted triggers per second of the reference dispatch API",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up before it (2)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests in flight per client process (32)")
    parser.add_argument("--redis-url", help="Redis idempotency (use a database >= 1)")
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    parser.add_argument("--runs", type=int, default=3, help="runs per mode (3)")
    parser.add_argument("--clients", type=int, default=1, help="client processes (1)")
    parser.add_argument("--batch-size", type=int, default=100,
                        help="triggers per batch request (100)")
    parser.add_argument("--batch-concurrency", type=int, default=4,
                        help="batch requests in flight per client process (4)")
    parser.add_argument("--mode", choices=["single", "batch", "both"], default="both")
    parser.add_argument("--client", choices=["httpx", "raw"], default="httpx",
                        help="httpx.AsyncClient (default), or a minimal raw HTTP/1.1 client")
    # A client process of --clients N (internal).
    parser.add_argument("--client-of", help=argparse.SUPPRESS)
    parser.add_argument("--client-mode", choices=["single", "batch"], help=argparse.SUPPRESS)
    parser.add_argument("--id-prefix", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1 or args.runs < 1:
        parser.error("--seconds, --concurrency and --runs must be > 0, --warmup >= 0")
    if args.clients < 1 or args.batch_size < 1 or args.batch_concurrency < 1:
        parser.error("--clients, --batch-size and --batch-concurrency must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client_of is not None:
        return _client_main(args)
    modes: list[Mode] = ["single", "batch"] if args.mode == "both" else [args.mode]
    runs: list[RunResult] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="nudgeflow-api-rps-") as tmp:
        for run in range(args.runs):
            for mode in modes:
                if mode in skipped:
                    continue
                try:
                    result = run_once(args, mode, run, Path(tmp))
                except LookupError as exc:
                    print(f"{mode}: skipped ({exc})", file=sys.stderr)
                    skipped.append(mode)
                    continue
                runs.append(result)
                print(f"run {run + 1} {mode:6}: {result.accepted_per_s:8,.0f} triggers/s "
                      f"(server CPU {result.server_cpu_pct:3.0f}%, clients "
                      f"{result.client_cpu_pct:3.0f}%, p50 {result.p50_ms:.1f} ms, "
                      f"p99 {result.p99_ms:.1f} ms, in the log {result.log_delay_ms_p50:.0f} ms "
                      f"(p50), at most {result.log_delay_ms_max:.0f} ms after the answer)",
                      file=sys.stderr)
    summary = summarize(runs)
    redis_text = f"Redis {args.redis_url}" if args.redis_url else "in memory"
    print(f"reference dispatch API, {redis_text}, {args.clients} {args.client} client "
          "process(es), "
          f"{args.seconds:g} s windows, medians of {args.runs}:")
    for name, figures in summary.items():
        in_flight = _concurrency(args, cast(Mode, name))
        unit = ("1 trigger" if name == "single" else f"{args.batch_size} triggers") + (
            f"/request, {in_flight} in flight")
        print(f"  {name:6} ({unit}): {figures['accepted_per_s_median']:8,.0f} "
              f"accepted triggers/s (min {figures['accepted_per_s_min']:,.0f}, max "
              f"{figures['accepted_per_s_max']:,.0f}); server CPU "
              f"{figures['server_cpu_pct_median']:.0f}%, clients "
              f"{figures['client_cpu_pct_median']:.0f}%; p50 {figures['p50_ms_median']:.1f} ms; "
              f"in the log {figures['log_delay_ms_p50_median']:.0f} ms (p50), at most "
              f"{figures['log_delay_ms_max']:.0f} ms after the answer")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document: dict[str, Any] = {
            "config": {k: v for k, v in vars(args).items()
                       if k in ("seconds", "warmup", "concurrency", "redis_url", "runs",
                                "clients", "batch_size", "batch_concurrency", "mode", "client")},
            "cpu_count": os.cpu_count(),
            "summary": summary,
            "runs": [asdict(r) for r in runs],
        }
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A loopback dispatch API that answers after a fixed delay: `slow_api_ratio`'s two APIs.

    python -m nudgeflow.bench.slow_api PORT DELAY_MS

A tiny asyncio HTTP/1.1 server (keep-alive, no framework, nothing logged):
every `POST` is answered `202 {"trigger_id": <the body's>, "status": "accepted"}`
after DELAY_MS (a `POST /api/triggers` batch: `{"results": [...]}`, one per
body, as the reference API answers it); `GET /stats` answers `{"requests": N,
"delay_ms": D}` at once. Requests are handled concurrently (one task per
connection), so the delay is a latency, not a rate limit: a client with k
requests in flight gets up to k / delay answers per second. It checks nothing,
keeps nothing and is never the bottleneck, which the reference API is on this
machine: the same server answers the instant case (DELAY_MS = 0), so only the
delay differs between the two runs of the ratio.

`LoopbackApi` runs it in a process of its own (not a thread of the harness,
whose GIL it would share) and reads its request count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from types import TracebackType
from typing import Final

import orjson

from nudgeflow.bench.services import child_env, free_port, stop_process
from nudgeflow.core.errors import ServiceError

__all__ = ["LoopbackApi", "main", "serve"]

_MAX_HEADER: Final = 64 * 1024


class _Server:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ConnectionError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, _, rest = request_line.partition(" ")
                path = rest.partition(" ")[0]
                length = 0
                close = False
                for line in header_lines:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value.strip() or 0)
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                body = await reader.readexactly(length) if length else b""
                if method == "POST":
                    self.requests += 1
                    if self.delay_s > 0:
                        await asyncio.sleep(self.delay_s)
                    status, payload = "202 Accepted", _answer(path, body)
                elif method == "GET" and path == "/stats":
                    status, payload = "200 OK", orjson.dumps(
                        {"requests": self.requests, "delay_ms": self.delay_s * 1000}
                    )
                else:
                    status, payload = "404 Not Found", b'{"error":"not found"}'
                writer.write(
                    f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(payload)}\r\n"
                    f"connection: {'close' if close else 'keep-alive'}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()


def _answer(path: str, body: bytes) -> bytes:
    if path.endswith("/api/triggers"):  # a batch: one result per body, in order
        try:
            items = orjson.loads(body)
        except orjson.JSONDecodeError:
            items = []
        ids = [item.get("trigger_id") for item in items if isinstance(item, dict)]
        return orjson.dumps({"results": [{"trigger_id": i, "status": "accepted"} for i in ids]})
    return orjson.dumps({"trigger_id": _trigger_id(body), "status": "accepted"})


def _trigger_id(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    value = data.get("trigger_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


async def serve(port: int, delay_ms: float) -> None:
    """Serve on 127.0.0.1:`port` until cancelled."""
    server = _Server(delay_ms / 1000.0)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", port, limit=_MAX_HEADER,
                                          backlog=1024)
    async with listener:
        await listener.serve_forever()


class LoopbackApi:
    """`python -m nudgeflow.bench.slow_api` on a free loopback port, as a context manager."""

    def __init__(self, delay_ms: float) -> None:
        self.delay_ms = delay_ms
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "nudgeflow.bench.slow_api", str(self.port),
             str(self.delay_ms)],
            env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                msg = f"the loopback API exited at start with {self._proc.returncode}"
                raise ServiceError(msg)
            try:
                self.requests()
            except OSError:
                time.sleep(0.05)
                continue
            return
        self.stop()
        msg = f"the loopback API did not answer on {self.url} within {timeout_s} s"
        raise ServiceError(msg)

    def requests(self) -> int:
        """POSTs answered so far."""
        with urllib.request.urlopen(f"{self.url}/stats", timeout=2) as answer:
            count: int = json.loads(answer.read())["requests"]
        return count

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> LoopbackApi:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    port, delay_ms = int(argv[0]), float(argv[1]) if len(argv) > 1 else 0.0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(port, delay_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

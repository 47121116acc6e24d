"""Health endpoints, Prometheus metrics exposition and structured JSON logs for live runs.

`/healthz` answers while the process is alive, `/readyz` once the flow has
checked its services and started, `/metrics` serves the Prometheus registry
(ours and bytewax's). Logs are one JSON object per line, carry the trigger id
on every line about a trigger, and never carry personal data: e-mail addresses
and phone numbers are masked before a line is written.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Final

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nudgeflow.core.timeutil import format_ms, now_ms

_EMAIL: Final = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
# International numbers (+49 170 1234567) and North American ones ((212) 555-0100);
# dates, ids and epoch milliseconds stay readable.
_PHONE: Final = re.compile(r"\+\d[\d ()-]{6,}\d|\(?\b\d{3}\)?[ .-]\d{3}[ .-]\d{4}\b")
# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)))


def redact(text: str) -> str:
    """Mask e-mail addresses and phone numbers."""
    return _PHONE.sub("<phone>", _EMAIL.sub("<email>", text))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": format_ms(int(record.created * 1000)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            line["error"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs every request at INFO: thousands of lines a second under load.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class Health:
    """What the endpoints report: alive from the start, ready once the flow runs."""

    def __init__(self) -> None:
        self.started_ms = now_ms()
        self.ready = threading.Event()
        self.detail = "starting"


class _Handler(BaseHTTPRequestHandler):
    health: ClassVar[Health]

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, {"status": "alive", "since": format_ms(self.health.started_ms)})
        elif path == "/readyz":
            ready = self.health.ready.is_set()
            self._send(200 if ready else 503,
                       {"status": "ready" if ready else "not ready",
                        "detail": self.health.detail})
        elif path == "/metrics":
            body = generate_latest()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self._send(404, {"error": "not found"})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = orjson.dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return  # probes every few seconds would drown the logs


def serve_health(health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Serve the endpoints from a daemon thread; returns the server (port 0 picks one)."""
    handler = type("HealthHandler", (_Handler,), {"health": health})
    server = ThreadingHTTPServer((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="health", daemon=True)
    thread.start()
    return server

"""Health endpoints, Prometheus metrics exposition, the live dashboard and JSON logs.

`/healthz` answers while the process is alive, `/readyz` once the flow has
checked its services and started, `/metrics` serves the Prometheus registry
(ours and bytewax's), and `/dashboard` is a page that shows the same registry,
summarised (`/dashboard.json`, nudgeflow.core.dashboard), every two seconds.
Logs are one JSON object per line, carry the trigger id on every line about a
trigger, and never carry personal data: e-mail addresses and phone numbers are
masked before a line is written.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any, ClassVar, Final

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from nudgeflow.core.dashboard import EventRate, summarise
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


# The page and its script, package data (served as they are: no build step, no CDN).
_WEB: Final = files("nudgeflow").joinpath("core", "web")
_STATIC: Final = {
    "/dashboard": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
}


class _Handler(BaseHTTPRequestHandler):
    health: ClassVar[Health]
    registry: ClassVar[CollectorRegistry]
    rate: ClassVar[EventRate]

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in _STATIC:
            name, content_type = _STATIC[path]
            self._send_bytes(200, _WEB.joinpath(name).read_bytes(), content_type)
        elif path == "/dashboard.json":
            self._send(200, summarise(self.registry, self.rate))
        elif path == "/healthz":
            self._send(200, {"status": "alive", "since": format_ms(self.health.started_ms)})
        elif path == "/readyz":
            ready = self.health.ready.is_set()
            self._send(200 if ready else 503,
                       {"status": "ready" if ready else "not ready",
                        "detail": self.health.detail})
        elif path == "/metrics":
            self._send_bytes(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        else:
            self._send(404, {"error": "not found"})

    def _send(self, status: int, body: dict[str, Any]) -> None:
        self._send_bytes(status, orjson.dumps(body), "application/json")

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return  # probes every few seconds would drown the logs


def serve_health(
    health: Health, host: str, port: int, registry: CollectorRegistry = REGISTRY
) -> ThreadingHTTPServer:
    """Serve the endpoints from a daemon thread; returns the server (port 0 picks one).

    `/metrics` and `/dashboard.json` both read `registry` (prometheus-client's
    default one, where the flow records, unless a test passes its own).
    """
    handler = type("HealthHandler", (_Handler,),
                   {"health": health, "registry": registry, "rate": EventRate()})
    server = ThreadingHTTPServer((host, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="health", daemon=True)
    thread.start()
    return server

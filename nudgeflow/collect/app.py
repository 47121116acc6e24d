"""The collector's HTTP interface, as a pure ASGI app (no framework on the hot path).

    POST /v1/track | /v1/page | /v1/identify | /v1/batch    Segment's HTTP Tracking API
         (and /v1/t, /v1/p, /v1/i, /v1/b, where analytics.js posts them)
    POST /v1/events                                         canonical events: one, an array, NDJSON
         200 {"accepted": N, "rejected": [{"index": i, "reason": "…"}]}   N ≥ 1
         400 the same body (and "error") when no item was accepted
         401 no valid write key        403 origin not allowed by CORS
         404 unknown path              405 method not allowed (with Allow)
         413 body or batch too large   415 content type not JSON / text / NDJSON
         429 rate limit of the write key (Retry-After)
         503 Kafka or Redis cannot take the call now (Retry-After): retry it whole
    OPTIONS on the same paths                              CORS preflight (204)
    GET  /tracker.js                                       the JavaScript tracker
    GET  /healthz | /readyz | /metrics                     alive; Kafka healthy; Prometheus

The write key is the Basic-auth user name with an empty password, as Segment's
libraries send it; where a browser cannot set that header (`sendBeacon`) the
key may come as `?writeKey=` or, as analytics.js sends it, as the body's
`writeKey`. An answer is sent only once Kafka acknowledged every accepted event
and every dead letter (and Redis stored every identify), so a 200 means
nothing of the call can be lost; a 503 means retry the same call.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final, Protocol
from urllib.parse import parse_qs

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nudgeflow.collect import metrics
from nudgeflow.collect.calls import ENDPOINTS, Endpoint, Item, parse_call
from nudgeflow.collect.identify import ProfileUpdate
from nudgeflow.collect.limits import RateLimiter
from nudgeflow.collect.producer import KafkaUnavailableError
from nudgeflow.core.errors import ServiceError
from nudgeflow.core.events import Event

__all__ = ["CollectorApp", "Limits", "ProfileWriter", "RedisUnavailableError"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON: Final = (b"content-type", b"application/json")
_ROUTES: Final[dict[str, Endpoint]] = {
    **{f"/v1/{name}": name for name in ENDPOINTS},
    # the short paths analytics.js (analytics-next) posts to
    "/v1/t": "track", "/v1/p": "page", "/v1/i": "identify", "/v1/b": "batch",
}
# Browsers send beacons as text/plain: a "simple" request, without a CORS preflight.
_BODY_TYPES: Final = frozenset({
    b"application/json", b"text/plain", b"application/x-ndjson", b"application/ndjson",
    b"application/jsonl", b"",
})
_NDJSON_TYPES: Final = frozenset({b"application/x-ndjson", b"application/ndjson",
                                  b"application/jsonl"})


class RedisUnavailableError(ServiceError):
    """Redis did not store a call's profile updates."""


class EventSink(Protocol):
    """Where accepted events and dead letters go (`nudgeflow.collect.producer.EventWriter`)."""

    healthy: bool

    async def write(self, events: Sequence[Event],
                    dead_letters: Sequence[tuple[bytes, str]]) -> None: ...


class ProfileWriter(Protocol):
    """Where identify calls go (`nudgeflow.collect.server.RedisProfiles`)."""

    async def write(self, updates: Sequence[ProfileUpdate]) -> None: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 512 * 1024
    max_batch_events: int = 1000
    rate_per_key: float = 5000.0
    burst_per_key: int = 20_000
    cors_origins: tuple[str, ...] = ("*",)
    retry_after_s: int = 2


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _error(status: int, reason: str, metric: str, *headers: tuple[bytes, bytes]) -> _Answer:
    metrics.refused.labels(metric).inc()
    return _Answer(status, orjson.dumps({"error": reason}), list(headers))


class CollectorApp:
    """The ASGI app: `await app(scope, receive, send)`."""

    def __init__(
        self,
        sink: EventSink,
        *,
        write_keys: Iterable[str],
        profiles: ProfileWriter | None = None,
        limits: Limits = Limits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = sink
        self._profiles = profiles
        self._keys = frozenset(write_keys)
        self._limits = limits
        self._limiter = RateLimiter(limits.rate_per_key, limits.burst_per_key, clock)
        self._any_origin = "*" in limits.cors_origins
        self._origins = frozenset(o.encode() for o in limits.cors_origins)
        self._tracker = resources.files("nudgeflow.collect").joinpath(
            "static/tracker.js").read_bytes()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        headers = _headers(scope["headers"])
        origin = headers.get(b"origin")
        answer: _Answer | None
        if origin is not None and not self._origin_allowed(origin):
            answer = _error(403, "origin not allowed", "origin_not_allowed")
        else:
            answer = await self._answer(scope, headers, receive)
        if answer is None:
            return  # the client went away
        await self._send(send, answer, origin)

    async def _answer(self, scope: Scope, headers: dict[bytes, bytes],
                      receive: Receive) -> _Answer | None:
        path: str = scope["path"]
        method: str = scope["method"]
        endpoint = _ROUTES.get(path)
        if endpoint is not None:
            if method == "POST":
                return await self._call(endpoint, scope, headers, receive)
            if method == "OPTIONS":
                return _Answer(204, b"", [
                    (b"access-control-allow-methods", b"POST, OPTIONS"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"access-control-max-age", b"600"),
                ])
            return _error(405, f"{method} not allowed on {path}", "method_not_allowed",
                          (b"allow", b"POST, OPTIONS"))
        if path in ("/tracker.js", "/healthz", "/readyz", "/metrics"):
            if method not in ("GET", "HEAD"):
                return _error(405, f"{method} not allowed on {path}", "method_not_allowed",
                              (b"allow", b"GET, HEAD"))
            return self._get(path)
        return _error(404, f"no such endpoint {path}", "not_found")

    def _get(self, path: str) -> _Answer:
        if path == "/tracker.js":
            return _Answer(200, self._tracker, [
                (b"content-type", b"text/javascript; charset=utf-8"),
                (b"cache-control", b"public, max-age=300"),
            ])
        if path == "/healthz":
            return _Answer(200, b'{"status":"alive"}', [_JSON])
        if path == "/readyz":
            ready = self._sink.healthy
            return _Answer(200 if ready else 503, orjson.dumps(
                {"status": "ready" if ready else "not ready",
                 "detail": "kafka ok" if ready else "the last delivery to Kafka failed"}
            ), [_JSON])
        return _Answer(200, generate_latest(), [(b"content-type", CONTENT_TYPE_LATEST.encode())])

    async def _call(self, endpoint: Endpoint, scope: Scope, headers: dict[bytes, bytes],
                    receive: Receive) -> _Answer | None:
        limits = self._limits
        content_type = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if content_type not in _BODY_TYPES:
            return _error(415, "send JSON (application/json, text/plain) or NDJSON "
                               "(application/x-ndjson)", "unsupported_media_type")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            return _body_too_large(limits.max_body_bytes)
        body = await _read_body(receive, limits.max_body_bytes)
        if body is None:
            return None
        if body is _TOO_LARGE:
            return _body_too_large(limits.max_body_bytes)
        parsed = parse_call(endpoint, body, ndjson=content_type in _NDJSON_TYPES)
        key = _basic_user(headers.get(b"authorization")) or _query_key(scope) \
            or parsed.body_write_key
        if key is None or key not in self._keys:
            return _error(401, "a valid write key is required (Basic auth user name)",
                          "unauthorized", (b"www-authenticate", b'Basic realm="nudgeflow"'))
        items = parsed.items
        if len(items) > limits.max_batch_events:
            return _error(413, f"a call carries at most {limits.max_batch_events} events "
                               f"(got {len(items)})", "batch_too_large")
        wait_s = self._limiter.take(key, len(items))
        if wait_s is not None:
            return _error(429, "rate limit of this write key exceeded", "rate_limited",
                          (b"retry-after", str(max(1, math.ceil(wait_s))).encode()))
        return await self._deliver(endpoint, items)

    async def _deliver(self, endpoint: Endpoint, items: list[Item]) -> _Answer:
        events: list[Event] = []
        updates: list[ProfileUpdate] = []
        dead: list[tuple[bytes, str]] = []
        rejected: list[dict[str, Any]] = []
        kinds: list[str] = []  # of the rejected items, counted once the call is answered
        for index, item in enumerate(items):
            if isinstance(item, Event):
                events.append(item)
            elif isinstance(item, ProfileUpdate):
                if self._profiles is None:
                    reason = "profiles are not stored: the collector runs without Redis"
                    rejected.append({"index": index, "reason": reason})
                    kinds.append("invalid_profile")
                else:
                    updates.append(item)
            else:
                rejected.append({"index": index, "reason": item.reason})
                dead.append((item.raw, item.reason))
                kinds.append(item.kind)
        retry = (b"retry-after", str(self._limits.retry_after_s).encode())
        try:
            if updates and self._profiles is not None:
                await self._profiles.write(updates)
            await self._sink.write(events, dead)
        except KafkaUnavailableError as exc:
            return _error(503, f"{exc}; retry the call", "kafka_unavailable", retry)
        except RedisUnavailableError as exc:
            return _error(503, f"{exc}; retry the call", "redis_unavailable", retry)
        _count(endpoint, len(events), len(updates), kinds)
        accepted = len(events) + len(updates)
        body: dict[str, Any] = {"accepted": accepted, "rejected": rejected}
        if accepted:
            return _Answer(200, orjson.dumps(body), [_JSON])
        body["error"] = "no event of the call was accepted" if items else "the call has no events"
        return _Answer(400, orjson.dumps(body), [_JSON])

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Close the profile store's connections on the server's loop, before it closes."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._profiles is not None:
                    await self._profiles.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _origin_allowed(self, origin: bytes) -> bool:
        return self._any_origin or origin in self._origins

    async def _send(self, send: Send, answer: _Answer, origin: bytes | None) -> None:
        headers = answer.headers
        if not any(name == b"content-type" for name, _ in headers) and answer.body:
            headers = [*headers, _JSON]
        headers = [*headers, (b"content-length", str(len(answer.body)).encode())]
        if origin is not None and answer.status != 403:
            allowed = b"*" if self._any_origin else origin
            headers += [(b"access-control-allow-origin", allowed), (b"vary", b"origin")]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})


def _count(endpoint: Endpoint, events: int, profiles: int, rejected: list[str]) -> None:
    if events:
        metrics.accepted.labels(endpoint, "event").inc(events)
    if profiles:
        metrics.accepted.labels(endpoint, "profile").inc(profiles)
    for kind in rejected:
        metrics.rejected.labels(kind).inc()


def _body_too_large(limit: int) -> _Answer:
    return _error(413, f"the body is larger than {limit} bytes", "body_too_large")


_TOO_LARGE: Final = b"\x00too large"


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The body; `_TOO_LARGE` once it passes `limit`; None if the client disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return _TOO_LARGE
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for name, value in raw:
        headers.setdefault(name, value)
    return headers


def _basic_user(value: bytes | None) -> str | None:
    """The user name of `Authorization: Basic base64(user:password)`."""
    if value is None or value[:6].lower() != b"basic ":
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.split(":", 1)[0] or None


def _query_key(scope: Scope) -> str | None:
    query: bytes = scope.get("query_string", b"")
    if b"writeKey=" not in query:
        return None
    values = parse_qs(query.decode("latin-1")).get("writeKey")
    return values[0] if values else None



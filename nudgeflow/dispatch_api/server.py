"""The reference dispatch API (EVENTS.md §3): what the dispatch sink calls.

    POST   /api/trigger                          202 {"trigger_id", "status": accepted|scheduled}
                                                 |400|409 (Idempotency-Key is not trigger_id)
    GET    /api/trigger/status?trigger_id=ID     200 {"trigger_id", "status"} | 404
    GET    /api/trigger/status/{trigger_id}      the same
    POST   /api/trigger/{trigger_id}/cancel      200 {"trigger_id", "status": "cancelled"}|404|409
    DELETE /api/trigger/{trigger_id}             the same
    GET    /openapi.json                         this contract, errors included

A trigger is remembered under its `Idempotency-Key` (`nudgeflow.dispatch_api.trigger_store`:
in memory, or in Redis with `redis_url`, which survives a restart): a repeat of
a key answers the first answer again and sends nothing new, the property the
sink's retries rely on. The key is the trigger's id (EVENTS.md §3): a key that
is not the body's `trigger_id` is refused with 409 and nothing is stored, since
trusting either of the two would deduplicate by an id that may be the wrong
one. JSON Schema cannot tie a header to a body field, so such a request is
schema-valid; the document declares the 409 it gets. Every first-time accepted
trigger is also appended to a JSON-lines log (`--log FILE`), which demos and
tests read.

Delivery. A trigger whose `send_at` is in the future is `scheduled`; the others
are `accepted` and due at once. A scheduler thread claims what is due, sends
it through the channel's adapter (`nudgeflow.dispatch_api.channels`: SMTP email, SMS and
push to a provider URL; a channel without a provider is only recorded) and
sets `sent` or `failed`. A scheduled trigger can be cancelled until it is
claimed (`cancelled`); afterwards the cancel answers 409.

The message is the body's `message` (`{"subject"?, "body"}`, rendered by the
sink from `config/templates`); without one a plain fallback is sent. The
contact comes from the body's optional `contact` object, then from the Redis
profile hash `profile:<user_id>` (`email`, `phone`, `push_token`).

Authentication, when configured: `Authorization: Bearer <token>`, and/or an
HMAC signature of the body (`nudgeflow.core.signing`). Every error, 404 and
validation errors included, is JSON `{"error": "<reason>"}`, and each is
declared in the OpenAPI document.

Request handlers are plain `def`s, so FastAPI runs them on a thread pool: the
store, the log and the scheduler are thread-safe. `ServerThread` runs the app
on loopback in a background thread for tests and the demo; `serve()` runs it
in the foreground for `nudgeflow dispatch-api`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Annotated, Any, Final, cast

import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nudgeflow.core.errors import ServiceError
from nudgeflow.core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature_problem
from nudgeflow.core.timeutil import datetime_to_ms
from nudgeflow.core.triggers import CHANNELS, Channel
from nudgeflow.dispatch_api.channels import (
    ChannelAdapter,
    Contact,
    ContactDirectory,
    DeliveryError,
    HttpProvider,
    Message,
    NoContacts,
    RecordOnly,
    RedisContacts,
    SmtpEmail,
    parse_host_port,
)
from nudgeflow.dispatch_api.trigger_store import (
    InMemoryTriggerStore,
    RedisTriggerStore,
    Status,
    StoredTrigger,
    TriggerStore,
    dumps,
)

__all__ = [
    "InMemoryTriggerStore",
    "JsonLineLog",
    "RedisTriggerStore",
    "Scheduler",
    "ServerThread",
    "StoredTrigger",
    "TriggerRequest",
    "TriggerStatus",
    "TriggerStore",
    "create_app",
    "serve",
]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

_LOOPBACK: Final = "127.0.0.1"
_TRIGGER_PATH: Final = "/api/trigger"
_PENDING: Final[tuple[Status, ...]] = ("scheduled", "accepted")
_ACCEPTED: Final[tuple[Status, ...]] = ("accepted",)
_SCHEDULED: Final[tuple[Status, ...]] = ("scheduled",)


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --- the contract --------------------------------------------------------------------------


def _rfc3339_string(value: object) -> object:
    if isinstance(value, datetime | str):
        return value
    msg = "must be an RFC 3339 date-time string"
    raise ValueError(msg)


# FastAPI validates parsed JSON in Python mode, where pydantic would read a number as
# epoch seconds; the contract says a date-time string.
Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339_string)]


class MessageBody(BaseModel):
    """The personalised message: email subject / push title, and the text."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    subject: str | None = None
    body: str = Field(min_length=1)


class ContactBody(BaseModel):
    """How to reach the user, when the caller knows it better than the API's directory."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str | None = None
    email: str | None = None
    phone: str | None = None
    push_token: str | None = None


# The trigger id is also the Idempotency-Key header, so it must be a valid header value:
# visible ASCII, which also survives the header's whitespace trimming unchanged.
_ID_PATTERN: Final = r"^[!-~]+$"
_ID_MAX_LENGTH: Final = 128
_EXAMPLE_ID: Final = "9827cb4a-0de5-54ab-ae6f-71049ccafa7e"

# One consistent request, in the document: the key is the body's trigger_id. Contract
# testers (schemathesis's examples phase) send it, so the 202 path is always exercised.
_EXAMPLE_TRIGGER: Final[dict[str, Any]] = {
    "trigger_id": _EXAMPLE_ID,
    "trigger_type": "cart_abandonment",
    "user_id": "u1",
    "fired_at": "2026-03-01T10:00:00Z",
    "detected_at": "2026-03-01T10:00:00.012Z",
    "segment": "vip",
    "metadata": {"cart_value": 150.0},
    "channel": "email",
    "send_at": "2026-03-01T10:00:00Z",
}


class TriggerRequest(BaseModel):
    """The body of `POST /api/trigger`: a trigger (EVENTS.md §2) plus channel and send time.

    Times must be RFC 3339 strings, as the OpenAPI document says: a number is
    not taken for epoch seconds.
    """

    model_config = ConfigDict(
        extra="ignore", frozen=True, json_schema_extra={"examples": [_EXAMPLE_TRIGGER]}
    )

    trigger_id: str = Field(min_length=1, max_length=_ID_MAX_LENGTH, pattern=_ID_PATTERN)
    trigger_type: str = Field(min_length=1)
    user_id: str = Field(min_length=1, max_length=128)
    fired_at: Timestamp
    detected_at: Timestamp
    segment: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    channel: Channel
    # EVENTS.md asks for "now" on immediate sends; null is read the same way.
    send_at: Timestamp | None = None
    message: MessageBody | None = None
    contact: ContactBody | None = None


class TriggerStatus(BaseModel):
    """The answer of every successful call."""

    trigger_id: str
    status: Status


class ErrorBody(BaseModel):
    """Every error: 4xx for a bad or unauthenticated request, 5xx for a server fault."""

    error: str


_ERROR_DESCRIPTIONS: Final[Mapping[int, str]] = {
    400: "bad request: invalid JSON, a missing or malformed header or field, an unknown channel",
    401: "missing or wrong credentials (bearer token, HMAC signature)",
    404: "unknown trigger_id",
    409: "the trigger is past the point where it can be cancelled",
    500: "server fault; retry with backoff",
}

_KEY_MISMATCH: Final = "Idempotency-Key does not match trigger_id"
_KEY_CONFLICT: Final = "the Idempotency-Key is not the body's trigger_id"

# Sent with the bearer token's 401 only (RFC 6750), so declared but not required.
_WWW_AUTHENTICATE: Final[dict[str, Any]] = {
    "WWW-Authenticate": {
        "description": "`Bearer`, when the bearer token is missing or wrong",
        "schema": {"type": "string"},
    }
}


def _errors(
    *codes: int, described: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The error responses of an operation; `described` words a code for this operation."""
    descriptions = {**_ERROR_DESCRIPTIONS, **(described or {})}
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        response: dict[str, Any] = {"model": ErrorBody, "description": descriptions[code]}
        if code == 401:
            response["headers"] = _WWW_AUTHENTICATE
        responses[code] = response
    return responses


# --- the scheduler -------------------------------------------------------------------------


def _fallback_message(payload: Mapping[str, Any]) -> Message:
    trigger_type = str(payload.get("trigger_type", "trigger"))
    return Message(subject=f"nudgeflow: {trigger_type}", body=f"{trigger_type} for you")


class Scheduler:
    """Sends what is due, through the channel adapters, and records `sent` or `failed`.

    `run_once()` does one round (tests call it directly); `start()` runs rounds
    in a thread, every `interval_s` or at once after `wake()`. Deliveries of one
    round run on a pool of `workers` threads. A delivery that dies half-way
    (the process stops) is claimed again after `lease_s`.
    """

    def __init__(
        self,
        store: TriggerStore,
        adapters: Mapping[Channel, ChannelAdapter] | None = None,
        contacts: ContactDirectory | None = None,
        *,
        clock: Clock = _utc_now,
        interval_s: float = 0.05,
        lease_s: float = 60.0,
        workers: int = 4,
    ) -> None:
        self._store = store
        self._adapters: dict[Channel, ChannelAdapter] = {
            channel: RecordOnly(channel) for channel in CHANNELS
        }
        self._adapters.update(adapters or {})
        self._contacts = contacts if contacts is not None else NoContacts()
        self._clock = clock
        self._interval_s = interval_s
        self._lease_ms = int(lease_s * 1000)
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def wake(self) -> None:
        self._wake.set()

    def run_once(self) -> int:
        """Claim what is due now and deliver it; the number claimed."""
        now_ms = datetime_to_ms(self._clock())
        claimed = self._store.claim_due(now_ms, limit=self._workers * 8, lease_ms=self._lease_ms)
        if claimed:
            list(self._executor().map(self._deliver, claimed))
        return len(claimed)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self._workers, thread_name_prefix="deliver"
                )
            return self._pool

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before the round: a wake-up during it makes the wait below return at once.
            self._wake.clear()
            wait_s = self._interval_s
            try:
                if self.run_once():
                    continue
            except Exception as exc:  # a store outage: keep going, the queue is still there
                log.warning("scheduler round failed (%s); retrying in 1 s", exc)
                wait_s = max(wait_s, 1.0)
            self._wake.wait(wait_s)

    def _deliver(self, trigger_id: str) -> None:
        try:
            self._deliver_one(trigger_id)
        except Exception:
            # Left in the queue: claimed again once its lease ends.
            log.exception("delivery of %s failed before an outcome; will retry", trigger_id)

    def _deliver_one(self, trigger_id: str) -> None:
        record, _ = self._store.transition(trigger_id, _PENDING, "accepted")
        if record is None or record.status != "accepted":
            # Unknown (expired, discarded) or already cancelled/sent/failed: nothing to do.
            self._store.finish(trigger_id)
            return
        payload = record.payload
        channel = payload.get("channel")
        adapter = self._adapters.get(cast(Channel, channel)) if channel in CHANNELS else None
        if adapter is None:
            self._fail(trigger_id, f"unknown channel {channel!r}")
            return
        raw_message = payload.get("message")
        message = (
            Message(raw_message.get("subject"), str(raw_message.get("body", "")))
            if isinstance(raw_message, Mapping)
            else _fallback_message(payload)
        )
        user_id = str(payload.get("user_id", ""))
        contact_override = payload.get("contact")
        contact: Contact = self._contacts.contact(user_id).merged(
            contact_override if isinstance(contact_override, Mapping) else None
        )
        try:
            adapter.send(message, contact, trigger_id=trigger_id)
        except DeliveryError as exc:
            self._fail(trigger_id, str(exc))
            return
        except Exception as exc:  # an adapter bug: failed, not retried forever
            self._fail(trigger_id, f"{channel}: {type(exc).__name__}: {exc}")
            return
        self._store.transition(trigger_id, _ACCEPTED, "sent")
        self._store.finish(trigger_id)

    def _fail(self, trigger_id: str, reason: str) -> None:
        log.warning("delivery of %s failed: %s", trigger_id, reason)
        self._store.transition(trigger_id, _ACCEPTED, "failed", error=reason)
        self._store.finish(trigger_id)


# --- the log -------------------------------------------------------------------------------


class JsonLineLog:
    """Appends one JSON object per line, flushed per line; safe from many threads."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None

    @property
    def path(self) -> Path:
        return self._path

    def append(self, record: dict[str, Any]) -> None:
        line = dumps(record) + b"\n"
        with self._lock:
            if self._file is None:
                # Opened on first use so that building an app creates no file.
                self._file = self._path.open("ab")
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# --- the app -------------------------------------------------------------------------------


def create_app(  # noqa: PLR0915 - the routes are closures over the app's parts
    log_path: Path | None = None,
    *,
    store: TriggerStore | None = None,
    clock: Clock = _utc_now,
    fail_first: int = 0,
    token: str | None = None,
    hmac_secret: str | None = None,
    adapters: Mapping[Channel, ChannelAdapter] | None = None,
    contacts: ContactDirectory | None = None,
    scheduler_interval_s: float = 0.05,
    run_scheduler: bool = True,
) -> FastAPI:
    """The dispatch API as an ASGI app.

    `log_path`: append every first-time accepted trigger there (the request body
    without `contact`, plus `received_at`). `store`: defaults to a fresh
    `InMemoryTriggerStore`. `clock`: "now", to tell `scheduled` from `accepted`
    and to find what is due. `token`: requests need `Authorization: Bearer
    <token>` (401 otherwise). `hmac_secret`: requests need a valid
    `X-Nudgeflow-Signature` (401 otherwise). `adapters`: a channel's provider
    (default: record only). `contacts`: where contact details come from.
    `run_scheduler=False` leaves delivery to `app.state.scheduler.run_once()`.

    `fail_first` is a testing aid: the first N `POST /api/trigger` calls answer
    500 before looking at the request, so a client's retry path can be tested
    against a real server. Leave it at 0 anywhere else.
    """
    trigger_store: TriggerStore = store if store is not None else InMemoryTriggerStore()
    json_log = JsonLineLog(log_path) if log_path is not None else None
    faults = _FaultInjector(fail_first)
    scheduler = Scheduler(
        trigger_store, adapters, contacts, clock=clock, interval_s=scheduler_interval_s
    )
    secret = hmac_secret.encode() if hmac_secret is not None else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if run_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            if json_log is not None:
                json_log.close()

    authenticate = _authenticator(token, secret, clock)
    app = FastAPI(
        title="nudgeflow dispatch API",
        version="1",
        lifespan=lifespan,
        dependencies=[Depends(authenticate)],
    )
    app.state.scheduler = scheduler
    app.state.store = trigger_store
    _install_error_handlers(app)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        # Liveness for containers and orchestrators; outside the dispatch contract.
        return {"status": "alive"}

    @app.post(
        _TRIGGER_PATH,
        status_code=202,
        response_model=TriggerStatus,
        responses=_errors(400, 401, 409, 500, described={409: _KEY_CONFLICT}),
        summary="Accept a trigger for delivery (idempotent by Idempotency-Key)",
    )
    def post_trigger(
        body: TriggerRequest,
        idempotency_key: Annotated[
            str,
            Header(
                alias="Idempotency-Key",
                description=(
                    "The body's `trigger_id`, exactly: a repeat of the key answers the first "
                    f"answer again. Any other value is refused with 409 ({_KEY_MISMATCH})."
                ),
                min_length=1,
                max_length=_ID_MAX_LENGTH,
                pattern=_ID_PATTERN,
                examples=[_EXAMPLE_ID],
            ),
        ],
    ) -> TriggerStatus:
        if idempotency_key != body.trigger_id:
            # 409, not 400: the request is well formed (no schema can tie a header to a body
            # field); its two names for the trigger conflict. A 4xx: the sink does not retry.
            raise StarletteHTTPException(409, _KEY_MISMATCH)
        now = clock()
        scheduled = body.send_at is not None and body.send_at > now
        status: Status = "scheduled" if scheduled else "accepted"
        due = body.send_at if scheduled and body.send_at is not None else now
        # The body as validated (datetimes normalised, unknown fields dropped).
        payload = body.model_dump(mode="json")
        record, created = trigger_store.put_if_absent(
            StoredTrigger(body.trigger_id, status, now, datetime_to_ms(due), payload)
        )
        # A repeat is answered from the store, whatever its body says: a replayed
        # trigger carries a new `detected_at`, and is still the same trigger.
        if created:
            if json_log is not None:
                line = {k: v for k, v in payload.items() if k != "contact"}
                if line.get("message") is None:
                    line.pop("message", None)
                line["received_at"] = now.astimezone(UTC).isoformat().replace("+00:00", "Z")
                try:
                    json_log.append(line)
                except OSError:
                    # Not logged means not sent: forget it so that the retry sends it.
                    trigger_store.discard(record.trigger_id)
                    raise
            if not scheduled:
                scheduler.wake()
        return TriggerStatus(trigger_id=record.trigger_id, status=record.answer)

    def lookup(trigger_id: str) -> TriggerStatus:
        record = trigger_store.get(trigger_id)
        if record is None:
            raise StarletteHTTPException(404, "unknown trigger_id")
        return TriggerStatus(trigger_id=record.trigger_id, status=record.status)

    @app.get(
        "/api/trigger/status",
        response_model=TriggerStatus,
        responses=_errors(400, 401, 404, 500),
        summary="The status of a trigger",
    )
    def get_status_query(trigger_id: str) -> TriggerStatus:
        return lookup(trigger_id)

    @app.get(
        "/api/trigger/status/{trigger_id}",
        response_model=TriggerStatus,
        responses=_errors(401, 404, 500),
        summary="The status of a trigger",
    )
    def get_status_path(trigger_id: str) -> TriggerStatus:
        return lookup(trigger_id)

    def cancel(trigger_id: str) -> TriggerStatus:
        record, changed = trigger_store.transition(trigger_id, _SCHEDULED, "cancelled")
        if record is None:
            raise StarletteHTTPException(404, "unknown trigger_id")
        if changed:
            trigger_store.finish(trigger_id)
        elif record.status != "cancelled":
            raise StarletteHTTPException(
                409, f"trigger is {record.status}; only a scheduled trigger can be cancelled"
            )
        return TriggerStatus(trigger_id=record.trigger_id, status="cancelled")

    @app.post(
        "/api/trigger/{trigger_id}/cancel",
        response_model=TriggerStatus,
        responses=_errors(401, 404, 409, 500),
        summary="Cancel a scheduled trigger",
    )
    def post_cancel(trigger_id: str) -> TriggerStatus:
        return cancel(trigger_id)

    @app.delete(
        "/api/trigger/{trigger_id}",
        response_model=TriggerStatus,
        responses=_errors(401, 404, 409, 500),
        summary="Cancel a scheduled trigger",
    )
    def delete_trigger(trigger_id: str) -> TriggerStatus:
        return cancel(trigger_id)

    # Runs before routing and validation, so even a malformed request gets its 500.
    @app.middleware("http")
    async def inject_faults(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.method == "POST" and request.url.path == _TRIGGER_PATH and faults.take():
            return _error(500, "injected failure (fail_first)")
        return await call_next(request)

    _install_openapi(app)
    return app


# Declared as a security scheme, so the OpenAPI document says what to send. Module-level:
# FastAPI resolves the (string) annotations of dependencies in this module's namespace.
_BEARER: Final = HTTPBearer(auto_error=False, description="the API's shared token")
_Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


# Health checks come from the container runtime, which holds no credentials.
_OPEN_PATHS: Final = frozenset({"/healthz"})


def _authenticator(
    token: str | None, secret: bytes | None, clock: Clock
) -> Callable[..., Awaitable[None]]:
    """The dependency that checks credentials before anything else of a request."""

    async def check_signature(request: Request) -> None:
        if secret is None or request.url.path in _OPEN_PATHS:
            return
        problem = signature_problem(
            secret,
            request.headers.get(TIMESTAMP_HEADER),
            request.headers.get(SIGNATURE_HEADER),
            await request.body(),
            now_s=clock().timestamp(),
        )
        if problem is not None:
            raise StarletteHTTPException(401, problem)

    if token is None:
        return check_signature

    expected = token

    async def check_token_and_signature(request: Request, credentials: _Bearer) -> None:
        if request.url.path in _OPEN_PATHS:
            return
        if credentials is None or credentials.credentials != expected:
            raise StarletteHTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        await check_signature(request)

    return check_token_and_signature


def _install_openapi(app: FastAPI) -> None:
    """The generated document, minus FastAPI's 422 (validation errors are 400 here)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, routes=app.routes, description=__doc__
            )
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = schema.get("components", {}).get("schemas", {})
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class _FaultInjector:
    """Counts down the `fail_first` failures; thread-safe."""

    def __init__(self, remaining: int) -> None:
        if remaining < 0:
            msg = f"fail_first must be >= 0, got {remaining}"
            raise ValueError(msg)
        self._remaining = remaining
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._remaining <= 0:
                return False
            self._remaining -= 1
            return True


def _error(status_code: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status_code)


def _install_error_handlers(app: FastAPI) -> None:
    """Give every error the `{"error": "<reason>"}` shape of EVENTS.md §3."""

    async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        response = _error(exc.status_code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    async def on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return _error(400, _validation_reason(exc))

    async def on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("dispatch API: unexpected %s", type(exc).__name__, exc_info=exc)
        return _error(500, "internal server error")

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_unexpected)


def _validation_reason(exc: RequestValidationError) -> str:
    """One readable line for the first problem: a missing header, bad JSON, a bad field."""
    errors = list(exc.errors())
    if not errors:
        return "invalid request"
    first = errors[0]
    kind = first.get("type", "")
    loc = [str(part) for part in first.get("loc", ())]
    where, path = (loc[0], loc[1:]) if loc else ("", [])
    if kind == "json_invalid":
        return "request body is not valid JSON"
    if where == "header" and kind == "missing":
        name = "Idempotency-Key" if path == ["Idempotency-Key"] else ".".join(path)
        return f"missing {name} header"
    if where == "query" and kind == "missing":
        return f"missing query parameter {'.'.join(path)}"
    if where == "body" and not path:
        return f"request body: {first.get('msg', 'invalid')}"
    field = ".".join(path) if path else where
    return f"{field}: {first.get('msg', 'invalid')}"


# --- running it ----------------------------------------------------------------------------


def build_adapters(
    *,
    smtp: str | None = None,
    sms_url: str | None = None,
    push_url: str | None = None,
    smtp_sender: str = "nudgeflow@localhost",
) -> dict[Channel, ChannelAdapter]:
    """Channel adapters from `serve`'s flags; a channel left out is only recorded."""
    adapters: dict[Channel, ChannelAdapter] = {}
    if smtp is not None:
        host, port = parse_host_port(smtp, what="--smtp")
        adapters["email"] = SmtpEmail(host, port, sender=smtp_sender)
    if sms_url is not None:
        adapters["sms"] = HttpProvider("sms", sms_url)
    if push_url is not None:
        adapters["push"] = HttpProvider("push", push_url)
    return adapters


def serve(
    host: str,
    port: int,
    log_path: Path | None,
    *,
    redis_url: str | None = None,
    smtp: str | None = None,
    sms_url: str | None = None,
    push_url: str | None = None,
    token: str | None = None,
    hmac_secret: str | None = None,
) -> None:
    """Run the dispatch API in the foreground until interrupted (`nudgeflow dispatch-api`).

    `redis_url`: keep idempotency, status and the schedule in Redis (survives a
    restart) and read contacts from `profile:<user_id>`; without it, in memory.
    `smtp` (`HOST:PORT`), `sms_url`, `push_url`: the channels' providers.
    `token`, `hmac_secret`: required credentials. Raises `ConfigError` for a bad
    `smtp` and `ServiceError` when Redis cannot be reached.
    """
    app = build_app(
        log_path,
        redis_url=redis_url,
        smtp=smtp,
        sms_url=sms_url,
        push_url=push_url,
        token=token,
        hmac_secret=hmac_secret,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", ws="none")


def build_app(
    log_path: Path | None,
    *,
    redis_url: str | None = None,
    smtp: str | None = None,
    sms_url: str | None = None,
    push_url: str | None = None,
    token: str | None = None,
    hmac_secret: str | None = None,
) -> FastAPI:
    """The app `serve` runs, for tests and embedding."""
    import redis

    adapters = build_adapters(smtp=smtp, sms_url=sms_url, push_url=push_url)
    store: TriggerStore | None = None
    contacts: ContactDirectory | None = None
    if redis_url is not None:
        client = redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        try:
            client.ping()
        except redis.RedisError as exc:
            msg = f"cannot reach Redis at {redis_url}: {exc}"
            raise ServiceError(msg) from None
        store = RedisTriggerStore(client)
        contacts = RedisContacts(client)
    return create_app(
        log_path,
        store=store,
        token=token,
        hmac_secret=hmac_secret,
        adapters=adapters,
        contacts=contacts,
    )


class ServerThread:
    """Runs an app with uvicorn in a background thread on loopback; a context manager.

    Port 0 picks a free port: the socket is bound here, before the thread starts,
    so `url` is known at once and no other process can take the port meanwhile.
    On exit the server shuts down and the thread is joined.
    """

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str = _LOOPBACK,
        port: int = 0,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._startup_timeout_s = startup_timeout_s
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT`, once started."""
        if self._url is None:
            msg = "ServerThread is not started"
            raise RuntimeError(msg)
        return self._url

    def start(self) -> None:
        # proto must be IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets
        # only then, and without it every response waits ~40 ms on Nagle + delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._socket = sock
        config = uvicorn.Config(
            self._app,
            log_level="warning",
            # Fixed protocols: no optional websockets import, no surprise warnings.
            http="h11",
            ws="none",
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="dispatch-api", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                msg = f"dispatch API did not start on {self._host}:{self._port}"
                raise ServiceError(msg)
            time.sleep(0.005)
        host, port = sock.getsockname()[:2]
        self._url = f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._url = None

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

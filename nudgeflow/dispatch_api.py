"""The reference dispatch API (EVENTS.md §3): what the dispatch sink calls.

    POST /api/trigger                          202 {"trigger_id", "status"}
    GET  /api/trigger/status?trigger_id=ID     200 {"trigger_id", "status"} | 404
    GET  /api/trigger/status/{trigger_id}      the same

It accepts a trigger, remembers it under its `Idempotency-Key` and, instead of
sending an email, appends it to a JSON-lines log (`--log FILE`): the log is
what demos and tests read to count messages "sent". A repeat of a key answers
the first answer again and logs nothing, which is the property the sink's
retries rely on. Every error, 404 and validation errors included, is JSON
`{"error": "<reason>"}`.

State lives behind `TriggerStore` (in memory here; a later issue moves it to
Redis). Request handlers are plain `def`s, so FastAPI runs them on a thread
pool: the store and the log are thread-safe.

`ServerThread` runs the app on loopback in a background thread for tests and
the demo; `serve()` runs it in the foreground for `nudgeflow dispatch-api`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Annotated, Any, Final, Literal, Protocol

import orjson
import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nudgeflow.errors import ServiceError

__all__ = [
    "InMemoryTriggerStore",
    "JsonLineLog",
    "ServerThread",
    "StoredTrigger",
    "TriggerRequest",
    "TriggerStatus",
    "TriggerStore",
    "create_app",
    "serve",
]

Status = Literal["accepted", "scheduled", "sent", "failed", "cancelled"]
Clock = Callable[[], datetime]

_LOOPBACK: Final = "127.0.0.1"


def _utc_now() -> datetime:
    return datetime.now(UTC)


class TriggerRequest(BaseModel):
    """The body of `POST /api/trigger`: a trigger (EVENTS.md §2) plus channel and send time."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    trigger_id: str = Field(min_length=1, max_length=128)
    trigger_type: str = Field(min_length=1)
    user_id: str = Field(min_length=1, max_length=128)
    fired_at: AwareDatetime
    detected_at: AwareDatetime
    segment: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    channel: Literal["email", "sms", "push"]
    # EVENTS.md asks for "now" on immediate sends; null is read the same way.
    send_at: AwareDatetime | None = None


class TriggerStatus(BaseModel):
    """The answer of every successful call."""

    trigger_id: str
    status: Status


@dataclass(frozen=True, slots=True)
class StoredTrigger:
    trigger_id: str
    status: Status
    received_at: datetime


class TriggerStore(Protocol):
    """Where accepted triggers are remembered; must be safe to call from many threads."""

    def put_if_absent(self, record: StoredTrigger) -> tuple[StoredTrigger, bool]:
        """Store `record` unless its id is known; the stored record and whether it is new."""
        ...

    def get(self, trigger_id: str) -> StoredTrigger | None: ...

    def discard(self, trigger_id: str) -> None:
        """Forget a trigger (used to undo an accept whose side effect failed)."""
        ...


class InMemoryTriggerStore:
    """A dict guarded by a lock: one process, forgotten on restart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, StoredTrigger] = {}

    def put_if_absent(self, record: StoredTrigger) -> tuple[StoredTrigger, bool]:
        with self._lock:
            existing = self._records.get(record.trigger_id)
            if existing is not None:
                return existing, False
            self._records[record.trigger_id] = record
            return record, True

    def get(self, trigger_id: str) -> StoredTrigger | None:
        with self._lock:
            return self._records.get(trigger_id)

    def discard(self, trigger_id: str) -> None:
        with self._lock:
            self._records.pop(trigger_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


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
        line = orjson.dumps(record) + b"\n"
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


def create_app(
    log_path: Path | None = None,
    *,
    store: TriggerStore | None = None,
    clock: Clock = _utc_now,
    fail_first: int = 0,
    token: str | None = None,
) -> FastAPI:
    """The dispatch API as an ASGI app.

    `log_path`: append every first-time accepted trigger there (the request body
    plus `received_at`). `store`: defaults to a fresh `InMemoryTriggerStore`.
    `clock`: "now", to tell `scheduled` from `accepted`. `token`: when set,
    requests need `Authorization: Bearer <token>` (401 otherwise).

    `fail_first` is a testing aid: the first N `POST /api/trigger` calls answer
    500 before looking at the request, so a client's retry path can be tested
    against a real server. Leave it at 0 anywhere else.
    """
    trigger_store: TriggerStore = store if store is not None else InMemoryTriggerStore()
    log = JsonLineLog(log_path) if log_path is not None else None
    faults = _FaultInjector(fail_first)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        if log is not None:
            log.close()

    app = FastAPI(title="nudgeflow dispatch API", lifespan=lifespan)
    _install_error_handlers(app)

    def check_token(authorization: str | None) -> None:
        if token is not None and authorization != f"Bearer {token}":
            raise StarletteHTTPException(401, "missing or wrong bearer token")

    @app.post("/api/trigger", status_code=202, response_model=TriggerStatus)
    def post_trigger(
        body: TriggerRequest,
        idempotency_key: Annotated[str, Header(alias="Idempotency-Key")],
        authorization: Annotated[str | None, Header()] = None,
    ) -> TriggerStatus:
        check_token(authorization)
        if idempotency_key != body.trigger_id:
            raise StarletteHTTPException(400, "Idempotency-Key does not match trigger_id")
        now = clock()
        status: Status = (
            "scheduled" if body.send_at is not None and body.send_at > now else "accepted"
        )
        record, created = trigger_store.put_if_absent(StoredTrigger(body.trigger_id, status, now))
        # A repeat is answered from the store, whatever its body says: a replayed
        # trigger carries a new `detected_at`, and is still the same trigger.
        if created and log is not None:
            # The body as validated (datetimes normalised, unknown fields dropped).
            line = body.model_dump(mode="json")
            line["received_at"] = now.astimezone(UTC).isoformat().replace("+00:00", "Z")
            try:
                log.append(line)
            except OSError:
                # Not logged means not sent: forget it so that the retry sends it.
                trigger_store.discard(record.trigger_id)
                raise
        return TriggerStatus(trigger_id=record.trigger_id, status=record.status)

    def lookup(trigger_id: str, authorization: str | None) -> TriggerStatus:
        check_token(authorization)
        record = trigger_store.get(trigger_id)
        if record is None:
            raise StarletteHTTPException(404, "unknown trigger_id")
        return TriggerStatus(trigger_id=record.trigger_id, status=record.status)

    @app.get("/api/trigger/status", response_model=TriggerStatus)
    def get_status_query(
        trigger_id: str, authorization: Annotated[str | None, Header()] = None
    ) -> TriggerStatus:
        return lookup(trigger_id, authorization)

    @app.get("/api/trigger/status/{trigger_id}", response_model=TriggerStatus)
    def get_status_path(
        trigger_id: str, authorization: Annotated[str | None, Header()] = None
    ) -> TriggerStatus:
        return lookup(trigger_id, authorization)

    # Runs before routing and validation, so even a malformed request gets its 500.
    @app.middleware("http")
    async def inject_faults(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.method == "POST" and request.url.path == "/api/trigger" and faults.take():
            return _error(500, "injected failure (fail_first)")
        return await call_next(request)

    return app


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

    async def on_unexpected(_request: Request, _exc: Exception) -> JSONResponse:
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


def serve(host: str, port: int, log_path: Path | None) -> None:
    """Run the dispatch API in the foreground until interrupted."""
    uvicorn.run(create_app(log_path), host=host, port=port, log_level="warning", ws="none")


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

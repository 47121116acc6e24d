"""The reference dispatch API (EVENTS.md §3): what the dispatch sink calls.

    POST   /api/trigger                          202 {"trigger_id", "status": accepted|scheduled}
                                                 |400|409 (Idempotency-Key is not trigger_id)
    POST   /api/triggers                         202 {"results": [{"trigger_id", "status"}, …]}
                                                 |400 (a batch: a JSON array of trigger bodies)
    GET    /api/trigger/status?trigger_id=ID     200 {"trigger_id", "status"} | 404
    GET    /api/trigger/status/{trigger_id}      the same
    POST   /api/trigger/{trigger_id}/cancel      200 {"trigger_id", "status": "cancelled"}|404|409
    DELETE /api/trigger/{trigger_id}             the same
    POST   /api/trigger/{trigger_id}/events      200 {"trigger_id", "event", "recorded": […]}
                                                 |404|409 (the channel's webhook: opened, clicked)
    GET    /api/trigger/{trigger_id}/events      200 {"trigger_id", "events": {EVENT: time}}|404
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

A batch (`POST /api/triggers`, 1 to 1,000 trigger bodies) is the same as that
many single requests, each keyed by its own `trigger_id` (no header): the
answer lists each trigger's answer in order, a repeat (of an earlier request,
or of an earlier item of the same batch) answered with its first answer. A
batch with any invalid item is refused whole (400) and nothing of it is stored.

Outcomes. How each delivery ended (`sent`, `failed`) and what the channel's
webhook reports of a sent message (`opened`, `clicked`: a click is an open
too) are kept with the trigger, each once, with the time it first happened. A
webhook event for a trigger that was not sent is refused (409); a repeat
records nothing new. With `outcomes_log` (`--outcomes-log FILE`), each one is
also appended as a line `{"trigger_id", "trigger_type", "user_id", "outcome",
"ts", "channel"}`, the shape of the flow's outcomes, so `nudgeflow report` reads
it beside them.

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

How it is fast. Handlers are `async` and never block the event loop. Accepting
goes through one pipeline (`_Intake`): the triggers of all requests that arrive
while the previous round is in the store are stored together (one Redis script
call, one round trip, however many triggers) and their log lines written with
one write, before any of them is answered: a 202 means stored and logged, and
a reader of the log sees a trigger before its sender sees the answer. A pure
ASGI layer (`_FastPath`) takes a well-formed, authenticated `POST
/api/trigger(s)` straight to the intake, with no routing, dependency injection
or response model; anything else about such a request (a bad body or header,
missing credentials, another content type) it hands to the FastAPI app
unchanged, which answers exactly as it would have. Delivery runs on the
scheduler thread, in batches, off the answer's path.

`ServerThread` runs the app on loopback in a background thread for tests and
the demo; `serve()` runs it in the foreground for `nudgeflow dispatch-api`
(with uvloop and httptools when they are installed).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any, Final, cast

import orjson
import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from nudgeflow.core.errors import ServiceError
from nudgeflow.core.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature_problem
from nudgeflow.core.timeutil import datetime_to_ms, format_ms
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
    Engagement,
    InMemoryTriggerStore,
    Outcome,
    RedisTriggerStore,
    Status,
    StoredTrigger,
    TriggerStore,
    dumps,
)
from nudgeflow.serving import LOOPBACK, AsgiThread

__all__ = [
    "InMemoryTriggerStore",
    "JsonLineLog",
    "RedisTriggerStore",
    "Scheduler",
    "ServerThread",
    "StoredTrigger",
    "TriggerBatch",
    "TriggerBatchStatus",
    "TriggerRequest",
    "TriggerStatus",
    "TriggerStore",
    "create_app",
    "serve",
]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

_TRIGGER_PATH: Final = "/api/trigger"
_BATCH_PATH: Final = "/api/triggers"
_FAST_PATHS: Final = frozenset({_TRIGGER_PATH, _BATCH_PATH})
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


class EngagementRequest(BaseModel):
    """The body of `POST /api/trigger/{trigger_id}/events`: what the recipient did, and when."""

    model_config = ConfigDict(
        extra="ignore", frozen=True,
        json_schema_extra={"examples": [{"event": "opened", "at": "2026-03-01T10:05:00Z"}]},
    )

    event: Engagement
    at: Timestamp | None = None  # when it happened; default: when the API hears of it


class EngagementStatus(BaseModel):
    """The events newly recorded (a click records the open too; a repeat records nothing)."""

    trigger_id: str
    event: Engagement
    recorded: list[Engagement]


class TriggerEvents(BaseModel):
    """Each outcome of a trigger (sent, failed, opened, clicked) and when it first happened."""

    trigger_id: str
    events: dict[str, AwareDatetime]


_BATCH_MAX: Final = 1000


class TriggerBatch(RootModel[list[TriggerRequest]]):
    """The body of `POST /api/triggers`: 1 to 1,000 triggers, each keyed by its `trigger_id`."""

    model_config = ConfigDict(frozen=True, json_schema_extra={"examples": [[_EXAMPLE_TRIGGER]]})

    root: list[TriggerRequest] = Field(min_length=1, max_length=_BATCH_MAX)


class TriggerBatchStatus(BaseModel):
    """The answer of a batch: each trigger's answer, in the order of the batch."""

    results: list[TriggerStatus]


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
    in a thread, every `interval_s` or at once after `wake()`. A round claims
    up to `batch` due triggers and moves them through the store together
    (`start_deliveries`, `finish_deliveries`: a few round trips a round, not a
    few a trigger). A channel that is only recorded needs nothing more; the
    others' deliveries run on a pool of `workers` threads. A delivery that dies
    half-way (the process stops) is claimed again after `lease_s`.
    """

    def __init__(
        self,
        store: TriggerStore,
        adapters: Mapping[Channel, ChannelAdapter] | None = None,
        contacts: ContactDirectory | None = None,
        *,
        outcomes_log: JsonLineLog | None = None,
        clock: Clock = _utc_now,
        interval_s: float = 0.05,
        lease_s: float = 60.0,
        workers: int = 4,
        batch: int = 500,
    ) -> None:
        self._store = store
        self._adapters: dict[Channel, ChannelAdapter] = {
            channel: RecordOnly(channel) for channel in CHANNELS
        }
        self._adapters.update(adapters or {})
        self._contacts = contacts if contacts is not None else NoContacts()
        self._outcomes_log = outcomes_log
        self._clock = clock
        self._interval_s = interval_s
        self._lease_ms = int(lease_s * 1000)
        self._workers = workers
        self._batch = batch
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
        claimed = self._store.claim_due(now_ms, limit=self._batch, lease_ms=self._lease_ms)
        if claimed:
            self._deliver_all(claimed)
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

    def _deliver_all(self, trigger_ids: Sequence[str]) -> None:
        records = self._store.start_deliveries(trigger_ids)
        outcomes: list[Outcome] = []
        sends: list[tuple[StoredTrigger, ChannelAdapter]] = []
        for trigger_id, record in zip(trigger_ids, records, strict=True):
            if record is None or record.status != "accepted":
                # Unknown (expired, discarded) or already cancelled/sent/failed: nothing to do.
                outcomes.append((trigger_id, None, None))
                continue
            channel = record.payload.get("channel")
            adapter = self._adapters.get(cast(Channel, channel)) if channel in CHANNELS else None
            if adapter is None:
                outcomes.append(self._failed(trigger_id, f"unknown channel {channel!r}"))
            elif isinstance(adapter, RecordOnly):
                outcomes.append((trigger_id, "sent", None))  # nothing leaves: nothing to look up
            else:
                sends.append((record, adapter))
        if sends:
            delivered = self._executor().map(lambda job: self._deliver(*job), sends)
            # None: died before an outcome, left in the queue to be claimed again after its lease.
            outcomes += [outcome for outcome in delivered if outcome is not None]
        at_ms = datetime_to_ms(self._clock())
        finished = set(self._store.finish_deliveries(outcomes, at_ms))
        if self._outcomes_log is not None and finished:
            by_id = {r.trigger_id: r for r in records if r is not None}
            self._outcomes_log.append_many([
                outcome_line(by_id[trigger_id], status, at_ms)
                for trigger_id, status, _ in outcomes
                if trigger_id in finished and status is not None and trigger_id in by_id
            ])

    def _deliver(self, record: StoredTrigger, adapter: ChannelAdapter) -> Outcome | None:
        trigger_id = record.trigger_id
        try:
            return self._deliver_one(record, adapter)
        except Exception:
            log.exception("delivery of %s failed before an outcome; will retry", trigger_id)
            return None

    def _deliver_one(self, record: StoredTrigger, adapter: ChannelAdapter) -> Outcome:
        trigger_id, payload = record.trigger_id, record.payload
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
            return self._failed(trigger_id, str(exc))
        except Exception as exc:  # an adapter bug: failed, not retried forever
            return self._failed(trigger_id, f"{adapter.channel}: {type(exc).__name__}: {exc}")
        return trigger_id, "sent", None

    @staticmethod
    def _failed(trigger_id: str, reason: str) -> Outcome:
        log.warning("delivery of %s failed: %s", trigger_id, reason)
        return trigger_id, "failed", reason


# --- the log -------------------------------------------------------------------------------


class JsonLineLog:
    """Appends JSON objects, one a line; safe from many threads.

    `append_many` writes any number of lines with one write, flushed at once:
    the intake logs a round's triggers together. The log knows which trigger
    ids it holds (read back from the file when it is first used), so a process
    that was killed between storing a trigger and logging it can log it when
    the trigger is sent again (`unlogged`): the log is what was sent.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None
        self._logged: set[str] | None = None

    @property
    def path(self) -> Path:
        return self._path

    def append(self, record: dict[str, Any]) -> None:
        self.append_many([record])

    def append_many(self, records: Sequence[dict[str, Any]]) -> None:
        data = b"".join([dumps(record) + b"\n" for record in records])
        with self._lock:
            if self._file is None:
                # Opened on first use so that building an app creates no file.
                self._file = self._path.open("ab")
            self._file.write(data)
            self._file.flush()
            self._known().update(str(record["trigger_id"]) for record in records)

    def unlogged(self, trigger_ids: Sequence[str]) -> set[str]:
        """Those of `trigger_ids` that no line of the log holds."""
        with self._lock:
            known = self._known()
            return {trigger_id for trigger_id in trigger_ids if trigger_id not in known}

    def _known(self) -> set[str]:
        if self._logged is None:
            self._logged = set()
            if self._path.exists():
                with self._path.open("rb") as lines:
                    for line in lines:
                        try:
                            self._logged.add(str(orjson.loads(line)["trigger_id"]))
                        except (orjson.JSONDecodeError, KeyError, TypeError):
                            continue  # a torn last line: that trigger was not logged
        return self._logged

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def outcome_line(record: StoredTrigger, outcome: str, at_ms: int) -> dict[str, Any]:
    """A line of the outcomes log: the shape of the flow's outcomes (`nudgeflow report`)."""
    payload = record.payload
    return {
        "trigger_id": record.trigger_id,
        "trigger_type": payload.get("trigger_type"),
        "user_id": payload.get("user_id"),
        "outcome": outcome,
        "ts": format_ms(at_ms),
        "channel": payload.get("channel"),
    }


def _log_line(record: StoredTrigger) -> dict[str, Any]:
    """A trigger's line: the request body as validated, without `contact`, plus `received_at`."""
    line = {k: v for k, v in record.payload.items() if k != "contact"}
    if line.get("message") is None:
        line.pop("message", None)
    line["received_at"] = record.received_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return line


# --- accepting -----------------------------------------------------------------------------


class _Intake:
    """Accepts triggers: those of all requests go through one pipeline, in rounds.

    A request submits its triggers and waits. A round takes everything
    submitted meanwhile (up to `max_round` triggers), stores it with one
    `put_many` (one Redis round trip), appends the new triggers' lines to the
    log with one write, wakes the scheduler, and answers each request. Rounds
    follow each other on one task; while a round waits for the store the next
    one fills up, so the busier the API, the larger the round. A round whose
    log write fails forgets its new triggers again (not logged means not
    sent: the retry must find them new) and fails its requests.

    Runs on the event loop; nothing in it blocks for long (the log write goes
    to the page cache).
    """

    def __init__(
        self,
        store: TriggerStore,
        json_log: JsonLineLog | None,
        scheduler: Scheduler,
        clock: Clock,
        *,
        max_round: int = 2000,
    ) -> None:
        self._store = store
        self._log = json_log
        self._scheduler = scheduler
        self._clock = clock
        self._max_round = max_round
        self._queue: list[tuple[list[StoredTrigger], asyncio.Future[list[StoredTrigger]]]] = []
        self._drainer: asyncio.Task[None] | None = None  # the loop keeps only weak references

    def records(self, bodies: Sequence[TriggerRequest]) -> list[StoredTrigger]:
        now = self._clock()
        out = []
        for body in bodies:
            scheduled = body.send_at is not None and body.send_at > now
            status: Status = "scheduled" if scheduled else "accepted"
            due = body.send_at if scheduled and body.send_at is not None else now
            # The body as validated (datetimes normalised, unknown fields dropped).
            payload = body.model_dump(mode="json")
            out.append(
                StoredTrigger(
                    body.trigger_id, status, now, datetime_to_ms(due), payload, first_status=status
                )
            )
        return out

    async def accept(self, bodies: Sequence[TriggerRequest]) -> list[StoredTrigger]:
        """Store (and log) each body's trigger unless known; the records that answer them.

        A repeat is answered from the store, whatever its body says: a replayed
        trigger carries a new `detected_at`, and is still the same trigger.
        """
        records = self.records(bodies)
        future: asyncio.Future[list[StoredTrigger]] = asyncio.get_running_loop().create_future()
        self._queue.append((records, future))
        if self._drainer is None:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                await self._round(self._take())
        finally:
            self._drainer = None

    def _take(self) -> list[tuple[list[StoredTrigger], asyncio.Future[list[StoredTrigger]]]]:
        taken, count = 0, 0
        for records, _ in self._queue:
            if taken and count + len(records) > self._max_round:
                break
            taken += 1
            count += len(records)
        batch, self._queue = self._queue[:taken], self._queue[taken:]
        return batch

    async def _round(
        self, batch: list[tuple[list[StoredTrigger], asyncio.Future[list[StoredTrigger]]]]
    ) -> None:
        records = [record for submitted, _ in batch for record in submitted]
        try:
            results = await self._store.put_many(records)
            new = [record for record, created in results if created]
            # New triggers, and known ones the log lacks: a process killed between
            # storing a trigger and logging it never sent it, and the sink sends it again.
            to_log: dict[str, StoredTrigger] = {}
            if self._log is not None:
                unlogged = self._log.unlogged([record.trigger_id for record, _ in results])
                for record, _ in results:
                    if record.trigger_id in unlogged:
                        to_log.setdefault(record.trigger_id, record)
            if to_log and self._log is not None:
                try:
                    self._log.append_many([_log_line(record) for record in to_log.values()])
                except OSError:
                    # Not logged means not sent: forget them so that the retries send them.
                    await self._store.adiscard_many([record.trigger_id for record in new])
                    raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        if any(record.status == "accepted" for record in new):
            self._scheduler.wake()
        start = 0
        for submitted, future in batch:
            end = start + len(submitted)
            if not future.done():
                future.set_result([record for record, _ in results[start:end]])
            start = end


# --- the app -------------------------------------------------------------------------------


def create_app(
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
    outcomes_log: Path | None = None,
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
    `outcomes_log`: append each delivery outcome and webhook event there.

    `fail_first` is a testing aid: the first N `POST /api/trigger` (or
    `/api/triggers`) calls answer 500 before looking at the request, so a
    client's retry path can be tested against a real server. Leave it at 0
    anywhere else.
    """
    trigger_store: TriggerStore = store if store is not None else InMemoryTriggerStore()
    json_log = JsonLineLog(log_path) if log_path is not None else None
    faults = _FaultInjector(fail_first)
    events_log = JsonLineLog(outcomes_log) if outcomes_log is not None else None
    scheduler = Scheduler(
        trigger_store, adapters, contacts, clock=clock, interval_s=scheduler_interval_s,
        outcomes_log=events_log,
    )
    intake = _Intake(trigger_store, json_log, scheduler, clock)
    secret = hmac_secret.encode() if hmac_secret is not None else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if run_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            for opened in (json_log, events_log):
                if opened is not None:
                    opened.close()
            await trigger_store.aclose()

    authenticate = _authenticator(token, secret, clock)
    app = _DispatchAPI(
        title="nudgeflow dispatch API",
        version="1",
        lifespan=lifespan,
        dependencies=[Depends(authenticate)],
    )
    app.state.scheduler = scheduler
    app.state.store = trigger_store
    _install_error_handlers(app)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        # Liveness for containers and orchestrators; outside the dispatch contract.
        return {"status": "alive"}

    # The two POSTs below are what `_FastPath` does for a well-formed request; FastAPI gets
    # the others, and documents both.
    @app.post(
        _TRIGGER_PATH,
        status_code=202,
        response_model=TriggerStatus,
        responses=_errors(400, 401, 409, 500, described={409: _KEY_CONFLICT}),
        summary="Accept a trigger for delivery (idempotent by Idempotency-Key)",
    )
    async def post_trigger(
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
        [record] = await intake.accept([body])
        return TriggerStatus(trigger_id=record.trigger_id, status=record.answer)

    @app.post(
        _BATCH_PATH,
        status_code=202,
        response_model=TriggerBatchStatus,
        responses=_errors(400, 401, 500),
        summary="Accept a batch of triggers (each idempotent by its trigger_id)",
    )
    async def post_triggers(body: TriggerBatch) -> TriggerBatchStatus:
        records = await intake.accept(body.root)
        return TriggerBatchStatus(
            results=[TriggerStatus(trigger_id=r.trigger_id, status=r.answer) for r in records]
        )

    async def lookup(trigger_id: str) -> TriggerStatus:
        record = await trigger_store.aget(trigger_id)
        if record is None:
            raise StarletteHTTPException(404, "unknown trigger_id")
        return TriggerStatus(trigger_id=record.trigger_id, status=record.status)

    @app.get(
        "/api/trigger/status",
        response_model=TriggerStatus,
        responses=_errors(400, 401, 404, 500),
        summary="The status of a trigger",
    )
    async def get_status_query(trigger_id: str) -> TriggerStatus:
        return await lookup(trigger_id)

    @app.get(
        "/api/trigger/status/{trigger_id}",
        response_model=TriggerStatus,
        responses=_errors(401, 404, 500),
        summary="The status of a trigger",
    )
    async def get_status_path(trigger_id: str) -> TriggerStatus:
        return await lookup(trigger_id)

    async def cancel(trigger_id: str) -> TriggerStatus:
        record, changed = await trigger_store.atransition(trigger_id, _SCHEDULED, "cancelled")
        if record is None:
            raise StarletteHTTPException(404, "unknown trigger_id")
        if changed:
            await trigger_store.afinish(trigger_id)
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
    async def post_cancel(trigger_id: str) -> TriggerStatus:
        return await cancel(trigger_id)

    @app.delete(
        "/api/trigger/{trigger_id}",
        response_model=TriggerStatus,
        responses=_errors(401, 404, 409, 500),
        summary="Cancel a scheduled trigger",
    )
    async def delete_trigger(trigger_id: str) -> TriggerStatus:
        return await cancel(trigger_id)

    _install_event_routes(app, trigger_store, events_log, clock)

    app.fast_path = _FastPath(
        functools.partial(FastAPI.__call__, app),
        intake=intake,
        faults=faults,
        token=token,
        secret=secret,
        clock=clock,
    )
    _install_openapi(app)
    return app


def _install_event_routes(
    app: FastAPI, trigger_store: TriggerStore, events_log: JsonLineLog | None, clock: Clock
) -> None:
    """The webhook that reports opened and clicked messages, and a trigger's outcomes."""

    @app.post(
        "/api/trigger/{trigger_id}/events",
        response_model=EngagementStatus,
        responses=_errors(400, 401, 404, 409, 500),
        summary="Record that a sent message was opened or clicked (the channel's webhook)",
    )
    async def post_event(trigger_id: str, body: EngagementRequest) -> EngagementStatus:
        at_ms = datetime_to_ms(body.at if body.at is not None else clock())
        record, recorded = await trigger_store.arecord_event(trigger_id, body.event, at_ms)
        if record is None:
            raise StarletteHTTPException(404, "unknown trigger_id")
        if record.status != "sent":
            raise StarletteHTTPException(
                409, f"trigger is {record.status}; only a sent message can be {body.event}"
            )
        if events_log is not None and recorded:
            events_log.append_many([outcome_line(record, name, at_ms) for name in recorded])
        return EngagementStatus(trigger_id=record.trigger_id, event=body.event,
                                recorded=recorded)

    @app.get(
        "/api/trigger/{trigger_id}/events",
        response_model=TriggerEvents,
        responses=_errors(401, 404, 500),
        summary="What became of a trigger: sent or failed, opened, clicked, and when",
    )
    async def get_events(trigger_id: str) -> TriggerEvents:
        record = await trigger_store.aget(trigger_id)
        if record is None:
            raise StarletteHTTPException(404, "unknown trigger_id")
        events = await trigger_store.aevents(trigger_id)
        return TriggerEvents(trigger_id=record.trigger_id, events={
            name: datetime.fromtimestamp(at / 1000, tz=UTC) for name, at in sorted(events.items())
        })


class _DispatchAPI(FastAPI):
    """The FastAPI app, with `fast_path` in front of everything for `POST /api/trigger(s)`.

    In front of FastAPI's own layers, not among its middleware: those cost
    more than the rest of accepting a trigger (FastAPI checks its telemetry
    settings in the environment, for one, every request).
    """

    fast_path: _FastPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fast_path = self.fast_path
        if (
            fast_path is not None
            and scope["type"] == "http"
            and scope["path"] in _FAST_PATHS
            and scope["method"] == "POST"
        ):
            await fast_path(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class _FastPath:
    """`POST /api/trigger(s)` without FastAPI, when the request is a well-formed one.

    Pure ASGI: reads the body, checks credentials and the content type, parses
    the JSON as FastAPI would (`json.loads`), validates it with the same model,
    hands it to the intake and sends the 202 itself (orjson). The first thing
    that is not as it should be (anything that would make FastAPI answer 4xx,
    or that FastAPI reads differently) makes it pass the request, body
    included, to the app instead, which answers it as it always has: errors and
    edge cases have one implementation, and only the accepting path has two
    fronts on one intake. Also injects the `fail_first` failures, before
    looking at the request.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        intake: _Intake,
        faults: _FaultInjector,
        token: str | None,
        secret: bytes | None,
        clock: Clock,
    ) -> None:
        self._app = app
        self._intake = intake
        self._faults = faults
        self._secret = secret
        self._clock = clock
        # The Authorization value FastAPI surely accepts; else every request goes to FastAPI.
        self._authorization: bytes | None = None
        self._needs_token = token is not None
        if token is not None and token.strip() == token and token.isascii() and token:
            self._authorization = b"Bearer " + token.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A `POST` to one of `_FAST_PATHS`."""
        if self._faults.take():
            await _error(500, "injected failure (fail_first)")(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:  # the client went away
            return
        try:
            answer = await self._accept(scope, body, batch=scope["path"] == _BATCH_PATH)
        except Exception as exc:  # the store or the log failed: what FastAPI's handler does
            log.error("dispatch API: unexpected %s", type(exc).__name__, exc_info=exc)
            await _error(500, "internal server error")(scope, receive, send)
            return
        if answer is None:
            await self._app(scope, _replay(body, receive), send)
            return
        await send({
            "type": "http.response.start",
            "status": 202,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(answer)).encode("ascii")),
            ],
        })  # fmt: skip
        await send({"type": "http.response.body", "body": answer})

    async def _accept(self, scope: Scope, body: bytes, *, batch: bool) -> bytes | None:
        """The answer of a well-formed request, or None to leave the request to FastAPI."""
        headers = _first_headers(scope["headers"])
        content_type = headers.get(b"content-type", b"")
        if content_type != b"application/json" and not content_type.startswith(
            b"application/json;"
        ):
            return None
        if self._needs_token and (
            self._authorization is None or headers.get(b"authorization") != self._authorization
        ):
            return None
        if self._secret is not None and _signature_problem(
            self._secret, headers, body, self._clock
        ):
            return None
        try:
            parsed = json.loads(body)  # what FastAPI (Starlette's `Request.json`) does
            if batch:
                bodies = TriggerBatch.model_validate(parsed).root
            else:
                bodies = [TriggerRequest.model_validate(parsed)]
        except (ValueError, RecursionError):  # ValidationError and JSONDecodeError included
            return None
        if not batch:
            key = headers.get(b"idempotency-key")
            if key is None or key.decode("latin-1") != bodies[0].trigger_id:
                return None
        records = await self._intake.accept(bodies)
        if not batch:
            [record] = records
            return orjson.dumps({"trigger_id": record.trigger_id, "status": record.answer})
        results = [{"trigger_id": r.trigger_id, "status": r.answer} for r in records]
        return orjson.dumps({"results": results})


def _first_headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The first value of each header (ASGI names are lower case), as Starlette reads them."""
    headers: dict[bytes, bytes] = {}
    for name, value in raw:
        headers.setdefault(name, value)
    return headers


def _signature_problem(
    secret: bytes, headers: Mapping[bytes, bytes], body: bytes, clock: Clock
) -> str | None:
    timestamp = headers.get(TIMESTAMP_HEADER.lower().encode("ascii"))
    signature = headers.get(SIGNATURE_HEADER.lower().encode("ascii"))
    return signature_problem(
        secret,
        timestamp.decode("latin-1") if timestamp is not None else None,
        signature.decode("latin-1") if signature is not None else None,
        body,
        now_s=clock().timestamp(),
    )


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body; None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app after the body was read: the body again, then the real one."""
    replayed = False

    async def replay() -> ASGIMessage:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


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

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        response = _error(exc.status_code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            # Starlette names only the first route of the path; a path served by two
            # routes (GET and POST .../events) allows the methods of both.
            response.headers["Allow"] = ", ".join(_allowed_methods(app, request.url.path))
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


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods of every route with the template of the first route matching `path`."""
    template: str | None = None
    methods: set[str] = set()
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        if template is None and regex is not None and regex.match(path):
            template = getattr(route, "path", None)
        if template is not None and getattr(route, "path", None) == template:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


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
    outcomes_log: Path | None = None,
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
        outcomes_log=outcomes_log,
    )
    # loop/http "auto": uvloop and httptools when installed (uvicorn[standard]), else asyncio
    # and h11. No access log: a log line a request would cost more than the request.
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        ws="none",
        loop="auto",
        http="auto",
        proxy_headers=False,  # no proxy in front: X-Forwarded-* would only cost
    )


def build_app(
    log_path: Path | None,
    *,
    redis_url: str | None = None,
    smtp: str | None = None,
    sms_url: str | None = None,
    push_url: str | None = None,
    token: str | None = None,
    hmac_secret: str | None = None,
    outcomes_log: Path | None = None,
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
        outcomes_log=outcomes_log,
    )


class ServerThread(AsgiThread):
    """The reference API (an app of `create_app`) on a background thread; a context manager."""

    def __init__(self, app: FastAPI, *, host: str = LOOPBACK, port: int = 0,
                 startup_timeout_s: float = 10.0) -> None:
        # h11: fixed protocols, the same whatever else is installed.
        super().__init__(app, name="dispatch API", host=host, port=port, http="h11",
                         startup_timeout_s=startup_timeout_s)

"""Where the reference dispatch API keeps triggers: idempotency, status, and the due queue.

    TriggerStore (protocol)
    ├── InMemoryTriggerStore   a dict and a lock: one process, forgotten on restart
    └── RedisTriggerStore      survives a restart and is shared by API instances

A stored trigger has an immutable part (id, when it was received, when it is
due, the request body, the first answer) and a mutable status:

    accepted ──► sent | failed                 (delivered at once)
    scheduled ──► accepted ──► sent | failed   (delivered when due)
    scheduled ──► cancelled

What happened to a delivered message is kept beside its status, each event at
most once with the time it first happened (`events`): `sent` or `failed` when
the delivery ends, then `opened` and `clicked` as the channel's webhook reports
them (`record_event`: only for a `sent` trigger; a click is an open too).

Every trigger that has something to deliver sits in a *due queue* under the
time it is due (now, for an immediate send). The scheduler `claim_due`s what is
due: claiming moves the entry a lease into the future rather than removing it,
so a scheduler that dies mid-delivery leaves the trigger to be claimed again
once the lease runs out; `finish` removes it. Status changes are
compare-and-set (`transition`), so a cancel and a delivery that race cannot
both win.

Redis layout (`prefix` defaults to `nudgeflow:dispatch`):

    <prefix>:trigger:<id>   string, JSON of the immutable part; created with SET NX (the
                            idempotency key), expires after `retention_s`
    <prefix>:state:<id>     hash {status, error, at:<event>: epoch ms}, same expiry
    <prefix>:due            sorted set of ids, score = due time in epoch ms

Creation, transitions and claims are Lua scripts: each is atomic in Redis.

The API's request handlers use the `async` methods (`put_many`, `aget`,
`atransition`, …), which never block the event loop: `RedisTriggerStore` runs
them on a `redis.asyncio` client of its own (one per event loop, derived from
the synchronous client's address), and `put_many` stores any number of
triggers in one script call, one round trip. The scheduler thread uses the
synchronous methods, a round's deliveries in batches (`start_deliveries`,
`finish_deliveries`).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Literal, Protocol, cast, get_args

import orjson
import redis
import redis.asyncio

from nudgeflow.core.timeutil import datetime_to_ms, ms_to_datetime

__all__ = [
    "DEFAULT_RETENTION_S",
    "ENGAGEMENTS",
    "InMemoryTriggerStore",
    "Outcome",
    "RedisTriggerStore",
    "Status",
    "StoredTrigger",
    "TriggerStore",
    "dumps",
]

Status = Literal["accepted", "scheduled", "sent", "failed", "cancelled"]
STATUSES: Final[frozenset[str]] = frozenset(get_args(Status))
DEFAULT_RETENTION_S: Final = 30 * 86_400
_PENDING: Final[tuple[Status, ...]] = ("scheduled", "accepted")
_ACCEPTED: Final[tuple[Status, ...]] = ("accepted",)

# How a delivery ended: (trigger id, `sent` | `failed` | None for nothing to do, error).
Outcome = tuple[str, Status | None, str | None]
# What the channel's webhook reports of a sent message; a click implies the open.
Engagement = Literal["opened", "clicked"]
ENGAGEMENTS: Final[tuple[Engagement, ...]] = ("opened", "clicked")


def dumps(value: Any) -> bytes:
    """JSON bytes of any JSON-shaped value, including what orjson refuses.

    orjson refuses integers beyond 64 bits and strings with lone surrogates; a
    request body may carry both, and must not become a 500.
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":")).encode("ascii")


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


@dataclass(frozen=True, slots=True)
class StoredTrigger:
    """One accepted trigger: its status now, and what is needed to deliver it."""

    trigger_id: str
    status: Status
    received_at: datetime
    due_ms: int | None = None  # when to deliver (epoch ms); None: nothing to deliver
    payload: Mapping[str, Any] = field(default_factory=dict)  # the validated request body
    error: str | None = None  # why the delivery failed
    first_status: Status | None = None  # the first answer; repeats of the key get it again

    @property
    def answer(self) -> Status:
        """The status a repeat of the Idempotency-Key is answered with."""
        return self.first_status if self.first_status is not None else self.status


class TriggerStore(Protocol):
    """Where accepted triggers are remembered.

    The synchronous methods must be safe to call from many threads (the
    scheduler's, tests'); the `async` ones are called on the API's event loop
    and must not block it.
    """

    def put_if_absent(self, record: StoredTrigger) -> tuple[StoredTrigger, bool]:
        """Store `record` (and queue it at `due_ms`) unless its id is known.

        Returns the stored record and whether it is new.
        """
        ...

    def get(self, trigger_id: str) -> StoredTrigger | None: ...

    def discard(self, trigger_id: str) -> None:
        """Forget a trigger (used to undo an accept whose side effect failed)."""
        ...

    def transition(
        self,
        trigger_id: str,
        allowed: Collection[Status],
        to: Status,
        error: str | None = None,
    ) -> tuple[StoredTrigger | None, bool]:
        """Set the status to `to` if it is one of `allowed`, atomically.

        Returns the record as it is now (None if unknown) and whether it changed.
        """
        ...

    def claim_due(self, now_ms: int, *, limit: int, lease_ms: int) -> list[str]:
        """Ids due at `now_ms` (at most `limit`), each moved `lease_ms` into the future."""
        ...

    def finish(self, trigger_id: str) -> None:
        """Take a trigger out of the due queue: delivered, failed or cancelled."""
        ...

    def next_due_ms(self) -> int | None:
        """When the earliest queued trigger is due (a claimed one: when its lease ends)."""
        ...

    def start_deliveries(self, trigger_ids: Sequence[str]) -> list[StoredTrigger | None]:
        """Claimed triggers about to be delivered: each pending one becomes `accepted`.

        Returns each record as it is now (None if unknown), in order: only an
        `accepted` one is to be delivered.
        """
        ...

    def finish_deliveries(self, outcomes: Sequence[Outcome], at_ms: int = 0) -> list[str]:
        """Record how deliveries ended (at `at_ms`) and take them out of the due queue.

        An outcome's status (`sent`, `failed`) is set only on an `accepted`
        trigger, and is then also its event at `at_ms`; None just takes the
        trigger out of the queue. Returns the ids whose status was set.
        """
        ...

    async def arecord_event(
        self, trigger_id: str, event: Engagement, at_ms: int
    ) -> tuple[StoredTrigger | None, list[Engagement]]:
        """A sent message was opened or clicked: keep the first time of each (a click opens).

        Returns the record (None if unknown) and the events newly recorded; a
        trigger that is not `sent` records nothing.
        """
        ...

    async def aevents(self, trigger_id: str) -> dict[str, int]:
        """Each event of the trigger and when it first happened (epoch ms)."""
        ...

    async def put_many(self, records: Sequence[StoredTrigger]) -> list[tuple[StoredTrigger, bool]]:
        """`put_if_absent` of each record, in order (a repeated id is a repeat), at once."""
        ...

    async def aget(self, trigger_id: str) -> StoredTrigger | None:
        """`get`, on the event loop."""
        ...

    async def atransition(
        self,
        trigger_id: str,
        allowed: Collection[Status],
        to: Status,
        error: str | None = None,
    ) -> tuple[StoredTrigger | None, bool]:
        """`transition`, on the event loop."""
        ...

    async def afinish(self, trigger_id: str) -> None:
        """`finish`, on the event loop."""
        ...

    async def adiscard_many(self, trigger_ids: Sequence[str]) -> None:
        """`discard` of each, on the event loop."""
        ...

    async def aclose(self) -> None:
        """Release what the `async` methods opened on the running loop (the API's shutdown)."""
        ...


class InMemoryTriggerStore:
    """A dict and a due queue guarded by a lock: one process, forgotten on restart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, StoredTrigger] = {}
        self._due: dict[str, int] = {}
        self._events: dict[str, dict[str, int]] = {}

    def put_if_absent(self, record: StoredTrigger) -> tuple[StoredTrigger, bool]:
        with self._lock:
            existing = self._records.get(record.trigger_id)
            if existing is not None:
                return existing, False
            stored = record
            if record.first_status is None:
                stored = replace(record, first_status=record.answer)
            self._records[record.trigger_id] = stored
            if record.due_ms is not None:
                self._due[record.trigger_id] = record.due_ms
            return stored, True

    def get(self, trigger_id: str) -> StoredTrigger | None:
        with self._lock:
            return self._records.get(trigger_id)

    def discard(self, trigger_id: str) -> None:
        with self._lock:
            self._records.pop(trigger_id, None)
            self._due.pop(trigger_id, None)
            self._events.pop(trigger_id, None)

    def transition(
        self,
        trigger_id: str,
        allowed: Collection[Status],
        to: Status,
        error: str | None = None,
    ) -> tuple[StoredTrigger | None, bool]:
        with self._lock:
            record = self._records.get(trigger_id)
            if record is None or record.status not in allowed:
                return record, False
            changed = replace(record, status=to, error=error if error is not None else record.error)
            self._records[trigger_id] = changed
            return changed, True

    def claim_due(self, now_ms: int, *, limit: int, lease_ms: int) -> list[str]:
        with self._lock:
            due = sorted((at, tid) for tid, at in self._due.items() if at <= now_ms)[:limit]
            for _, trigger_id in due:
                self._due[trigger_id] = now_ms + lease_ms
            return [trigger_id for _, trigger_id in due]

    def finish(self, trigger_id: str) -> None:
        with self._lock:
            self._due.pop(trigger_id, None)

    def next_due_ms(self) -> int | None:
        with self._lock:
            return min(self._due.values(), default=None)

    def start_deliveries(self, trigger_ids: Sequence[str]) -> list[StoredTrigger | None]:
        out: list[StoredTrigger | None] = []
        with self._lock:
            for trigger_id in trigger_ids:
                record = self._records.get(trigger_id)
                if record is not None and record.status in _PENDING:
                    record = replace(record, status="accepted")
                    self._records[trigger_id] = record
                out.append(record)
        return out

    def finish_deliveries(self, outcomes: Sequence[Outcome], at_ms: int = 0) -> list[str]:
        finished: list[str] = []
        with self._lock:
            for trigger_id, status, error in outcomes:
                record = self._records.get(trigger_id)
                if status is not None and record is not None and record.status in _ACCEPTED:
                    self._records[trigger_id] = replace(
                        record, status=status, error=error if error is not None else record.error
                    )
                    self._events.setdefault(trigger_id, {}).setdefault(status, at_ms)
                    finished.append(trigger_id)
                self._due.pop(trigger_id, None)
        return finished

    async def arecord_event(
        self, trigger_id: str, event: Engagement, at_ms: int
    ) -> tuple[StoredTrigger | None, list[Engagement]]:
        with self._lock:
            record = self._records.get(trigger_id)
            if record is None or record.status != "sent":
                return record, []
            events = self._events.setdefault(trigger_id, {})
            new: list[Engagement] = []
            for name in _implied(event):
                if name not in events:
                    events[name] = at_ms
                    new.append(name)
            return record, new

    async def aevents(self, trigger_id: str) -> dict[str, int]:
        with self._lock:
            return dict(self._events.get(trigger_id, {}))

    # The async methods: a dict behind a lock held for microseconds never blocks the loop.

    async def put_many(self, records: Sequence[StoredTrigger]) -> list[tuple[StoredTrigger, bool]]:
        return [self.put_if_absent(record) for record in records]

    async def aget(self, trigger_id: str) -> StoredTrigger | None:
        return self.get(trigger_id)

    async def atransition(
        self,
        trigger_id: str,
        allowed: Collection[Status],
        to: Status,
        error: str | None = None,
    ) -> tuple[StoredTrigger | None, bool]:
        return self.transition(trigger_id, allowed, to, error)

    async def afinish(self, trigger_id: str) -> None:
        self.finish(trigger_id)

    async def adiscard_many(self, trigger_ids: Sequence[str]) -> None:
        for trigger_id in trigger_ids:
            self.discard(trigger_id)

    async def aclose(self) -> None:
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


def _implied(event: Engagement) -> tuple[Engagement, ...]:
    """The events a reported one stands for, in order: a click is also an open."""
    return ("opened", "clicked") if event == "clicked" else (event,)


_PUT: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[3]) then
  redis.call('HSET', KEYS[2], 'status', ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5]) end
  return {1, ARGV[1], ARGV[2], false}
end
local state = redis.call('HMGET', KEYS[2], 'status', 'error')
return {0, redis.call('GET', KEYS[1]), state[1], state[2]}
"""

_TRANSITION: Final = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
for i = 3, #ARGV do
  if ARGV[i] == current then
    redis.call('HSET', KEYS[1], 'status', ARGV[1])
    if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[2]) end
    return 1
  end
end
return 0
"""

# Any number of `_PUT`s in one call. KEYS: the due queue, then each trigger's trigger and
# state key; ARGV: the retention, then each trigger's immutable part, status, due ms (or '')
# and queue member. Returns, a trigger: 1 (new), or 0 and what is stored (immutable part,
# status, error): short replies for the usual case. A repeated id in one call is a repeat of
# its first occurrence.
_PUT_MANY: Final = """
local out = {}
for i = 1, (#KEYS - 1) / 2 do
  local trigger_key, state_key, a = KEYS[2 * i], KEYS[2 * i + 1], 4 * i - 2
  if redis.call('SET', trigger_key, ARGV[a], 'NX', 'EX', ARGV[1]) then
    redis.call('HSET', state_key, 'status', ARGV[a + 1])
    redis.call('EXPIRE', state_key, ARGV[1])
    if ARGV[a + 2] ~= '' then redis.call('ZADD', KEYS[1], ARGV[a + 2], ARGV[a + 3]) end
    out[#out + 1] = 1
  else
    local state = redis.call('HMGET', state_key, 'status', 'error')
    local n = #out
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 0, redis.call('GET', trigger_key),
      state[1], state[2]
  end
end
return out
"""

# Deliveries about to start. KEYS: each trigger's trigger and state key. A scheduled or
# accepted trigger becomes accepted. Returns 3 values a trigger: immutable part, status, error.
_START_MANY: Final = """
local out = {}
for i = 1, #KEYS / 2 do
  local state_key, o = KEYS[2 * i], 3 * i - 2
  local status = redis.call('HGET', state_key, 'status')
  if status == 'scheduled' then
    redis.call('HSET', state_key, 'status', 'accepted')
    status = 'accepted'
  end
  out[o], out[o + 1], out[o + 2] = redis.call('GET', KEYS[2 * i - 1]), status,
    redis.call('HGET', state_key, 'error')
end
return out
"""

# Deliveries ended. KEYS: the due queue, then each trigger's state key; ARGV: the time
# (epoch ms), then each trigger's queue member, new status (or '': none) and error (or '').
# The status is set on an accepted trigger only, with its event's time; every one leaves the
# queue. Returns the 1-based positions whose status was set.
_FINISH_MANY: Final = """
local set = {}
for i = 1, #KEYS - 1 do
  local state_key, a = KEYS[i + 1], 3 * i - 1
  if ARGV[a + 1] ~= '' and redis.call('HGET', state_key, 'status') == 'accepted' then
    redis.call('HSET', state_key, 'status', ARGV[a + 1])
    redis.call('HSETNX', state_key, 'at:' .. ARGV[a + 1], ARGV[1])
    if ARGV[a + 2] ~= '' then redis.call('HSET', state_key, 'error', ARGV[a + 2]) end
    set[#set + 1] = i
  end
  redis.call('ZREM', KEYS[1], ARGV[a])
end
return set
"""

# A sent message was opened or clicked. KEYS: the state key; ARGV: the time, then the
# events to record. Returns the status (false: unknown), then the events newly recorded.
_RECORD_EVENT: Final = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {false} end
local out = {status}
if status ~= 'sent' then return out end
for i = 2, #ARGV do
  if redis.call('HSETNX', KEYS[1], 'at:' .. ARGV[i], ARGV[1]) == 1 then out[#out + 1] = ARGV[i] end
end
return out
"""

_CLAIM: Final = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


# What an asyncio client copies of a synchronous client's connection settings.
_COPIED_SETTINGS: Final = (
    "db", "username", "password", "socket_timeout", "socket_connect_timeout", "client_name",
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_data",
    "ssl_check_hostname", "ssl_min_version", "ssl_ciphers",
)  # fmt: skip


def async_client_like(client: redis.Redis) -> redis.asyncio.Redis:
    """A `redis.asyncio` client of the same server, database and credentials as `client`."""
    pool = client.connection_pool
    settings = pool.connection_kwargs
    common: dict[str, Any] = {k: settings[k] for k in _COPIED_SETTINGS if k in settings}
    if "path" in settings:
        return redis.asyncio.Redis(unix_socket_path=settings["path"], **common)
    ssl = issubclass(pool.connection_class, redis.connection.SSLConnection)
    return redis.asyncio.Redis(
        host=settings.get("host", "localhost"), port=settings.get("port", 6379), ssl=ssl, **common
    )


class _AsyncScripts:
    """An asyncio client and its scripts, for one event loop."""

    def __init__(self, client: redis.asyncio.Redis, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        self.put_many = client.register_script(_PUT_MANY)
        self.transition = client.register_script(_TRANSITION)
        self.record_event = client.register_script(_RECORD_EVENT)


class RedisTriggerStore:
    """Triggers in Redis: idempotent across API restarts and API instances.

    `client` must not decode responses (the default of `redis.Redis`). The
    `async` methods use `async_client` if given, else a client like `client`
    made on first use (one per event loop).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "nudgeflow:dispatch",
        retention_s: int = DEFAULT_RETENTION_S,
        async_client: redis.asyncio.Redis | None = None,
    ) -> None:
        if retention_s <= 0:
            msg = f"retention_s must be > 0, got {retention_s}"
            raise ValueError(msg)
        self._client = client
        self._prefix = prefix.encode()
        self._retention_s = retention_s
        self._due_key = self._prefix + b":due"
        self._put = client.register_script(_PUT)
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._start_many = client.register_script(_START_MANY)
        self._finish_many = client.register_script(_FINISH_MANY)
        self._given_async_client = async_client
        self._async: _AsyncScripts | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisTriggerStore:
        client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return cls(client, **kwargs)

    def close(self) -> None:
        self._client.close()

    def _key(self, kind: bytes, trigger_id: str) -> bytes:
        return self._prefix + b":" + kind + b":" + trigger_id.encode("utf-8", "surrogatepass")

    @staticmethod
    def _member(trigger_id: str) -> bytes:
        return trigger_id.encode("utf-8", "surrogatepass")

    @staticmethod
    def _immutable(record: StoredTrigger) -> bytes:
        return dumps(
            {
                "trigger_id": record.trigger_id,
                "received_at_ms": datetime_to_ms(record.received_at),
                "due_ms": record.due_ms,
                "payload": record.payload,
                "first_status": record.answer,
            }
        )

    def put_if_absent(self, record: StoredTrigger) -> tuple[StoredTrigger, bool]:
        immutable = self._immutable(record)
        reply = self._put(
            keys=[
                self._key(b"trigger", record.trigger_id),
                self._key(b"state", record.trigger_id),
                self._due_key,
            ],
            args=[
                immutable,
                record.status,
                self._retention_s,
                "" if record.due_ms is None else record.due_ms,
                self._member(record.trigger_id),
            ],
        )
        created, raw, status, error = cast(list[Any], reply)
        stored = self._record(raw, status, error)
        if stored is None:  # expired between the SET NX and the GET: tell it as new
            return replace(record, first_status=record.answer), True
        return stored, bool(created)

    def get(self, trigger_id: str) -> StoredTrigger | None:
        pipe = self._client.pipeline(transaction=False)
        pipe.get(self._key(b"trigger", trigger_id))
        pipe.hmget(self._key(b"state", trigger_id), ["status", "error"])
        raw, (status, error) = pipe.execute()
        return self._record(raw, status, error)

    def discard(self, trigger_id: str) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._key(b"trigger", trigger_id), self._key(b"state", trigger_id))
        pipe.zrem(self._due_key, self._member(trigger_id))
        pipe.execute()

    def transition(
        self,
        trigger_id: str,
        allowed: Collection[Status],
        to: Status,
        error: str | None = None,
    ) -> tuple[StoredTrigger | None, bool]:
        changed = self._transition(
            keys=[self._key(b"state", trigger_id)],
            args=[to, error or "", *allowed],
        )
        return self.get(trigger_id), bool(changed)

    def claim_due(self, now_ms: int, *, limit: int, lease_ms: int) -> list[str]:
        ids = self._claim(keys=[self._due_key], args=[now_ms, now_ms + lease_ms, limit])
        return [text for raw in cast(list[bytes], ids) if (text := _text(raw)) is not None]

    def finish(self, trigger_id: str) -> None:
        self._client.zrem(self._due_key, self._member(trigger_id))

    def next_due_ms(self) -> int | None:
        first = cast(
            list[tuple[bytes, float]], self._client.zrange(self._due_key, 0, 0, withscores=True)
        )
        return int(first[0][1]) if first else None

    def start_deliveries(self, trigger_ids: Sequence[str]) -> list[StoredTrigger | None]:
        if not trigger_ids:
            return []
        keys: list[bytes] = []
        for trigger_id in trigger_ids:
            keys += [self._key(b"trigger", trigger_id), self._key(b"state", trigger_id)]
        reply = cast(list[Any], self._start_many(keys=keys))
        return [self._record(*reply[3 * i : 3 * i + 3]) for i in range(len(trigger_ids))]

    def finish_deliveries(self, outcomes: Sequence[Outcome], at_ms: int = 0) -> list[str]:
        if not outcomes:
            return []
        keys: list[bytes] = [self._due_key]
        args: list[bytes | str | int] = [at_ms]
        for trigger_id, status, error in outcomes:
            keys.append(self._key(b"state", trigger_id))
            args += [self._member(trigger_id), status or "", error or ""]
        positions = cast(list[int], self._finish_many(keys=keys, args=args))
        return [outcomes[int(p) - 1][0] for p in positions]

    # --- on the event loop ---

    def _on_loop(self) -> _AsyncScripts:
        loop = asyncio.get_running_loop()
        scripts = self._async
        if scripts is None or scripts.loop is not loop:
            # A client's connections belong to the loop they were opened on.
            client = self._given_async_client or async_client_like(self._client)
            scripts = self._async = _AsyncScripts(client, loop)
        return scripts

    async def put_many(self, records: Sequence[StoredTrigger]) -> list[tuple[StoredTrigger, bool]]:
        if not records:
            return []
        keys: list[bytes] = [self._due_key]
        args: list[bytes | str | int] = [self._retention_s]
        for record in records:
            trigger_id = record.trigger_id
            keys += [self._key(b"trigger", trigger_id), self._key(b"state", trigger_id)]
            args += [
                self._immutable(record),
                record.status,
                "" if record.due_ms is None else record.due_ms,
                self._member(record.trigger_id),
            ]
        reply = cast(list[Any], await self._on_loop().put_many(keys=keys, args=args))
        out: list[tuple[StoredTrigger, bool]] = []
        at = 0
        for record in records:
            stored = None
            if reply[at]:
                at += 1
            else:
                stored = self._record(reply[at + 1], reply[at + 2], reply[at + 3])
                at += 4
            if stored is not None:
                out.append((stored, False))
            elif record.first_status is not None:
                # New, or (as `put_if_absent`) a record that vanished meanwhile: told as new.
                out.append((record, True))
            else:
                out.append((replace(record, first_status=record.answer), True))
        return out

    async def aget(self, trigger_id: str) -> StoredTrigger | None:
        async with self._on_loop().client.pipeline(transaction=False) as pipe:
            pipe.get(self._key(b"trigger", trigger_id))
            pipe.hmget(self._key(b"state", trigger_id), ["status", "error"])
            raw, (status, error) = await pipe.execute()
        return self._record(raw, status, error)

    async def atransition(
        self,
        trigger_id: str,
        allowed: Collection[Status],
        to: Status,
        error: str | None = None,
    ) -> tuple[StoredTrigger | None, bool]:
        scripts = self._on_loop()
        state_key = self._key(b"state", trigger_id)
        # One round trip: the script, then the record as the script left it.
        async with scripts.client.pipeline(transaction=False) as pipe:
            args = [to, error or "", *allowed]
            await scripts.transition(keys=[state_key], args=args, client=pipe)
            pipe.get(self._key(b"trigger", trigger_id))
            pipe.hmget(state_key, ["status", "error"])
            changed, raw, (status, error_text) = await pipe.execute()
        return self._record(raw, status, error_text), bool(changed)

    async def afinish(self, trigger_id: str) -> None:
        await self._on_loop().client.zrem(self._due_key, self._member(trigger_id))

    async def adiscard_many(self, trigger_ids: Sequence[str]) -> None:
        if not trigger_ids:
            return
        keys = [self._key(kind, t) for t in trigger_ids for kind in (b"trigger", b"state")]
        async with self._on_loop().client.pipeline(transaction=True) as pipe:
            pipe.delete(*keys)
            pipe.zrem(self._due_key, *(self._member(t) for t in trigger_ids))
            await pipe.execute()

    async def arecord_event(
        self, trigger_id: str, event: Engagement, at_ms: int
    ) -> tuple[StoredTrigger | None, list[Engagement]]:
        scripts = self._on_loop()
        state_key = self._key(b"state", trigger_id)
        async with scripts.client.pipeline(transaction=False) as pipe:
            await scripts.record_event(keys=[state_key], args=[at_ms, *_implied(event)],
                                       client=pipe)
            pipe.get(self._key(b"trigger", trigger_id))
            pipe.hmget(state_key, ["status", "error"])
            reply, raw, (status, error) = await pipe.execute()
        record = self._record(raw, status, error)
        recorded = [cast(Engagement, _text(name)) for name in cast(list[Any], reply)[1:]]
        return record, recorded if record is not None else []

    async def aevents(self, trigger_id: str) -> dict[str, int]:
        fields = cast(dict[bytes, bytes],
                      await self._on_loop().client.hgetall(self._key(b"state", trigger_id)))
        return {
            name[3:]: int(at) for raw, at in fields.items()
            if (name := _text(raw)) is not None and name.startswith("at:")
        }

    async def aclose(self) -> None:
        scripts, self._async = self._async, None
        if scripts is not None and scripts.client is not self._given_async_client:
            await scripts.client.aclose()

    def _record(
        self, raw: bytes | None, status: bytes | None, error: bytes | None
    ) -> StoredTrigger | None:
        status_text = _text(status)
        if raw is None or status_text not in STATUSES:
            return None
        data = _loads(raw)
        first = data.get("first_status")
        return StoredTrigger(
            trigger_id=data["trigger_id"],
            status=cast(Status, status_text),
            received_at=ms_to_datetime(int(data["received_at_ms"])),
            due_ms=data.get("due_ms"),
            payload=data.get("payload") or {},
            error=_text(error),
            first_status=cast(Status, first) if first in STATUSES else None,
        )

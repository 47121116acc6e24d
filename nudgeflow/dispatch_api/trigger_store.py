"""Where the reference dispatch API keeps triggers: idempotency, status, and the due queue.

    TriggerStore (protocol)
    ├── InMemoryTriggerStore   a dict and a lock: one process, forgotten on restart
    └── RedisTriggerStore      survives a restart and is shared by API instances

A stored trigger has an immutable part (id, when it was received, when it is
due, the request body, the first answer) and a mutable status:

    accepted ──► sent | failed                 (delivered at once)
    scheduled ──► accepted ──► sent | failed   (delivered when due)
    scheduled ──► cancelled

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
    <prefix>:state:<id>     hash {status, error}, same expiry
    <prefix>:due            sorted set of ids, score = due time in epoch ms

Creation, transitions and claims are Lua scripts: each is atomic in Redis.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Literal, Protocol, cast, get_args

import orjson
import redis

from nudgeflow.core.timeutil import datetime_to_ms, ms_to_datetime

__all__ = [
    "DEFAULT_RETENTION_S",
    "InMemoryTriggerStore",
    "RedisTriggerStore",
    "Status",
    "StoredTrigger",
    "TriggerStore",
    "dumps",
]

Status = Literal["accepted", "scheduled", "sent", "failed", "cancelled"]
STATUSES: Final[frozenset[str]] = frozenset(get_args(Status))
DEFAULT_RETENTION_S: Final = 30 * 86_400


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
    """Where accepted triggers are remembered; must be safe to call from many threads."""

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


class InMemoryTriggerStore:
    """A dict and a due queue guarded by a lock: one process, forgotten on restart."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, StoredTrigger] = {}
        self._due: dict[str, int] = {}

    def put_if_absent(self, record: StoredTrigger) -> tuple[StoredTrigger, bool]:
        with self._lock:
            existing = self._records.get(record.trigger_id)
            if existing is not None:
                return existing, False
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

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)


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

_CLAIM: Final = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "surrogatepass") if isinstance(value, bytes) else value


class RedisTriggerStore:
    """Triggers in Redis: idempotent across API restarts and API instances.

    `client` must not decode responses (the default of `redis.Redis`).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "nudgeflow:dispatch",
        retention_s: int = DEFAULT_RETENTION_S,
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

    def put_if_absent(self, record: StoredTrigger) -> tuple[StoredTrigger, bool]:
        immutable = dumps(
            {
                "trigger_id": record.trigger_id,
                "received_at_ms": datetime_to_ms(record.received_at),
                "due_ms": record.due_ms,
                "payload": record.payload,
                "first_status": record.answer,
            }
        )
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

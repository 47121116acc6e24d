"""The body of a collector call -> one item per event it carries, each decided on its own.

No I/O: `parse_call(endpoint, body, ndjson=…)` reads a request body as the
endpoint defines it and decodes every event with the flow's own decoder
(`nudgeflow.core.events.decode_object` / `decode_event`), so the collector
accepts exactly what the flow would apply and rejects, with the same reason,
what the flow would dead-letter.

    endpoint   body                                              item kinds
    track      one Segment track call (`type` implied)          Event | Refused
    page       one Segment page call (`type` implied)           Event | Refused
    identify   one Segment identify call (`type` implied)       ProfileUpdate | Refused
    batch      {"batch": [calls with `type`], "context"?: …}   any of the above
               or one call with its `type` (webhooks)
    events     one canonical event, a JSON array, or NDJSON     Event | Refused

A body that cannot be read at all is one `Refused` item (index 0) with the
whole body as its raw bytes: it is dead-lettered like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from nudgeflow.collect.identify import ProfileUpdate, profile_update
from nudgeflow.core.events import Event, Rejection, decode_event, decode_object

__all__ = ["ENDPOINTS", "Endpoint", "Item", "ParsedCall", "Refused", "parse_call"]

Endpoint = Literal["track", "page", "identify", "batch", "events"]
ENDPOINTS: Final[tuple[Endpoint, ...]] = ("track", "page", "identify", "batch", "events")
SEGMENT_CALLS: Final = ("track", "page", "identify")

# Why an item was refused, as a metric label (the reason itself is free text).
RefusalKind = Literal["invalid_json", "invalid_event", "unsupported_call", "invalid_profile"]


@dataclass(frozen=True, slots=True)
class Refused:
    """An item that is not an event we take: why, and the bytes the dead letter keeps."""

    reason: str
    raw: bytes
    kind: RefusalKind


Item = Event | ProfileUpdate | Refused


@dataclass(frozen=True, slots=True)
class ParsedCall:
    """Every item of a call in order, and the write key the body carried (Segment's `writeKey`)."""

    items: list[Item]
    body_write_key: str | None = None


def parse_call(endpoint: Endpoint, body: bytes, *, ndjson: bool = False) -> ParsedCall:
    """Read `body` as `endpoint` defines it. Never raises on bad input."""
    if endpoint == "events":
        return ParsedCall(_events(body, ndjson=ndjson))
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ParsedCall([_unreadable(body)])
    if type(data) is not dict:
        return ParsedCall([_event_of(decode_object(data), body)])
    write_key = data.get("writeKey")
    key = write_key if isinstance(write_key, str) else None
    if endpoint == "batch":
        return ParsedCall(_batch(data, body), key)
    call = data if "type" in data else {**data, "type": endpoint}
    if call["type"] != endpoint:
        reason = f"a call to /v1/{endpoint} must have type {endpoint!r} (got {call['type']!r})"
        return ParsedCall([Refused(reason, body, "unsupported_call")], key)
    return ParsedCall([_segment(call, body)], key)


def _events(body: bytes, *, ndjson: bool) -> list[Item]:
    if not ndjson:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            lines = [line for line in body.splitlines() if line.strip()]
            if len(lines) < 2:
                return [_unreadable(body)]
            return _lines(lines)  # a JSON parse that stops at a line end: NDJSON sent as JSON
        if type(data) is list:
            return [_event_of(decode_object(item), _dumps(item)) for item in data]
        return [_event_of(decode_object(data), body)]
    return _lines([line for line in body.splitlines() if line.strip()])


def _lines(lines: list[bytes]) -> list[Item]:
    return [_event_of(decode_event(line), line) for line in lines]


def _event_of(decoded: Event | Rejection, raw: bytes) -> Item:
    if isinstance(decoded, Event):
        return decoded
    kind: RefusalKind = "invalid_json" if decoded.reason.startswith(("not valid", "not a JSON")) \
        else "invalid_event"
    return Refused(decoded.reason, raw, kind)


def _batch(data: dict[str, Any], body: bytes) -> list[Item]:
    if "batch" not in data and "type" in data:
        return [_segment(data, body)]  # one call, as Segment's webhook destination posts it
    calls = data.get("batch")
    if type(calls) is not list:
        reason = "a batch is an object with a 'batch' array of calls (or one call with a 'type')"
        return [Refused(reason, body, "invalid_json")]
    context = data.get("context")
    items: list[Item] = []
    for call in calls:
        if type(call) is not dict:
            items.append(_event_of(decode_object(call), _dumps(call)))
            continue
        if isinstance(context, dict) and "context" not in call:
            # the batch's context is every call's default
            items.append(_segment({**call, "context": context}, _dumps(call)))
        else:
            items.append(_segment(call, _dumps(call)))
    return items


def _segment(call: dict[str, Any], raw: bytes) -> Item:
    kind = call.get("type")
    if kind == "identify":
        update = profile_update(call)
        return update if isinstance(update, ProfileUpdate) else Refused(
            update, raw, "invalid_profile"
        )
    if kind not in SEGMENT_CALLS:
        reason = f"unsupported call type {kind!r} (supported: {', '.join(SEGMENT_CALLS)})"
        return Refused(reason, raw, "unsupported_call")
    if "messageId" not in call:  # else `decode_object` would read it as a canonical event
        call = {**call, "messageId": None}
    decoded = decode_object(call)
    if isinstance(decoded, Event):
        return decoded
    kind_of: RefusalKind = (
        "unsupported_call" if decoded.reason.startswith("unsupported") else "invalid_event"
    )
    return Refused(decoded.reason, raw, kind_of)


def _unreadable(body: bytes) -> Refused:
    decoded = decode_event(body)
    reason = decoded.reason if isinstance(decoded, Rejection) else "not valid JSON"
    return Refused(reason, body, "invalid_json")


def _dumps(item: Any) -> bytes:
    return orjson.dumps(item)

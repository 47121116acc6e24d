"""The behavioral event of EVENTS.md §1: its model, and decoding raw bytes into it.

`decode_event(raw)` never raises on bad input: it returns an `Event` or a
`Rejection` whose `reason` a person can act on. Rejections travel on as data to
the dead letters with the original bytes (see `nudgeflow.dead_letters`).

Two paths decide, and they agree by construction:

- the fast path (`_fast_event`) checks the orjson-decoded object with plain
  Python and accepts only what the pydantic model `_EventModel` accepts, with
  the same values; whatever it is not sure of it hands on, it never rejects;
- the model (`_EventModel`, strict pydantic) decides everything else and words
  the reasons of rejections. tests/unit/test_events.py checks the two agree.

`Event` itself is an immutable named tuple of the model's fields (a pydantic
model costs more to build than the whole fast path, and ~1 KB more per event):
the same attributes as the model, plus `qty`, `model_fields`, `model_validate`
and `model_dump`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, ClassVar, Final, Literal, NamedTuple

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from nudgeflow.core.normalize import from_segment, is_segment
from nudgeflow.core.timeutil import datetime_to_ms

EventType = Literal[
    "page_view", "add_to_cart", "remove_from_cart", "checkout_started", "purchase", "page_leave"
]
PageType = Literal["product", "pricing", "category", "home", "cart", "checkout", "content", "other"]

EVENT_TYPES: Final = frozenset(EventType.__args__)  # type: ignore[attr-defined]
PAGE_TYPES: Final = frozenset(PageType.__args__)  # type: ignore[attr-defined]
PAGE_EVENT_TYPES: Final = frozenset({"page_view", "page_leave"})
CART_EVENT_TYPES: Final = frozenset({"add_to_cart", "remove_from_cart"})

# RFC 3339 date-time with a mandatory `T` and a mandatory offset; fraction optional.
# ASCII digits only, and the whole string (`fullmatch`: `$` would let a trailing
# newline through).
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.ASCII
)
# Epoch ms outside datetime's years 1..9999 cannot be written back as `fired_at`.
_MIN_MS: Final = -62_135_596_800_000
_MAX_MS: Final = 253_402_300_799_999


def parse_ts(value: object) -> int:
    """An event's `ts` as epoch milliseconds UTC.

    Accepts a JSON integer (epoch ms) or an RFC 3339 string with `T` and an offset.
    Rejects floats, booleans, numeric strings, naive times and impossible dates.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        msg = "must be an RFC 3339 string or integer epoch milliseconds"
        raise ValueError(msg)  # pydantic reports ValueError as a field error
    if isinstance(value, int):
        if not _MIN_MS <= value <= _MAX_MS:
            msg = "epoch milliseconds out of range"
            raise ValueError(msg)
        return value
    match = _RFC3339.fullmatch(value)
    if match is None:
        msg = "must be RFC 3339 with 'T' and an offset ('Z' or ±HH:MM), e.g. 2026-03-01T10:00:00Z"
        raise ValueError(msg)
    offset = match.group(8)
    if offset != "Z" and (int(offset[1:3]) > 23 or int(offset[4:6]) > 59):
        msg = f"impossible offset {offset}"
        raise ValueError(msg)
    fraction = (match.group(7) or "")[1:7].ljust(6, "0") if match.group(7) else "000000"
    text = value[: match.start(7)] if match.group(7) else value[: match.start(8)]
    try:
        parsed = datetime.fromisoformat(f"{text}.{fraction}{'+00:00' if offset == 'Z' else offset}")
    except ValueError as exc:
        msg = f"impossible date or time ({exc})"
        raise ValueError(msg) from None
    return datetime_to_ms(parsed)


# --- the fast `ts` string: lookups instead of a regex and a datetime ----------------

_SECOND_MS: Final = {f"{second:02d}": second * 1000 for second in range(60)}
_MILLIS: Final = {f"{millis:03d}": millis for millis in range(1000)}
_MINUTE_HEAD = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:", re.ASCII)
_ZONE = re.compile(r"[+-]\d\d:\d\d", re.ASCII)
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()
_CACHE_LIMIT: Final = 4096
# "2026-03-01T10:15:" -> epoch ms of that minute read as UTC; only valid heads.
_minute_ms: dict[str, int] = {}
# "+02:00" -> 7_200_000 (ms to subtract); only valid offsets.
_zone_ms: dict[str, int] = {"Z": 0}


def _minute_of(head: str) -> int | None:
    if _MINUTE_HEAD.fullmatch(head) is None:
        return None
    hour, minute = int(head[11:13]), int(head[14:16])
    if hour > 23 or minute > 59:
        return None
    try:
        day = date.fromisoformat(head[:10]).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        return None
    if len(_minute_ms) >= _CACHE_LIMIT:
        _minute_ms.clear()
    ms = _minute_ms[head] = day * 86_400_000 + hour * 3_600_000 + minute * 60_000
    return ms


def _zone_of(zone: str) -> int | None:
    ms = _zone_ms.get(zone)
    if ms is not None:
        return ms
    if _ZONE.fullmatch(zone) is None:
        return None
    hours, minutes = int(zone[1:3]), int(zone[4:6])
    if hours > 23 or minutes > 59:
        return None
    ms = (hours * 60 + minutes) * 60_000 * (-1 if zone[0] == "-" else 1)
    if len(_zone_ms) >= _CACHE_LIMIT:
        _zone_ms.clear()
        _zone_ms["Z"] = 0
    _zone_ms[zone] = ms
    return ms


def _string_ts(value: str) -> int | None:
    """`parse_ts(value)` for a string, or None where it would raise."""
    head = value[:17]
    minute = _minute_ms.get(head)
    if minute is None:
        minute = _minute_of(head)
    second = _SECOND_MS.get(value[17:19])
    if minute is not None and second is not None:
        size = len(value)
        millis: int | None = 0
        zone: int | None = None
        if size == 24 and value[19] == "." and value[23] == "Z":  # ...:SS.mmmZ
            millis, zone = _MILLIS.get(value[20:23]), 0
        elif size == 29 and value[19] == ".":  # ...:SS.mmm+HH:MM
            millis, zone = _MILLIS.get(value[20:23]), _zone_of(value[23:])
        elif size in {20, 25}:  # ...:SSZ, ...:SS+HH:MM
            zone = _zone_of(value[19:])
        if millis is not None and zone is not None:
            return minute + second + millis - zone
    try:  # any other shape, or an invalid one: the exact parser decides
        return parse_ts(value)
    except ValueError:
        return None


# --- the model: what is an event, and why not -----------------------------------------

Ident = Annotated[StrictStr, Field(min_length=1, max_length=128)]
EventTs = Annotated[int, BeforeValidator(parse_ts)]
NonNegative = Annotated[float, Field(ge=0)]


def _number(value: object) -> object:
    # JSON numbers only: pydantic's strict float would refuse ints, lax would take "1.5".
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = "must be a number"
        raise ValueError(msg)
    return float(value)


Number = Annotated[NonNegative, BeforeValidator(_number)]


class _EventModel(BaseModel):
    """The rules of EVENTS.md §1 as a strict pydantic model: the reference, and the reasons."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    event_id: Ident
    user_id: Ident
    type: EventType
    ts: EventTs
    session_id: StrictStr | None = None
    page_type: PageType | None = None
    url: StrictStr | None = None
    product_id: StrictStr | None = None
    quantity: Annotated[StrictInt, Field(ge=1)] | None = None
    price: Number | None = None
    order_id: StrictStr | None = None
    value: Number | None = None
    dwell_ms: Annotated[StrictInt, Field(ge=0)] | None = None
    properties: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _type_rules(self) -> _EventModel:
        kind = self.type
        if kind in PAGE_EVENT_TYPES and self.page_type is None:
            object.__setattr__(self, "page_type", "other")
        needs_product = kind in CART_EVENT_TYPES or (
            kind == "page_view" and self.page_type == "product"
        )
        if needs_product and self.product_id is None:
            what = "page_view of a product page" if kind == "page_view" else kind
            msg = f"missing field 'product_id' (required for {what})"
            raise ValueError(msg)
        if kind == "page_leave" and self.dwell_ms is None:
            msg = "missing field 'dwell_ms' (required for page_leave)"
            raise ValueError(msg)
        if kind in CART_EVENT_TYPES and self.quantity is None:
            object.__setattr__(self, "quantity", 1)
        return self


class _EventFields(NamedTuple):
    """The fields of `_EventModel`, in its order, as an immutable record."""

    event_id: str
    user_id: str
    type: EventType
    ts: int
    session_id: str | None
    page_type: PageType | None
    url: str | None
    product_id: str | None
    quantity: int | None
    price: float | None
    order_id: str | None
    value: float | None
    dwell_ms: int | None
    properties: dict[str, Any] | None


_FIELDS: Final = _EventFields._fields
assert tuple(_EventModel.model_fields) == _FIELDS  # the model and the record agree
_new_tuple = tuple.__new__


class Event(_EventFields):
    """One behavioral event, validated and normalised (ts as UTC epoch ms).

    Immutable and cheap: a named tuple of the model's fields (built in one C call
    by the fast path), with the model's `model_fields`, `model_validate` and
    `model_dump`. `Event(**fields)` and `Event.model_validate(data)` validate like
    the model and raise pydantic's `ValidationError`; `decode_event` is the way in
    from bytes.
    """

    __slots__ = ()

    model_fields: ClassVar[dict[str, FieldInfo]] = _EventModel.model_fields

    def __new__(cls, **fields: Any) -> Event:
        return cls.model_validate(fields)

    @classmethod
    def model_validate(cls, data: Any) -> Event:
        if isinstance(data, Event):
            return data
        return _from_model(_EventModel.model_validate(data))

    def model_dump(self) -> dict[str, Any]:
        return dict(zip(_FIELDS, self, strict=True))

    @property
    def qty(self) -> int:
        return self.quantity if self.quantity is not None else 1

    def __reduce__(self) -> tuple[Any, ...]:
        return (_event, (tuple(self),))


def _event(values: tuple[Any, ...]) -> Event:
    """An `Event` of already validated values, in `_FIELDS` order (and for pickle)."""
    return _new_tuple(Event, values)


def _from_model(model: _EventModel) -> Event:
    return _new_tuple(Event, tuple(getattr(model, name) for name in _FIELDS))


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why some bytes are not an event. Travels to the dead letters with those bytes."""

    reason: str


def decode_event(raw: bytes | str) -> Event | Rejection:
    """Bytes of one message (or one replay line) -> an `Event`, or a `Rejection` saying why not."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection(_json_reason(raw, exc))
    return decode_object(data)


def decode_object(data: object) -> Event | Rejection:
    """One decoded JSON value -> an `Event`, or a `Rejection`: `decode_event` after the parse.

    The one decoder of the flow and the collector (`nudgeflow.collect`): a Segment
    call is normalised (`nudgeflow.core.normalize`), then validated like any event.
    """
    if type(data) is not dict:
        return Rejection(f"not a JSON object (got {_json_kind(data)})")
    if "event_id" not in data and is_segment(data):
        normalised = from_segment(data)
        if isinstance(normalised, str):
            return Rejection(normalised)
        data = normalised
    event = _fast_event(data)
    return event if event is not None else _model_event(data)


def encode_event(event: Event) -> bytes:
    """The canonical JSON of an event (EVENTS.md §1, `ts` in epoch ms): what the collector writes.

    `decode_event(encode_event(event)) == event`: absent fields are left out, defaults
    (`page_type`, `quantity`) written as decided.
    """
    return orjson.dumps({
        name: value for name, value in zip(_FIELDS, event, strict=True) if value is not None
    })


def validate_event(data: dict[str, Any]) -> Event | Rejection:
    """A decoded JSON object -> an `Event`, or a `Rejection`. `null` means absent."""
    event = _fast_event(data)
    return event if event is not None else _model_event(data)


def _model_event(data: dict[str, Any]) -> Event | Rejection:
    cleaned = {key: value for key, value in data.items() if value is not None}
    try:
        return _from_model(_EventModel.model_validate(cleaned))
    except ValidationError as exc:
        return Rejection(_validation_reason(exc.errors(include_url=False)))


def _fast_event(data: dict[str, Any]) -> Event | None:
    """The `Event` the model would make of `data`, or None: then the model decides.

    Only ever accepts what `_EventModel` accepts, with the same values (`null` is
    absent, exact types: no bools for numbers, no floats for integers).
    """
    get = data.get
    event_id = get("event_id")
    user_id = get("user_id")
    kind = get("type")
    if (
        type(event_id) is not str
        or type(user_id) is not str
        or type(kind) is not str
        or not 0 < len(event_id) <= 128
        or not 0 < len(user_id) <= 128
        or kind not in EVENT_TYPES
    ):
        return None
    ts = get("ts")
    if type(ts) is int:
        if not _MIN_MS <= ts <= _MAX_MS:
            return None
    elif type(ts) is str:
        ts = _string_ts(ts)
        if ts is None:
            return None
    else:
        return None
    session_id = get("session_id")
    url = get("url")
    product_id = get("product_id")
    order_id = get("order_id")
    if (
        (session_id is not None and type(session_id) is not str)
        or (url is not None and type(url) is not str)
        or (product_id is not None and type(product_id) is not str)
        or (order_id is not None and type(order_id) is not str)
    ):
        return None
    page_type = get("page_type")
    if page_type is None:
        if kind in PAGE_EVENT_TYPES:
            page_type = "other"
    elif type(page_type) is not str or page_type not in PAGE_TYPES:
        return None
    quantity = get("quantity")
    if quantity is None:
        if kind in CART_EVENT_TYPES:
            quantity = 1
    elif type(quantity) is not int or quantity < 1:
        return None
    dwell_ms = get("dwell_ms")
    if dwell_ms is None:
        if kind == "page_leave":
            return None
    elif type(dwell_ms) is not int or dwell_ms < 0:
        return None
    price = get("price")
    if price is not None:
        if type(price) is int and price >= 0:
            price = float(price)
        elif type(price) is not float or not price >= 0:
            return None
    value = get("value")
    if value is not None:
        if type(value) is int and value >= 0:
            value = float(value)
        elif type(value) is not float or not value >= 0:
            return None
    properties = get("properties")
    if properties is not None and type(properties) is not dict:
        return None
    if product_id is None and (
        kind in CART_EVENT_TYPES or (kind == "page_view" and page_type == "product")
    ):
        return None
    return _new_tuple(Event, (
        event_id, user_id, kind, ts, session_id, page_type, url, product_id,
        quantity, price, order_id, value, dwell_ms, properties,
    ))


def _json_reason(raw: bytes | str, exc: orjson.JSONDecodeError) -> str:
    if isinstance(raw, bytes):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "not valid UTF-8"
    return f"not valid JSON: {exc}"


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


def _validation_reason(errors: list[ErrorDetails]) -> str:
    parts = []
    for error in errors:
        loc = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
        field = loc[0] if loc else ""
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            parts.append(f"missing field '{field}'")
        elif field:
            parts.append(f"field '{'.'.join(loc)}': {message}")
        else:
            parts.append(message)
    return "; ".join(parts)

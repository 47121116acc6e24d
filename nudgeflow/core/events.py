"""The behavioral event of EVENTS.md §1: its model, and decoding raw bytes into it.

`decode_event(raw)` never raises on bad input: it returns an `Event` or a
`Rejection` whose `reason` a person can act on. Rejections travel on as data to
the dead letters with the original bytes (see `nudgeflow.dead_letters`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, Literal

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
from pydantic_core import ErrorDetails

from nudgeflow.core.normalize import from_segment, is_segment
from nudgeflow.core.timeutil import datetime_to_ms

EventType = Literal[
    "page_view", "add_to_cart", "remove_from_cart", "checkout_started", "purchase", "page_leave"
]
PageType = Literal["product", "pricing", "category", "home", "cart", "checkout", "content", "other"]

EVENT_TYPES: Final = frozenset(EventType.__args__)  # type: ignore[attr-defined]
PAGE_EVENT_TYPES: Final = frozenset({"page_view", "page_leave"})
CART_EVENT_TYPES: Final = frozenset({"add_to_cart", "remove_from_cart"})

# RFC 3339 date-time with a mandatory `T` and a mandatory offset; fraction optional.
_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$"
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
    match = _RFC3339.match(value)
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


class Event(BaseModel):
    """One behavioral event, validated and normalised (ts as UTC epoch ms)."""

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
    def _type_rules(self) -> Event:
        kind = self.type
        if kind in PAGE_EVENT_TYPES and self.page_type is None:
            object.__setattr__(self, "page_type", "other")
        needs_product = kind in CART_EVENT_TYPES or (
            kind == "page_view" and self.page_type == "product"
        )
        if needs_product and self.product_id is None:
            msg = f"missing field 'product_id' (required for {_describe(self)})"
            raise ValueError(msg)
        if kind == "page_leave" and self.dwell_ms is None:
            msg = "missing field 'dwell_ms' (required for page_leave)"
            raise ValueError(msg)
        if kind in CART_EVENT_TYPES and self.quantity is None:
            object.__setattr__(self, "quantity", 1)
        return self

    @property
    def qty(self) -> int:
        return self.quantity if self.quantity is not None else 1


def _describe(event: Event) -> str:
    return "page_view of a product page" if event.type == "page_view" else event.type


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
    if not isinstance(data, dict):
        return Rejection(f"not a JSON object (got {_json_kind(data)})")
    if is_segment(data):
        normalised = from_segment(data)
        if isinstance(normalised, str):
            return Rejection(normalised)
        data = normalised
    return validate_event(data)


def validate_event(data: dict[str, Any]) -> Event | Rejection:
    """A decoded JSON object -> an `Event`, or a `Rejection`. `null` means absent."""
    cleaned = {key: value for key, value in data.items() if value is not None}
    try:
        return Event.model_validate(cleaned)
    except ValidationError as exc:
        return Rejection(_validation_reason(exc.errors(include_url=False)))


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

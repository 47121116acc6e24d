"""The event model of EVENTS.md §1: what is accepted, normalised, and why anything is refused."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from nudgeflow.core.events import Event, Rejection, decode_event

BASE: dict[str, Any] = {"event_id": "e1", "user_id": "u1", "type": "page_view", "ts": 1_000}


def decode(**fields: Any) -> Event | Rejection:
    data = {**BASE, **fields}
    return decode_event(orjson.dumps({k: v for k, v in data.items() if v is not ...}))


def reason(**fields: Any) -> str:
    result = decode(**fields)
    assert isinstance(result, Rejection), result
    return result.reason


def test_a_minimal_page_view_is_an_event_with_page_type_other() -> None:
    event = decode()
    assert isinstance(event, Event)
    assert event.page_type == "other"
    assert event.ts == 1_000


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        ("2026-03-01T10:00:00Z", 1_772_359_200_000),
        ("2026-03-01T12:00:00+02:00", 1_772_359_200_000),
        ("2026-03-01T05:30:00-04:30", 1_772_359_200_000),
        ("2026-03-01T10:00:00.250Z", 1_772_359_200_250),
        (1_772_359_200_000, 1_772_359_200_000),
    ],
)
def test_ts_is_normalised_to_utc_epoch_ms(ts: object, expected_ms: int) -> None:
    event = decode(ts=ts)
    assert isinstance(event, Event)
    assert event.ts == expected_ms


@pytest.mark.parametrize(
    ("ts", "why"),
    [
        (1.5, "RFC 3339 string or integer"),
        (True, "RFC 3339 string or integer"),
        ("1772359200000", "RFC 3339 with 'T'"),
        ("2026-03-01 10:00:00Z", "RFC 3339 with 'T'"),
        ("2026-03-01T10:00:00", "RFC 3339 with 'T'"),
        ("2026-02-30T10:00:00Z", "impossible date"),
        ("2026-03-01T24:00:00Z", "impossible date"),
        ("2026-03-01T10:00:00+25:00", "impossible offset"),
    ],
)
def test_bad_ts_is_refused_with_the_reason(ts: object, why: str) -> None:
    assert why in reason(ts=ts)


def test_missing_and_null_required_fields_are_named() -> None:
    assert reason(user_id=...) == "missing field 'user_id'"
    assert reason(event_id=None) == "missing field 'event_id'"
    assert reason(ts=None) == "missing field 'ts'"


def test_null_in_an_optional_field_means_absent() -> None:
    event = decode(url=None, session_id=None, page_type=None)
    assert isinstance(event, Event)
    assert event.url is None
    assert event.page_type == "other"


@pytest.mark.parametrize("field", ["event_id", "user_id"])
def test_ids_must_be_1_to_128_characters(field: str) -> None:
    assert "at least 1" in reason(**{field: ""})
    assert "at most 128" in reason(**{field: "x" * 129})
    assert isinstance(decode(**{field: "é" * 128}), Event)


def test_unknown_type_and_page_type_are_refused_exactly() -> None:
    assert "field 'type'" in reason(type="pageview")
    assert "field 'page_type'" in reason(page_type="Product")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"type": "add_to_cart"}, "missing field 'product_id' (required for add_to_cart)"),
        ({"type": "remove_from_cart"}, "missing field 'product_id'"),
        ({"type": "page_view", "page_type": "product"}, "product page"),
        ({"type": "page_leave"}, "missing field 'dwell_ms'"),
    ],
)
def test_fields_required_by_type(fields: dict[str, Any], needle: str) -> None:
    assert needle in reason(**fields)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"quantity": 0}, "field 'quantity'"),
        ({"quantity": 1.0}, "field 'quantity'"),
        ({"quantity": "2"}, "field 'quantity'"),
        ({"price": -1}, "field 'price'"),
        ({"price": "9.99"}, "field 'price'"),
        ({"value": -0.5}, "field 'value'"),
        ({"dwell_ms": -1}, "field 'dwell_ms'"),
        ({"dwell_ms": 10.0}, "field 'dwell_ms'"),
        ({"product_id": 7}, "field 'product_id'"),
        ({"properties": [1]}, "field 'properties'"),
        ({"session_id": 3}, "field 'session_id'"),
    ],
)
def test_field_rules_hold_on_every_type(fields: dict[str, Any], needle: str) -> None:
    # A page_view carries no cart fields normally; where present they must still be valid.
    assert needle in reason(**fields)


def test_cart_quantity_defaults_to_1_and_prices_take_ints() -> None:
    event = decode(type="add_to_cart", product_id="p1", price=3)
    assert isinstance(event, Event)
    assert (event.quantity, event.price) == (1, 3.0)


def test_unknown_fields_are_ignored() -> None:
    assert isinstance(decode(colour="red", nested={"a": 1}), Event)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"[1, 2]", "not a JSON object (got an array)"),
        (b'"text"', "not a JSON object (got a string)"),
        (b"null", "not a JSON object (got null)"),
        (b'{"event_id": "e1"', "not valid JSON"),
    ],
)
def test_bytes_that_are_not_an_object(raw: bytes, needle: str) -> None:
    result = decode_event(raw)
    assert isinstance(result, Rejection)
    assert needle in result.reason

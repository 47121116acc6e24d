"""The event model of EVENTS.md §1: what is accepted, normalised, and why anything is refused."""

from __future__ import annotations

import pickle
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nudgeflow.core import events as events_module
from nudgeflow.core.events import (
    EVENT_TYPES,
    Event,
    Rejection,
    decode_event,
    parse_ts,
    validate_event,
)

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


# --- edges of the JSON types (EVENTS.md §1, TRIGGERS.md "Values") ---------------------


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"quantity": True}, "field 'quantity'"),
        ({"dwell_ms": False}, "field 'dwell_ms'"),
        ({"price": True}, "field 'price'"),
        ({"value": False}, "field 'value'"),
        ({"ts": False}, "field 'ts'"),
        ({"event_id": True}, "field 'event_id'"),
        ({"page_type": ["product"]}, "field 'page_type'"),
        ({"type": ["page_view"]}, "field 'type'"),
        ({"properties": "a=1"}, "field 'properties'"),
        ({"url": {"href": "x"}}, "field 'url'"),
        ({"order_id": 7}, "field 'order_id'"),
    ],
)
def test_no_bools_for_numbers_and_exact_json_types(fields: dict[str, Any], needle: str) -> None:
    assert needle in reason(**fields)


@pytest.mark.parametrize(
    ("raw_value", "field"),
    [(b"1e3", "ts"), (b"1000.0", "ts"), (b"1E3", "quantity"), (b"2.0", "quantity"),
     (b"1e1", "dwell_ms"), (b"18446744073709551616", "ts")],
)
def test_json_numbers_with_a_fraction_or_exponent_are_not_integers(
    raw_value: bytes, field: str
) -> None:
    # orjson reads 1e3 (and integers beyond 64 bits) as floats: not JSON integers here.
    raw = b'{"event_id":"e1","user_id":"u1","type":"add_to_cart","product_id":"p",' + (
        b'"ts":1,' if field != "ts" else b""
    ) + b'"' + field.encode() + b'":' + raw_value + b"}"
    result = decode_event(raw)
    assert isinstance(result, Rejection), result
    assert f"field '{field}'" in result.reason


def test_prices_take_exponents_and_negative_zero() -> None:
    event = decode_event(b'{"event_id":"e1","user_id":"u1","type":"add_to_cart","ts":1,'
                         b'"product_id":"p","price":1e2,"value":-0.0}')
    assert isinstance(event, Event)
    assert (event.price, event.value) == (100.0, 0.0)
    assert isinstance(event.price, float)


@pytest.mark.parametrize(
    "ts",
    [
        "2026-03-01t10:00:00Z",  # RFC 3339 allows 't' and 'z'; the spec says "with `T`" and `Z`
        "2026-03-01T10:00:00z",
        "2026-03-01T10:00:00Z\n",  # a trailing newline is not RFC 3339 (the old `$` let it in)
        "2026-03-01T10:00:00+02:00\n",
        " 2026-03-01T10:00:00Z",
        "10000-01-01T00:00:00Z",  # beyond year 9999
        "2026-03-01T10:00:00.1234567890Z",  # more than 9 fraction digits
        "2026-03-01T10:00:00+0200",
        "2026-03-01T10:00Z",
        "\u0662\u0660\u0662\u0666-03-01T10:00:00Z",  # non-ASCII digits
        "2026-03-01T10:00:00+\u0660\u0662:00",
        "1e3",
    ],
)
def test_ts_strings_that_are_not_the_rfc_3339_of_the_spec(ts: str) -> None:
    assert "RFC 3339 with 'T'" in reason(ts=ts)


@pytest.mark.parametrize(
    ("ts", "why"),
    [
        ("0000-01-01T00:00:00Z", "impossible date"),
        ("2026-02-29T10:00:00Z", "impossible date"),
        ("2026-03-01T10:00:60Z", "impossible date"),
        ("2026-03-01T10:60:00Z", "impossible date"),
        ("2026-03-01T10:00:00-00:60", "impossible offset"),
        (253_402_300_800_000, "out of range"),
        (-62_135_596_800_001, "out of range"),
    ],
)
def test_impossible_times_and_out_of_range_epochs(ts: object, why: str) -> None:
    assert why in reason(ts=ts)


@pytest.mark.parametrize(
    ("ts", "expected_ms"),
    [
        ("2024-02-29T23:59:59.999Z", 1_709_251_199_999),
        ("2026-03-01T10:00:00.5Z", 1_772_359_200_500),
        ("2026-03-01T10:00:00.123456789Z", 1_772_359_200_123),
        ("2026-03-01T10:00:00.9999+00:00", 1_772_359_200_999),
        ("2026-03-01T10:00:00-00:00", 1_772_359_200_000),
        ("2026-03-01T10:00:00+23:59", 1_772_272_860_000),
        ("1969-12-31T23:59:59.999Z", -1),
        ("0001-01-01T00:00:00Z", -62_135_596_800_000),
        ("0001-01-01T00:00:00+01:00", -62_135_600_400_000),  # as before: not range-checked
        ("9999-12-31T23:59:59.999Z", 253_402_300_799_999),
        (-62_135_596_800_000, -62_135_596_800_000),
        (253_402_300_799_999, 253_402_300_799_999),
    ],
)
def test_ts_edges_that_are_valid(ts: object, expected_ms: int) -> None:
    event = decode(ts=ts)
    assert isinstance(event, Event), event
    assert event.ts == expected_ms
    if isinstance(ts, str):
        assert parse_ts(ts) == expected_ms


def test_surrogates_are_not_valid_json_but_pairs_are_one_character() -> None:
    lone = decode_event(b'{"event_id":"\\ud800","user_id":"u1","type":"page_view","ts":1}')
    assert isinstance(lone, Rejection)
    assert "not valid JSON" in lone.reason
    as_text = decode_event('{"event_id":"\ud800","user_id":"u1","type":"page_view","ts":1}')
    assert isinstance(as_text, Rejection)
    assert "not valid JSON" in as_text.reason
    pairs = decode_event(
        b'{"event_id":"' + b"\\ud83d\\ude00" * 128 + b'","user_id":"u1","type":"page_view","ts":1}'
    )
    assert isinstance(pairs, Event)
    assert pairs.event_id == "\U0001f600" * 128
    assert "at most 128" in reason(event_id="\U0001f600" * 129)


def test_a_segment_looking_object_with_a_list_type_is_refused_not_raised() -> None:
    result = decode_event(b'{"messageId":"m1","type":["track"],"userId":"u1"}')
    assert isinstance(result, Rejection)
    assert "field 'type'" in result.reason


def test_field_rules_hold_where_the_type_does_not_use_the_field() -> None:
    event = decode(type="purchase", page_type="cart", quantity=3, dwell_ms=0)
    assert isinstance(event, Event)
    assert (event.page_type, event.quantity, event.dwell_ms) == ("cart", 3, 0)
    assert "field 'page_type'" in reason(type="purchase", page_type="Cart")


# --- the Event: what the rest of the code uses of it ----------------------------------


def test_an_event_is_immutable_and_pickles() -> None:
    event = decode(type="add_to_cart", product_id="p1", properties={"size": "M"})
    assert isinstance(event, Event)
    with pytest.raises(AttributeError):
        event.ts = 5  # type: ignore[misc]
    copy = pickle.loads(pickle.dumps(event))
    assert type(copy) is Event
    assert copy == event
    assert copy.qty == 1


def test_event_keeps_the_model_interface() -> None:
    assert list(Event.model_fields) == [
        "event_id", "user_id", "type", "ts", "session_id", "page_type", "url", "product_id",
        "quantity", "price", "order_id", "value", "dwell_ms", "properties",
    ]
    event = Event.model_validate({**BASE, "type": "page_leave", "dwell_ms": 5})
    assert isinstance(event, Event)
    assert (event.page_type, event.dwell_ms) == ("other", 5)
    assert Event(**BASE) == decode()
    assert event.model_dump()["dwell_ms"] == 5
    with pytest.raises(ValidationError):
        Event.model_validate({**BASE, "quantity": 1.0})


# --- the fast path against the model it stands in for ----------------------------------

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 3), st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "x", "p1", "x" * 128, "x" * 129, "é" * 128, "\U0001f600" * 129]),
    st.sampled_from(sorted(EVENT_TYPES | {"pageview", "Page_View"})),
    st.sampled_from(["product", "pricing", "other", "Product"]),
)
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=2),
                    st.dictionaries(st.text(max_size=2), _SCALARS, max_size=2))


@st.composite
def _rfc3339ish(draw: st.DrawFn) -> str:
    two = st.sampled_from(["00", "01", "09", "12", "23", "24", "28", "29", "30", "31", "59", "60"])
    year = draw(st.sampled_from(["2026", "2024", "1969", "0001", "9999", "0000", "10000"]))
    fraction = draw(st.one_of(st.just(""), st.text("0123456789", max_size=10).map(".{}".format)))
    zone = draw(st.one_of(
        st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+0100", "Z\n", "+05:45"]),
        st.tuples(st.sampled_from("+-"), two, two).map(lambda t: f"{t[0]}{t[1]}:{t[2]}"),
    ))
    sep = draw(st.sampled_from(["T", "T", "t", " "]))
    return (f"{year}-{draw(two)}-{draw(two)}{sep}{draw(two)}:{draw(two)}:{draw(two)}"
            f"{fraction}{zone}")


_TS = st.one_of(st.integers(-63_000_000_000_000, 254_000_000_000_000), _rfc3339ish(), _VALUES)
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    **{name: _VALUES for name in Event.model_fields},
    "ts": _TS,
    "quantity": st.one_of(st.integers(-1, 3), _VALUES),
    "dwell_ms": st.one_of(st.integers(-1, 3), _VALUES),
    "product_id": st.one_of(st.just("p1"), _VALUES),
    "unknown": _VALUES,
}
_BASES = [
    BASE,
    {**BASE, "type": "add_to_cart", "product_id": "p1", "quantity": 2, "price": 1.5},
    {**BASE, "type": "page_leave", "page_type": "product", "product_id": "p", "dwell_ms": 9},
    {**BASE, "type": "purchase", "order_id": "o1", "value": 10, "ts": "2026-03-01T10:00:00Z"},
]


@st.composite
def _objects(draw: st.DrawFn) -> dict[str, Any]:
    data = dict(draw(st.sampled_from(_BASES)))
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(sorted(_FIELD_VALUES)))
        if draw(st.integers(0, 4)) == 0:
            data.pop(name, None)
        else:
            data[name] = draw(_FIELD_VALUES[name])
    return data


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_objects())
def test_the_fast_path_accepts_exactly_what_the_model_accepts(data: dict[str, Any]) -> None:
    by_model = events_module._model_event(data)
    fast = events_module._fast_event(data)
    result = validate_event(data)
    if isinstance(by_model, Rejection):
        assert fast is None
        assert result == by_model
        return
    assert isinstance(result, Event)
    for name in Event.model_fields:
        assert _same(getattr(result, name), getattr(by_model, name)), name
    if fast is not None:
        assert all(_same(x, y) for x, y in zip(fast, by_model, strict=True))


@settings(max_examples=1500, deadline=None)
@given(st.one_of(_rfc3339ish(), st.text(max_size=30)))
def test_the_fast_ts_parser_equals_parse_ts(text: str) -> None:
    try:
        expected: int | None = parse_ts(text)
    except ValueError:
        expected = None
    assert events_module._string_ts(text) == expected


def test_the_decode_bench_runs_on_a_small_sample() -> None:
    from nudgeflow.bench.decode import measure, render, sample_lines

    lines = sample_lines(400)
    result = measure(lines, decode_event, runs=1)
    rejected = sum(isinstance(decode_event(raw), Rejection) for raw in lines)
    assert (result["lines"], result["invalid"]) == (400, rejected)
    assert result["valid"] == 400 - rejected
    assert "decode_event, valid events" in render(result)

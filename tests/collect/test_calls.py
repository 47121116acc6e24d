"""Reading collector calls: every item decided by the flow's decoder, each with its own reason."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nudgeflow.collect.calls import Refused, parse_call
from nudgeflow.collect.identify import ProfileUpdate
from nudgeflow.core.events import Event, decode_event, encode_event

TS = "2026-03-01T10:00:00.000Z"


def canonical(event_id: str = "e1", **fields: Any) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": "u1", "type": "page_view", "ts": TS, **fields}


def test_a_track_call_without_type_is_read_as_track_and_normalised() -> None:
    body = orjson.dumps({"messageId": "m1", "userId": "u1", "timestamp": TS,
                         "event": "Product Added", "properties": {"product_id": "p1"}})
    [event] = parse_call("track", body).items
    assert isinstance(event, Event)
    assert (event.event_id, event.type, event.product_id, event.quantity) == (
        "m1", "add_to_cart", "p1", 1)


def test_a_page_call_becomes_a_page_view() -> None:
    body = orjson.dumps({"messageId": "m1", "anonymousId": "a1", "timestamp": TS,
                         "name": "Pricing"})
    [event] = parse_call("page", body).items
    assert isinstance(event, Event)
    assert (event.user_id, event.type, event.page_type) == ("a1", "page_view", "pricing")


def test_the_collector_accepts_what_the_flow_decodes_the_same_way() -> None:
    raw = orjson.dumps(canonical(type="add_to_cart", product_id="p1", price=2))
    [event] = parse_call("events", raw).items
    assert event == decode_event(raw)
    assert isinstance(event, Event)
    assert decode_event(encode_event(event)) == event  # what Kafka gets decodes to the same


def test_a_track_call_without_message_id_is_refused_with_that_reason() -> None:
    body = orjson.dumps({"userId": "u1", "timestamp": TS, "event": "Checkout Started"})
    [item] = parse_call("track", body).items
    assert isinstance(item, Refused)
    assert "messageId" in item.reason


def test_a_call_of_another_type_on_a_typed_endpoint_is_refused() -> None:
    body = orjson.dumps({"type": "page", "messageId": "m1", "userId": "u1", "timestamp": TS})
    [item] = parse_call("track", body).items
    assert isinstance(item, Refused)
    assert item.kind == "unsupported_call"
    assert item.reason == "a call to /v1/track must have type 'track' (got 'page')"


def test_a_batch_gives_each_call_its_own_outcome_and_reason() -> None:
    calls = [
        {"type": "track", "messageId": "m1", "userId": "u1", "timestamp": TS,
         "event": "Checkout Started"},
        {"type": "screen", "messageId": "m2", "userId": "u1", "timestamp": TS},
        {"type": "track", "messageId": "m3", "userId": "u1", "timestamp": TS,
         "event": "Coupon Applied"},
        {"type": "identify", "userId": "u1", "traits": {"segment": "vip"}},
        {"type": "track", "messageId": "m5", "userId": "u1", "timestamp": "yesterday",
         "event": "Checkout Started"},
        "not a call",
    ]
    parsed = parse_call("batch", orjson.dumps({"batch": calls, "writeKey": "k"}))
    assert parsed.body_write_key == "k"
    first, screen, coupon, identify, bad_ts, text = parsed.items
    assert isinstance(first, Event)
    assert isinstance(screen, Refused)
    assert "unsupported call type 'screen'" in screen.reason
    assert isinstance(coupon, Refused)
    assert "unsupported Segment track event 'Coupon Applied'" in coupon.reason
    assert identify == ProfileUpdate("u1", {"segment": "vip"})
    assert isinstance(bad_ts, Refused)
    assert "field 'ts'" in bad_ts.reason
    assert isinstance(text, Refused)
    assert text.reason == "not a JSON object (got a string)"
    assert orjson.loads(coupon.raw)["event"] == "Coupon Applied"  # the dead letter's bytes


def test_the_batch_context_gives_each_call_its_url() -> None:
    call = {"type": "page", "messageId": "m1", "userId": "u1", "timestamp": TS}
    body = orjson.dumps({"batch": [call], "context": {"page": {"url": "https://s/p"}}})
    [event] = parse_call("batch", body).items
    assert isinstance(event, Event)
    assert event.url == "https://s/p"


def test_a_batch_without_a_batch_array_is_one_refusal() -> None:
    [item] = parse_call("batch", b'{"calls": []}').items
    assert isinstance(item, Refused)
    assert "'batch' array" in item.reason


@pytest.mark.parametrize("ndjson", [True, False])
def test_ndjson_lines_are_events_each_with_its_reason(ndjson: bool) -> None:
    lines = [orjson.dumps(canonical("e1")), b"{oops", orjson.dumps(canonical("e3", type="x"))]
    items = parse_call("events", b"\n".join(lines) + b"\n", ndjson=ndjson).items
    assert isinstance(items[0], Event)
    assert isinstance(items[1], Refused)
    assert items[1].reason.startswith("not valid JSON")
    assert items[1].raw == b"{oops"
    assert isinstance(items[2], Refused)
    assert "field 'type'" in items[2].reason


def test_a_json_array_of_events_and_one_event() -> None:
    items = parse_call("events", orjson.dumps([canonical("e1"), canonical("e2", ts=1.5)])).items
    assert isinstance(items[0], Event)
    assert isinstance(items[1], Refused)
    [single] = parse_call("events", orjson.dumps(canonical("e9"))).items
    assert isinstance(single, Event)


def test_a_body_that_is_not_json_is_one_refusal_keeping_the_body() -> None:
    [item] = parse_call("track", b"\xff\xfe").items
    assert isinstance(item, Refused)
    assert (item.reason, item.raw, item.kind) == ("not valid UTF-8", b"\xff\xfe", "invalid_json")


_FIELD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**13), st.floats(allow_nan=False),
    st.sampled_from(["", "p1", "u1", "product", "page_view", "add_to_cart", "page_leave",
                     "2026-03-01T10:00:00Z", "2026-03-01T10:00:00+25:00"]),
)
_EVENTISH = st.dictionaries(
    st.sampled_from(["event_id", "user_id", "type", "ts", "page_type", "product_id",
                     "quantity", "price", "dwell_ms", "messageId", "userId", "timestamp"]),
    _FIELD_VALUES,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_EVENTISH, _FIELD_VALUES), max_size=5))
def test_each_item_is_decided_as_the_flow_decides_that_message(items: list[Any]) -> None:
    parsed = parse_call("events", orjson.dumps(items)).items
    assert len(parsed) == len(items)
    for item, outcome in zip(items, parsed, strict=True):
        flow = decode_event(orjson.dumps(item))
        if isinstance(flow, Event):
            assert outcome == flow
        else:
            assert isinstance(outcome, Refused)
            assert outcome.reason == flow.reason


def test_one_call_posted_to_batch_is_read_as_a_batch_of_one() -> None:
    """What Segment's webhook destination sends: each call, with its type, to one URL."""
    call = {"type": "page", "messageId": "m1", "userId": "u1", "timestamp": TS, "name": "cart"}
    [event] = parse_call("batch", orjson.dumps(call)).items
    assert isinstance(event, Event)
    assert event.page_type == "cart"

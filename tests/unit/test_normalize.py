"""Segment-spec calls accepted on the input topic and mapped to the canonical event."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from nudgeflow.core.events import Event, Rejection, decode_event


def segment(**fields: Any) -> Event | Rejection:
    call = {"messageId": "m1", "userId": "u1", "timestamp": "2026-03-01T10:00:00.000Z", **fields}
    return decode_event(orjson.dumps(call))


def test_product_added_becomes_add_to_cart_with_its_properties() -> None:
    event = segment(type="track", event="Product Added",
                    properties={"product_id": "p1", "quantity": 2, "price": 9.5, "brand": "x"})
    assert isinstance(event, Event)
    assert (event.event_id, event.user_id, event.type) == ("m1", "u1", "add_to_cart")
    assert (event.product_id, event.quantity, event.price) == ("p1", 2, 9.5)
    assert event.properties == {"brand": "x"}
    assert event.ts == 1_772_359_200_000


@pytest.mark.parametrize(
    ("name", "kind"),
    [("Product Viewed", "page_view"), ("Product Removed", "remove_from_cart"),
     ("Checkout Started", "checkout_started"), ("Order Completed", "purchase")],
)
def test_track_names_map_to_event_types(name: str, kind: str) -> None:
    event = segment(type="track", event=name, properties={"sku": "p1", "revenue": 20})
    assert isinstance(event, Event)
    assert event.type == kind
    if kind == "page_view":
        assert (event.page_type, event.product_id) == ("product", "p1")
    if kind == "purchase":
        assert event.value == 20.0


def test_anonymous_id_is_the_user_when_there_is_no_user_id() -> None:
    event = segment(type="page", userId=None, anonymousId="anon-7", name="Pricing")
    assert isinstance(event, Event)
    assert (event.user_id, event.type, event.page_type) == ("anon-7", "page_view", "pricing")


def test_page_calls_take_their_type_from_name_or_category_and_url_from_context() -> None:
    event = segment(type="page", name="Summer sale", category="Collection",
                    context={"page": {"url": "https://shop/c/summer"}})
    assert isinstance(event, Event)
    assert (event.page_type, event.url) == ("category", "https://shop/c/summer")
    other = segment(type="page", name="About us")
    assert isinstance(other, Event)
    assert other.page_type == "other"


def test_unsupported_track_names_and_bad_fields_are_refused_with_reasons() -> None:
    rejected = segment(type="track", event="Coupon Applied")
    assert isinstance(rejected, Rejection)
    assert "unsupported Segment track event 'Coupon Applied'" in rejected.reason
    no_product = segment(type="track", event="Product Added", properties={})
    assert isinstance(no_product, Rejection)
    assert "product_id" in no_product.reason
    naive = segment(type="page", timestamp="2026-03-01T10:00:00")
    assert isinstance(naive, Rejection)
    assert "field 'ts'" in naive.reason


def test_a_canonical_event_with_a_message_id_is_left_alone() -> None:
    event = decode_event(orjson.dumps({"event_id": "e", "user_id": "u", "type": "page_view",
                                       "ts": 5, "messageId": "m", }))
    assert isinstance(event, Event)
    assert event.event_id == "e"

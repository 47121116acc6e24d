"""A user's state is their own, though users without a cart or sends share empty stand-ins."""

from __future__ import annotations

import orjson
import pytest
from rule_texts import CART_ABANDONMENT

from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import Profile, held_profile, make_profile
from nudgeflow.core.rules import parse_rules
from nudgeflow.operators.cart import EMPTY_CART
from nudgeflow.operators.detector import Detector

RULES = "rules:" + CART_ABANDONMENT
T0 = 1_772_359_200_000
MIN = 60_000
EMAIL = Profile(segment="regular", opt_in=("email",))


def event(user: str, event_id: str, kind: str, ts: int, **fields: object) -> Event:
    decoded = decode_event(orjson.dumps(
        {"event_id": event_id, "user_id": user, "type": kind, "ts": ts, **fields}))
    assert isinstance(decoded, Event)
    return decoded


def test_one_users_cart_never_shows_in_another_users() -> None:
    detector = Detector(parse_rules(RULES))
    alice, bob = detector.new_user("alice"), detector.new_user("bob")
    detector.process(alice, event("alice", "a1", "add_to_cart", T0, product_id="p1",
                                  quantity=2, price=5.0), EMAIL)
    detector.process(bob, event("bob", "b1", "page_view", T0, page_type="home"), EMAIL)
    assert alice.cart.snapshot()["items"] == [{"product_id": "p1", "quantity": 2, "price": 5.0}]
    assert bob.cart.empty and EMPTY_CART.empty

    # emptied, alice's cart is gone; a later add starts from nothing
    detector.process(alice, event("alice", "a2", "remove_from_cart", T0 + MIN, product_id="p1",
                                  quantity=2), EMAIL)
    assert alice.cart.empty
    detector.process(alice, event("alice", "a3", "add_to_cart", T0 + 2 * MIN, product_id="p2",
                                  quantity=1, price=3.0), EMAIL)
    assert [item["product_id"] for item in alice.cart.snapshot()["items"]] == ["p2"]
    assert bob.cart.empty


def test_the_shared_empty_cart_refuses_to_change() -> None:
    with pytest.raises(TypeError):
        EMPTY_CART.add("p1", 1, None)
    with pytest.raises(TypeError):
        EMPTY_CART.clear()
    assert EMPTY_CART.empty


def test_profiles_share_their_repeated_parts_and_keep_their_values() -> None:
    one = make_profile("regular", ["email", "sms"], "Europe/Berlin", "Ada")
    two = make_profile("regular", ("email", "sms"), "Europe/Berlin", "Bo")
    assert one.opt_in is two.opt_in and one.timezone is two.timezone
    assert (one.segment, one.opt_in, one.timezone, one.name) == (
        "regular", ("email", "sms"), "Europe/Berlin", "Ada")
    assert make_profile() is make_profile("new", (), None, None)


def test_a_held_profile_keeps_what_detection_reads_and_is_shared_by_users_alike() -> None:
    detector = Detector(parse_rules(RULES))
    alice, bob = detector.new_user("alice"), detector.new_user("bob")
    ada = make_profile("vip", ["sms"], "Asia/Tokyo", "Ada")
    detector.process(alice, event("alice", "a1", "page_view", T0, page_type="home"), ada)
    detector.process(bob, event("bob", "b1", "page_view", T0, page_type="home"),
                     make_profile("vip", ["sms"], "Asia/Tokyo", "Bo"))
    assert alice.profile is bob.profile is held_profile(ada)
    assert (alice.profile.segment, alice.profile.opt_in, alice.profile.timezone) == (
        "vip", ("sms",), "Asia/Tokyo")

"""A decision carries the profile its message is rendered with, when the detector has it.

The user's held profile leaves the name out (it is shared by users alike), so
an event's decision carries the whole profile the event came with, and the
dispatch sink renders from it without a lookup; a timer's decision has none
and the renderer asks the profile store.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from rule_texts import CART_ABANDONMENT, rules_yaml

from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import Profile
from nudgeflow.core.resources import DEFAULT_TEMPLATES
from nudgeflow.core.rules import parse_rules
from nudgeflow.core.triggers import Decision
from nudgeflow.enrich.messages import MessageRenderer
from nudgeflow.enrich.profile_store import StaticProfiles
from nudgeflow.operators.detector import Detector

INTEREST = """
  - name: product_interest
    kind: count_in_window
    match: {event: page_view, where: {page_type: product}}
    scope: product_id
    window: 10m
    min_count: 2
    channels: [email]
"""
ADA = Profile(segment="regular", opt_in=("email",), name="Ada")


def event(event_id: str, kind: str, ts: int, **fields: object) -> Event:
    decoded = decode_event(orjson.dumps(
        {"event_id": event_id, "user_id": "u1", "type": kind, "ts": ts, **fields}))
    assert isinstance(decoded, Event)
    return decoded


def test_an_events_decision_carries_the_whole_profile_and_a_timers_none() -> None:
    config = parse_rules(rules_yaml(INTEREST, CART_ABANDONMENT))
    detector = Detector(config)
    user = detector.new_user("u1")
    view = {"page_type": "product", "product_id": "p1"}
    detector.process(user, event("a", "page_view", 0, **view), ADA)
    _, fired = detector.process(user, event("b", "page_view", 1000, **view), ADA)
    assert [d.trigger.trigger_type for d in fired] == ["product_interest"]
    assert fired[0].profile == ADA
    assert user.profile.name is None  # what the user's state holds

    detector.process(user, event("c", "add_to_cart", 2000, product_id="p1"), ADA)
    timers = detector.finish(user, 2000 + 16 * 60_000)
    assert [d.trigger.trigger_type for d in timers] == ["cart_abandonment"]
    assert timers[0].profile is None

    renderer = MessageRenderer.load(DEFAULT_TEMPLATES, config)
    store = StaticProfiles({"u1": Profile(segment="regular", opt_in=("email",), name="Bea")})
    render = renderer.for_profiles(store)
    assert "Ada" in _text(render(fired[0]))  # no lookup: the event's profile
    assert "Bea" in _text(render(timers[0]))  # the store's


def _text(message: dict[str, str]) -> str:
    return " ".join(message.values())


def test_the_decision_profile_is_not_part_of_its_content() -> None:
    config = parse_rules(rules_yaml(INTEREST))
    first, second = Detector(config), Detector(config)
    view = {"page_type": "product", "product_id": "p1"}
    decisions: list[Decision] = []
    for detector, profile in ((first, ADA), (second, Profile(segment="regular",
                                                             opt_in=("email",)))):
        user = detector.new_user("u1")
        detector.process(user, event("a", "page_view", 0, **view), profile)
        decisions += detector.process(user, event("b", "page_view", 1000, **view), profile)[1]
    assert decisions[0] == decisions[1]  # equal decisions whatever the name


class _CountingProfiles:
    def __init__(self, profiles: dict[str, Profile]) -> None:
        self.store = StaticProfiles(profiles)
        self.calls: list[list[str]] = []

    def lookup(self, user_ids: Iterable[str]) -> dict[str, Profile]:
        wanted = list(user_ids)
        self.calls.append(wanted)
        return self.store.lookup(wanted)


def test_a_batch_of_decisions_looks_up_the_profiles_it_lacks_at_once() -> None:
    config = parse_rules(rules_yaml(INTEREST, CART_ABANDONMENT))
    detector = Detector(config)
    fired_by_timers: list[Decision] = []
    for n in range(3):
        user = detector.new_user(f"u{n}")
        detector.process(user, event(f"c{n}", "add_to_cart", 0, product_id="p1"), ADA)
        fired_by_timers += detector.finish(user, 16 * 60_000)
    user = detector.new_user("ada")
    view = {"page_type": "product", "product_id": "p1"}
    detector.process(user, event("a", "page_view", 0, **view), ADA)
    fired_by_event = detector.process(user, event("b", "page_view", 1000, **view), ADA)[1]
    names = {f"u{n}": Profile(segment="regular", opt_in=("email",), name=f"Bea{n}")
             for n in range(3)}
    profiles = _CountingProfiles(names)
    render = MessageRenderer.load(DEFAULT_TEMPLATES, config).for_profiles(profiles)

    messages = render.many([*fired_by_timers, *fired_by_event])

    assert profiles.calls == [["u0", "u1", "u2"]]  # one lookup, only for the timers' decisions
    assert [f"Bea{n}" in _text(m) for n, m in enumerate(messages[:3])] == [True] * 3
    assert "Ada" in _text(messages[3])

"""Attribution: a purchase in (fired_at, fired_at + window] converts a measured trigger, once."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from rule_texts import CART_ABANDONMENT

from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.outcomes import Outcome, arm_of, attributed
from nudgeflow.core.policies import Policies
from nudgeflow.core.profiles import Profile
from nudgeflow.core.rules import PolicyConfig, RuleBase, RulesError, parse_rules
from nudgeflow.core.stream_clock import StreamClock
from nudgeflow.core.timeutil import format_ms
from nudgeflow.core.triggers import Decision, Trigger
from nudgeflow.operators.attribution import Attribution
from nudgeflow.operators.detector import Detector, UserState
from nudgeflow.operators.snapshot import decode, encode

T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z
SEC = 1_000
MIN = 60_000
HOUR = 3_600_000
DAY = 24 * HOUR
EMAIL = Profile(segment="regular", opt_in=("email",))
NOBODY = Profile(segment="regular", opt_in=())

READER = """
  - name: engaged_reader
    kind: threshold
    match: {event: page_leave}
    field: dwell_ms
    above: 120000
    channels: [email]
    frequency_capped: false
"""
CART = CART_ABANDONMENT


def detector(*rules: str, window: str | None = None, extra: str = "") -> Detector:
    text = "version: 1\nrules:\n" + "".join(rules)
    if window is not None:
        text = text.rstrip("\n") + f"\n    attribution_window: {window}\n"
    return Detector(parse_rules(text + extra))


_counter = iter(range(10**9))


def event(user: str, kind: str, ts: int, **fields: Any) -> Event:
    raw = orjson.dumps({"event_id": f"e{next(_counter)}", "user_id": user, "type": kind,
                        "ts": ts, **fields})
    decoded = decode_event(raw)
    assert isinstance(decoded, Event), decoded
    return decoded


def read(user: str, ts: int) -> Event:
    return event(user, "page_leave", ts, dwell_ms=200_000, url="https://shop/a")


def purchase(user: str, ts: int, value: float | None = 40.0) -> Event:
    fields = {} if value is None else {"value": value}
    return event(user, "purchase", ts, order_id="o1", **fields)


def run(det: Detector, user: UserState, events: list[Event], profile: Profile = EMAIL,
        clock: StreamClock | None = None) -> tuple[list[Decision], list[Outcome]]:
    decisions: list[Decision] = []
    outcomes: list[Outcome] = []
    for e in events:
        stream = clock.read(e.ts, None) if clock is not None else None
        _, out = det.process(user, e, profile, stream=stream)
        decisions += out
        outcomes += user.attribution.drain()
    return decisions, outcomes


@pytest.mark.parametrize(("after", "converts"), [
    (0, False),  # at fired_at: not after it
    (1, True),
    (DAY, True),  # the window's end is in it
    (DAY + 1, False),
])
def test_a_purchase_converts_a_trigger_only_inside_its_window(after: int, converts: bool) -> None:
    det = detector(READER)
    user = det.new_user("ann")
    decisions, outcomes = run(det, user, [read("ann", T0), purchase("ann", T0 + after)])
    assert [d.decision for d in decisions] == ["dispatched"]
    if converts:
        (outcome,) = outcomes
        assert outcome.trigger_id == decisions[0].trigger.trigger_id
        assert outcome.to_json() == {
            "trigger_id": decisions[0].trigger.trigger_id, "trigger_type": "engaged_reader",
            "user_id": "ann", "outcome": "converted", "ts": format_ms(T0 + after),
            "value": 40.0, "fired_at": format_ms(T0), "variant": None, "cart_recovered": None,
        }
    else:
        assert outcomes == []


def test_each_trigger_converts_once_at_its_first_purchase() -> None:
    det = detector(READER)
    user = det.new_user("ann")
    _, outcomes = run(det, user, [
        read("ann", T0), purchase("ann", T0 + MIN, 10.0), purchase("ann", T0 + 2 * MIN, 99.0),
    ])
    assert [(o.ts_ms, o.value) for o in outcomes] == [(T0 + MIN, 10.0)]


def test_one_purchase_converts_every_trigger_whose_window_holds_it() -> None:
    det = detector(READER)
    user = det.new_user("ann")
    decisions, outcomes = run(det, user, [
        read("ann", T0), read("ann", T0 + HOUR), purchase("ann", T0 + 2 * HOUR, None),
    ])
    assert len(decisions) == 2
    assert sorted(o.trigger_id for o in outcomes) == sorted(d.trigger.trigger_id
                                                            for d in decisions)
    assert all(o.value is None for o in outcomes)


def test_the_window_is_set_per_rule() -> None:
    det = detector(READER, window="1h")
    user = det.new_user("ann")
    _, outcomes = run(det, user, [read("ann", T0), purchase("ann", T0 + HOUR + 1)])
    assert outcomes == []
    other = det.new_user("bob")
    _, outcomes = run(det, other, [read("bob", T0), purchase("bob", T0 + HOUR)])
    assert len(outcomes) == 1


@pytest.mark.parametrize(("value", "problem"), [
    ("0", "attribution_window"), ("soon", "bad duration"), ("-1h", "attribution_window"),
])
def test_a_bad_attribution_window_is_refused_at_start_with_its_line(
    value: str, problem: str
) -> None:
    text = "version: 1\nrules:\n" + READER + f"    attribution_window: {value}\n"
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.yaml")
    assert "rules.yaml:11" in str(info.value)
    assert problem in str(info.value)


def test_a_purchase_applied_before_the_trigger_was_decided_still_converts_it() -> None:
    # The purchase (ts +20 s) arrives first; the page_leave (ts +10 s) is out of order
    # but within the lateness, and fires at its own ts: the purchase follows it.
    det = detector(READER)
    user = det.new_user("ann")
    decisions, outcomes = run(det, user, [
        event("ann", "page_view", T0), purchase("ann", T0 + 20 * SEC), read("ann", T0 + 10 * SEC),
    ])
    assert len(decisions) == 1
    assert [(o.trigger_id, o.ts_ms) for o in outcomes] == [
        (decisions[0].trigger.trigger_id, T0 + 20 * SEC)
    ]


def test_a_trigger_suppressed_before_the_experiment_step_gets_no_outcome() -> None:
    det = detector(READER)
    user = det.new_user("ann")
    decisions, outcomes = run(det, user, [read("ann", T0), purchase("ann", T0 + MIN)], NOBODY)
    assert [d.reason for d in decisions] == ["no_channel"]
    assert outcomes == []


def _arm_users(rule: RuleBase, count: int) -> dict[bool, str]:
    """A user in the holdout and one outside it, for `rule`'s experiment."""
    policies = Policies(PolicyConfig())
    found: dict[bool, str] = {}
    for n in range(count):
        assignment = policies.assign(rule, f"user-{n}")
        assert assignment is not None
        found.setdefault(assignment.holdout, f"user-{n}")
    assert set(found) == {True, False}
    return found


def test_holdout_triggers_get_outcomes_like_dispatched_ones() -> None:
    extra = ("    experiment: {name: reader_test, holdout: 0.5, variants: "
             "[{name: fast}, {name: slow, delay: 1h}]}\n")
    det = detector(READER + extra)
    users = _arm_users(det.logics[0].config, 50)
    results = {}
    for holdout, user_id in users.items():
        user = det.new_user(user_id)
        results[holdout] = run(det, user, [read(user_id, T0), purchase(user_id, T0 + 5 * MIN)])
    (held,), (held_outcome,) = results[True]
    assert (held.decision, held.reason) == ("suppressed", "holdout")
    assert held_outcome.variant == "holdout"
    assert held_outcome.to_json()["variant"] == "holdout"
    decisions, (outcome,) = results[False]
    assert outcome.variant in {"fast", "slow"}
    # the slow arm's delayed send was cancelled by the purchase: measured all the same
    expected = ["dispatched"] if outcome.variant == "fast" else ["suppressed"]
    assert [d.decision for d in decisions] == expected


def test_a_delayed_send_cancelled_by_the_purchase_is_converted_by_it() -> None:
    det = detector(READER + "    delay: 1h\n    cancel_delayed_on: [{event: purchase}]\n")
    user = det.new_user("ann")
    decisions, outcomes = run(det, user, [read("ann", T0), purchase("ann", T0 + 10 * MIN)])
    assert [(d.decision, d.reason) for d in decisions] == [("suppressed", "cancelled")]
    assert [o.trigger_id for o in outcomes] == [decisions[0].trigger.trigger_id]


def _cart(user: str, *later: Event) -> tuple[list[Decision], list[Outcome]]:
    det = detector(CART)
    state = det.new_user(user)
    return run(det, state, [
        event(user, "add_to_cart", T0, product_id="p1", price=20.0),
        event(user, "add_to_cart", T0 + MIN, product_id="p2", price=5.0),
        event(user, "page_view", T0 + 30 * MIN),  # the cart timer fires
        *later,
    ])


def test_a_cart_bought_after_its_reminder_is_recovered() -> None:
    decisions, outcomes = _cart("ann", purchase("ann", T0 + HOUR))
    assert [d.trigger.trigger_type for d in decisions] == ["cart_abandonment"]
    assert [o.cart_recovered for o in outcomes] == [True]


def test_a_purchase_of_other_products_converts_but_does_not_recover_the_cart() -> None:
    decisions, outcomes = _cart(
        "bob",
        event("bob", "remove_from_cart", T0 + 40 * MIN, product_id="p1"),
        event("bob", "remove_from_cart", T0 + 41 * MIN, product_id="p2"),
        event("bob", "add_to_cart", T0 + 42 * MIN, product_id="p7", price=3.0),
        purchase("bob", T0 + 43 * MIN),
    )
    assert [d.trigger.trigger_type for d in decisions] == ["cart_abandonment"]
    assert [o.cart_recovered for o in outcomes] == [False]


def test_state_is_freed_once_the_users_clock_passes_the_window() -> None:
    det = detector(READER)
    # L = 30 s: with the user's clock at F + W + L, a purchase at F + W is not late,
    # and still converts.
    ann = det.new_user("ann")
    _, outcomes = run(det, ann, [
        read("ann", T0), event("ann", "page_view", T0 + DAY + 30 * SEC), purchase("ann", T0 + DAY),
    ])
    assert len(outcomes) == 1
    # Once the clock is past that, no purchase can: the trigger is forgotten (at the
    # next prune, which runs before an event with the watermark as it stood).
    bob = det.new_user("bob")
    run(det, bob, [read("bob", T0), event("bob", "page_view", T0 + DAY + 2 * MIN)])
    assert len(bob.attribution.watching) == 1
    run(det, bob, [event("bob", "page_view", T0 + DAY + 3 * MIN)])
    assert bob.attribution.empty


def test_a_user_is_not_idle_while_a_trigger_waits_for_its_outcome() -> None:
    det = detector(READER)
    user = det.new_user("ann")
    trigger = Trigger("t1", "engaged_reader", "ann", T0, T0, "regular", {})
    user.attribution.watch(Decision(trigger, "dispatched", None, "email", T0), DAY)
    assert not det.idle(user)
    user.attribution.prune(T0 + DAY + 1)
    assert det.idle(user)


def test_a_quiet_user_is_forgotten_with_their_watched_triggers() -> None:
    # Live mode: the stream clock moves on while the user is quiet, past the horizon.
    det = detector(READER)
    user = det.new_user("ann")
    run(det, user, [read("ann", T0)], clock=StreamClock())
    assert det.horizon >= DAY + det.lateness
    det.advance(user, T0 + det.horizon - MIN, forget=True)
    assert user.attribution.watching
    det.advance(user, T0 + det.horizon + MIN, forget=True)
    assert det.idle(user)


def test_watched_triggers_survive_a_snapshot() -> None:
    det = detector(READER)
    user = det.new_user("ann")
    decisions, _ = run(det, user, [read("ann", T0), purchase("ann", T0 - 5 * SEC)])
    assert user.attribution.recent  # a purchase a later out-of-order trigger may follow
    restored, _, _ = decode(det, encode(det, user, None, None))
    assert restored.attribution.to_data() == user.attribution.to_data()
    _, outcomes = run(det, restored, [purchase("ann", T0 + HOUR)])
    assert [o.trigger_id for o in outcomes] == [decisions[0].trigger.trigger_id]


def test_the_attribution_class_alone() -> None:
    attribution = Attribution()
    trigger = Trigger("t1", "cart_abandonment", "ann", T0, T0, "regular",
                      {"items": [{"product_id": "p1"}],
                       "experiment": {"name": "x", "variant": "now", "holdout": False}})
    attribution.on_purchase(T0 + 5, 12.5, ("p1", "p2"))  # before the trigger was decided
    attribution.watch(Decision(trigger, "dispatched", None, "email", T0), HOUR)
    (outcome,) = attribution.drain()
    assert (outcome.variant, outcome.cart_recovered, outcome.value) == ("now", True, 12.5)
    assert attribution.drain() == []
    attribution.prune(T0 + 5)
    assert attribution.empty


def test_which_decisions_are_measured_and_their_arm() -> None:
    assert attributed("dispatched", None)
    assert all(attributed("suppressed", r) for r in ("holdout", "control", "cancelled"))
    assert not any(attributed("suppressed", r)
                   for r in ("duplicate", "frequency_cap", "no_channel"))
    assert arm_of({}) == ""
    assert arm_of({"experiment": {"name": "x", "variant": None, "holdout": True}}) == "holdout"
    assert arm_of({"experiment": {"name": "x", "variant": None, "holdout": False}}) == "treatment"
    assert arm_of({"experiment": {"name": "x", "variant": "b", "holdout": False}}) == "b"

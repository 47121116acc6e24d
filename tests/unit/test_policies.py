"""Response policies: dedup, frequency cap, quiet hours, channel, delay, experiments."""

from __future__ import annotations

from typing import Any

import orjson

from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.policies import Policies, PolicyState
from nudgeflow.core.profiles import Profile, profile_from_mapping
from nudgeflow.core.rules import PolicyConfig, RuleBase, parse_rules
from nudgeflow.core.timeutil import MS_PER_DAY, MS_PER_HOUR, datetime_to_ms
from nudgeflow.core.triggers import Decision, Trigger
from nudgeflow.operators.detector import Detector

T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z, a Sunday
EMAIL = Profile(segment="regular", opt_in=("email",))


def trigger(fired_at: int, trigger_id: str = "t") -> Trigger:
    return Trigger(trigger_id, "r", "u1", fired_at, fired_at, "regular", {})


def rule(**fields: Any) -> RuleBase:
    return RuleBase(name="r", **fields)


def plan(policies: Policies, state: PolicyState, fired_at: int, rule_: RuleBase,
         profile: Profile = EMAIL, trigger_id: str | None = None) -> Decision:
    t = trigger(fired_at, trigger_id or f"t{fired_at}")
    return policies.plan(t, rule_, profile, state, policies.assign(rule_, "u1")).decision


def test_frequency_cap_allows_3_per_24h_counting_the_window_inclusively() -> None:
    policies, state = Policies(PolicyConfig()), PolicyState()
    outcomes = [plan(policies, state, T0 + k * MS_PER_HOUR, rule()).reason for k in range(4)]
    assert outcomes == [None, None, None, "frequency_cap"]
    # exactly 24 h after the first dispatch, the first is still in the window
    assert plan(policies, state, T0 + MS_PER_DAY, rule()).reason == "frequency_cap"
    assert plan(policies, state, T0 + MS_PER_DAY + 1, rule()).decision == "dispatched"


def test_frequency_cap_of_10_per_7_days() -> None:
    policies, state = Policies(PolicyConfig()), PolicyState()
    reasons = [plan(policies, state, T0 + k * 9 * MS_PER_HOUR, rule()).reason for k in range(12)]
    assert reasons.count(None) == 10
    assert reasons[-1] == "frequency_cap"


def test_a_rule_can_be_exempt_from_the_cap() -> None:
    policies, state = Policies(PolicyConfig()), PolicyState()
    uncapped = rule(frequency_capped=False)
    assert all(plan(policies, state, T0 + k, uncapped).dispatched for k in range(5))


def test_the_same_trigger_id_twice_is_suppressed_as_duplicate() -> None:
    policies, state = Policies(PolicyConfig()), PolicyState()
    assert plan(policies, state, T0, rule(), trigger_id="same").dispatched
    assert plan(policies, state, T0, rule(), trigger_id="same").reason == "duplicate"


def test_channel_is_the_first_opted_in_of_the_rules_preference() -> None:
    policies, state = Policies(PolicyConfig()), PolicyState()
    prefs = rule(channels=["sms", "push", "email"])
    both = Profile(opt_in=("email", "push"))
    assert plan(policies, state, T0, prefs, both).channel == "push"
    nothing = plan(policies, state, T0 + 1, prefs, Profile(opt_in=()))
    assert (nothing.decision, nothing.reason) == ("suppressed", "no_channel")


def test_quiet_hours_defer_sms_to_0800_local_and_leave_email_alone() -> None:
    policies, state = Policies(PolicyConfig()), PolicyState()
    berlin = Profile(opt_in=("sms", "email"), timezone="Europe/Berlin")
    late_evening = T0 + 12 * MS_PER_HOUR  # 22:00 UTC = 23:00 in Berlin
    sms = plan(policies, state, late_evening, rule(channels=["sms"]), berlin)
    from datetime import UTC, datetime

    assert sms.send_at_ms == datetime_to_ms(datetime(2026, 3, 2, 7, 0, tzinfo=UTC))
    email = plan(policies, state, late_evening + 1, rule(channels=["email"]), berlin)
    assert email.send_at_ms == late_evening + 1


def test_an_unknown_timezone_falls_back_to_the_default() -> None:
    profile = profile_from_mapping({"opt_in": "push", "timezone": "Mars/Olympus"})
    decision = plan(Policies(PolicyConfig()), PolicyState(), T0 + 12 * MS_PER_HOUR,
                    rule(channels=["push"]), profile)
    assert decision.send_at_ms == T0 + 22 * MS_PER_HOUR  # 08:00 UTC next day


def test_experiment_assignment_is_stable_and_holdout_is_suppressed() -> None:
    experiment = {"name": "exp1", "holdout": 0.5,
                  "variants": [{"name": "now", "delay": "0s"}, {"name": "later", "delay": "1h"}]}
    held = rule(experiment=experiment)
    policies = Policies(PolicyConfig())
    assignments = [policies.assign(held, f"user{n}") for n in range(400)]
    assert assignments == [policies.assign(held, f"user{n}") for n in range(400)]
    holdouts = sum(1 for a in assignments if a and a.holdout)
    assert 150 < holdouts < 250
    variants = {a.variant for a in assignments if a and not a.holdout}
    assert variants == {"now", "later"}


def _event(event_id: str, kind: str, ts: int, **fields: Any) -> Event:
    event = decode_event(orjson.dumps(
        {"event_id": event_id, "user_id": "u1", "type": kind, "ts": ts, **fields}))
    assert isinstance(event, Event)
    return event


DELAYED_RULES = """
rules:
  - name: cart_abandonment
    kind: absence
    after: {event: add_to_cart}
    timeout: 15m
    cancel_on: [{event: purchase}, {cart: empty}]
    channels: [email]
    delay: 1h
    cancel_delayed_on: [{event: purchase}]
"""


def test_a_delayed_send_is_cancelled_by_a_purchase_before_it_goes_out() -> None:
    detector = Detector(parse_rules(DELAYED_RULES))
    user = detector.new_user("u1")
    minute = 60_000
    detector.process(user, _event("a", "add_to_cart", T0, product_id="p"), EMAIL)
    _, out = detector.process(user, _event("b", "page_view", T0 + 20 * minute), EMAIL)
    assert out == []  # fired, but held until its send time
    _, out = detector.process(user, _event("c", "purchase", T0 + 30 * minute), EMAIL)
    assert [(d.trigger.trigger_type, d.decision, d.reason) for d in out] == [
        ("cart_abandonment", "suppressed", "cancelled")
    ]


def test_a_delayed_send_goes_out_once_its_send_time_has_passed() -> None:
    detector = Detector(parse_rules(DELAYED_RULES))
    user = detector.new_user("u1")
    minute = 60_000
    detector.process(user, _event("a", "add_to_cart", T0, product_id="p"), EMAIL)
    _, out = detector.process(user, _event("b", "page_view", T0 + 20 * minute), EMAIL)
    assert out == []
    _, out = detector.process(user, _event("c", "page_view", T0 + 76 * minute), EMAIL)
    assert [(d.decision, d.send_at_ms) for d in out] == [("dispatched", T0 + 75 * minute)]


def test_a_delay_already_over_when_detected_sends_at_once() -> None:
    detector = Detector(parse_rules(DELAYED_RULES))
    user = detector.new_user("u1")
    minute = 60_000
    detector.process(user, _event("a", "add_to_cart", T0, product_id="p"), EMAIL)
    _, out = detector.process(user, _event("b", "page_view", T0 + 80 * minute), EMAIL)
    assert [(d.decision, d.send_at_ms) for d in out] == [("dispatched", T0 + 80 * minute)]

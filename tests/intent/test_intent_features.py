"""The intent features of one user, event by event, and their parity with the flow's."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from intent_helpers import rules_text, write_model

from nudgeflow.app.intent.dataset import FeatureRecorder, extract
from nudgeflow.app.replay import run_replay
from nudgeflow.app.samples import SampleSpec, write_sample
from nudgeflow.core.intent.features import FEATURES, HISTORY_MS, IntentState, local_hour
from nudgeflow.core.rules import parse_rules
from nudgeflow.operators import intent_logic

T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z
MIN = 60_000


def ev(kind: str, ts: int, **fields: Any) -> Any:
    base = {"type": kind, "ts": ts, "page_type": None, "product_id": None, "dwell_ms": None}
    return SimpleNamespace(**{**base, **fields})


def features(state: IntentState, ts: int, **kw: Any) -> dict[str, float]:
    args = {"cart_value": 0.0, "cart_items": 0, "zone": "UTC", "events_this_hour": 0,
            "events_today": 0, **kw}
    return dict(zip(FEATURES, state.vector(ts, **args), strict=True))


def test_a_session_counts_what_the_shopper_did() -> None:
    state = IntentState()
    for e in (ev("page_view", T0, page_type="home"),
              ev("page_view", T0 + MIN, page_type="product", product_id="a"),
              ev("page_view", T0 + 2 * MIN, page_type="product", product_id="a"),
              ev("page_view", T0 + 3 * MIN, page_type="product", product_id="b"),
              ev("page_leave", T0 + 4 * MIN, page_type="product", dwell_ms=45_500),
              ev("page_view", T0 + 5 * MIN, page_type="pricing"),
              ev("add_to_cart", T0 + 6 * MIN, product_id="a"),
              ev("remove_from_cart", T0 + 7 * MIN, product_id="a"),
              ev("checkout_started", T0 + 8 * MIN)):
        state.observe(e, 0, T0)
    f = features(state, T0 + 8 * MIN, cart_value=20.0, cart_items=1)
    assert (f["session_views"], f["session_product_views"], f["session_distinct_products"]) == (
        5, 3, 2)
    assert (f["session_cart_adds"], f["session_cart_removes"], f["session_checkouts"]) == (
        1, 1, 1)
    assert (f["session_pricing_views"], f["session_dwell_s"], f["session_events"]) == (1, 45.5, 9)
    assert (f["session_minutes"], f["cart_value"], f["cart_items"]) == (8, 20, 1)
    assert (f["past_sessions"], f["past_purchases"]) == (0, 0)
    assert (f["hours_since_purchase"], f["hours_since_last_session"]) == (-1, -1)


def test_a_new_session_starts_from_zero_and_remembers_the_last() -> None:
    state = IntentState()
    state.observe(ev("add_to_cart", T0, product_id="a"), 0, T0)
    state.observe(ev("purchase", T0 + MIN), 0, T0)
    assert state.purchased
    state.observe(ev("page_view", T0 + 61 * MIN, page_type="home"), 1, T0 + 61 * MIN)
    f = features(state, T0 + 91 * MIN)
    assert not state.purchased
    assert (f["session_cart_adds"], f["session_events"], f["session_minutes"]) == (0, 1, 30)
    assert (f["past_sessions"], f["past_purchases"]) == (1, 1)
    assert f["hours_since_purchase"] == 1.5
    assert f["hours_since_last_session"] == 1.5


def test_history_is_forgotten_after_a_quiet_week() -> None:
    state = IntentState()
    state.observe(ev("purchase", T0), 0, T0)
    state.forget_before(T0 + HISTORY_MS)
    assert not state.empty
    state.forget_before(T0 + HISTORY_MS + 1)
    assert state.empty


def test_the_state_survives_a_snapshot() -> None:
    state = IntentState()
    state.observe(ev("page_view", T0, page_type="product", product_id="a"), 3, T0)
    copy = IntentState.from_data(state.to_data())
    assert features(copy, T0 + MIN) == features(state, T0 + MIN)
    copy.observe(ev("page_view", T0 + MIN, page_type="product", product_id="b"), 3, T0)
    assert features(copy, T0 + MIN)["session_distinct_products"] == 2
    assert features(state, T0 + MIN)["session_distinct_products"] == 1


@pytest.mark.parametrize(("zone", "hour"), [
    ("UTC", 10), ("Europe/Berlin", 11), ("Asia/Kolkata", 15), ("America/New_York", 5),
    ("Not/AZone", 10),
])
def test_the_local_hour_is_the_profile_timezone_s(zone: str, hour: int) -> None:
    assert local_hour(T0 + 20 * MIN, zone) == hour  # 10:20 UTC; Kolkata (+05:30): 15:50


def test_offline_and_flow_vectors_are_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training set's vectors are the ones the replay flow scores, on 2 workers."""
    events, profiles = write_sample(tmp_path, SampleSpec(users=250, hours=2.0, seed=3))
    model = write_model(tmp_path / "tiny.json")
    # Threshold 1.0: the tiny model never reaches it, so the flow scores every event
    # that training does (after a firing, the flow stops scoring that session).
    rules = parse_rules(rules_text(model, threshold=1.0))
    online = FeatureRecorder()
    monkeypatch.setattr(intent_logic, "default_log", online)
    run_replay(events, tmp_path / "out.jsonl", profiles=profiles, rules=rules, workers=2)
    offline = extract(events, profiles=profiles)
    assert len(offline.samples) > 1000

    def by_user(recorder_samples: list[Any]) -> dict[str, list[Any]]:
        grouped: dict[str, list[Any]] = {}
        for s in recorder_samples:
            grouped.setdefault(s.user_id, []).append((s.session, s.ts, s.vector))
        return grouped

    assert by_user(online.samples) == by_user(offline.samples)


def test_a_user_back_after_a_quiet_week_is_a_new_visitor_again() -> None:
    state = IntentState()
    state.observe(ev("purchase", T0), 0, T0)
    back = T0 + HISTORY_MS + 1
    state.observe(ev("page_view", back, page_type="home"), 1, back)
    f = features(state, back)
    assert (f["past_sessions"], f["past_purchases"], f["hours_since_purchase"]) == (0, 0, -1)
    within = IntentState()
    within.observe(ev("purchase", T0), 0, T0)
    within.observe(ev("page_view", back - 1, page_type="home"), 1, back - 1)
    assert features(within, back - 1)["past_purchases"] == 1

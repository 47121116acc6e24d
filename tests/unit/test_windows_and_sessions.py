"""Sliding counts, cooldowns, carts and sessions: the per-user state the rules stand on."""

from __future__ import annotations

import random

from nudgeflow.operators.cart import Cart
from nudgeflow.operators.sessions import SessionTracker
from nudgeflow.operators.windows import Cooldowns, SlidingCounter

MIN = 60_000


def test_window_counts_include_both_ends_and_out_of_order_times() -> None:
    counter = SlidingCounter()
    for ts in (0, 10 * MIN, 5 * MIN):
        counter.add("p1", ts)
    assert counter.count("p1", 0, 10 * MIN) == 3
    assert counter.count("p1", 1, 10 * MIN) == 2
    assert counter.count("p2", 0, 10 * MIN) == 0


def test_prune_drops_only_times_before_the_horizon_and_empty_scopes() -> None:
    counter = SlidingCounter()
    counter.add("p1", 0)
    counter.add("p1", 5)
    counter.add("p2", 1)
    counter.prune(5)
    assert len(counter) == 1
    assert counter.count("p1", 5, 5) == 1
    counter.prune(6)
    assert counter.empty


def test_counts_stay_exact_as_a_counter_grows_past_its_small_form_and_shrinks_back() -> None:
    """A heavy user's counter changes form (flat, then keyed, then flat); counts never do."""
    rng = random.Random(3)
    counter, model = SlidingCounter(), []  # model: every (scope, ts) still held
    horizon = 0
    for step in range(400):
        scope, ts = f"p{rng.randrange(5)}", horizon + rng.randrange(50 * MIN)
        counter.add(scope, ts)
        model.append((scope, ts))
        if step % 37 == 36:  # a burst ends: time moves on and most times go
            horizon += 45 * MIN
            counter.prune(horizon)
            model = [(s, t) for s, t in model if t >= horizon]
        if step % 11 == 0:  # a snapshot and a restore in between changes nothing
            counter = SlidingCounter.from_data(counter.to_data())
        start = rng.randrange(horizon, horizon + 50 * MIN)
        end = start + rng.randrange(20 * MIN)
        for probe in ("p0", "p3", "missing"):
            expected = sum(1 for s, t in model if s == probe and start <= t <= end)
            assert counter.count(probe, start, end) == expected
        assert len(counter) == len(model)


def test_cooldown_reopens_at_exactly_fired_at_plus_cooldown() -> None:
    cooldowns = Cooldowns(cooldown_ms=100)
    cooldowns.record("a", 1_000)
    assert cooldowns.blocked("a", 1_099)
    assert not cooldowns.blocked("a", 1_100)
    assert not cooldowns.blocked("b", 1_050)
    cooldowns.prune(1_099)
    assert not cooldowns.empty
    cooldowns.prune(1_100)
    assert cooldowns.empty


def test_cart_arithmetic() -> None:
    cart = Cart()
    cart.add("p1", 2, 10.0)
    cart.add("p1", 1, None)  # a later add without price keeps the known price
    cart.add("p2", 1, 5.0)
    cart.remove("p3", 1)  # not in the cart: nothing changes
    cart.remove("p2", 5)  # more than held: removed entirely
    assert cart.snapshot() == {
        "cart_value": 30.0,
        "items": [{"product_id": "p1", "quantity": 3, "price": 10.0}],
    }
    cart.remove("p1", 3)
    assert cart.empty


def test_a_gap_of_exactly_the_session_gap_starts_a_new_session() -> None:
    sessions = SessionTracker(gap_ms=30 * MIN)
    first, _ = sessions.place(0)
    same, _ = sessions.place(30 * MIN - 1)
    assert same is first
    second, ended = sessions.place(60 * MIN - 1)  # exactly 30 min after the latest ts
    assert ended is first
    assert second.index == first.index + 1
    assert sessions.open_sessions == 2


def test_an_out_of_order_event_joins_the_current_session_and_close_frees_it() -> None:
    sessions = SessionTracker(gap_ms=30 * MIN)
    session, _ = sessions.place(10 * MIN)
    joined, _ = sessions.place(9 * MIN)
    assert joined is session
    assert session.latest_ts == 10 * MIN
    assert sessions.close(session.index) is session
    assert sessions.open_sessions == 0
    assert sessions.close(session.index) is None

"""The sample generator: deterministic, decodable, in a plausible arrival order, a plausible mix."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nudgeflow.app.samples import (
    DEFAULT_START_MS,
    SampleLine,
    SampleSpec,
    generate_events,
    generate_lines,
    generate_profiles,
    write_sample,
)
from nudgeflow.core.events import Event, Rejection, decode_event
from nudgeflow.core.timeutil import datetime_to_ms

LATENESS_MS = 30_000
SMALL = SampleSpec(users=200, seed=11)


@pytest.fixture(scope="module")
def default_lines() -> list[SampleLine]:
    return list(generate_lines(SampleSpec()))


@pytest.fixture(scope="module")
def decoded(default_lines: list[SampleLine]) -> list[tuple[SampleLine, Event | Rejection]]:
    return [(line, decode_event(line.data)) for line in default_lines]


def _digest(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        digest.update(b"\n")
    return digest.hexdigest()


def _check_invariants(lines: list[SampleLine]) -> None:
    """What the flow relies on, whatever the spec."""
    arrival = -1
    max_ts: dict[str, int] = {}
    seen: dict[tuple[str, str], bytes] = {}
    for line in lines:
        assert line.arrival_ms >= arrival, "lines must come in arrival order"
        arrival = line.arrival_ms
        decoded = decode_event(line.data)
        if line.kind == "invalid":
            assert isinstance(decoded, Rejection), line
            continue
        assert isinstance(decoded, Event), (line, decoded)
        assert decoded.user_id == line.user_id
        assert decoded.ts <= line.arrival_ms, "nothing arrives before it happens"
        key = (decoded.user_id, decoded.event_id)
        if line.kind == "duplicate":
            assert seen.get(key) == line.data, "a duplicate re-sends an earlier line"
            continue
        assert key not in seen, f"event_id reused by a line that is not a duplicate: {line}"
        seen[key] = line.data
        latest = max_ts.get(line.user_id, decoded.ts)
        if line.kind == "out_of_order":
            assert decoded.ts < latest, f"labelled out of order but arrives in order: {line}"
            assert latest - decoded.ts <= 20_000 < LATENESS_MS, line
        else:
            assert decoded.ts >= latest, f"behind its user's latest ts: {line}"
        max_ts[line.user_id] = max(latest, decoded.ts)


def test_default_start_is_march_first_8_utc() -> None:
    assert datetime_to_ms(datetime(2026, 3, 1, 8, tzinfo=UTC)) == DEFAULT_START_MS
    assert SampleSpec().start_ms == DEFAULT_START_MS


def test_same_spec_gives_the_same_bytes() -> None:
    assert _digest(generate_events(SMALL)) == _digest(generate_events(SMALL))
    profiles = [orjson.dumps(p) for p in generate_profiles(SMALL)]
    assert profiles == [orjson.dumps(p) for p in generate_profiles(SMALL)]


def test_another_seed_gives_other_bytes() -> None:
    other = SampleSpec(users=SMALL.users, seed=SMALL.seed + 1)
    assert _digest(generate_events(SMALL)) != _digest(generate_events(other))


def test_more_users_do_not_change_the_first_users_traffic() -> None:
    # A user's traffic depends on the seed and their index only.
    small = [line for line in generate_lines(SMALL) if line.user_id <= "u000050"]
    bigger = SampleSpec(users=400, seed=SMALL.seed)
    big = [line for line in generate_lines(bigger) if line.user_id <= "u000050"]
    assert [line.data for line in small] == [line.data for line in big]


def test_write_sample_writes_what_the_generators_yield(tmp_path: Path) -> None:
    events_path, profiles_path = write_sample(tmp_path / "sample", SMALL)
    assert events_path == tmp_path / "sample" / "events.jsonl"
    assert profiles_path == tmp_path / "sample" / "profiles.jsonl"
    events = events_path.read_bytes()
    assert events == b"".join(data + b"\n" for data in generate_events(SMALL))
    expected_profiles = b"".join(orjson.dumps(p) + b"\n" for p in generate_profiles(SMALL))
    assert profiles_path.read_bytes() == expected_profiles
    again_events, _ = write_sample(tmp_path / "again", SMALL)
    assert again_events.read_bytes() == events


def test_generation_is_lazy() -> None:
    # Nothing but a plan of a few numbers per user exists before the first line.
    first = next(generate_events(SampleSpec(users=100_000)))
    assert isinstance(decode_event(first), Event)


def test_default_spec_invariants(default_lines: list[SampleLine]) -> None:
    _check_invariants(default_lines)


def test_each_invalid_line_is_rejected_and_every_other_line_decodes(
    decoded: list[tuple[SampleLine, Event | Rejection]],
) -> None:
    rejected = [line for line, result in decoded if isinstance(result, Rejection)]
    invalid = [line for line, _ in decoded if line.kind == "invalid"]
    assert rejected == invalid
    reasons = Counter(
        result.reason.split(":")[0].split("(")[0].strip()
        for _, result in decoded
        if isinstance(result, Rejection)
    )
    # Every kind of flaw shows up: cut-off JSON, no product_id, float quantity, naive ts.
    assert any(reason.startswith("not valid JSON") for reason in reasons), reasons
    assert any("product_id" in reason for reason in reasons), reasons
    assert any("quantity" in reason for reason in reasons), reasons
    assert any("'ts'" in reason for reason in reasons), reasons


def test_shares_are_near_the_spec(default_lines: list[SampleLine]) -> None:
    kinds = Counter(line.kind for line in default_lines)
    valid = kinds["event"] + kinds["out_of_order"]
    spec = SampleSpec()
    assert kinds["invalid"] == pytest.approx(spec.invalid_share * valid, rel=0.35)
    assert kinds["duplicate"] == pytest.approx(spec.duplicate_share * valid, rel=0.35)
    # Some delayed events are not overtaken after all; most are.
    assert 0.5 * spec.out_of_order_share * valid < kinds["out_of_order"]
    assert kinds["out_of_order"] <= 1.2 * spec.out_of_order_share * valid


def test_the_mix_is_plausible(decoded: list[tuple[SampleLine, Event | Rejection]]) -> None:
    events = [
        event for line, event in decoded if isinstance(event, Event) and line.kind != "duplicate"
    ]
    users = SampleSpec().users
    assert 15 * users < len(events) < 25 * users
    types = Counter(event.type for event in events)
    assert set(types) == {
        "page_view",
        "page_leave",
        "add_to_cart",
        "remove_from_cart",
        "checkout_started",
        "purchase",
    }
    assert types["purchase"] < types["checkout_started"] < types["add_to_cart"]
    carting = {e.user_id for e in events if e.type == "add_to_cart"}
    buying = {e.user_id for e in events if e.type == "purchase"}
    assert 0.10 * users <= len(carting) <= 0.15 * users
    assert 0.2 * len(carting) < len(buying) < 0.7 * len(carting)  # many carts are abandoned
    assert buying <= carting
    pages = Counter(e.page_type for e in events if e.type == "page_view")
    assert pages["product"] > pages["category"] > pages["pricing"] > 0
    assert pages["home"] and pages["cart"] and pages["checkout"] and pages["content"]
    long_reads = [e for e in events if e.type == "page_leave" and (e.dwell_ms or 0) > 120_000]
    assert 0 < len(long_reads) < 0.02 * types["page_leave"]
    for event in events:
        if event.type in ("add_to_cart", "remove_from_cart"):
            assert event.quantity is not None and event.price is not None
        if event.type == "purchase":
            assert event.order_id and event.value is not None and event.value > 0
    assert any(e.properties for e in events)


def test_repeat_views_and_pricing_revisits_happen(
    decoded: list[tuple[SampleLine, Event | Rejection]],
) -> None:
    views: dict[tuple[str, str], list[int]] = defaultdict(list)
    pricing_sessions: dict[str, set[str]] = defaultdict(set)
    for line, event in decoded:
        if not isinstance(event, Event) or line.kind == "duplicate" or event.type != "page_view":
            continue
        if event.page_type == "product" and event.product_id is not None:
            views[(event.user_id, event.product_id)].append(event.ts)
        if event.page_type == "pricing" and event.session_id is not None:
            pricing_sessions[event.user_id].add(event.session_id)
    interested = set()
    for (user_id, _), times in views.items():
        times.sort()
        if any(times[i + 2] - times[i] <= 600_000 for i in range(len(times) - 2)):
            interested.add(user_id)
    users = SampleSpec().users
    assert 0.02 * users < len(interested) < 0.2 * users
    revisiting = [user for user, sessions in pricing_sessions.items() if len(sessions) >= 2]
    assert 0.005 * users < len(revisiting) < 0.1 * users


def test_ts_comes_in_each_wire_format(default_lines: list[SampleLine]) -> None:
    styles: Counter[str] = Counter()
    for line in default_lines:
        if line.kind == "invalid":
            continue
        ts = orjson.loads(line.data)["ts"]
        if isinstance(ts, int):
            styles["epoch_ms"] += 1
        elif ts.endswith("Z"):
            styles["utc"] += 1
        elif ts.endswith("+02:00"):
            styles["offset"] += 1
    total = sum(styles.values())
    assert styles["utc"] > total / 2
    assert styles["epoch_ms"] > total / 20
    assert styles["offset"] > total / 20


def test_users_have_one_to_three_sessions(default_lines: list[SampleLine]) -> None:
    sessions: dict[str, set[str]] = defaultdict(set)
    for line in default_lines:
        if line.kind != "invalid":
            sessions[line.user_id].add(orjson.loads(line.data)["session_id"])
    assert len(sessions) == SampleSpec().users
    counts = Counter(len(ids) for ids in sessions.values())
    assert set(counts) == {1, 2, 3}


def test_profiles() -> None:
    spec = SampleSpec()
    profiles = list(generate_profiles(spec))
    assert 0.8 * spec.users < len(profiles) < 0.9 * spec.users
    assert len({p["user_id"] for p in profiles}) == len(profiles)
    segments = Counter(p["segment"] for p in profiles)
    assert set(segments) == {"vip", "regular", "new"}
    assert 0.03 < segments["vip"] / len(profiles) < 0.07
    assert 0.55 < segments["regular"] / len(profiles) < 0.65
    zones = Counter(p["timezone"] for p in profiles)
    assert set(zones) == {"Europe/Berlin", "America/New_York", "UTC", "Asia/Tokyo"}
    empty = 0
    for profile in profiles:
        assert {"user_id", "segment", "name", "email", "timezone", "opt_in"} <= set(profile)
        assert None not in profile.values()
        assert "@" in profile["email"]
        opt_in = profile["opt_in"]
        assert opt_in == [c for c in ("email", "sms", "push") if c in opt_in]
        assert "sms" not in opt_in or "phone" in profile
        assert "push" not in opt_in or "push_token" in profile
        empty += not opt_in
    assert 0 < empty < 0.2 * len(profiles)


def test_profiles_are_for_users_of_the_sample() -> None:
    users = {line.user_id for line in generate_lines(SMALL)}
    assert {p["user_id"] for p in generate_profiles(SMALL)} <= users


def test_no_users_no_lines() -> None:
    spec = SampleSpec(users=0)
    assert list(generate_events(spec)) == []
    assert list(generate_profiles(spec)) == []


@pytest.mark.parametrize(
    "bad",
    [
        {"users": -1},
        {"hours": 0},
        {"invalid_share": -0.1},
        {"duplicate_share": 0.6},
        {"out_of_order_share": 1.0},
    ],
)
def test_spec_refuses_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SampleSpec(**bad)


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    users=st.integers(min_value=1, max_value=30),
    hours=st.floats(min_value=0.05, max_value=30.0),
    invalid=st.floats(min_value=0.0, max_value=0.5),
    duplicate=st.floats(min_value=0.0, max_value=0.5),
    late=st.floats(min_value=0.0, max_value=0.5),
)
def test_invariants_hold_for_any_spec(
    seed: int, users: int, hours: float, invalid: float, duplicate: float, late: float
) -> None:
    spec = SampleSpec(
        users=users,
        hours=hours,
        seed=seed,
        invalid_share=invalid,
        duplicate_share=duplicate,
        out_of_order_share=late,
    )
    lines = list(generate_lines(spec))
    assert {line.user_id for line in lines} == {f"u{i + 1:06d}" for i in range(users)}
    _check_invariants(lines)


def test_buyers_browse_differently_before_the_cart(
    decoded: list[tuple[SampleLine, Event | Rejection]],
) -> None:
    """What the intent model learns from: a cart session that ends in a purchase looks
    different before its first add_to_cart (fewer distinct products, longer reads)."""
    sessions: dict[str, list[Event]] = defaultdict(list)
    for line, event in decoded:
        if line.kind == "event" and isinstance(event, Event) and event.session_id:
            sessions[event.session_id].append(event)
    seen: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for events in sessions.values():
        events.sort(key=lambda e: e.ts)
        adds = [i for i, e in enumerate(events) if e.type == "add_to_cart"]
        if not adds or events[0].type != "page_view" or events[0].page_type == "cart":
            continue  # no cart, or a returning buyer's short visit
        before = events[:adds[0]]
        views = [e.product_id for e in before if e.type == "page_view" and e.page_type == "product"]
        dwell = [e.dwell_ms or 0 for e in before
                 if e.type == "page_leave" and e.page_type == "product"]
        if views and dwell:
            bought = any(e.type == "purchase" for e in events)
            seen[bought].append((len(set(views)) / len(views), sum(dwell) / len(dwell)))
    assert len(seen[True]) > 30 and len(seen[False]) > 30

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    buyers, browsers = seen[True], seen[False]
    assert mean([d for d, _ in buyers]) < mean([d for d, _ in browsers]) - 0.1
    assert mean([w for _, w in buyers]) > 1.3 * mean([w for _, w in browsers])

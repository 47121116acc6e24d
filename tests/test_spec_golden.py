"""Golden streams for TRIGGERS.md, with expectations written by hand from the spec.

Each test builds a small stream (times as offsets from T0), runs it through the
real `nudgeflow replay` (in-process CLI) and compares the detected triggers per
user, in output order, with the hand-written list. The same list is also checked
against the brute-force reference of `tests/reference/spec_model.py`, so the
reference and the hand reading of the spec keep each other honest.

Unless a test says otherwise every user gets a `regular` profile, so that the
segment rules (`vip_concierge`, `new_visitor_welcome`) stay out of the way.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from reference.spec_model import run_reference, segment_of

from nudgeflow.cli import main
from nudgeflow.core.events import Event, decode_event, parse_ts

T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z
SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN
DAY = 24 * HOUR

Line = dict[str, Any] | str  # an event object, or a raw line (blank / invalid)
Fire = tuple[str, int, str | None]  # (trigger_type, fired_at offset from T0 in ms, scope)
ProfileLine = dict[str, Any]


def m(minutes: float, ms: int = 0) -> int:
    """An offset from T0: `minutes` plus `ms` milliseconds."""
    return round(minutes * MIN) + ms


def ev(kind: str, at: int, user: str = "u", eid: str | None = None, **fields: Any) -> Line:
    """One event at offset `at` (ms from T0). The event_id is assigned by position unless given."""
    event: dict[str, Any] = {"user_id": user, "type": kind, "ts": T0 + at, **fields}
    if eid is not None:
        event["event_id"] = eid
    return event


def view(at: int, page_type: str = "home", user: str = "u", **fields: Any) -> Line:
    return ev("page_view", at, user, page_type=page_type, **fields)


def pview(product: str, at: int, user: str = "u", **fields: Any) -> Line:
    return ev("page_view", at, user, page_type="product", product_id=product, **fields)


def add(product: str, at: int, user: str = "u", **fields: Any) -> Line:
    return ev("add_to_cart", at, user, product_id=product, **fields)


def remove(product: str, at: int, user: str = "u", **fields: Any) -> Line:
    return ev("remove_from_cart", at, user, product_id=product, **fields)


def purchase(at: int, user: str = "u", **fields: Any) -> Line:
    return ev("purchase", at, user, **fields)


def leave(at: int, dwell_ms: int, user: str = "u", **fields: Any) -> Line:
    return ev("page_leave", at, user, dwell_ms=dwell_ms, **fields)


def fire(trigger_type: str, at: int, scope: str | None = None) -> Fire:
    return (trigger_type, at, scope)


@dataclass(frozen=True)
class Run:
    triggers: list[dict[str, Any]]
    dead: list[dict[str, Any]]

    def fires(self, user: str = "u") -> list[Fire]:
        return [
            (t["trigger_type"], parse_ts(t["fired_at"]) - T0, _scope(t["trigger_type"], t))
            for t in self.triggers
            if t["user_id"] == user
        ]

    def dead_lines(self) -> list[tuple[int, str]]:
        return [(d["line"], d["reason"]) for d in self.dead]


def _scope(trigger_type: str, record: Mapping[str, Any]) -> str | None:
    metadata = record["metadata"]
    if trigger_type in {"product_interest", "product_retargeting"}:
        return str(metadata["product_id"])
    if trigger_type == "engaged_reader":
        url = metadata.get("url")
        return None if url is None else str(url)
    return None


def _render(lines: Sequence[Line]) -> list[str]:
    counter = itertools.count(1)
    rendered = []
    for line in lines:
        if isinstance(line, str):
            rendered.append(line)
            continue
        event = dict(line)
        event.setdefault("event_id", f"e{next(counter)}")
        rendered.append(orjson.dumps(event).decode())
    return rendered


def _default_profiles(lines: Sequence[Line]) -> list[ProfileLine]:
    users = sorted({line["user_id"] for line in lines if isinstance(line, dict)})
    return [{"user_id": user, "segment": "regular"} for user in users]


def replay(
    tmp_path: Path, lines: Sequence[Line], profiles: Sequence[ProfileLine] | None = None
) -> Run:
    """Run `lines` through the real CLI and read the triggers and dead letters back."""
    rendered = _render(lines)
    profiles = _default_profiles(lines) if profiles is None else profiles
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(rendered) + "\n")
    profile_file = tmp_path / "profiles.jsonl"
    profile_file.write_text("".join(orjson.dumps(p).decode() + "\n" for p in profiles))
    out = tmp_path / "out.jsonl"
    dead = tmp_path / "dead.jsonl"
    code = main([
        "replay", str(events), "--out", str(out), "--dead-letter", str(dead),
        "--profiles", str(profile_file), "--quiet",
    ])
    assert code == 0
    return Run(_read_jsonl(out), _read_jsonl(dead) if dead.exists() else [])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def reference_fires(
    lines: Sequence[Line], profiles: Sequence[ProfileLine] | None = None
) -> dict[str, list[Fire]]:
    """The same stream through the brute-force reference."""
    events = [e for e in map(decode_event, _render(lines)) if isinstance(e, Event)]
    profiles = _default_profiles(lines) if profiles is None else profiles
    last: dict[str, ProfileLine] = {p["user_id"]: p for p in profiles}
    segments = {user: segment_of(last.get(user)) for user in {e.user_id for e in events}}
    result = run_reference(events, segments)
    return {
        user: [(d.trigger_type, d.fired_at_ms - T0, d.scope) for d in detections]
        for user, detections in result.detections.items()
    }


def check(
    tmp_path: Path,
    lines: Sequence[Line],
    expected: Sequence[Fire] | Mapping[str, Sequence[Fire]],
    profiles: Sequence[ProfileLine] | None = None,
) -> Run:
    """Hand expectations == reference == product (per user, in order)."""
    wanted = {"u": list(expected)} if not isinstance(expected, Mapping) else {
        user: list(fires) for user, fires in expected.items()
    }
    reference = reference_fires(lines, profiles)
    for user, fires in wanted.items():
        assert reference.get(user, []) == fires, f"reference disagrees for {user}"
    run = replay(tmp_path, lines, profiles)
    for user, fires in wanted.items():
        assert run.fires(user) == fires, f"product disagrees for {user}"
    return run


# ---------------------------------------------------------------- cart_abandonment


def test_cart_abandonment_fires_at_last_add_plus_15m(tmp_path: Path) -> None:
    run = check(
        tmp_path,
        [add("p", 0, quantity=2, price=10.0), view(m(15.5, 1))],
        [fire("cart_abandonment", m(15))],
    )
    (record,) = run.triggers
    items = [(i["product_id"], i["quantity"]) for i in record["metadata"]["items"]]
    assert items == [("p", 2)]


def test_purchase_exactly_at_the_deadline_cancels(tmp_path: Path) -> None:
    check(tmp_path, [add("p", 0), purchase(m(15)), view(m(40))], [])


def test_purchase_after_the_deadline_but_before_the_decision_cancels(tmp_path: Path) -> None:
    # The purchase itself moves the watermark past D, but it is applied first.
    check(tmp_path, [add("p", 0), purchase(m(15.5, 1)), view(m(40))], [])


def test_purchase_after_the_decision_only_cancels_the_followup(tmp_path: Path) -> None:
    check(
        tmp_path,
        [add("p", 0), view(m(15.5, 1)), purchase(m(16)), view(2 * DAY)],
        [fire("cart_abandonment", m(15))],
    )


def test_timer_with_deadline_equal_to_watermark_is_not_decided_yet(tmp_path: Path) -> None:
    # After view@15:30 the watermark is exactly D=15:00: not decided; the purchase
    # at 15:15 (>= watermark: not late) then cancels it.
    check(tmp_path, [add("p", 0), view(m(15.5)), purchase(m(15.25))], [])


def test_timer_decided_once_watermark_passes_deadline_by_1ms(tmp_path: Path) -> None:
    check(
        tmp_path,
        [add("p", 0), view(m(15.5, 1)), purchase(m(15.25, 1))],
        [fire("cart_abandonment", m(15))],
    )


def test_second_add_moves_the_deadline(tmp_path: Path) -> None:
    check(
        tmp_path,
        [add("p", 0), add("q", m(10)), view(m(20)), view(m(25.5)), view(m(25.5, 1))],
        [fire("cart_abandonment", m(25))],
    )


def test_out_of_order_add_keeps_the_largest_ts(tmp_path: Path) -> None:
    # add@0:30 arrives after add@1:00; its ts equals the watermark, so it is applied.
    run = check(
        tmp_path,
        [add("p", m(1)), add("q", m(0.5)), view(m(15.5)), view(m(16.5, 1))],
        [fire("cart_abandonment", m(16))],
    )
    assert run.dead == []


@pytest.mark.parametrize(
    ("removed", "expected"),
    [
        (2, [fire("cart_abandonment", m(16))]),  # 3 held, 2 removed: 1 left
        (3, []),  # exactly everything (quantities summed per product)
        (5, []),  # more than held removes it all
    ],
)
def test_remove_all_cancels_with_quantities_summed(
    tmp_path: Path, removed: int, expected: list[Fire]
) -> None:
    lines = [
        add("p", 0, quantity=2),
        add("p", m(1), quantity=1),
        remove("p", m(2), quantity=removed),
        view(m(20)),
    ]
    check(tmp_path, lines, expected)


def test_removing_one_of_two_products_does_not_cancel(tmp_path: Path) -> None:
    check(
        tmp_path,
        [add("p", 0), add("q", m(1)), remove("p", m(2)), view(m(20))],
        [fire("cart_abandonment", m(16))],
    )


def test_removing_a_product_not_in_the_cart_changes_nothing(tmp_path: Path) -> None:
    run = check(
        tmp_path,
        [remove("z", 0), add("p", m(1)), remove("q", m(2), quantity=9), view(m(20))],
        [fire("cart_abandonment", m(16))],
    )
    (record,) = run.triggers
    items = [(i["product_id"], i["quantity"]) for i in record["metadata"]["items"]]
    assert items == [("p", 1)]


def test_cart_keeps_items_after_abandonment_and_a_new_add_starts_an_episode(
    tmp_path: Path,
) -> None:
    run = check(
        tmp_path,
        [add("p", 0), view(m(16)), add("q", m(20)), view(m(35.5, 1))],
        [fire("cart_abandonment", m(15)), fire("cart_abandonment", m(35))],
    )
    second = run.triggers[1]
    items = sorted((i["product_id"], i["quantity"]) for i in second["metadata"]["items"])
    assert items == [("p", 1), ("q", 1)]


def test_remove_all_then_add_starts_a_fresh_episode(tmp_path: Path) -> None:
    check(
        tmp_path,
        [add("p", 0), remove("p", m(5)), add("q", m(10)), view(m(26))],
        [fire("cart_abandonment", m(25))],
    )


# ---------------------------------------------------------- cart_abandonment_followup


def test_followup_fires_at_f_plus_24h(tmp_path: Path) -> None:
    check(
        tmp_path,
        [add("p", 0), view(m(16)), view(DAY + m(15.5)), view(DAY + m(15.5, 1))],
        [fire("cart_abandonment", m(15)), fire("cart_abandonment_followup", DAY + m(15))],
    )


@pytest.mark.parametrize(
    ("middle", "expected"),
    [
        (purchase(m(60)), [fire("cart_abandonment", m(15))]),
        (remove("p", m(60)), [fire("cart_abandonment", m(15))]),
        (remove("p", m(60), quantity=7), [fire("cart_abandonment", m(15))]),
        # an add cancels the follow-up and starts a new episode (its follow-up is
        # due at DAY + 75 min, after the end of the input)
        (add("q", m(60)), [fire("cart_abandonment", m(15)), fire("cart_abandonment", m(75))]),
        # removing a product that is not in the cart does not empty it
        (
            remove("q", m(60)),
            [fire("cart_abandonment", m(15)), fire("cart_abandonment_followup", DAY + m(15))],
        ),
    ],
    ids=["purchase", "remove-all", "remove-more-than-held", "add", "remove-other"],
)
def test_followup_cancellation(tmp_path: Path, middle: Line, expected: list[Fire]) -> None:
    check(tmp_path, [add("p", 0), view(m(16)), middle, view(DAY + m(15.5, 1))], expected)


@pytest.mark.parametrize("late_cancel", ["purchase", "add"])
def test_followup_cancelled_by_event_that_arrives_after_its_deadline(
    tmp_path: Path, late_cancel: str
) -> None:
    # The cancelling event (ts after F + 24 h) is applied before the timer is decided.
    cancel = purchase(DAY + m(20)) if late_cancel == "purchase" else add("q", DAY + m(20))
    check(tmp_path, [add("p", 0), view(m(16)), cancel], [fire("cart_abandonment", m(15))])


# ------------------------------------------------------- watermark, lateness, dedup


@pytest.mark.parametrize(("offset", "late"), [(0, False), (-1, True)])
def test_event_at_the_watermark_is_not_late_1ms_below_is(
    tmp_path: Path, offset: int, late: bool
) -> None:
    at = m(9.5, offset)
    run = check(
        tmp_path,
        [view(m(10)), leave(at, 200_000, url="/a")],
        [] if late else [fire("engaged_reader", at, "/a")],
    )
    assert run.dead_lines() == ([(2, "late")] if late else [])


def test_late_event_is_dead_lettered_and_not_applied(tmp_path: Path) -> None:
    # The late purchase would cancel the cart if it were applied.
    run = check(
        tmp_path,
        [add("p", 0), view(m(10)), "", purchase(m(9)), view(m(16))],
        [fire("cart_abandonment", m(15))],
    )
    assert run.dead_lines() == [(4, "late")]


def test_late_duplicate_is_a_duplicate_not_a_dead_letter(tmp_path: Path) -> None:
    lines = [
        leave(m(10), 200_000, eid="x", url="/a"),
        view(m(20), eid="y"),
        "",
        leave(m(10), 200_000, eid="x", url="/a"),  # late and a duplicate
        view(m(5), eid="z"),  # late
    ]
    run = check(tmp_path, lines, [fire("engaged_reader", m(10), "/a")])
    assert run.dead_lines() == [(5, "late")]


@pytest.mark.parametrize(("extra", "duplicate"), [(0, True), (1, False)])
def test_dedup_span_is_24h_inclusive(tmp_path: Path, extra: int, duplicate: bool) -> None:
    # Three page views for a new user welcome them, unless the third is a duplicate.
    at = DAY + extra
    lines = [view(0, eid="x"), view(m(1), eid="y"), view(at, eid="x")]
    expected = [] if duplicate else [fire("new_visitor_welcome", at)]
    run = check(tmp_path, lines, expected, profiles=[])
    assert run.dead == []


def test_duplicates_and_invalid_lines_do_not_move_the_watermark(tmp_path: Path) -> None:
    invalid = orjson.dumps(
        {"event_id": "bad", "user_id": "u", "type": "add_to_cart", "ts": T0 + m(20)}
    ).decode()  # no product_id
    lines = [add("p", 0, eid="a"), add("p", m(20), eid="a"), invalid, purchase(m(1))]
    run = check(tmp_path, lines, [])
    assert [line for line, _ in run.dead_lines()] == [3]
    assert run.dead[0]["reason"] != "late"


def test_event_ids_are_per_user(tmp_path: Path) -> None:
    lines = [leave(0, 200_000, user="u", eid="s"), leave(0, 200_000, user="w", eid="s")]
    check(
        tmp_path,
        lines,
        {"u": [fire("engaged_reader", 0)], "w": [fire("engaged_reader", 0)]},
    )


def test_out_of_order_view_counts_and_is_checked_at_its_own_ts(tmp_path: Path) -> None:
    lines = [
        pview("p", 0),
        pview("p", m(5)),
        pview("p", m(4, 40 * SEC)),  # window [-5:20, 4:40]: 0, 4:40 -> 2
        pview("p", m(4, 50 * SEC)),  # window [-5:10, 4:50]: 0, 4:40, 4:50 -> 3
    ]
    check(tmp_path, lines, [fire("product_interest", m(4, 50 * SEC), "p")])


# -------------------------------------------------------------------- count rules


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (1, False)])
def test_product_interest_window_includes_both_ends(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    last = m(10, extra)
    lines = [pview("p", 0), pview("p", m(5)), pview("p", last)]
    check(tmp_path, lines, [fire("product_interest", last, "p")] if fires else [])


def test_product_interest_cooldown_reopens_exactly_and_views_during_it_count(
    tmp_path: Path,
) -> None:
    lines = [
        pview("p", 0),
        pview("p", m(1)),
        pview("p", m(2)),  # interest fires; cooldown until DAY + 2 min
        pview("p", DAY),  # retargeting: [0, DAY] holds 4 views (both ends)
        pview("p", DAY + m(1)),
        pview("p", DAY + m(2, -1)),  # 3 in 10 min, but the cooldown runs
        pview("p", DAY + m(2)),  # cooldown reopened exactly: fires
    ]
    check(
        tmp_path,
        lines,
        [
            fire("product_interest", m(2), "p"),
            fire("product_retargeting", DAY, "p"),
            # the first session (product views, no add) closed at 0:32; the view at
            # DAY moves the watermark past it, and is applied (and checked) first
            fire("browse_abandonment", m(32)),
            fire("product_interest", DAY + m(2), "p"),
        ],
    )


def test_an_out_of_order_view_before_a_firing_is_inside_its_cooldown(tmp_path: Path) -> None:
    # Reading: "not again until fired_at + 24 h" blocks any later firing of the scope
    # with fired_at < 2:00 + 24 h, including an out-of-order view at 1:50 whose own
    # window [-8:10, 1:50] holds 3 views (see the report: the other reading would fire).
    lines = [pview("p", 0), pview("p", m(1)), pview("p", m(2)), pview("p", m(1, 50 * SEC))]
    check(tmp_path, lines, [fire("product_interest", m(2), "p")])


def test_product_interest_is_scoped_per_product(tmp_path: Path) -> None:
    lines = [pview("p", 0), pview("q", m(1)), pview("p", m(2)), pview("q", m(3)), pview("p", m(4))]
    check(tmp_path, lines, [fire("product_interest", m(4), "p")])


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (1, False)])
def test_product_retargeting_four_views_within_24h_inclusive(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    last = DAY + extra
    lines = [pview("p", 0), pview("p", 8 * HOUR), pview("p", 16 * HOUR), pview("p", last)]
    # Each view is its own session: the first close fires browse_abandonment (at 0:30),
    # the next two are inside its 24 h cooldown; the last session never closes.
    expected = [fire("browse_abandonment", m(30))]
    if fires:
        expected.append(fire("product_retargeting", last, "p"))
    check(tmp_path, lines, expected)


# ----------------------------------------------------------------- engaged_reader


def test_engaged_reader_threshold_scope_and_cooldown(tmp_path: Path) -> None:
    lines = [
        leave(0, 120_000, url="/a"),  # not > 120 000
        leave(m(1), 120_001, url="/a"),
        leave(m(2), 500_000, url="/a"),  # cooldown of /a
        leave(m(3), 500_000, url="/b"),
        leave(m(4), 500_000),  # no url: its own scope
        leave(m(5), 500_000),  # cooldown of (no url)
        leave(DAY + m(1), 500_000, url="/a"),  # /a reopened exactly
    ]
    check(
        tmp_path,
        lines,
        [
            fire("engaged_reader", m(1), "/a"),
            fire("engaged_reader", m(3), "/b"),
            fire("engaged_reader", m(4), None),
            fire("engaged_reader", DAY + m(1), "/a"),
        ],
    )


# ---------------------------------------------------------------- pricing_revisit


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (1, False)])
def test_pricing_revisit_within_48h_inclusive(tmp_path: Path, extra: int, fires: bool) -> None:
    at = 48 * HOUR + extra
    lines = [view(0, "pricing"), view(at, "pricing")]
    check(tmp_path, lines, [fire("pricing_revisit", at)] if fires else [])


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (-1, False)])
def test_a_gap_of_exactly_30m_starts_a_new_session(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    at = m(30, extra)
    lines = [view(0, "pricing"), view(at, "pricing")]
    check(tmp_path, lines, [fire("pricing_revisit", at)] if fires else [])


def test_pricing_revisit_any_earlier_session_and_cooldown(tmp_path: Path) -> None:
    lines = [
        view(0, "pricing"),
        view(2 * HOUR),
        view(4 * HOUR, "pricing"),  # session 3 vs session 1: fires
        view(5 * HOUR, "pricing"),  # cooldown (48 h)
        view(52 * HOUR, "pricing"),  # cooldown reopened exactly; 4 h is within 48 h
    ]
    check(tmp_path, lines, [fire("pricing_revisit", 4 * HOUR), fire("pricing_revisit", 52 * HOUR)])


def test_pricing_revisit_needs_an_earlier_session(tmp_path: Path) -> None:
    check(tmp_path, [view(0, "pricing"), view(m(10), "pricing"), view(m(20), "pricing")], [])


# ------------------------------------------------------------- browse_abandonment


def test_browse_abandonment_fires_when_the_session_closes(tmp_path: Path) -> None:
    run = check(
        tmp_path, [pview("p", 0), view(m(30.5)), view(m(30.5, 1))],
        [fire("browse_abandonment", m(30))],
    )
    assert "p" in orjson.dumps(run.triggers[0]["metadata"]).decode()


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (-1, False)])
def test_browse_abandonment_at_the_end_of_the_input(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    lines = [pview("p", 0, user="u"), view(m(30, extra), user="w")]
    check(
        tmp_path,
        lines,
        {"u": [fire("browse_abandonment", m(30))] if fires else [], "w": []},
    )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([pview("p", 0), purchase(m(1)), view(2 * HOUR)], []),
        ([view(0), view(m(1), "pricing"), view(2 * HOUR)], []),
        ([pview("p", 0), add("p", m(1)), view(2 * HOUR)], [fire("cart_abandonment", m(16))]),
    ],
    ids=["purchase", "no-product-view", "add"],
)
def test_browse_abandonment_needs_a_product_view_and_no_add_or_purchase(
    tmp_path: Path, lines: list[Line], expected: list[Fire]
) -> None:
    check(tmp_path, lines, expected)


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (-1, False)])
def test_browse_abandonment_cooldown_is_not_restarted_by_a_blocked_close(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    lines = [
        pview("p", 0),  # closes at 0:30: fires, cooldown until DAY + 0:30
        pview("q", 2 * HOUR),  # closes at 2:30: blocked (does not restart the cooldown)
        pview("r", DAY + extra),  # closes at DAY + 0:30 (+extra)
        view(DAY + 2 * HOUR),
    ]
    expected = [fire("browse_abandonment", m(30))]
    if fires:
        expected.append(fire("browse_abandonment", DAY + m(30)))
    check(tmp_path, lines, expected)


def test_out_of_order_event_inside_the_gap_joins_the_current_session(tmp_path: Path) -> None:
    lines = [
        pview("p", 0),
        view(m(30)),  # gap of exactly 30 min: a new session
        add("q", m(29, 50 * SEC)),  # out of order, not late: joins the current (2nd) session
        view(m(50)),
    ]
    check(
        tmp_path,
        lines,
        [fire("browse_abandonment", m(30)), fire("cart_abandonment", m(44, 50 * SEC))],
    )


# ------------------------------------------------------------------ vip_concierge

VIP = [{"user_id": "u", "segment": "vip"}]


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (1, False)])
def test_vip_concierge_second_abandonment_within_7d_inclusive(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    week = 7 * DAY + extra
    lines = [add("p", 0), view(m(16)), view(DAY + m(16)), add("p", week), view(7 * DAY + m(16))]
    expected = [
        fire("cart_abandonment", m(15)),
        fire("cart_abandonment_followup", DAY + m(15)),
        fire("cart_abandonment", week + m(15)),
    ]
    if fires:
        expected.append(fire("vip_concierge", week + m(15)))
    check(tmp_path, lines, expected, profiles=VIP)


@pytest.mark.parametrize("segment", ["vip", "regular"])
def test_vip_concierge_only_for_vip_and_with_cooldown(tmp_path: Path, segment: str) -> None:
    lines = [
        add("p", 0), view(m(16)),
        add("p", m(20)), view(m(36)),
        add("p", m(40)), view(m(56)),
    ]
    expected = [fire("cart_abandonment", m(15)), fire("cart_abandonment", m(35))]
    if segment == "vip":
        expected.append(fire("vip_concierge", m(35)))
    expected.append(fire("cart_abandonment", m(55)))  # vip: inside the 7 d cooldown
    check(tmp_path, lines, expected, profiles=[{"user_id": "u", "segment": segment}])


# ------------------------------------------------------------ new_visitor_welcome


def test_new_visitor_welcome_counts_page_views_only(tmp_path: Path) -> None:
    lines = [
        view(0, eid="a"),
        leave(m(1), 10, eid="b"),  # not a page_view
        view(m(2), "pricing", eid="c"),
        view(m(3), eid="a"),  # duplicate
        view(m(1), eid="d"),  # late (watermark 1:30)
        view(m(40), "category", eid="e"),  # the 3rd applied page_view, in a new session
    ]
    run = check(tmp_path, lines, [fire("new_visitor_welcome", m(40))], profiles=[])
    assert run.dead_lines() == [(5, "late")]


# ----------------------------------------------------------------------- segments

SEGMENT_STREAM: list[Line] = [
    view(0), view(m(1)), view(m(2)),
    add("p", m(3)), view(m(19)),
    add("p", m(20)), view(m(36)),
]
NEW = [fire("new_visitor_welcome", m(2)), fire("cart_abandonment", m(18)),
       fire("cart_abandonment", m(35))]
VIP_FIRES = [fire("cart_abandonment", m(18)), fire("cart_abandonment", m(35)),
             fire("vip_concierge", m(35))]
NEITHER = [fire("cart_abandonment", m(18)), fire("cart_abandonment", m(35))]


@pytest.mark.parametrize(
    ("profiles", "expected"),
    [
        ([], NEW),
        ([{"user_id": "u", "segment": "new"}], NEW),
        ([{"user_id": "u", "segment": "vip"}], VIP_FIRES),
        ([{"user_id": "u", "segment": "regular"}], NEITHER),
        ([{"user_id": "u", "segment": "gold"}], NEITHER),
        ([{"user_id": "u", "segment": 5}], NEW),
        ([{"user_id": "u", "name": "Ann"}], NEW),
        ([{"user_id": "u", "segment": "vip"}, {"user_id": "u", "segment": "gold"}], NEITHER),
        ([{"user_id": "u", "segment": "gold"}, {"user_id": "u", "segment": "vip"}], VIP_FIRES),
        ([{"user_id": "w", "segment": "vip"}], NEW),
    ],
    ids=["none", "new", "vip", "regular", "unknown", "non-string", "no-segment",
         "last-wins-gold", "last-wins-vip", "other-user"],
)
def test_segments(tmp_path: Path, profiles: list[ProfileLine], expected: list[Fire]) -> None:
    check(tmp_path, SEGMENT_STREAM, expected, profiles=profiles)


# -------------------------------------------------------------------- replay end


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (-1, False)])
def test_replay_end_decides_timers_due_by_the_largest_ts(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    lines = [add("p", 0, user="u"), view(m(15, extra), user="w")]
    check(tmp_path, lines, {"u": [fire("cart_abandonment", m(15))] if fires else [], "w": []})


@pytest.mark.parametrize(("extra", "fires"), [(0, True), (-1, False)])
def test_followup_set_at_the_end_obeys_the_bound(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    lines = [add("p", 0, user="u"), view(DAY + m(15, extra), user="w")]
    expected = [fire("cart_abandonment", m(15))]
    if fires:
        expected.append(fire("cart_abandonment_followup", DAY + m(15)))
    check(tmp_path, lines, {"u": expected})


def test_end_bound_counts_a_duplicate_but_not_an_invalid_line(tmp_path: Path) -> None:
    invalid = orjson.dumps(
        {"event_id": "bad", "user_id": "w", "type": "page_leave", "ts": T0 + DAY}
    ).decode()  # no dwell_ms
    lines = [add("p", 0, eid="a"), invalid, add("p", m(15), eid="a")]  # the last: a duplicate
    check(tmp_path, lines, [fire("cart_abandonment", m(15))])


# ------------------------------------------------------------------------ ordering


def test_the_arriving_events_own_trigger_comes_before_the_timers_it_releases(
    tmp_path: Path,
) -> None:
    # The page_leave is applied (and fires) first; then the cart timer (D=15) is decided.
    check(
        tmp_path,
        [add("p", 0), leave(m(16), 200_000, url="/a")],
        [fire("engaged_reader", m(16), "/a"), fire("cart_abandonment", m(15))],
    )


def test_timers_due_at_the_same_deadline_follow_the_tables_order(tmp_path: Path) -> None:
    # The follow-up (F=15 min, due DAY+15 min) and the close of the session whose latest
    # ts is DAY-15 min (due DAY+15 min) are decided together: follow-up first.
    lines = [add("p", 0), view(m(16)), pview("q", DAY - m(15)), view(DAY + m(15.5, 1))]
    check(
        tmp_path,
        lines,
        [
            fire("cart_abandonment", m(15)),
            fire("cart_abandonment_followup", DAY + m(15)),
            fire("browse_abandonment", DAY + m(15)),
        ],
    )


# -------------------------------------------------------------------- replay files


@pytest.mark.parametrize(
    ("lines", "triggers"),
    [([add("p", 0), view(m(16))], 1), ([add("p", 0), pview("p", m(1))], 0)],
    ids=["triggers-but-no-dead-letters", "nothing-at-all"],
)
def test_replay_with_no_output_lines(tmp_path: Path, lines: list[Line], triggers: int) -> None:
    # "the exit code is 0 unless the files cannot be read or written" (TRIGGERS.md)
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(_render(lines)) + "\n")
    out = tmp_path / "out.jsonl"
    dead = tmp_path / "dead.jsonl"
    code = main(["replay", str(events), "--out", str(out), "--dead-letter", str(dead), "--quiet"])
    assert code == 0
    assert dead.read_bytes() == b""
    assert len(_read_jsonl(out)) == triggers

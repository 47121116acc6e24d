"""Golden streams for TRIGGERS.md, with expectations written by hand from the spec.

Each test builds a small stream (times as offsets from T0), runs it through the
real `nudgeflow replay` (in-process CLI) and compares the detected triggers per
user, in output order, with the hand-written list. The same list is also checked
against the brute-force reference of `tests/reference/spec_model.py`, so the
reference and the hand reading of the spec keep each other honest; and for every
user of the stream the product's triggers (with their `detected_at`, the stream
clock when each was decided) must equal the reference's.

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
from reference.spec_rules import spec_rules_text

from nudgeflow.cli import main
from nudgeflow.core.events import Event, decode_event, parse_ts

T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z
SEC = 1000
MIN = 60 * SEC
HOUR = 60 * MIN
DAY = 24 * HOUR

Line = dict[str, Any] | str  # an event object, or a raw line (blank / invalid)
Fire = tuple[str, int, str | None]  # (trigger_type, fired_at offset from T0 in ms, scope)
# (trigger_type, fired_at, scope, detected_at), both times as offsets from T0 in ms
Timed = tuple[str, int, str | None, int]
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
        return [(kind, fired_at, scope) for kind, fired_at, scope, _ in self.timed(user)]

    def timed(self, user: str = "u") -> list[Timed]:
        return [
            (
                t["trigger_type"],
                parse_ts(t["fired_at"]) - T0,
                _scope(t["trigger_type"], t),
                parse_ts(t["detected_at"]) - T0,
            )
            for t in self.triggers
            if t["user_id"] == user
        ]

    def detected(self, user: str = "u") -> list[int]:
        """`detected_at` of the user's triggers (offsets from T0), in output order."""
        return [detected_at for *_, detected_at in self.timed(user)]

    def of(self, user: str = "u") -> list[dict[str, Any]]:
        return [t for t in self.triggers if t["user_id"] == user]

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
    tmp_path: Path,
    lines: Sequence[Line],
    profiles: Sequence[ProfileLine] | None = None,
    rules: str | None = None,
) -> Run:
    """Run `lines` through the real CLI and read the triggers and dead letters back.

    `rules` is the text of a rules file (default: the shipped rules but `high_intent`,
    which the reference does not model: `reference/spec_rules.py`).
    """
    rendered = _render(lines)
    profiles = _default_profiles(lines) if profiles is None else profiles
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(rendered) + "\n")
    profile_file = tmp_path / "profiles.jsonl"
    profile_file.write_text("".join(orjson.dumps(p).decode() + "\n" for p in profiles))
    out = tmp_path / "out.jsonl"
    dead = tmp_path / "dead.jsonl"
    argv = [
        "replay", str(events), "--out", str(out), "--dead-letter", str(dead),
        "--profiles", str(profile_file), "--quiet",
    ]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(spec_rules_text() if rules is None else rules)
    argv += ["--rules", str(rules_file)]
    code = main(argv)
    assert code == 0
    return Run(_read_jsonl(out), _read_jsonl(dead) if dead.exists() else [])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def reference_timed(
    lines: Sequence[Line], profiles: Sequence[ProfileLine] | None = None
) -> dict[str, list[Timed]]:
    """The same stream through the brute-force reference (the valid lines, in order)."""
    events = [e for e in map(decode_event, _render(lines)) if isinstance(e, Event)]
    profiles = _default_profiles(lines) if profiles is None else profiles
    last: dict[str, ProfileLine] = {p["user_id"]: p for p in profiles}
    segments = {user: segment_of(last.get(user)) for user in {e.user_id for e in events}}
    result = run_reference(events, segments)
    timed: dict[str, list[Timed]] = {}
    for user, detections in result.detections.items():
        timed[user] = []
        for d in detections:
            assert d.detected_at_ms is not None
            timed[user].append(
                (d.trigger_type, d.fired_at_ms - T0, d.scope, d.detected_at_ms - T0)
            )
    return timed


def reference_fires(
    lines: Sequence[Line], profiles: Sequence[ProfileLine] | None = None
) -> dict[str, list[Fire]]:
    return {
        user: [(kind, fired_at, scope) for kind, fired_at, scope, _ in timed]
        for user, timed in reference_timed(lines, profiles).items()
    }


def check(
    tmp_path: Path,
    lines: Sequence[Line],
    expected: Sequence[Fire] | Mapping[str, Sequence[Fire]],
    profiles: Sequence[ProfileLine] | None = None,
    rules: str | None = None,
) -> Run:
    """Hand expectations == reference == product (per user, in order).

    Every user's triggers, `detected_at` included, must also be the reference's.
    """
    wanted = {"u": list(expected)} if not isinstance(expected, Mapping) else {
        user: list(fires) for user, fires in expected.items()
    }
    reference = reference_fires(lines, profiles)
    for user, fires in wanted.items():
        assert reference.get(user, []) == fires, f"reference disagrees for {user}"
    run = replay(tmp_path, lines, profiles, rules)
    for user, fires in wanted.items():
        assert run.fires(user) == fires, f"product disagrees for {user}"
    timed = reference_timed(lines, profiles)
    for user in sorted(set(timed) | {t["user_id"] for t in run.triggers}):
        assert run.timed(user) == timed.get(user, []), f"product vs reference for {user}"
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


def test_duplicates_and_invalid_lines_do_not_move_the_users_clock(tmp_path: Path) -> None:
    invalid = orjson.dumps(
        {"event_id": "bad", "user_id": "u", "type": "add_to_cart", "ts": T0 + m(20)}
    ).decode()  # no product_id
    lines = [add("p", 0, eid="a"), add("p", m(20), eid="a"), invalid, purchase(m(1))]
    # The purchase at 0:01 is not late (neither the duplicate nor the invalid line moved
    # the user's clock c), but the duplicate raised the stream clock to 0:20: before the
    # purchase line, the watermark is 0 + (20 - 0) min - 30 s > D = 0:15 (new Time section).
    run = check(tmp_path, lines, [fire("cart_abandonment", m(15))])
    assert run.detected() == [m(20)]
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


# ------------------------------------------- the stream clock (TRIGGERS.md "Time")
#
# In replay the stream clock S is the largest ts of the valid lines read so far; a
# user's watermark is c + (S - S0) - L (c, S0: their clock and S just after their last
# applied event). Before each valid line its user's timers with D < watermark are
# decided, with S as it stood before the line; `detected_at` is S at the decision.


@pytest.mark.parametrize(("extra", "fires"), [(0, False), (1, True)])
def test_another_users_line_fires_a_quiet_users_reminder(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    # w's line moves S to 0:15:30 (+1 ms): before u's purchase line, u's watermark is
    # 0 + (S - 0) - 30 s = D (equal is not enough: the purchase cancels) or D + 1 ms.
    lines = [add("p", 0), view(m(15.5, extra), user="w"), purchase(m(1))]
    run = check(tmp_path, lines, {"u": [fire("cart_abandonment", m(15))] if fires else [],
                                  "w": []})
    assert run.detected() == ([m(15.5, 1)] if fires else [])  # S before the purchase line
    assert run.dead == []


def test_reminder_fires_before_a_second_add_and_a_new_episode_starts(tmp_path: Path) -> None:
    # 10:00 add; other traffic moves S to 10:16, so before the 10:20 add is applied the
    # 10:15 reminder is decided (cart: p). The 10:20 add then starts a new episode
    # (D = 10:35), decided at the end (D <= final S = 10:36) with p and q in the cart.
    lines = [add("p", 0), view(m(16), user="w"), add("q", m(20)), view(m(36), user="w")]
    run = check(
        tmp_path, lines,
        {"u": [fire("cart_abandonment", m(15)), fire("cart_abandonment", m(35))], "w": []},
    )
    first, second = run.of("u")
    assert [(i["product_id"], i["quantity"]) for i in first["metadata"]["items"]] == [("p", 1)]
    items = sorted((i["product_id"], i["quantity"]) for i in second["metadata"]["items"])
    assert items == [("p", 1), ("q", 1)]
    assert run.detected() == [m(16), m(36)]


INVALID_W = orjson.dumps(
    {"event_id": "bad", "user_id": "w", "type": "page_leave", "ts": T0 + m(16)}
).decode()  # no dwell_ms


@pytest.mark.parametrize(
    ("third", "fires"),
    [
        (view(m(15.5), user="w", eid="x"), False),  # a duplicate: S = 0:15:30, watermark = D
        (view(m(15.5, 1), user="w", eid="x"), True),  # a duplicate: S 1 ms further
        (INVALID_W, False),  # an invalid line never raises S
    ],
    ids=["duplicate-at-the-boundary", "duplicate-1ms-past", "invalid"],
)
def test_a_duplicate_line_raises_the_stream_clock(
    tmp_path: Path, third: Line, fires: bool
) -> None:
    lines = [add("p", 0), view(m(1), user="w", eid="x"), third, purchase(m(2))]
    run = check(tmp_path, lines, {"u": [fire("cart_abandonment", m(15))] if fires else [],
                                  "w": []})
    if fires:
        assert run.detected() == [m(15.5, 1)]
    assert run.dead_lines() == ([] if isinstance(third, dict) else [(3, run.dead[0]["reason"])])
    assert all(reason != "late" for _, reason in run.dead_lines())


def test_a_late_line_runs_step_1_for_its_user_but_moves_no_clock(tmp_path: Path) -> None:
    lines = [
        add("p", m(20)),  # c = 0:20, S0 = 0:20, D = 0:35
        view(m(36), user="w"),  # S = 0:36: u's watermark is 0:35:30
        view(m(1)),  # late for u (below 0:19:30); before it, u's reminder is decided
        view(m(50), user="w"),  # S = 0:50
        view(m(19.5)),  # exactly c - L: not late (the late line did not move c)
    ]
    run = check(tmp_path, lines, {"u": [fire("cart_abandonment", m(35))], "w": []})
    # Decided before the late line, with S as it stood then (0:36), not at the next line.
    assert run.detected() == [m(36)]
    assert run.dead_lines() == [(3, "late")]


@pytest.mark.parametrize(("extra", "fires"), [(0, False), (1, True)])
def test_a_device_clock_lagging_the_stream_is_not_late(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    # u's device is 2 h behind everyone: its events are far below S but not late (only
    # u's own clock counts), and u's timers move with S from S0 = 2:00 on.
    lines = [
        view(2 * HOUR, user="w"),
        add("p", 0),
        leave(m(1), 200_000, url="/a"),  # c = 0:01, S0 = 2:00
        view(2 * HOUR + m(14.5, extra), user="w"),  # watermark 0:01 + 14:30 - 0:30 (+1 ms)
        purchase(m(2)),
    ]
    expected = [fire("engaged_reader", m(1), "/a")]
    if fires:
        expected.append(fire("cart_abandonment", m(15)))
    run = check(tmp_path, lines, {"u": expected, "w": []})
    assert run.dead == []
    assert run.detected() == [2 * HOUR] + ([2 * HOUR + m(14.5, 1)] if fires else [])


def test_an_event_stamped_in_the_future_raises_the_stream_clock(tmp_path: Path) -> None:
    # Replay has no wall clock to cap S: w's event 10 days ahead moves u's watermark past
    # the reminder, the session close and the follow-up it sets, before u's purchase.
    lines = [add("p", 0), view(10 * DAY, user="w"), purchase(m(1))]
    run = check(
        tmp_path, lines,
        {"u": [fire("cart_abandonment", m(15)), fire("cart_abandonment_followup", DAY + m(15))],
         "w": []},
    )
    assert run.detected() == [10 * DAY, 10 * DAY]
    assert run.dead == []


@pytest.mark.parametrize(("extra", "closed"), [(0, False), (1, True)])
def test_the_stream_clock_closes_a_quiet_users_session_and_it_is_over(
    tmp_path: Path, extra: int, closed: bool
) -> None:
    lines = [
        view(0, "pricing"),
        pview("p", m(1)),  # the session's latest ts: it closes at 0:31
        view(m(31.5, extra), user="w"),  # u's watermark: 0:31 (+1 ms)
        # Inside the gap in event time. If the close was decided, that session is over:
        # this starts a new one, and the earlier session's pricing view makes a revisit.
        view(m(10), "pricing"),
    ]
    expected = [fire("browse_abandonment", m(31)), fire("pricing_revisit", m(10))]
    run = check(tmp_path, lines, {"u": expected if closed else [], "w": []})
    if closed:
        assert run.detected() == [m(31.5, 1), m(31.5, 1)]  # S before the line; S after it
        assert "p" in orjson.dumps(run.of("u")[0]["metadata"]).decode()


def _rules_with_cart_delay(delay: str) -> str:
    text = spec_rules_text()
    anchor = "    metadata: cart\n    channels: [sms, push, email]\n"
    assert text.count(anchor) == 1
    return text.replace(anchor, f"{anchor}    delay: {delay}\n")


@pytest.mark.parametrize(("extra", "sent"), [(0, False), (1, True)])
def test_a_delayed_send_goes_out_when_the_stream_clock_passes_it(
    tmp_path: Path, extra: int, sent: bool
) -> None:
    # cart_abandonment with `delay: 1h`: F = 0:15, the send is due at 1:15 (email, not
    # quiet hours). After u's 0:01 line (c = 0:01, S0 = 0:16) w moves S to 1:30:30 (+1 ms):
    # u's watermark is 0:01 + 1:14:30 - 0:30 = 1:15 (+1 ms) before u's purchase line. Past
    # the send time it went out before the purchase; at it (equal is not enough), the
    # purchase arrives first and cancels it.
    profiles = [
        {"user_id": "u", "segment": "regular", "opt_in": ["email"]},
        {"user_id": "w", "segment": "regular"},
    ]
    lines = [
        add("p", 0),
        view(m(16), user="w"),
        view(m(1)),  # before it, S = 0:16 decides the reminder (watermark 0:15:30)
        view(HOUR + m(30.5, extra), user="w"),
        purchase(m(2)),
    ]
    run = check(tmp_path, lines, {"u": [fire("cart_abandonment", m(15))], "w": []},
                profiles=profiles, rules=_rules_with_cart_delay("1h"))
    (record,) = run.of("u")
    assert run.detected() == [m(16)]
    if sent:
        assert (record["decision"], record["reason"]) == ("dispatched", None)
        assert record["channel"] == "email"
        assert parse_ts(record["send_at"]) - T0 == HOUR + m(15)
    else:
        assert (record["decision"], record["reason"]) == ("suppressed", "cancelled")


@pytest.mark.parametrize(("extra", "followup"), [(0, True), (-1, False)])
def test_the_end_decides_up_to_the_final_stream_clock_set_by_a_duplicate(
    tmp_path: Path, extra: int, followup: bool
) -> None:
    # The last line is a duplicate of w's: it sets the final S to DAY + 0:15 (-1 ms). At
    # the end every timer with D <= final S is decided (the bound, not u's watermark),
    # and the follow-up the reminder sets there obeys the same bound.
    lines = [
        add("p", 0),
        view(DAY, user="w", eid="x"),
        view(DAY + m(15, extra), user="w", eid="x"),
    ]
    expected = [fire("cart_abandonment", m(15))]
    if followup:
        expected.append(fire("cart_abandonment_followup", DAY + m(15)))
    run = check(tmp_path, lines, {"u": expected, "w": []})
    assert run.detected() == [DAY + m(15, extra)] * len(expected)


@pytest.mark.parametrize(("offset", "late"), [(0, False), (-1, True)])
def test_lateness_is_per_user_a_wrong_device_clock_makes_no_one_else_late(
    tmp_path: Path, offset: int, late: bool
) -> None:
    at = m(4.5, offset)
    lines = [
        view(10 * DAY, user="w"),  # w's device is 10 days ahead: S = 10 d
        view(m(5)),  # u's first event: not late, whatever S is
        leave(at, 200_000, url="/a"),  # against u's own clock: c - L = 0:04:30
    ]
    run = check(tmp_path, lines,
                {"u": [] if late else [fire("engaged_reader", at, "/a")], "w": []})
    assert run.dead_lines() == ([(3, "late")] if late else [])
    if not late:
        assert run.detected() == [10 * DAY]  # S after its line


@pytest.mark.parametrize(("extra", "fires"), [(0, False), (1, True)])
def test_the_stream_clock_counts_from_the_users_last_applied_event(
    tmp_path: Path, extra: int, fires: bool
) -> None:
    # S0 is S just after u's *last* applied event: the 0:01 view, read when S was 0:15,
    # resets u's watermark to c - L = 0:00:30. Then S = 0:29:30 (+1 ms) makes it
    # 0:01 + (0:29:30 - 0:15) - 0:30 = D = 0:15 (+1 ms).
    lines = [
        add("p", 0),
        view(m(15), user="w"),
        view(m(1)),
        view(m(29.5, extra), user="w"),
        purchase(m(2)),
    ]
    check(tmp_path, lines, {"u": [fire("cart_abandonment", m(15))] if fires else [], "w": []})


def test_an_invalid_line_runs_no_step_1(tmp_path: Path) -> None:
    # An invalid line has no trustworthy user: it decides nothing for the user it names
    # (the product's reading; the spec's "the line's user" could be read to include it).
    # Only `detected_at` can tell: u's reminder is decided before u's next valid line.
    invalid = orjson.dumps(
        {"event_id": "bad", "user_id": "u", "type": "add_to_cart", "ts": T0 + m(2)}
    ).decode()  # no product_id
    lines = [add("p", 0), view(m(16), user="w"), invalid, view(m(20), user="w"), view(m(1))]
    run = check(tmp_path, lines, {"u": [fire("cart_abandonment", m(15))], "w": []})
    assert run.detected() == [m(20)]
    assert run.dead_lines() == [(3, run.dead[0]["reason"])]


QUIET_WEEK = 8 * DAY  # longer than any window, cooldown or dedup span of the rules


@pytest.mark.parametrize(
    ("lines", "expected", "profiles"),
    [
        (  # an exact retransmission is a duplicate (|ts - ts0| <= 24 h): 2 page views only
            [view(0, eid="a"), view(m(1), eid="b"), view(QUIET_WEEK, user="w"),
             view(m(1), eid="b")],
            [],
            [{"user_id": "w", "segment": "regular"}],  # u has no profile: `new`
        ),
        (  # the engaged_reader cooldown of /a runs until 24:00 in u's event time
            [leave(0, 200_000, url="/a"), view(QUIET_WEEK, user="w"),
             leave(m(1), 200_000, url="/a")],
            [fire("engaged_reader", 0, "/a")],
            None,
        ),
        (  # the 0:02 view has 3 views of p in [-0:08, 0:02]; the first session's close
           # (fired, decided before it) puts the close of the second inside the cooldown
            [pview("p", 0), pview("p", m(1)), view(QUIET_WEEK, user="w"), pview("p", m(2))],
            [fire("browse_abandonment", m(31)), fire("product_interest", m(2), "p")],
            None,
        ),
        (  # the second abandonment of a vip within 7 d
            [add("p", 0), view(m(16), user="w"), view(m(1)), view(QUIET_WEEK, user="w"),
             add("p", m(2)), view(QUIET_WEEK + m(20), user="w"), view(m(3))],
            [fire("cart_abandonment", m(15)), fire("cart_abandonment_followup", DAY + m(15)),
             fire("cart_abandonment", m(17)), fire("vip_concierge", m(17)),
             fire("cart_abandonment_followup", DAY + m(17))],
            [{"user_id": "u", "segment": "vip"}, {"user_id": "w", "segment": "regular"}],
        ),
    ],
    ids=["dedup", "cooldown", "count-window", "vip-history"],
)
def test_a_quiet_week_of_stream_time_forgets_nothing_of_the_user(
    tmp_path: Path, lines: list[Line], expected: list[Fire], profiles: list[ProfileLine] | None
) -> None:
    # u's device lags: after S moved a week on, u's next events are stamped just after
    # u's own clock, so they are not late ("only the user's own events count") and must
    # be judged against all of u's history: dedup (|ts - ts0| <= 24 h), cooldowns and
    # count windows are in u's event time, and the stream clock only decides timers.
    run = check(tmp_path, lines, {"u": expected, "w": []}, profiles=profiles)
    assert run.dead == []

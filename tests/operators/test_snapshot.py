"""Versioned per-user snapshots, and resuming them under a changed rules file."""

from __future__ import annotations

import hashlib
import pickle
import sqlite3
from pathlib import Path

import orjson
import pytest
from bytewax.recovery import init_db_dir
from rule_texts import CART_ABANDONMENT

from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import Profile
from nudgeflow.core.rules import parse_rules
from nudgeflow.core.stream_clock import StreamClock
from nudgeflow.core.triggers import Decision
from nudgeflow.operators.detector import Detector, UserState
from nudgeflow.operators.snapshot import (
    DEFLATED,
    FORMAT,
    SnapshotFormatError,
    check_recovery,
    compact,
    decode,
    dump_user,
    encode,
)
from nudgeflow.operators.snapshot_dictionary import DICTIONARY

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z
MIN = 60_000
EMAIL = Profile(segment="regular", opt_in=("email",), timezone="Europe/Berlin", name="Ada")

CART = CART_ABANDONMENT
INTEREST = """
  - name: product_interest
    kind: count_in_window
    match: {event: page_view, where: {page_type: product}}
    window: %s
    min_count: 3
    scope: product_id
    cooldown: 24h
    channels: [email]
"""
RETARGETING = """
  - name: product_retargeting
    kind: count_in_window
    match: {event: page_view, where: {page_type: product}}
    window: 24h
    min_count: 4
    scope: product_id
    cooldown: 24h
    channels: [email]
"""
READER = """
  - name: engaged_reader
    kind: threshold
    match: {event: page_leave}
    field: dwell_ms
    above: 120000
    scope: url
    cooldown: 24h
    channels: %s
"""
LONG_READ = """
  - name: long_read
    kind: threshold
    match: {event: page_leave}
    field: dwell_ms
    above: 100000
    channels: [email]
"""
SESSIONS = """
  - name: browse_abandonment
    kind: session_close
    require: [{event: page_view, where: {page_type: product}}]
    forbid: [{event: add_to_cart}, {event: purchase}]
    cooldown: 24h
    channels: [email]
  - name: delayed_note
    kind: threshold
    match: {event: page_leave}
    field: dwell_ms
    above: 500000
    delay: 1h
    cancel_delayed_on: [{event: purchase}]
    channels: [email]
"""
# No frequency cap: each rule's own behaviour across the restart is what is looked at.
POLICIES = "policies: {frequency_cap: {per_day: 1000, per_week: 1000}}\n"
BEFORE = (POLICIES + "rules:" + CART + INTEREST % "10m" + RETARGETING + READER % "[email]"
          + SESSIONS)
# A rule added at the top, one removed, two reordered, one window changed, and a
# response-only change (channels) on a rule that keeps its state.
AFTER = (POLICIES + "rules:" + LONG_READ + READER % "[email, sms]" + CART + INTEREST % "20m"
         + SESSIONS)


class Stream:
    """One user's events through a detector, stamped as replay stamps them."""

    def __init__(self, detector: Detector, user: UserState | None = None) -> None:
        self.detector = detector
        self.user = user or detector.new_user("u1")
        self.clock = StreamClock()
        self.fired: list[tuple[str, int, str]] = []

    def send(self, n: int, kind: str, at: int, **fields: object) -> None:
        raw = orjson.dumps({"event_id": f"e{n}", "user_id": "u1", "type": kind,
                            "ts": T0 + at, **fields})
        event = decode_event(raw)
        assert isinstance(event, Event)
        stamp = self.clock.read(event.ts, None)
        _, decisions = self.detector.process(self.user, event, EMAIL, stream=stamp)
        self.fired += [(d.trigger.trigger_type, (d.trigger.fired_at_ms - T0) // MIN, d.decision)
                       for d in decisions]


def _history(detector: Detector) -> Stream:
    stream = Stream(detector)
    stream.send(1, "add_to_cart", 0, product_id="p1", price=10.0)
    stream.send(2, "page_view", 1 * MIN, page_type="product", product_id="p1")
    stream.send(3, "page_view", 2 * MIN, page_type="product", product_id="p1")
    stream.send(4, "page_leave", 3 * MIN, url="/a", dwell_ms=200_000)
    stream.send(5, "page_leave", 4 * MIN, url="/b", dwell_ms=600_000)  # delayed 1 h
    return stream


def _resume(blob: bytes, rules: str) -> Stream:
    detector = Detector(parse_rules(rules))
    user, _, _ = decode(detector, blob)
    stream = Stream(detector, user)
    stream.clock.read(T0 + 4 * MIN, None)  # the stream clock the partition resumes with
    return stream


def test_a_snapshot_round_trips_every_part_of_a_users_state() -> None:
    stream = _history(Detector(parse_rules(BEFORE)))
    blob = encode(stream.detector, stream.user, 123, "0-events")
    assert blob.startswith(b"NFUS" + bytes([FORMAT]))
    restored, wall, source = decode(stream.detector, blob)
    assert (wall, source) == (123, "0-events")
    assert dump_user(stream.detector, restored) == dump_user(stream.detector, stream.user)
    assert restored.timers.pending() == stream.user.timers.pending()


def test_resuming_under_the_same_rules_goes_on_as_if_never_stopped() -> None:
    straight = _history(Detector(parse_rules(BEFORE)))
    straight.send(6, "page_view", 20 * MIN, page_type="home")
    resumed = _resume(encode(straight.detector, _history(straight.detector).user, 0, None),
                      BEFORE)
    resumed.send(6, "page_view", 20 * MIN, page_type="home")
    assert resumed.fired == straight.fired[-len(resumed.fired):]
    assert ("cart_abandonment", 15, "dispatched") in resumed.fired


# A user parked when the flow stopped was stored deflated: the policy is the same.
@pytest.mark.parametrize("parked", [False, True], ids=["held", "parked"])
def test_a_changed_rules_file_keeps_resets_adds_and_drops_rules_by_the_policy(
    parked: bool,
) -> None:
    history = _history(Detector(parse_rules(BEFORE)))
    assert ("engaged_reader", 3, "dispatched") in history.fired
    blob = encode(history.detector, history.user, 0, None)
    resumed = _resume(compact(blob) if parked else blob, AFTER)

    resumed.send(6, "page_view", 5 * MIN, page_type="product", product_id="p1")
    # product_interest's window changed: its counts start over (kept, this view was the 3rd).
    assert [f for f in resumed.fired if f[0] == "product_interest"] == []
    resumed.send(7, "page_view", 6 * MIN, page_type="product", product_id="p1")
    resumed.send(8, "page_view", 7 * MIN, page_type="product", product_id="p1")
    assert ("product_interest", 7, "dispatched") in resumed.fired
    # engaged_reader moved and changed only its channels: its cooldown on /a holds.
    resumed.send(9, "page_leave", 8 * MIN, url="/a", dwell_ms=200_000)
    assert [f for f in resumed.fired if f[0] == "engaged_reader"] == []
    # long_read is new, at the top: it starts empty and fires on its first match.
    assert ("long_read", 8, "dispatched") in resumed.fired
    # cart_abandonment moved but is unchanged: its pending timer survived, and fires.
    resumed.send(10, "page_view", 20 * MIN, page_type="home")
    assert ("cart_abandonment", 15, "dispatched") in resumed.fired
    # product_retargeting is gone: its state with it, and it never fires.
    assert "product_retargeting" not in resumed.user.rule_states
    assert all(f[0] != "product_retargeting" for f in resumed.fired)
    # The delayed send decided before the restart still goes out when due.
    resumed.send(11, "page_view", 70 * MIN, page_type="home")
    assert ("delayed_note", 4, "dispatched") in resumed.fired


def test_ties_between_restored_timers_follow_the_rules_file_as_it_is_now() -> None:
    history = _history(Detector(parse_rules(BEFORE)))
    resumed = _resume(encode(history.detector, history.user, 0, None), AFTER)
    orders = {t.rule: t.rule_order for t in resumed.user.timers.pending()}
    assert orders["cart_abandonment"] == resumed.detector.by_name["cart_abandonment"].order == 2


@pytest.mark.parametrize("fmt", [2, 3, 4])
def test_a_snapshot_of_each_readable_format_still_loads(fmt: int) -> None:
    """The committed fixtures were written by FORMATs 2 to 4; every later format must read them."""
    blob = (FIXTURES / f"user_snapshot_format{fmt}.bin").read_bytes()
    assert blob[4] == fmt
    resumed = _resume(blob, BEFORE)
    resumed.send(6, "page_view", 20 * MIN, page_type="home")
    assert ("cart_abandonment", 15, "dispatched") in resumed.fired
    if fmt < 4:  # written before attribution existed: the abandonment fired now is watched
        assert len(resumed.user.attribution.watching) == 1


def test_an_upgrade_from_format_2_keeps_the_trigger_ids_the_policies_remember() -> None:
    blob = (FIXTURES / "user_snapshot_format2.bin").read_bytes()
    data, _, _ = pickle.loads(blob[5:])
    recent_ids = data["policy"][0]  # format 2: trigger_id -> fired_at, in full
    assert recent_ids
    restored, _, _ = decode(Detector(parse_rules(BEFORE)), blob)
    assert all(restored.policy.seen(trigger_id) for trigger_id in recent_ids)
    assert not restored.policy.seen("a trigger id never fired")
    # and written again, it is the current format, which reads back the same
    again = encode(Detector(parse_rules(BEFORE)), restored, 0, None)
    assert again[4] == FORMAT
    reread, _, _ = decode(Detector(parse_rules(BEFORE)), again)
    assert all(reread.policy.seen(trigger_id) for trigger_id in recent_ids)


def test_the_preset_dictionary_is_frozen() -> None:
    """Every format-4 snapshot ever written needs exactly these bytes to be read."""
    assert hashlib.sha256(DICTIONARY).hexdigest() == (
        "33eaebad1b2220c8de044c1d45479414b081d2aa15fad6ee165c4f9f44c9bf24")


def test_a_snapshot_costs_far_less_than_its_pickle() -> None:
    """What a parked user costs in memory: the names every user repeats are nearly free."""
    history = _history(Detector(parse_rules(BEFORE)))
    plain = encode(history.detector, history.user, 0, "0-events")
    deflated = compact(plain)
    assert deflated[4] == DEFLATED and compact(deflated) == deflated
    assert len(deflated) < 0.6 * len(plain)
    restored, wall, source = decode(history.detector, deflated)
    assert (wall, source) == (0, "0-events")
    assert dump_user(history.detector, restored) == dump_user(history.detector, history.user)


def test_a_damaged_snapshot_is_refused_with_one_line() -> None:
    history = _history(Detector(parse_rules(BEFORE)))
    blob = compact(encode(history.detector, history.user, 0, None))
    with pytest.raises(SnapshotFormatError, match="format-4 user snapshot that does not inflate"
                       ) as caught:
        decode(history.detector, blob[:5] + bytes(b ^ 0xFF for b in blob[5:40]) + blob[40:])
    assert "\n" not in str(caught.value)


def test_a_snapshot_of_another_format_is_refused_with_one_line() -> None:
    old = pickle.dumps((UserState, None))  # what format 1 was: a pickled UserState
    with pytest.raises(SnapshotFormatError, match=r"format 1 .*reads formats 2, 3 and 4") as caught:
        decode(Detector(parse_rules(BEFORE)), old)
    assert "\n" not in str(caught.value)


def test_a_recovery_directory_with_old_snapshots_is_refused_at_start(tmp_path: Path) -> None:
    init_db_dir(tmp_path, 1)
    (db_file,) = tmp_path.glob("*.sqlite3")
    history = _history(Detector(parse_rules(BEFORE)))
    current = pickle.dumps(encode(history.detector, history.user, 0, None))
    with sqlite3.connect(db_file) as db:
        db.execute("INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) "
                   "VALUES (?, ?, ?, ?)", ("nudgeflow_live.detect", "u1", 1, current))
    check_recovery(tmp_path, "nudgeflow_live.detect")  # ours: accepted

    with sqlite3.connect(db_file) as db:
        db.execute("INSERT INTO snaps (step_id, state_key, snap_epoch, ser_change) "
                   "VALUES (?, ?, ?, ?)", ("nudgeflow_live.detect", "u2", 1,
                                           pickle.dumps(pickle.dumps({"old": True}))))
    with pytest.raises(SnapshotFormatError, match="holds per-user state in format 1") as caught:
        check_recovery(tmp_path, "nudgeflow_live.detect")
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


def test_a_pending_delayed_send_survives_as_a_decision() -> None:
    history = _history(Detector(parse_rules(BEFORE)))
    (decision, rule), = history.user.pending_sends.values()
    assert isinstance(decision, Decision) and rule == "delayed_note"
    restored, _, _ = decode(history.detector, encode(history.detector, history.user, 0, None))
    assert restored.pending_sends == history.user.pending_sends


def write_fixture(fmt: int = FORMAT) -> None:
    """Writes a fixture of the current FORMAT, or of DEFLATED (run once per format)."""
    history = _history(Detector(parse_rules(BEFORE)))
    blob = encode(history.detector, history.user, 0, "0-events")
    if fmt == DEFLATED:
        blob = compact(blob)
    (FIXTURES / f"user_snapshot_format{fmt}.bin").write_bytes(blob)


if __name__ == "__main__":
    write_fixture()

"""Admission (duplicate, late) and the timer queue: the clockwork of TRIGGERS.md "Time"."""

from __future__ import annotations

import pytest

from nudgeflow.operators.event_time import Admission, Admit, TimerQueue

DAY = 86_400_000


def test_the_first_event_is_never_late_and_sets_the_watermark() -> None:
    admission = Admission(lateness_ms=30_000, retention_ms=DAY)
    assert admission.watermark is None
    assert admission.admit("a", 100_000) is Admit.APPLY
    assert admission.watermark == 70_000


def test_an_event_at_the_watermark_is_applied_one_ms_below_is_late() -> None:
    admission = Admission(lateness_ms=30_000, retention_ms=DAY)
    admission.admit("a", 100_000)
    assert admission.admit("b", 70_000) is Admit.APPLY
    assert admission.admit("c", 69_999) is Admit.LATE


def test_late_and_duplicate_events_do_not_move_the_watermark() -> None:
    admission = Admission(lateness_ms=30_000, retention_ms=DAY)
    admission.admit("a", 100_000)
    admission.admit("a", 500_000)  # duplicate: within 24 h of the first
    admission.admit("b", 1_000)  # late
    assert admission.max_ts == 100_000


def test_duplicates_within_24h_either_side_are_dropped_and_beyond_applied() -> None:
    admission = Admission(lateness_ms=30_000, retention_ms=2 * DAY)
    admission.admit("a", DAY)
    assert admission.admit("a", 2 * DAY) is Admit.DUPLICATE  # exactly 24 h later
    assert admission.admit("a", 2 * DAY + 1) is Admit.APPLY  # 24 h + 1 ms: a new event


def test_a_late_repeat_of_a_seen_id_is_a_duplicate_not_late() -> None:
    admission = Admission(lateness_ms=30_000, retention_ms=DAY)
    admission.admit("a", 0)
    admission.admit("b", 3_600_000)
    assert admission.admit("a", 0) is Admit.DUPLICATE


def test_late_events_are_not_remembered_for_dedup() -> None:
    admission = Admission(lateness_ms=30_000, retention_ms=DAY)
    admission.admit("a", 3_600_000)
    assert admission.admit("b", 0) is Admit.LATE
    assert admission.admit("b", 0) is Admit.LATE


def test_prune_forgets_ids_older_than_the_retention_behind_the_watermark() -> None:
    admission = Admission(lateness_ms=0, retention_ms=DAY)
    admission.admit("a", 0)
    admission.admit("b", DAY + 1)
    admission.prune()
    assert admission.remembered == 1
    assert admission.expires_at() == 2 * DAY + 1


def test_retention_shorter_than_the_dedup_span_is_refused() -> None:
    with pytest.raises(ValueError, match="24 h"):
        Admission(lateness_ms=0, retention_ms=DAY - 1)


def test_timers_are_due_strictly_after_their_deadline_in_deadline_then_rule_order() -> None:
    timers = TimerQueue()
    timers.set("browse", 6, "s1", 1_000)
    timers.set("cart", 0, "", 1_000)
    timers.set("followup", 1, "", 500)
    assert timers.pop_due(500, inclusive=False) is None  # D == watermark: not yet
    due = [timers.pop_due(1_001, inclusive=False) for _ in range(3)]
    assert [t.rule for t in due if t] == ["followup", "cart", "browse"]
    assert timers.pop_due(10_000, inclusive=False) is None


def test_end_of_replay_bound_is_inclusive() -> None:
    timers = TimerQueue()
    timers.set("cart", 0, "", 1_000)
    assert timers.pop_due(999, inclusive=True) is None
    timer = timers.pop_due(1_000, inclusive=True)
    assert timer is not None
    assert timer.deadline == 1_000


def test_setting_a_timer_again_moves_it_and_cancel_removes_it() -> None:
    timers = TimerQueue()
    timers.set("cart", 0, "", 1_000)
    timers.set("cart", 0, "", 2_000)
    assert len(timers) == 1
    assert timers.next_deadline() == 2_000
    timers.cancel("cart")
    assert timers.next_deadline() is None

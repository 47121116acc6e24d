"""Response policies (TRIGGERS.md "After detection"): whether, when and where a trigger is sent.

Applied in the spec's order: dedup, frequency cap, quiet hours, channel, delay,
experiment. Each detected trigger ends `dispatched` or `suppressed` with a
reason. Quiet hours and delay both move the send time, so they are computed
together on the chosen channel: the send time is the detection time plus the
rule's delay, pushed to the end of the quiet window for quiet channels.

The per-user state (`PolicyState`) lives with the user's detector: the flow is
keyed by user, so a user's triggers are all decided in one place and the cap is
exact across workers and processes without a shared store.
"""

from __future__ import annotations

from array import array
from bisect import insort
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nudgeflow.core import digests
from nudgeflow.core.digests import digest64
from nudgeflow.core.profiles import Profile
from nudgeflow.core.rules import PolicyConfig, RuleBase, VariantConfig
from nudgeflow.core.timeutil import MS_PER_DAY, datetime_to_ms, ms_to_datetime
from nudgeflow.core.triggers import Channel, Decision, Trigger, stable_fraction

WEEK_MS = 7 * MS_PER_DAY


class PolicyState:
    """What the policies remember of one user: recent trigger ids and dispatched send times.

    Trigger ids are remembered as (digest, fired_at) records (`core.digests`),
    the dispatched times as a sorted array of 64-bit integers: this is held for
    every user who ever had a trigger.
    """

    __slots__ = ("_recent", "dispatched")

    def __init__(self, recent: bytes = b"", dispatched: Iterable[int] = ()) -> None:
        self._recent = bytearray(recent)  # trigger id digest, fired_at
        self.dispatched: array[int] = array("q", sorted(dispatched))  # fired_at, dispatched

    @classmethod
    def from_ids(cls, recent_ids: dict[str, int], dispatched: Iterable[int]) -> PolicyState:
        """From trigger ids in full (how snapshots of format 2 hold them)."""
        state = cls(b"", dispatched)
        for trigger_id, fired_at in recent_ids.items():
            state.remember(trigger_id, fired_at)
        return state

    def seen(self, trigger_id: str) -> bool:
        return digests.find(self._recent, digest64(trigger_id)) >= 0

    def remember(self, trigger_id: str, fired_at: int) -> None:
        digest = digest64(trigger_id)
        offset = digests.find(self._recent, digest)
        if offset >= 0:
            digests.set_time(self._recent, offset, fired_at)
        else:
            digests.append(self._recent, digest, fired_at)

    def count_dispatched(self, fired_at: int) -> None:
        insort(self.dispatched, fired_at)

    def prune(self, watermark: int) -> None:
        horizon = watermark - WEEK_MS
        if self.dispatched and self.dispatched[0] < horizon:
            self.dispatched = array("q", (t for t in self.dispatched if t >= horizon))
        kept = digests.kept_since(self._recent, horizon)
        if kept is not None:
            self._recent = kept

    def to_data(self) -> tuple[bytes, list[int]]:
        return bytes(self._recent), list(self.dispatched)

    @property
    def empty(self) -> bool:
        return not self.dispatched and not self._recent


@dataclass(frozen=True, slots=True)
class Assignment:
    experiment: str
    variant: str | None
    holdout: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.experiment, "variant": self.variant, "holdout": self.holdout}


# Made per event, so not frozen (the note in nudgeflow.core.envelope); never changed once made.
@dataclass(slots=True)
class Plan:
    """A decision still to be made final: `decision` now, or a delayed send due at `send_at_ms`."""

    decision: Decision
    delayed: bool


@lru_cache(maxsize=512)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _parse_clock(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


class Policies:
    """The response policies of one rules file."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._quiet_start = _parse_clock(config.quiet_hours.start)
        self._quiet_end = _parse_clock(config.quiet_hours.end)
        self._quiet_channels = frozenset(config.quiet_hours.channels)
        self._default_zone = _zone(config.default_timezone) or ZoneInfo("UTC")

    # --- experiments --------------------------------------------------------------------

    def assign(self, rule: RuleBase, user_id: str) -> Assignment | None:
        """Stable assignment of a user to a rule's experiment: a hash of (experiment, user)."""
        experiment = rule.experiment
        if experiment is None:
            return None
        point = stable_fraction(experiment.name, user_id)
        if point < experiment.holdout:
            return Assignment(experiment.name, None, holdout=True)
        variants = experiment.variants
        if not variants:
            return Assignment(experiment.name, None, holdout=False)
        # Rescale the non-holdout part to [0, 1) so variant shares follow their weights.
        point = (point - experiment.holdout) / (1 - experiment.holdout)
        total = sum(v.weight for v in variants)
        edge = 0.0
        for variant in variants:
            edge += variant.weight / total
            if point < edge:
                return Assignment(experiment.name, variant.name, holdout=False)
        return Assignment(experiment.name, variants[-1].name, holdout=False)

    def _variant(self, rule: RuleBase, assignment: Assignment | None) -> VariantConfig | None:
        if assignment is None or assignment.variant is None or rule.experiment is None:
            return None
        for variant in rule.experiment.variants:
            if variant.name == assignment.variant:
                return variant
        return None

    # --- the decision -------------------------------------------------------------------

    def plan(
        self,
        trigger: Trigger,
        rule: RuleBase,
        profile: Profile,
        state: PolicyState,
        assignment: Assignment | None,
        *,
        event_clock: int | None = None,
        message_profile: Profile | None = None,
    ) -> Plan:
        """Decide a freshly detected trigger; a delayed send is only `dispatched` provisionally.

        A delay runs in event time, like every timer: the send is held while
        `fired_at + delay` is ahead of `event_clock` (the user's latest event
        time; `detected_at` when not given).
        """
        fired_at = trigger.fired_at_ms
        if state.seen(trigger.trigger_id):
            return Plan(Decision(trigger, "suppressed", "duplicate"), delayed=False)
        state.remember(trigger.trigger_id, fired_at)

        if rule.frequency_capped and self._capped(state, fired_at):
            return Plan(Decision(trigger, "suppressed", "frequency_cap"), delayed=False)

        variant = self._variant(rule, assignment)
        preference = (variant.channels if variant and variant.channels else None) or (
            rule.channels or self.config.channels
        )
        channel = next((c for c in preference if c in profile.opt_in), None)
        if channel is None:
            return Plan(Decision(trigger, "suppressed", "no_channel"), delayed=False)

        delay = variant.delay if variant and variant.delay is not None else rule.delay
        due = fired_at + delay
        now = trigger.detected_at_ms if event_clock is None else event_clock
        # Held only while its send time is ahead of the user's clock: a delay that
        # has already run out by the time the trigger is detected sends at once.
        delayed = due > now
        send_at = self._after_quiet_hours(
            due if delayed else trigger.detected_at_ms, channel, profile
        )
        if assignment is not None and assignment.holdout:
            return Plan(Decision(trigger, "suppressed", "holdout"), delayed=False)

        # Counted when decided, so a later trigger sees this one inside its window;
        # a delayed send that is cancelled gives its place back (`release`).
        state.count_dispatched(fired_at)
        decision = Decision(trigger, "dispatched", None, channel=channel, send_at_ms=send_at,
                            profile=message_profile)
        return Plan(decision, delayed=delayed)

    def release(self, state: PolicyState, fired_at: int) -> None:
        """A delayed send was cancelled: it no longer counts against the cap."""
        if fired_at in state.dispatched:
            state.dispatched.remove(fired_at)

    def _capped(self, state: PolicyState, at: int) -> bool:
        cap = self.config.frequency_cap
        day = week = 0
        for sent in state.dispatched:
            if at - WEEK_MS <= sent <= at:
                week += 1
                if at - MS_PER_DAY <= sent:
                    day += 1
        return day >= cap.per_day or week >= cap.per_week

    def _after_quiet_hours(self, send_at: int, channel: Channel, profile: Profile) -> int:
        if channel not in self._quiet_channels:
            return send_at
        zone = (_zone(profile.timezone) if profile.timezone else None) or self._default_zone
        local = ms_to_datetime(send_at).astimezone(zone)
        start, end = self._quiet_start, self._quiet_end
        clock = local.time()
        if start == end:
            return send_at
        # A window with start > end spans midnight, as 21:00-08:00 does.
        quiet = (clock >= start or clock < end) if start > end else (start <= clock < end)
        if not quiet:
            return send_at
        day = local.date() if clock < end else local.date() + timedelta(days=1)
        resume = datetime.combine(day, end, tzinfo=zone)
        return datetime_to_ms(resume)

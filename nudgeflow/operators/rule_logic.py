"""The logic of each rule kind, as plain classes the detector drives.

A rule kind is two classes: its parameters (`nudgeflow.core.rules`, which also
say what its triggers' metadata look like) and its logic here, which declares
the `kind` it implements and is found through `RuleLogic.registry`. A logic
object is built once per rule and shared by all users; the per-user state it
keeps lives in `UserState.rule_states[logic.name]`, created by `new_state()`,
and `dump`/`load` turn it into plain data for snapshots (`operators.snapshot`).
A logic reacts to what the detector hands it (an applied event, a trigger of
another rule, its timer, a closed session) and acts through the `Step` it is
given: `step.fire(...)`, `step.set_timer(...)`.
"""

from __future__ import annotations

from bisect import insort
from typing import TYPE_CHECKING, Any, ClassVar

from nudgeflow.core.rules import (
    AbsenceRule,
    CartEmpty,
    CountInWindowRule,
    EventMatch,
    NthEventRule,
    RevisitRule,
    RuleBase,
    SequenceCountRule,
    SessionCloseRule,
    ThresholdRule,
    TriggerRef,
)
from nudgeflow.core.timeutil import format_duration_ms, format_ms
from nudgeflow.operators.windows import Cooldowns, SlidingCounter

if TYPE_CHECKING:
    from nudgeflow.core.events import Event
    from nudgeflow.core.triggers import Trigger
    from nudgeflow.operators.detector import Step
    from nudgeflow.operators.event_time import Timer
    from nudgeflow.operators.sessions import Session

class SessionMatchers:
    """The event matches sessions must track (one bit each in `Session.matched`)."""

    def __init__(self) -> None:
        self.matches: list[EventMatch] = []

    def add(self, match: EventMatch) -> int:
        self.matches.append(match)
        return len(self.matches) - 1


# The event types that change a cart (operators.detector applies them).
CART_EVENTS: frozenset[str] = frozenset({"add_to_cart", "remove_from_cart", "purchase"})

# Scope of an event whose scope field is absent ("engaged_reader without a url").
NO_SCOPE = "\x00none"


def scope_of(event: Event, field: str | None) -> str:
    if field is None:
        return ""
    value = getattr(event, field)
    return NO_SCOPE if value is None else str(value)


def scope_value(scope: str) -> str | None:
    return None if scope == NO_SCOPE else scope


class Logic:
    """What the detector drives: a name its timers carry, an order, and hooks.

    Every hook does nothing unless a logic needs it. The rule kinds are
    `RuleLogic`s; sessions and delayed sends are logics of the same shape
    (`operators.internal`), so the detector hands every timer to the logic
    its name names.
    """

    name: str
    order: int

    def on_event(self, step: Step, event: Event, session: Session | None) -> None:
        """An event was applied to the user's state (cart and session already updated)."""

    def on_timer(self, step: Step, timer: Timer) -> None:
        """This logic's timer was decided."""


class RuleLogic(Logic):
    """Base of the rule kinds. A subclass that sets `kind` is registered for it."""

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[RuleLogic]]] = {}
    # Whether `on_event` needs the session the event was placed in.
    needs_sessions: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = vars(cls).get("kind")
        if kind is not None:
            RuleLogic.registry[kind] = cls

    def __init__(self, config: RuleBase, order: int) -> None:
        self.config = config
        self.order = order
        self.name = config.name
        self.fingerprint = config.detection_fingerprint()
        # Set in `__init__`, not as class defaults, which compiled classes do not inherit.
        # The trigger type whose firings this rule consumes (absence after a trigger, sequences).
        self.listens_to: str | None = None
        # The event types `on_event` can act on: the detector shows a rule no other.
        self.watches: frozenset[str] = frozenset()

    @classmethod
    def build(cls, config: Any, order: int, sessions: SessionMatchers) -> RuleLogic:
        """The logic of `config`; `sessions` registers event matches a session must track."""
        return cls(config, order)

    def new_state(self) -> Any:
        return None

    def dump(self, state: Any) -> Any:
        """The per-user state as plain data (builtins only), for a snapshot."""
        return state

    def load(self, data: Any) -> Any:
        """The per-user state from what `dump` made."""
        return data

    def on_trigger(self, step: Step, trigger: Trigger) -> None:
        """A trigger of `listens_to` fired for this user."""

    def on_session_close(self, step: Step, session: Session) -> None:
        """A session of the user closed."""

    def prune(self, state: Any, watermark: int) -> None:
        """Drop what no decision at or after `watermark` can see."""

    def state_empty(self, state: Any) -> bool:
        return state is None


class AbsenceLogic(RuleLogic):
    """A deadline `timeout` after the latest start (event or trigger), unless cancelled first.

    The pending timer *is* the episode: it exists while an episode is open, a
    further start moves it to the latest start + timeout, a cancel deletes it,
    and deciding it fires once and ends the episode.
    """

    kind = "absence"

    def __init__(self, config: AbsenceRule, order: int) -> None:
        super().__init__(config, order)
        self.rule = config
        self.start_event = config.after if isinstance(config.after, EventMatch) else None
        if isinstance(config.after, TriggerRef):
            self.listens_to = config.after.trigger
        self.cancel_events = [c for c in config.cancel_on if isinstance(c, EventMatch)]
        self.cancel_when_empty = any(isinstance(c, CartEmpty) for c in config.cancel_on)
        watches = {match.event for match in self.cancel_events}
        if self.start_event is not None:
            watches.add(self.start_event.event)
        if self.cancel_when_empty:  # only these change the cart
            watches |= CART_EVENTS
        self.watches = frozenset(watches)

    def on_event(self, step: Step, event: Event, session: Session | None) -> None:
        if step.has_timer(self) and (
            any(match.matches(event) for match in self.cancel_events)
            or (self.cancel_when_empty and step.cart.empty)
        ):
            step.cancel_timer(self)
            by_event = any(match.matches(event) for match in self.cancel_events)
            cause = f"by {event.type}" if by_event else f"the cart is empty after {event.type}"
            if step.trace is not None:
                step.note(self, event.ts, f"cancelled: {cause}")
        if self.start_event is not None and self.start_event.matches(event):
            self._start(step, event.ts)

    def on_trigger(self, step: Step, trigger: Trigger) -> None:
        self._start(step, trigger.fired_at_ms)

    def _start(self, step: Step, at: int) -> None:
        deadline = at + self.rule.timeout
        current = step.timer_deadline(self)
        deadline = deadline if current is None else max(current, deadline)
        step.set_timer(self, deadline)
        verb = "started" if current is None else "moved"
        if step.trace is not None:
            step.note(self, at, f"deadline {verb}: {format_ms(deadline)}")

    def on_timer(self, step: Step, timer: Timer) -> None:
        metadata = step.cart.snapshot() if self.rule.metadata == "cart" else {}
        step.fire(self, timer.deadline, "", metadata)


class CountInWindowLogic(RuleLogic):
    """The matching event that makes `min_count` or more in `[ts - window, ts]` for its scope.

    Rules that count the same events by the same scope (product_interest and
    product_retargeting) share one counter: the first of them in the file owns
    it, adds each event and keeps it for the longest of their windows; the
    others only read it. Their cooldowns stay their own.
    """

    kind = "count_in_window"

    def __init__(self, config: CountInWindowRule, order: int) -> None:
        super().__init__(config, order)
        self.rule = config
        self.watches = frozenset({config.match.event})
        self.owner: CountInWindowLogic = self
        self.keep_ms = config.window

    def share_counter_with(self, owner: CountInWindowLogic) -> None:
        self.owner = owner
        owner.keep_ms = max(owner.keep_ms, self.rule.window)

    def new_state(self) -> tuple[SlidingCounter | None, Cooldowns]:
        return (SlidingCounter() if self.owner is self else None), Cooldowns(self.rule.cooldown)

    def on_event(self, step: Step, event: Event, session: Session | None) -> None:
        if not self.rule.match.matches(event):
            return
        cooldowns = step.state(self)[1]
        counter: SlidingCounter = step.state(self.owner)[0]
        scope = scope_of(event, self.rule.scope)
        ts = event.ts
        if self.owner is self:
            counter.add(scope, ts)
        count = counter.count(scope, ts - self.rule.window, ts)
        if count < self.rule.min_count:
            if step.trace is not None:
                step.note(self, ts, f"{count} of {self.rule.min_count} needed within "
                          f"{format_duration_ms(self.rule.window)} for {scope_value(scope)!r}")
            return
        if cooldowns.blocked(scope, ts):
            if step.trace is not None:
                step.note(self, ts, f"{count} within the window, but the cooldown is running")
            return
        metadata: dict[str, Any] = {"count": count, "window": format_duration_ms(self.rule.window)}
        if self.rule.scope is not None:
            metadata[self.rule.scope] = scope_value(scope)
        if step.fire(self, ts, scope, metadata):
            cooldowns.record(scope, ts)

    def prune(self, state: tuple[SlidingCounter | None, Cooldowns], watermark: int) -> None:
        counter, cooldowns = state
        if counter is not None:
            counter.prune(watermark - self.keep_ms)
        cooldowns.prune(watermark)

    def dump(self, state: tuple[SlidingCounter | None, Cooldowns]) -> Any:
        counter, cooldowns = state
        return (None if counter is None else counter.to_data()), cooldowns.to_data()

    def load(self, data: Any) -> tuple[SlidingCounter | None, Cooldowns]:
        counter_data, cooldown_data = data
        counter = None
        if self.owner is self:  # the owner may have changed with the rules: it keeps one
            counter = SlidingCounter.from_data(counter_data or {})
        return counter, Cooldowns.from_data(self.rule.cooldown, cooldown_data)

    def state_empty(self, state: tuple[SlidingCounter | None, Cooldowns] | None) -> bool:
        return state is None or ((state[0] is None or state[0].empty) and state[1].empty)


class _CooldownsOnly(RuleLogic):
    """A rule whose only per-user state is its cooldowns."""

    cooldown_ms: int

    def new_state(self) -> Cooldowns:
        return Cooldowns(self.cooldown_ms)

    def prune(self, state: Cooldowns, watermark: int) -> None:
        state.prune(watermark)

    def state_empty(self, state: Cooldowns | None) -> bool:
        return state is None or state.empty

    def dump(self, state: Cooldowns) -> Any:
        return state.to_data()

    def load(self, data: Any) -> Cooldowns:
        return Cooldowns.from_data(self.cooldown_ms, data)


class ThresholdLogic(_CooldownsOnly):
    """A matching event whose numeric `field` is above `above`."""

    kind = "threshold"

    def __init__(self, config: ThresholdRule, order: int) -> None:
        super().__init__(config, order)
        self.rule = config
        self.cooldown_ms = config.cooldown
        self.watches = frozenset({config.match.event})

    def on_event(self, step: Step, event: Event, session: Session | None) -> None:
        if not self.rule.match.matches(event):
            return
        value = getattr(event, self.rule.field)
        if value is None or value <= self.rule.above:
            if step.trace is not None:
                step.note(self, event.ts,
                          f"{self.rule.field} {value} is not above {self.rule.above:g}")
            return
        cooldowns: Cooldowns = step.state(self)
        scope = scope_of(event, self.rule.scope)
        if cooldowns.blocked(scope, event.ts):
            if step.trace is not None:
                step.note(self, event.ts, "above the threshold, but the cooldown is running")
            return
        metadata: dict[str, Any] = {self.rule.field: value}
        if self.rule.scope is not None:
            metadata[self.rule.scope] = scope_value(scope)
        if step.fire(self, event.ts, scope, metadata):
            cooldowns.record(scope, event.ts)


class RevisitLogic(RuleLogic):
    """A matching event when an *earlier* session had one within `[ts - within, ts]`."""

    kind = "revisit"

    def __init__(self, config: RevisitRule, order: int) -> None:
        super().__init__(config, order)
        self.rule = config
        self.watches = frozenset({config.match.event})

    def new_state(self) -> tuple[list[tuple[int, int]], Cooldowns]:
        # (ts, session index) of matching events, sorted by ts
        return [], Cooldowns(self.rule.cooldown)

    def on_event(self, step: Step, event: Event, session: Session | None) -> None:
        if session is None or not self.rule.match.matches(event):
            return
        seen, cooldowns = step.state(self)
        ts = event.ts
        earliest = ts - self.rule.within
        previous = [t for t, index in seen if index < session.index and earliest <= t <= ts]
        insort(seen, (ts, session.index))
        if not previous:
            if step.trace is not None:
                step.note(self, ts, "no matching event in an earlier session within "
                          f"{format_duration_ms(self.rule.within)}")
            return
        if cooldowns.blocked("", ts):
            if step.trace is not None:
                step.note(self, ts, "a revisit, but the cooldown is running")
            return
        metadata = {"previous_visit_at": format_ms(max(previous)), "url": event.url}
        if step.fire(self, ts, "", metadata):
            cooldowns.record("", ts)

    def prune(self, state: tuple[list[tuple[int, int]], Cooldowns], watermark: int) -> None:
        seen, cooldowns = state
        horizon = watermark - self.rule.within
        if seen and seen[0][0] < horizon:
            seen[:] = [item for item in seen if item[0] >= horizon]
        cooldowns.prune(watermark)

    def state_empty(self, state: tuple[list[tuple[int, int]], Cooldowns] | None) -> bool:
        return state is None or (not state[0] and state[1].empty)

    def dump(self, state: tuple[list[tuple[int, int]], Cooldowns]) -> Any:
        return list(state[0]), state[1].to_data()

    def load(self, data: Any) -> tuple[list[tuple[int, int]], Cooldowns]:
        seen, cooldowns = data
        return [tuple(x) for x in seen], Cooldowns.from_data(self.rule.cooldown, cooldowns)


class SessionCloseLogic(_CooldownsOnly):
    """A closed session that had every `require` match and no `forbid` match."""

    kind = "session_close"

    def __init__(self, config: SessionCloseRule, order: int, require: list[int], forbid: list[int]):
        super().__init__(config, order)
        self.rule = config
        self.cooldown_ms = config.cooldown
        # indices into the detector's list of session matchers
        self.require = require
        self.forbid = forbid

    @classmethod
    def build(cls, config: Any, order: int, sessions: SessionMatchers) -> RuleLogic:
        require = [sessions.add(m) for m in config.require]
        forbid = [sessions.add(m) for m in config.forbid]
        return cls(config, order, require, forbid)

    def on_session_close(self, step: Step, session: Session) -> None:
        matched = session.matched
        fired_at = session.close_at(step.session_gap)
        if not all(matched >> i & 1 for i in self.require):
            if step.trace is not None:
                step.note(self, fired_at,
                          f"session {session.index} closed without a required event")
            return
        if any(matched >> i & 1 for i in self.forbid):
            if step.trace is not None:
                step.note(self, fired_at, f"session {session.index} closed with a forbidden event")
            return
        cooldowns: Cooldowns = step.state(self)
        if cooldowns.blocked("", fired_at):
            if step.trace is not None:
                step.note(self, fired_at, f"session {session.index} qualified, but the cooldown "
                          "is running")
            return
        metadata = {
            "products": list(session.products),
            "session_start": format_ms(session.start_ts),
            "session_end": format_ms(session.latest_ts),
        }
        if step.fire(self, fired_at, "", metadata):
            cooldowns.record("", fired_at)


class SequenceCountLogic(RuleLogic):
    """A trigger of `trigger` that makes `min_count` or more of them in `[F - window, F]`."""

    kind = "sequence_count"

    def __init__(self, config: SequenceCountRule, order: int) -> None:
        super().__init__(config, order)
        self.rule = config
        self.listens_to = config.trigger

    def new_state(self) -> tuple[list[int], Cooldowns]:
        return [], Cooldowns(self.rule.cooldown)

    def on_trigger(self, step: Step, trigger: Trigger) -> None:
        history, cooldowns = step.state(self)
        fired_at = trigger.fired_at_ms
        insort(history, fired_at)
        start = fired_at - self.rule.window
        count = sum(1 for t in history if start <= t <= fired_at)
        if count < self.rule.min_count:
            if step.trace is not None:
                step.note(self, fired_at, f"{count} {self.rule.trigger} of {self.rule.min_count} "
                          f"needed within {format_duration_ms(self.rule.window)}")
            return
        if cooldowns.blocked("", fired_at):
            if step.trace is not None:
                step.note(self, fired_at, "enough, but the cooldown is running")
            return
        metadata = {
            "count": count,
            "window": format_duration_ms(self.rule.window),
            "of": self.rule.trigger,
            "trigger_id": trigger.trigger_id,
        }
        if step.fire(self, fired_at, "", metadata):
            cooldowns.record("", fired_at)

    def prune(self, state: tuple[list[int], Cooldowns], watermark: int) -> None:
        history, cooldowns = state
        horizon = watermark - self.rule.window
        if history and history[0] < horizon:
            history[:] = [t for t in history if t >= horizon]
        cooldowns.prune(watermark)

    def state_empty(self, state: tuple[list[int], Cooldowns] | None) -> bool:
        return state is None or (not state[0] and state[1].empty)

    def dump(self, state: tuple[list[int], Cooldowns]) -> Any:
        return list(state[0]), state[1].to_data()

    def load(self, data: Any) -> tuple[list[int], Cooldowns]:
        history, cooldowns = data
        return list(history), Cooldowns.from_data(self.rule.cooldown, cooldowns)


class NthEventLogic(RuleLogic):
    """The user's `n`th matching event ever, in arrival order; once per user.

    The state is the count so far, capped at `n`: the only state that is kept
    forever, one small integer per user who ever matched.
    """

    kind = "nth_event"

    def __init__(self, config: NthEventRule, order: int) -> None:
        super().__init__(config, order)
        self.rule = config
        self.watches = frozenset({config.match.event})

    def new_state(self) -> int:
        return 0

    def on_event(self, step: Step, event: Event, session: Session | None) -> None:
        if not self.rule.match.matches(event):
            return
        count: int = step.state(self)
        if count >= self.rule.n:
            return
        count += 1
        # A plain int (a small one is shared by every user), so it is replaced, not changed.
        step.set_state(self, count)
        if step.trace is not None:
            step.note(self, event.ts, f"matching event {count} of {self.rule.n}")
        if count == self.rule.n:
            step.fire(self, event.ts, "", {"count": self.rule.n})

    def state_empty(self, state: int | None) -> bool:
        return not state

    def dump(self, state: int) -> Any:
        return [state]  # the snapshot's data since format 2

    def load(self, data: Any) -> int:
        return int(data[0])

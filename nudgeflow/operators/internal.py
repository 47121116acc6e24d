"""The detector's own logics: sessions and delayed sends, driven like the rule kinds.

Their timers carry their names (`@sessions`, `@sends`: rule names cannot
start with `@`), so the detector hands every decided timer to the logic it
names, whatever it is.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Final

from nudgeflow.core.policies import Policies
from nudgeflow.core.rules import EventMatch
from nudgeflow.core.triggers import Decision
from nudgeflow.operators.rule_logic import Logic, RuleLogic, SessionCloseLogic, SessionMatchers

if TYPE_CHECKING:
    from nudgeflow.core.events import Event
    from nudgeflow.operators.detector import Step
    from nudgeflow.operators.event_time import Timer
    from nudgeflow.operators.sessions import Session

SESSIONS: Final = "@sessions"
SENDS: Final = "@sends"

# The timer keys of a user's first sessions, shared by every user (a str each otherwise).
_SESSION_KEYS: Final = tuple(str(index) for index in range(256))


class SessionsLogic(Logic):
    """Places each applied event in a session and closes sessions when their timer is due.

    A session's close is decided in the position of the first session rule in
    the rules' order, so ties with other rules' timers keep the table's order.
    """

    name = SESSIONS

    def __init__(
        self, gap_ms: int, matchers: SessionMatchers, rules: list[SessionCloseLogic], order: int
    ) -> None:
        self.gap_ms = gap_ms
        # Per event type, the (bit, match) of the matches that can see it.
        self._matchers: dict[str, list[tuple[int, EventMatch]]] = {}
        for index, match in enumerate(matchers.matches):
            self._matchers.setdefault(match.event, []).append((1 << index, match))
        self.rules = rules
        self.order = order

    def place(self, step: Step, event: Event) -> Session:
        user = step.user
        session, _ended = user.sessions.place(event.ts)
        session.events += 1
        for bit, match in self._matchers.get(event.type, ()):
            if not session.matched & bit and match.matches(event):
                session.matched |= bit
        if (
            event.type == "page_view"
            and event.page_type == "product"
            and event.product_id is not None
            and event.product_id not in session.products
        ):
            session.products += (sys.intern(event.product_id),)
        # An ended session keeps the close timer it had; the current one's moves with it.
        index = session.index
        key = _SESSION_KEYS[index] if index < len(_SESSION_KEYS) else str(index)
        user.timers.set(self.name, self.order, key, session.close_at(self.gap_ms))
        return session

    def on_timer(self, step: Step, timer: Timer) -> None:
        session = step.user.sessions.close(int(timer.key))
        if session is not None:
            for logic in self.rules:
                logic.on_session_close(step, session)


class DelayedSendsLogic(Logic):
    """Holds a delayed send as a timer until it is due, or cancels it (TRIGGERS.md policy 5)."""

    name = SENDS
    order = 0  # a send's timer carries the order of the rule that made it

    def __init__(self, rules: dict[str, RuleLogic], policies: Policies) -> None:
        self.rules = rules
        self.policies = policies

    def hold(self, step: Step, decision: Decision, logic: RuleLogic) -> None:
        assert decision.send_at_ms is not None
        trigger_id = decision.trigger.trigger_id
        step.user.hold_send(trigger_id, decision, logic.name)
        step.user.timers.set(self.name, logic.order, trigger_id, decision.send_at_ms)

    def on_event(self, step: Step, event: Event, session: Session | None) -> None:
        user = step.user
        for trigger_id, (decision, rule) in list(user.pending_sends.items()):
            logic = self.rules.get(rule)
            if logic is None:
                continue
            if any(match.matches(event) for match in logic.config.cancel_delayed_on):
                user.drop_send(trigger_id)
                user.timers.cancel(self.name, trigger_id)
                self.policies.release(user.policy, decision.trigger.fired_at_ms)
                step.out.append(Decision(decision.trigger, "suppressed", "cancelled"))
                if step.trace is not None:
                    step.note(logic, event.ts,
                              f"delayed send of {trigger_id} cancelled by {event.type}")

    def on_timer(self, step: Step, timer: Timer) -> None:
        pending = step.user.drop_send(timer.key)
        if pending is not None:
            step.out.append(pending[0])

    def finish(self, step: Step) -> None:
        """Replay's end: a send still held is reported dispatched, with its future send time."""
        for decision, _ in step.user.pending_sends.values():
            step.out.append(decision)
        for trigger_id in list(step.user.pending_sends):
            step.user.timers.cancel(self.name, trigger_id)
            step.user.drop_send(trigger_id)

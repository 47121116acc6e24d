"""The per-user detector: event time, cart, sessions, rules and policies for one user.

`Detector` is built once from a rules file and shared; `UserState` is one
user's data (picklable, snapshotted by the bytewax wrapper). The detector
applies TRIGGERS.md "Time" to the letter:

1. with the stream clock as it stood before the event was read, the user's
   timers with deadline < watermark (`c + (S - S0) - L`) are decided;
2. admission: duplicate (24 h of event time), then late (below `c - L`: the
   user's own clock, never the stream's);
3. an applied event updates the cart and the sessions, cancels delayed sends it
   cancels, and is shown to every rule in the rules' order (rules whose
   condition becomes true fire at once);
4. then every pending timer with deadline < watermark (now `c - L`) is
   decided, in order of deadline and then rule order; deciding one may set
   others, which obey the same bound.

Each detected trigger goes through the policies at once and comes out as a
`Decision`, except a delayed send, which is held as a timer until it is due or
cancelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from nudgeflow.core.events import EVENT_TYPES, Event
from nudgeflow.core.outcomes import Outcome, attributed
from nudgeflow.core.policies import Policies, PolicyState
from nudgeflow.core.profiles import NO_PROFILE, Profile, held_profile
from nudgeflow.core.rules import RulesConfig
from nudgeflow.core.stream_clock import StreamStamp
from nudgeflow.core.timeutil import MS_PER_DAY, MS_PER_HOUR
from nudgeflow.core.triggers import Decision, Trigger, make_trigger_id
from nudgeflow.operators.attribution import Attribution
from nudgeflow.operators.cart import EMPTY_CART, Cart
from nudgeflow.operators.event_time import Admission, Admit, TimerQueue
from nudgeflow.operators.intent_logic import HighIntentLogic  # noqa: F401  (registers the kind)
from nudgeflow.operators.internal import DelayedSendsLogic, SessionsLogic
from nudgeflow.operators.rule_logic import (
    CountInWindowLogic,
    Logic,
    RevisitLogic,
    RuleLogic,
    SessionCloseLogic,
    SessionMatchers,
)
from nudgeflow.operators.sessions import SessionTracker
from nudgeflow.operators.tumbling import TumblingCounter

# (event time, rule name, what happened): the story `nudgeflow explain` tells.
Trace = list[tuple[int, str, str]]


class UserState:
    """Everything nudgeflow keeps for one user. Data only: the logic is `Detector`.

    Held for every active user, so it is kept small (ARCHITECTURE.md "Per-user
    state"): what most users do not need (a cart, delayed sends, policy memory)
    is None until first needed and read through a shared empty stand-in.
    """

    __slots__ = (
        "_attribution", "_cart", "_pending", "_policy", "admission", "daily", "hourly", "profile",
        "pruned_at", "rule_states", "sessions", "stream_at", "timers", "user_id",
    )

    def __init__(
        self,
        user_id: str,
        admission: Admission,
        sessions: SessionTracker,
        timers: TimerQueue,
        *,
        cart: Cart | None = None,
        rule_states: dict[str, Any] | None = None,
        policy: PolicyState | None = None,
        pending_sends: dict[str, tuple[Decision, str]] | None = None,
        profile: Profile = NO_PROFILE,
        pruned_at: int | None = None,
        stream_at: int | None = None,
        hourly: TumblingCounter | None = None,
        daily: TumblingCounter | None = None,
        attribution: Attribution | None = None,
    ) -> None:
        self.user_id = user_id
        self.admission = admission
        self._cart = None if cart is None or cart.empty else cart
        self.sessions = sessions
        self.timers = timers
        # rule name -> that rule's state for this user (absent until the rule first needs one)
        self.rule_states: dict[str, Any] = {} if rule_states is None else rule_states
        self._policy = None if policy is None or policy.empty else policy
        # trigger_id -> (provisional decision, rule name) of delayed sends not yet due
        self._pending = pending_sends or None
        self.profile = profile
        self.pruned_at = pruned_at
        # S0: the stream clock just after the user's latest applied event (None: no stream clock)
        self.stream_at = stream_at
        # events per hour and per day (tumbling, event time): features for an intent model
        self.hourly = TumblingCounter(MS_PER_HOUR) if hourly is None else hourly
        self.daily = TumblingCounter(MS_PER_DAY) if daily is None else daily
        # triggers waiting for a purchase in their attribution window, and their outcomes
        self._attribution = None if attribution is None or attribution.empty else attribution

    @property
    def cart(self) -> Cart:
        """The user's cart (read it; change it through `cart_to_change`)."""
        return EMPTY_CART if self._cart is None else self._cart

    def cart_to_change(self) -> Cart:
        if self._cart is None:
            self._cart = Cart()
        return self._cart

    def cart_changed(self) -> None:
        """Called after a change: an emptied cart is dropped, not kept empty."""
        if self._cart is not None and self._cart.empty:
            self._cart = None

    @property
    def policy(self) -> PolicyState:
        """What the policies remember of the user, created when first asked for (to change)."""
        if self._policy is None:
            self._policy = PolicyState()
        return self._policy

    @property
    def policy_empty(self) -> bool:
        return self._policy is None or self._policy.empty

    def prune_policy(self, watermark: int) -> None:
        if self._policy is not None:
            self._policy.prune(watermark)
            if self._policy.empty:
                self._policy = None

    @property
    def attribution(self) -> Attribution:
        """Watched triggers, recent purchases, outcomes (read; change: `attribution_to_change`)."""
        return _NO_ATTRIBUTION if self._attribution is None else self._attribution

    def attribution_to_change(self) -> Attribution:
        if self._attribution is None:
            self._attribution = Attribution()
        return self._attribution

    def prune_attribution(self, watermark: int) -> None:
        if self._attribution is not None:
            self._attribution.prune(watermark)
            if self._attribution.empty:
                self._attribution = None

    def drain_outcomes(self) -> list[Outcome]:
        """The outcomes found since the last call (the operator emits them in the same batch)."""
        return [] if self._attribution is None else self._attribution.drain()

    @property
    def pending_sends(self) -> Mapping[str, tuple[Decision, str]]:
        """trigger_id -> (provisional decision, rule name) of delayed sends not yet due."""
        return _NO_SENDS if self._pending is None else self._pending

    @property
    def has_pending_sends(self) -> bool:
        return self._pending is not None

    def hold_send(self, trigger_id: str, decision: Decision, rule: str) -> None:
        if self._pending is None:
            self._pending = {}
        self._pending[trigger_id] = (decision, rule)

    def drop_send(self, trigger_id: str) -> tuple[Decision, str] | None:
        if self._pending is None:
            return None
        held = self._pending.pop(trigger_id, None)
        if not self._pending:
            self._pending = None
        return held


_NO_SENDS: Mapping[str, tuple[Decision, str]] = MappingProxyType({})
# Read by users who never had a trigger or a purchase watched; never changed (see above).
_NO_ATTRIBUTION: Final = Attribution()


class Step:
    """What rules may see and do while the detector handles one input of one user."""

    __slots__ = ("clock", "detector", "event_clock", "message_profile", "out", "trace", "user")

    def __init__(
        self,
        detector: Detector,
        user: UserState,
        clock: int,
        trace: Trace | None = None,
        event_clock: int | None = None,
    ) -> None:
        self.detector = detector
        self.user = user
        self.clock = clock  # detected_at of whatever fires during this step
        # The user's event time now, what delays are measured against like every timer:
        # their latest ts, or the end of the input when a replay finishes.
        max_ts = user.admission.max_ts
        if event_clock is None:
            event_clock = clock if max_ts is None else max_ts
        self.event_clock = event_clock
        self.out: list[Decision] = []
        self.trace = trace
        # The whole profile the event came with (its name too, which the user's held
        # profile leaves out): what a trigger fired now is rendered with, no lookup.
        self.message_profile: Profile | None = None

    def note(self, logic: Logic | None, at: int, message: str) -> None:
        """Record why a rule did or did not act (only when explaining: `trace` is set).

        Callers test `step.trace is not None` first: building the message costs
        more than most rules' work, and only `explain` reads it.
        """
        if self.trace is not None:
            self.trace.append((at, logic.name if logic is not None else "", message))

    @property
    def cart(self) -> Cart:
        return self.user.cart

    @property
    def session_gap(self) -> int:
        return self.detector.session_gap

    def state(self, logic: RuleLogic) -> Any:
        """The rule's state for this user, created on first use."""
        states = self.user.rule_states
        value = states.get(logic.name)
        if value is None:
            value = states[logic.name] = logic.new_state()
        return value

    def set_state(self, logic: RuleLogic, value: Any) -> None:
        """Replace the rule's state for this user (for a state that is an immutable value)."""
        self.user.rule_states[logic.name] = value

    def has_timer(self, logic: RuleLogic) -> bool:
        return self.user.timers.get(logic.name) is not None

    def timer_deadline(self, logic: RuleLogic) -> int | None:
        timer = self.user.timers.get(logic.name)
        return None if timer is None else timer.deadline

    def set_timer(self, logic: RuleLogic, deadline: int, key: str = "") -> None:
        self.user.timers.set(logic.name, logic.order, key, deadline)

    def cancel_timer(self, logic: RuleLogic, key: str = "") -> None:
        self.user.timers.cancel(logic.name, key)

    def fire(self, logic: RuleLogic, fired_at: int, scope: str, metadata: dict[str, Any]) -> bool:
        """Emit a trigger of `logic`'s rule unless the user is outside the rule's segment.

        Returns whether it fired, so the rule can start its cooldown.
        """
        return self.detector.fire(self, logic, fired_at, scope, metadata)


class Detector:
    """The rules of one rules file, applied to users' states. Shared by all users."""

    def __init__(self, config: RulesConfig) -> None:
        self.config = config
        self.lateness = config.time.lateness
        self.session_gap = config.time.session_gap
        self.dedup_retention = config.time.dedup_retention
        self.policies = Policies(config.policies)
        matchers = SessionMatchers()
        self.logics: list[RuleLogic] = [
            RuleLogic.registry[rule.kind].build(rule, order, matchers)
            for order, rule in enumerate(config.enabled_rules)
        ]
        self._share_counters()
        self.by_name: dict[str, RuleLogic] = {logic.name: logic for logic in self.logics}
        # Per event type, the rules that watch it, in file order: most rules watch one type.
        self._watching: dict[str, list[RuleLogic]] = {
            kind: [x for x in self.logics if kind in x.watches] for kind in EVENT_TYPES
        }
        self._listeners: dict[str, list[RuleLogic]] = {}
        for logic in self.logics:
            if logic.listens_to is not None:
                self._listeners.setdefault(logic.listens_to, []).append(logic)
        session_rules = [x for x in self.logics if isinstance(x, SessionCloseLogic)]
        self._uses_sessions = any(
            isinstance(x, SessionCloseLogic | RevisitLogic) or x.needs_sessions
            for x in self.logics
        )
        self.sessions = SessionsLogic(
            self.session_gap, matchers, session_rules,
            min((x.order for x in session_rules), default=len(self.logics)),
        )
        self.sends = DelayedSendsLogic(self.by_name, self.policies)
        # Who decides a timer: the logic its name names.
        self._timer_logics: dict[str, Logic] = {
            **self.by_name, self.sessions.name: self.sessions, self.sends.name: self.sends,
        }
        # How far behind the watermark any state can still matter: past it, a user is forgotten.
        horizons = [self.dedup_retention, 7 * 86_400_000]
        for rule in config.enabled_rules:
            for name in ("cooldown", "window", "within", "attribution_window"):
                horizons.append(int(getattr(rule, name, 0) or 0))
        self.horizon = max(horizons) + self.lateness

    def _share_counters(self) -> None:
        owners: dict[tuple[str, str | None], CountInWindowLogic] = {}
        for logic in self.logics:
            if isinstance(logic, CountInWindowLogic):
                key = (logic.rule.match.model_dump_json(), logic.rule.scope)
                owner = owners.setdefault(key, logic)
                if owner is not logic:
                    logic.share_counter_with(owner)

    # --- users ------------------------------------------------------------------------

    def new_user(self, user_id: str) -> UserState:
        return UserState(
            user_id=user_id,
            admission=Admission(self.lateness, self.dedup_retention),
            sessions=SessionTracker(self.session_gap),
            timers=TimerQueue(),
        )

    def process(
        self,
        user: UserState,
        event: Event,
        profile: Profile | None = None,
        now: int | None = None,
        *,
        trace: Trace | None = None,
        stream: StreamStamp | None = None,
    ) -> tuple[Admit, list[Decision]]:
        """Admit one arriving event and apply it; return its fate and the decisions it caused.

        The decisions include those of timers the stream clock made due before
        the event (step 1), whatever the event's own fate. `now` is the wall
        clock in live mode (it becomes `detected_at`); replay passes None and
        the stream clock stands in for it (the user's clock without one).
        """
        if profile is not None:
            held = user.profile
            # The profile store's reads share these parts (`make_profile`): a profile that
            # did not change is known by identity, without building a key.
            if not (profile.segment is held.segment and profile.opt_in is held.opt_in
                    and profile.timezone is held.timezone):
                user.profile = held_profile(profile)
        self._prune(user)
        out: list[Decision] = []
        if stream is not None and stream.before is not None:
            out = self.advance(user, stream.before, now, trace)
        verdict = user.admission.admit(event.event_id, event.ts)
        if verdict is not Admit.APPLY:
            return verdict, out
        if stream is not None:
            user.stream_at = stream.after
        clock = self._event_clock(user)
        if now is None and stream is not None and stream.after is not None:
            now = stream.after
        step = Step(self, user, clock if now is None else now, trace, event_clock=clock)
        step.message_profile = profile
        self._apply(step, event)
        self._decide(step, self._watermark(user), inclusive=False)
        out.extend(step.out)
        return verdict, out

    def advance(
        self,
        user: UserState,
        stream: int,
        now: int | None = None,
        trace: Trace | None = None,
        *,
        forget: bool = False,
    ) -> list[Decision]:
        """The stream clock is at `stream`: decide the user's timers its watermark passed.

        Live mode calls it while the user is quiet; both modes call it before
        each of the user's events (with the clock as it stood before that event).
        With `forget` (live mode, quiet users only), a user quiet for longer than
        the horizon of stream time is pruned as far as the stream clock took them.
        """
        if user.admission.max_ts is None or (not user.timers and not forget):
            return []  # most users, most of the time: nothing could be due
        user_now = self.user_clock(user, stream)
        step = Step(self, user, stream if now is None else now, trace, event_clock=user_now)
        self._decide(step, user_now - self.lateness, inclusive=False)
        if forget and user_now - self._event_clock(user) > self.horizon:
            # Quiet for longer than any rule looks back: forgotten, so a live flow's
            # memory is bounded by its active users. The price is exactness for a device
            # whose clock lags the stream by more than the horizon (README "Time,
            # exactly"); replay, whose clock a future-stamped line can move by weeks,
            # never forgets, so no user's device can make another user forgotten.
            self._prune(user, user_now - self.lateness)
        return step.out

    def user_clock(self, user: UserState, stream: int | None) -> int:
        """`c + (S - S0)`: the user's clock moved on by the stream clock since their last event.

        A stream clock behind `S0` (read again from an earlier offset after a
        restart) moves nothing: the user's clock never goes back.
        """
        clock = self._event_clock(user)
        if stream is None or user.stream_at is None:
            return clock
        return clock + max(0, stream - user.stream_at)

    def finish(self, user: UserState, end: int, trace: Trace | None = None) -> list[Decision]:
        """Replay's end: decide every timer with deadline <= `end` (the input's largest ts)."""
        self._prune(user)
        step = Step(self, user, end, trace, event_clock=end)
        self._decide(step, end, inclusive=True)
        # What is still pending has not happened within the recording; a delayed send
        # already decided stays dispatched at its send time.
        self.sends.finish(step)
        return step.out

    def stream_due(self, user: UserState) -> int | None:
        """The stream clock at which the user's next timer is due (their watermark past it)."""
        deadline = user.timers.next_deadline()
        if deadline is None:
            return None
        return self._stream_for(user, deadline + self.lateness + 1)

    def stream_expiry(self, user: UserState) -> int | None:
        """The stream clock at which the user has been quiet for longer than the horizon."""
        clock = user.admission.max_ts
        return None if clock is None else self._stream_for(user, clock + self.horizon + 1)

    def _stream_for(self, user: UserState, user_clock: int) -> int:
        """The stream clock `S` at which `c + (S - S0)` reaches `user_clock`."""
        anchor = user.stream_at if user.stream_at is not None else self._event_clock(user)
        return anchor + max(0, user_clock - self._event_clock(user))

    def idle(self, user: UserState) -> bool:
        """True when the user's state holds nothing: it may be dropped."""
        return (
            not len(user.timers)
            and user.cart.empty
            and not user.pending_sends
            and user.sessions.open_sessions == 0
            and user.admission.remembered == 0
            and user.policy_empty
            and user.attribution.empty
            and all(logic.state_empty(user.rule_states.get(logic.name)) for logic in self.logics)
        )

    # --- the steps --------------------------------------------------------------------

    def _watermark(self, user: UserState) -> int:
        watermark = user.admission.watermark
        assert watermark is not None  # only called once an event was applied
        return watermark

    @staticmethod
    def _event_clock(user: UserState) -> int:
        max_ts = user.admission.max_ts
        return 0 if max_ts is None else max_ts

    def _prune(self, user: UserState, watermark: int | None = None) -> None:
        # `c - L` is at most every future decision time and every future applied
        # `ts`, so what lies behind it can be dropped exactly. Pruning once per
        # event-time minute keeps the cost off the per-event path.
        if watermark is None:
            watermark = user.admission.watermark
        if watermark is None:
            return
        if user.pruned_at is not None and watermark < user.pruned_at + 60_000:
            return
        user.pruned_at = watermark
        user.admission.prune(watermark)
        user.prune_policy(watermark)
        user.prune_attribution(watermark)
        # An emptied rule state stays: deleting it from the dict leaves a dummy slot that
        # makes the dict grow on a later insert, which costs more than the state.
        for logic in self.logics:
            state = user.rule_states.get(logic.name)
            if state is not None:
                logic.prune(state, watermark)

    def features(self, user: UserState, at: int) -> dict[str, int]:
        """Per-user activity features at event time `at` (tumbling hour and day counts)."""
        return {
            "events_this_hour": user.hourly.current(at),
            "events_today": user.daily.current(at),
            "cart_items": len(user.cart.snapshot()["items"]),
            "open_sessions": user.sessions.open_sessions,
        }

    def _apply(self, step: Step, event: Event) -> None:
        user = step.user
        user.hourly.add(event.ts)
        user.daily.add(event.ts)
        kind = event.type
        if kind == "add_to_cart":
            user.cart_to_change().add(event.product_id or "", event.qty, event.price)
        elif kind == "remove_from_cart" and not user.cart.empty:
            user.cart.remove(event.product_id or "", event.qty)
            user.cart_changed()
        elif kind == "purchase":
            cart = user.cart
            user.attribution_to_change().on_purchase(
                event.ts, event.value, tuple(item[0] for item in cart.to_data())
            )
            if not cart.empty:
                cart.clear()
                user.cart_changed()
        session = self.sessions.place(step, event) if self._uses_sessions else None
        if user.has_pending_sends:
            self.sends.on_event(step, event, session)
        for logic in self._watching[event.type]:
            logic.on_event(step, event, session)

    def _decide(self, step: Step, bound: int, *, inclusive: bool) -> None:
        timers = step.user.timers
        if not timers:
            return
        while (timer := timers.pop_due(bound, inclusive=inclusive)) is not None:
            self._timer_logics[timer.rule].on_timer(step, timer)

    def fire(
        self, step: Step, logic: RuleLogic, fired_at: int, scope: str, metadata: dict[str, Any]
    ) -> bool:
        user = step.user
        rule = logic.config
        profile = user.profile
        if rule.segment is not None and profile.segment != rule.segment:
            if step.trace is not None:
                step.note(logic, fired_at, f"condition held, but the user's segment is "
                          f"{profile.segment!r} and the rule is for {rule.segment!r}")
            return False
        assignment = self.policies.assign(rule, user.user_id)
        if assignment is not None:
            metadata["experiment"] = assignment.to_json()
        trigger = Trigger(
            trigger_id=make_trigger_id(rule.name, user.user_id, fired_at, scope),
            trigger_type=rule.name,
            user_id=user.user_id,
            fired_at_ms=fired_at,
            detected_at_ms=max(step.clock, fired_at),
            segment=profile.segment,
            metadata=metadata,
        )
        plan = self.policies.plan(
            trigger, rule, profile, user.policy, assignment, event_clock=step.event_clock,
            message_profile=step.message_profile,
        )
        if step.trace is not None:
            outcome = plan.decision
            verdict = (f"dispatched via {outcome.channel}" if outcome.dispatched
                       else f"suppressed ({outcome.reason})")
            held = " after its delay" if plan.delayed else ""
            if step.trace is not None:
                step.note(logic, fired_at, f"FIRED {trigger.trigger_id}: {verdict}{held}")
        # Watched from now, a delayed send too: its window starts at fired_at, as its
        # holdout's does, whether it is later sent or cancelled.
        if attributed(plan.decision.decision, plan.decision.reason):
            user.attribution_to_change().watch(plan.decision, rule.attribution_window)
        if plan.delayed and plan.decision.send_at_ms is not None:
            self.sends.hold(step, plan.decision, logic)
        else:
            step.out.append(plan.decision)
        for listener in self._listeners.get(rule.name, ()):
            listener.on_trigger(step, trigger)
        return True


"""A brute-force reference of the detection semantics of TRIGGERS.md (default rules).

Written from the spec alone, for clarity, not speed: for each user it keeps the
full list of applied events (each with the stream clock just after it) and a log
of timer decisions, and recomputes every rule, the sessions and the watermark from
that history at each step. Only detection is modelled (which trigger, for whom, at
what `fired_at`, detected at which stream clock, with which key metadata); the
response policies (decision, reason, channel, delays) are not. `high_intent` is
not modelled.

Reading of the spec that this model follows (TRIGGERS.md "Time", replay mode, and
"Precise readings"):

- The stream clock `S` is the largest `ts` of the valid lines read so far
  (duplicates and late lines included). A user's clock `c` is the largest `ts` of
  their applied events; `S0` is `S` just after their latest applied event; their
  watermark is `c + (S - S0) - L` (so `c - L` right after an applied event).
- Each valid line, in order: (1) with `S` as it stood before the line, the line's
  user's pending timers with D < watermark are decided; (2) admission: duplicate
  when an applied event of the user had the same `event_id` with
  |ts - ts0| <= 24 h, else late when ts < c - L (the user's own clock, never `S`),
  else applied; (3) `S` rises to the line's `ts` if larger; (4) if applied, `c`
  and `S0` are updated, the event's immediate rules fire (table order), then the
  user's pending timers with D < c - L are decided.
- Invalid lines are not given to this model at all: they neither move `S` nor run
  step (1) for anyone. (The spec's step (1) names "the line's user"; an invalid
  line has no trustworthy user, and the product does not run step (1) for it. It
  can only change `detected_at`: the timers it would decide are decided at that
  user's next valid line, or at the end, with the same results in the same order.)
- Deciding: pending timers due under the bound are decided one at a time,
  smallest D first, ties in the table's order of rules (then session order); a
  timer set by a decision (a follow-up) joins the queue under the same bound.
- At the end of a replay, every pending timer with D <= the final `S` is decided
  the same way (follow-ups set then obey the same bound).
- `detected_at` is the stream clock at the decision: `S` before the line for
  step (1), `S` after the line for step (4) and the event's own rules, the final
  `S` at the end ("a recording is replayed as if its own clock were the wall clock").
- Sessions: an applied event joins the user's current (latest) session when its
  `ts` is under 30 min after that session's latest `ts` and that session's close
  has not been decided; otherwise it starts a new session ("a session whose close
  was decided is over").
- A cooldown "not again until fired_at + X" blocks a later firing of the same
  scope whose fired_at is < (previous fired_at) + X.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal

from nudgeflow.core.events import Event

SECOND: Final = 1000
MINUTE: Final = 60 * SECOND
HOUR: Final = 60 * MINUTE
DAY: Final = 24 * HOUR

LATENESS: Final = 30 * SECOND
SESSION_GAP: Final = 30 * MINUTE
DEDUP_SPAN: Final = DAY
CART_TIMEOUT: Final = 15 * MINUTE
FOLLOWUP_TIMEOUT: Final = DAY
INTEREST_WINDOW: Final = 10 * MINUTE
INTEREST_MIN: Final = 3
INTEREST_COOLDOWN: Final = DAY
RETARGET_WINDOW: Final = DAY
RETARGET_MIN: Final = 4
RETARGET_COOLDOWN: Final = DAY
READER_ABOVE: Final = 120_000
READER_COOLDOWN: Final = DAY
PRICING_WITHIN: Final = 48 * HOUR
PRICING_COOLDOWN: Final = 48 * HOUR
BROWSE_COOLDOWN: Final = DAY
VIP_WINDOW: Final = 7 * DAY
VIP_MIN: Final = 2
VIP_COOLDOWN: Final = 7 * DAY
WELCOME_N: Final = 3

# The table's order of rules (TRIGGERS.md, "Default rules").
RULE_ORDER: Final = (
    "cart_abandonment",
    "cart_abandonment_followup",
    "product_interest",
    "product_retargeting",
    "engaged_reader",
    "pricing_revisit",
    "browse_abandonment",
    "vip_concierge",
    "new_visitor_welcome",
    "high_intent",
)

Admission = Literal["apply", "duplicate", "late"]
Items = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Detection:
    """One detected trigger, reduced to what the spec pins down."""

    trigger_type: str
    user_id: str
    fired_at_ms: int
    # product_id for product rules, url (or None) for engaged_reader, else None.
    scope: str | None = None
    # cart rules: the cart at the decision, (product_id, quantity) sorted by product_id.
    items: Items | None = None
    # the stream clock S when it was decided (replay's detected_at); None: not known
    detected_at_ms: int | None = None


@dataclass(frozen=True, slots=True)
class _Applied:
    """An applied event and the stream clock just after it was read (its S0)."""

    event: Event
    stream_after: int


@dataclass(frozen=True, slots=True)
class _Decided:
    """A timer was decided (fired or not). `session` indexes the user's sessions."""

    rule: str
    deadline: int
    fired: bool
    session: int = -1


@dataclass(frozen=True, slots=True)
class _Timer:
    rule: str
    deadline: int
    session: int = -1

    def order(self) -> tuple[int, int, int]:
        return (self.deadline, RULE_ORDER.index(self.rule), self.session)


@dataclass(slots=True)
class _CartView:
    """Cart, open episode and pending follow-up, recomputed from the log."""

    cart: dict[str, int] = field(default_factory=dict)
    episode_adds: list[int] | None = None  # ts of the adds of the open episode
    followup_from: int | None = None  # F of the abandonment whose follow-up is pending


def segment_of(profile: Mapping[str, object] | None) -> str:
    """A profile line -> segment: no profile or a non-string segment means `new`."""
    if profile is None:
        return "new"
    segment = profile.get("segment")
    return segment if isinstance(segment, str) else "new"


class UserModel:
    """One user's history and the detections it implies."""

    def __init__(self, user_id: str, segment: str = "new") -> None:
        self.user_id = user_id
        self.segment = segment
        self.log: list[_Applied | _Decided] = []
        self.detections: list[Detection] = []
        self.now: int | None = None  # the stream clock of the decisions being made

    # ----- history -----

    def applied(self) -> list[Event]:
        return [entry.event for entry in self.log if isinstance(entry, _Applied)]

    def clock(self) -> int | None:
        """c: the largest ts of the user's applied events (None before the first)."""
        events = self.applied()
        return max(event.ts for event in events) if events else None

    def late_below(self) -> int | None:
        """c - L: an arriving event with a smaller ts is late. The user's own clock only."""
        clock = self.clock()
        return None if clock is None else clock - LATENESS

    def watermark(self, stream: int) -> int | None:
        """c + (S - S0) - L, with S0 the stream clock just after the latest applied event."""
        applied = [entry for entry in self.log if isinstance(entry, _Applied)]
        clock = self.clock()
        if clock is None:
            return None
        stream_at_last = applied[-1].stream_after
        return clock + (stream - stream_at_last) - LATENESS

    def sessions(self) -> list[list[Event]]:
        """All applied events split into sessions, in arrival order.

        A decided close ends a session: the next event starts a new one whatever its ts.
        """
        sessions: list[list[Event]] = []
        over: set[int] = set()
        for entry in self.log:
            if isinstance(entry, _Decided):
                if entry.rule == "browse_abandonment":
                    over.add(entry.session)
                continue
            event = entry.event
            current = len(sessions) - 1
            if (
                sessions
                and current not in over
                and event.ts < max(e.ts for e in sessions[current]) + SESSION_GAP
            ):
                sessions[current].append(event)
            else:
                sessions.append([event])
        return sessions

    def cart_view(self) -> _CartView:
        view = _CartView()
        for entry in self.log:
            if isinstance(entry, _Decided):
                if entry.rule == "cart_abandonment":
                    view.episode_adds = None
                    if entry.fired:
                        view.followup_from = entry.deadline
                elif entry.rule == "cart_abandonment_followup":
                    view.followup_from = None
                continue
            event = entry.event
            if event.type == "add_to_cart":
                assert event.product_id is not None
                view.cart[event.product_id] = view.cart.get(event.product_id, 0) + event.qty
                if view.episode_adds is None:
                    view.episode_adds = []
                view.episode_adds.append(event.ts)
                view.followup_from = None
            elif event.type == "remove_from_cart":
                assert event.product_id is not None
                if event.product_id in view.cart:
                    left = view.cart[event.product_id] - event.qty
                    if left > 0:
                        view.cart[event.product_id] = left
                    else:
                        del view.cart[event.product_id]
                    if not view.cart:
                        view.episode_adds = None
                        view.followup_from = None
            elif event.type == "purchase":
                view.cart = {}
                view.episode_adds = None
                view.followup_from = None
        return view

    def fired(self, trigger_type: str, scope: str | None = None) -> list[int]:
        return [
            d.fired_at_ms
            for d in self.detections
            if d.trigger_type == trigger_type and d.scope == scope
        ]

    def cooldown_open(
        self, trigger_type: str, at: int, cooldown: int, scope: str | None = None
    ) -> bool:
        """'not again until fired_at + X', for every earlier firing of that scope."""
        return all(at >= f + cooldown for f in self.fired(trigger_type, scope))

    def decided_sessions(self) -> set[int]:
        return {
            entry.session
            for entry in self.log
            if isinstance(entry, _Decided) and entry.rule == "browse_abandonment"
        }

    def pending_timers(self) -> list[_Timer]:
        timers: list[_Timer] = []
        view = self.cart_view()
        if view.episode_adds is not None:
            timers.append(_Timer("cart_abandonment", max(view.episode_adds) + CART_TIMEOUT))
        if view.followup_from is not None:
            timers.append(
                _Timer("cart_abandonment_followup", view.followup_from + FOLLOWUP_TIMEOUT)
            )
        decided = self.decided_sessions()
        for index, session in enumerate(self.sessions()):
            if index not in decided:
                latest = max(event.ts for event in session)
                timers.append(_Timer("browse_abandonment", latest + SESSION_GAP, index))
        return timers

    # ----- arrival -----

    def admission(self, event: Event) -> Admission:
        """Step (2): duplicate, then late (below the user's own c - L), else apply."""
        for seen in self.applied():
            if seen.event_id == event.event_id and abs(event.ts - seen.ts) <= DEDUP_SPAN:
                return "duplicate"
        below = self.late_below()
        if below is not None and event.ts < below:
            return "late"
        return "apply"

    def before_line(self, stream: int) -> None:
        """Step (1): the stream clock stands at `stream` before one of the user's lines."""
        watermark = self.watermark(stream)
        if watermark is None:
            return  # nothing applied yet: no clock, no timers
        self.now = stream
        self._decide_timers(lambda deadline: deadline < watermark)

    def apply(self, event: Event, stream_after: int) -> None:
        """Step (4): the event is applied; `stream_after` is S once the line was read."""
        self.log.append(_Applied(event, stream_after))
        self.now = stream_after
        self._immediate(event)
        watermark = self.watermark(stream_after)
        assert watermark is not None
        assert watermark == max(e.ts for e in self.applied()) - LATENESS  # c - L
        self._decide_timers(lambda deadline: deadline < watermark)

    def finish(self, end_ms: int) -> None:
        """The end of a replay: every pending timer with D <= the final S."""
        self.now = end_ms
        self._decide_timers(lambda deadline: deadline <= end_ms)

    # ----- rules that fire when an event is applied -----

    def _immediate(self, event: Event) -> None:
        events = self.applied()
        if event.type == "page_view" and event.page_type == "product":
            product = event.product_id
            views = [
                e.ts
                for e in events
                if e.type == "page_view" and e.page_type == "product" and e.product_id == product
            ]
            for rule, window, minimum, cooldown in (
                ("product_interest", INTEREST_WINDOW, INTEREST_MIN, INTEREST_COOLDOWN),
                ("product_retargeting", RETARGET_WINDOW, RETARGET_MIN, RETARGET_COOLDOWN),
            ):
                count = sum(1 for ts in views if event.ts - window <= ts <= event.ts)
                if count >= minimum and self.cooldown_open(rule, event.ts, cooldown, product):
                    self._emit(Detection(rule, self.user_id, event.ts, product))
        if (
            event.type == "page_leave"
            and event.dwell_ms is not None
            and event.dwell_ms > READER_ABOVE
            and self.cooldown_open("engaged_reader", event.ts, READER_COOLDOWN, event.url)
        ):
            self._emit(Detection("engaged_reader", self.user_id, event.ts, event.url))
        if event.type == "page_view" and event.page_type == "pricing":
            earlier = self.sessions()[:-1]  # the event itself is in the last session
            revisit = any(
                e.type == "page_view"
                and e.page_type == "pricing"
                and event.ts - PRICING_WITHIN <= e.ts <= event.ts
                for session in earlier
                for e in session
            )
            if revisit and self.cooldown_open("pricing_revisit", event.ts, PRICING_COOLDOWN):
                self._emit(Detection("pricing_revisit", self.user_id, event.ts))
        if event.type == "page_view" and self.segment == "new":
            page_views = sum(1 for e in events if e.type == "page_view")
            if page_views == WELCOME_N:
                self._emit(Detection("new_visitor_welcome", self.user_id, event.ts))

    # ----- timers -----

    def _decide_timers(self, due: Callable[[int], bool]) -> None:
        while True:
            ready = [timer for timer in self.pending_timers() if due(timer.deadline)]
            if not ready:
                return
            self._decide(min(ready, key=_Timer.order))

    def _decide(self, timer: _Timer) -> None:
        if timer.rule == "cart_abandonment":
            cart = self.cart_view().cart
            fired = bool(cart)
            self.log.append(_Decided(timer.rule, timer.deadline, fired))
            if fired:
                self._emit(
                    Detection(timer.rule, self.user_id, timer.deadline, items=_items(cart))
                )
                self._vip_check(timer.deadline)
        elif timer.rule == "cart_abandonment_followup":
            cart = self.cart_view().cart
            self.log.append(_Decided(timer.rule, timer.deadline, True))
            self._emit(Detection(timer.rule, self.user_id, timer.deadline, items=_items(cart)))
        elif timer.rule == "browse_abandonment":
            session = self.sessions()[timer.session]
            viewed = any(e.type == "page_view" and e.page_type == "product" for e in session)
            forbidden = any(e.type in {"add_to_cart", "purchase"} for e in session)
            fired = (
                viewed
                and not forbidden
                and self.cooldown_open(timer.rule, timer.deadline, BROWSE_COOLDOWN)
            )
            self.log.append(_Decided(timer.rule, timer.deadline, fired, timer.session))
            if fired:
                self._emit(Detection(timer.rule, self.user_id, timer.deadline))
        else:  # pragma: no cover - no other timers
            msg = f"unknown timer {timer.rule}"
            raise AssertionError(msg)

    def _vip_check(self, fired_at: int) -> None:
        if self.segment != "vip":
            return
        count = sum(
            1 for f in self.fired("cart_abandonment") if fired_at - VIP_WINDOW <= f <= fired_at
        )
        if count >= VIP_MIN and self.cooldown_open("vip_concierge", fired_at, VIP_COOLDOWN):
            self._emit(Detection("vip_concierge", self.user_id, fired_at))

    def _emit(self, detection: Detection) -> None:
        self.detections.append(replace(detection, detected_at_ms=self.now))


def _items(cart: Mapping[str, int]) -> Items:
    return tuple(sorted(cart.items()))


@dataclass(slots=True)
class ReferenceResult:
    detections: dict[str, list[Detection]]
    admissions: list[Admission]  # one per input event, in input order


def run_reference(
    events: Sequence[Event],
    segments: Mapping[str, str] | None = None,
    end_ms: int | None = None,
) -> ReferenceResult:
    """Replay `events` (the valid lines, in line order) and return every detection per user.

    `segments` maps user_id -> segment (a user without one is `new`). `end_ms` is the
    replay end bound; by default the final stream clock (the largest `ts` of `events`).
    """
    segments = segments or {}
    users: dict[str, UserModel] = {}
    admissions: list[Admission] = []
    read: list[int] = []  # the ts of every valid line read so far
    for event in events:
        model = users.get(event.user_id)
        if model is None:
            model = users[event.user_id] = UserModel(
                event.user_id, segments.get(event.user_id, "new")
            )
        if read:
            model.before_line(max(read))  # (1) S as it stood before the line
        admission = model.admission(event)  # (2)
        read.append(event.ts)  # (3) every valid line counts for S, whatever its fate
        if admission == "apply":
            model.apply(event, max(read))  # (4)
        admissions.append(admission)
    if end_ms is None and read:
        end_ms = max(read)
    if end_ms is not None:
        for model in users.values():
            model.finish(end_ms)
    return ReferenceResult({u: m.detections for u, m in users.items()}, admissions)


def flatten(result: Mapping[str, Iterable[Detection]]) -> list[Detection]:
    return [d for user in sorted(result) for d in result[user]]

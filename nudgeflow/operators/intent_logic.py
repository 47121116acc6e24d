"""The `high_intent` rule kind: the intent model scores the user's open session.

Every applied event updates the user's `IntentState` (the features of
`nudgeflow.core.intent.features`); every applied event that can change what a
purchase is predicted from (all but a purchase itself) is scored, until the
rule fires in that session or the session has a purchase. It fires once per
session, at the scoring event's `ts`, with the score, the model's version and
the features that moved the score most in `metadata`.

The model is plain Python (`nudgeflow.core.intent.model`): no scikit-learn in
the flow, the same score for the same vector in every process. The training
command drives this same logic with a `FeatureLog` and no model, so it learns
from exactly the vectors served here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from nudgeflow.core.events import EVENT_TYPES
from nudgeflow.core.intent.features import SCORED_TYPES, IntentState
from nudgeflow.core.intent.model import IntentModel, load_model, top_features
from nudgeflow.core.rules import HighIntentRule
from nudgeflow.operators.rule_logic import RuleLogic

if TYPE_CHECKING:
    from nudgeflow.core.events import Event
    from nudgeflow.operators.detector import Step
    from nudgeflow.operators.sessions import Session


class FeatureLog(Protocol):
    """Receives what training learns from (the offline path; None in the flow)."""

    def scored(self, user_id: str, session: int, ts: int, vector: tuple[float, ...]) -> None:
        """A vector the rule scores (or would score) at an event of `session` at `ts`."""

    def purchased(self, user_id: str, session: int, ts: int) -> None:
        """A purchase applied in `session` at `ts`."""


default_log: FeatureLog | None = None


class HighIntentLogic(RuleLogic):
    kind = "high_intent"
    needs_sessions = True

    def __init__(self, config: HighIntentRule, order: int) -> None:
        super().__init__(config, order)
        self.rule = config
        self.watches = frozenset(EVENT_TYPES)
        # Where scored vectors go besides the model: the training command sets one on its
        # logic; in the flow, `default_log` (None; a test sets it to see the flow's vectors).
        self.log: FeatureLog | None = default_log
        # No model (`model: ""`, only built by the training command): log, never fire.
        self.model: IntentModel | None = load_model(config.model) if config.model else None

    def new_state(self) -> IntentState:
        return IntentState()

    def vector(self, step: Step, state: IntentState, ts: int) -> tuple[float, ...]:
        user = step.user
        items = user.cart.to_data()
        value = 0.0
        for _, quantity, price in items:
            if price is not None:
                value += quantity * price
        zone = user.profile.timezone or self._default_zone(step)
        return state.vector(
            ts,
            cart_value=value,
            cart_items=len(items),
            zone=zone,
            events_this_hour=user.hourly.current(ts),
            events_today=user.daily.current(ts),
        )

    def _default_zone(self, step: Step) -> str:
        zone: str = step.detector.config.policies.default_timezone
        return zone

    def on_event(self, step: Step, event: Event, session: Session | None) -> None:
        if session is None:  # the detector places sessions for this rule
            return
        state: IntentState = step.state(self)
        state.observe(event, session.index, session.start_ts)
        log = self.log
        if event.type not in SCORED_TYPES:
            if log is not None and event.type == "purchase":
                log.purchased(step.user.user_id, session.index, event.ts)
            return
        if state.purchased or state.fired:
            return
        vector = self.vector(step, state, event.ts)
        if log is not None:
            log.scored(step.user.user_id, session.index, event.ts, vector)
        model = self.model
        if model is None:
            return
        score = model.score(vector)
        if score < self.rule.threshold:
            if step.trace is not None:
                step.note(self, event.ts, f"score {score:.3f} < {self.rule.threshold:g}; "
                          f"moved most by {_describe(model, vector)}")
            return
        metadata: dict[str, Any] = {
            "score": round(score, 4),
            "model": model.version,
            "top_features": top_features(model, vector),
        }
        if step.trace is not None:
            step.note(self, event.ts, f"score {score:.3f} >= {self.rule.threshold:g}; "
                      f"moved most by {_describe(model, vector)}")
        if step.fire(self, event.ts, "", metadata):
            state.fired = True

    def prune(self, state: IntentState, watermark: int) -> None:
        state.forget_before(watermark)

    def state_empty(self, state: IntentState | None) -> bool:
        return state is None or state.empty

    def dump(self, state: IntentState) -> Any:
        return state.to_data()

    def load(self, data: Any) -> IntentState:
        return IntentState.from_data(data)


def _describe(model: IntentModel, vector: tuple[float, ...]) -> str:
    return ", ".join(
        f"{item['feature']}={item['value']:g} ({item['effect']:+.2f})"
        for item in top_features(model, vector)
    ) or "nothing (the model's base rate)"

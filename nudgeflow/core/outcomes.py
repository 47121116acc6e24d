"""Outcomes: what a trigger achieved (issue 13), and which triggers are measured at all.

An outcome is `converted`: the trigger's user has an applied `purchase` with
`ts` in (`fired_at`, `fired_at` + the rule's attribution window]. It is
emitted once per trigger, by the flow (`nudgeflow.operators.attribution`), to
the `triggers.outcomes` topic or replay's `--outcomes` file; a trigger that did
not convert has no outcome line.

Which triggers are measured (`attributed`): those the policies let through to
the experiment step, whatever the experiment made of them, so that a variant
and its holdout are compared like with like:

- `dispatched`;
- suppressed `holdout` (or `control`): the experiment kept the message back;
- suppressed `cancelled`: a delayed send that a cancelling event (a purchase)
  stopped before it went out. It had been sent on its way when it fired, and
  dropping it would take exactly the quick buyers out of a delayed variant.

Triggers suppressed as `duplicate`, `frequency_cap` or `no_channel` never
reached the experiment (a holdout trigger has passed the same three checks),
so they get no outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from nudgeflow.core.timeutil import format_ms

CONVERTED: Final = "converted"
DEFAULT_ATTRIBUTION_WINDOW_MS: Final = 24 * 3_600_000
# Suppression reasons whose triggers are measured all the same (module docstring).
ATTRIBUTED_REASONS: Final = frozenset({"holdout", "control", "cancelled"})
HOLDOUT_ARM: Final = "holdout"
# The arm of an experiment that has a holdout and no variants: everyone else.
TREATMENT_ARM: Final = "treatment"


def attributed(decision: str, reason: str | None) -> bool:
    """Whether a trigger with this decision gets an outcome when it converts."""
    return decision == "dispatched" or reason in ATTRIBUTED_REASONS


def lift_of(rate: float, base_rate: float) -> tuple[float, float | None]:
    """An arm's conversion rate against its holdout's: (absolute, relative) lift.

    Absolute is the difference (0.02 is two percentage points); relative is that
    over the holdout's rate, None when the holdout never converted. `nudgeflow
    report` (`nudgeflow.app.lift`) and the live dashboard both take it from here.
    """
    lift = rate - base_rate
    return lift, (lift / base_rate if base_rate > 0 else None)


def arm_of(metadata: dict[str, Any]) -> str:
    """The experiment arm a trigger's `metadata.experiment` names; "" without an experiment."""
    experiment = metadata.get("experiment")
    if not isinstance(experiment, dict):
        return ""
    if experiment.get("holdout"):
        return HOLDOUT_ARM
    variant = experiment.get("variant")
    return variant if isinstance(variant, str) else TREATMENT_ARM


@dataclass(frozen=True, slots=True)
class Outcome:
    """One trigger's conversion: the purchase that fell within its window."""

    trigger_id: str
    trigger_type: str
    user_id: str
    fired_at_ms: int
    ts_ms: int  # the purchase's event time
    value: float | None  # the purchase's `value`, when it had one
    variant: str  # arm_of(the trigger's metadata): "" without an experiment
    # cart rules: whether the abandoned cart's products were all in the cart the
    # purchase emptied; None for rules whose trigger carries no cart
    cart_recovered: bool | None
    outcome: str = CONVERTED

    def to_json(self) -> dict[str, Any]:
        return {
            "trigger_id": self.trigger_id,
            "trigger_type": self.trigger_type,
            "user_id": self.user_id,
            "outcome": self.outcome,
            "ts": format_ms(self.ts_ms),
            "value": self.value,
            "fired_at": format_ms(self.fired_at_ms),
            "variant": self.variant or None,
            "cart_recovered": self.cart_recovered,
        }

"""Two-proportion comparison of an experiment arm against its holdout (statsmodels).

    lift         p_arm - p_holdout (absolute: 0.02 is two percentage points)
    ci_low/high  95% Wald interval of that difference
    p_value      two-sided z-test of equal proportions (pooled variance)
    needed       triggers per arm for 80% power at alpha 0.05, if the true
                 difference were the one observed (Cohen's h, normal approximation)

The unit is the attributed trigger: users are assigned to arms by a stable
hash, and a user with several triggers counts once per trigger.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_confint,
    proportion_effectsize,
    proportions_ztest,
)

from nudgeflow.core.outcomes import lift_of

ALPHA: Final = 0.05
POWER: Final = 0.8


@dataclass(frozen=True, slots=True)
class Comparison:
    lift: float
    relative_lift: float | None  # lift / p_holdout; None when the holdout never converted
    ci_low: float
    ci_high: float
    p_value: float | None  # None when no test is possible (no conversions, or all converted)
    # triggers each side would need for a difference this size to be significant
    # (80% power); None when the observed difference is zero
    needed_arm: int | None
    needed_holdout: int | None
    more_needed: int | None  # beyond what both sides already have

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < ALPHA


def rate_interval(converted: int, total: int) -> tuple[float, float]:
    """95% Wilson interval of one arm's conversion rate (for the charts)."""
    if total == 0:
        return (0.0, 0.0)
    low, high = proportion_confint(converted, total, alpha=ALPHA, method="wilson")
    return (float(low), float(high))


def compare(converted: int, total: int, base_converted: int, base_total: int) -> Comparison:
    """The arm (`converted` of `total`) against the holdout (`base_converted` of `base_total`)."""
    if total <= 0 or base_total <= 0:
        msg = "both arms need at least one trigger"
        raise ValueError(msg)
    p_arm, p_base = converted / total, base_converted / base_total
    low, high = confint_proportions_2indep(
        converted, total, base_converted, base_total,
        method="wald", compare="diff", alpha=ALPHA,
    )
    pooled = (converted + base_converted) / (total + base_total)
    p_value: float | None = None
    if 0 < pooled < 1:
        _z, p = proportions_ztest([converted, base_converted], [total, base_total],
                                  alternative="two-sided")
        p_value = float(p)
    needed_arm = needed_base = more = None
    if p_arm != p_base:
        ratio = base_total / total
        effect = abs(float(proportion_effectsize(p_arm, p_base)))
        nobs = float(NormalIndPower().solve_power(
            effect_size=effect, alpha=ALPHA, power=POWER, ratio=ratio,
            alternative="two-sided",
        ))
        needed_arm, needed_base = math.ceil(nobs), math.ceil(nobs * ratio)
        more = max(0, needed_arm - total) + max(0, needed_base - base_total)
    lift, relative = lift_of(p_arm, p_base)
    return Comparison(
        lift=lift,
        relative_lift=relative,
        ci_low=float(low),
        ci_high=float(high),
        p_value=p_value,
        needed_arm=needed_arm,
        needed_holdout=needed_base,
        more_needed=more,
    )

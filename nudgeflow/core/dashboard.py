"""The live dashboard's numbers: one JSON summary computed from the Prometheus registry.

The health server serves it at `/dashboard.json` next to `/metrics`, from the
same registry, and the page (`nudgeflow/core/web/`) only renders it. The
arithmetic is here, in Python, rather than in the page's script parsing the
exposition text: the percentiles from histogram buckets and the lift are then
unit-tested like the rest of the package, the page stays a small renderer with
no parser to keep in step with prometheus-client's format, and one request
carries everything the page shows, computed at one instant.

    events      nudgeflow_events_total by outcome; events/s over the last ~10 s
    triggers    detected, dispatched, suppressed by reason, delivered, failed, retried, by rule
    latency     nudgeflow_event_to_dispatch_seconds{since="source_read"}: p50/p95/p99
                and the share within the 200 ms budget, over all rules and per rule
    timer lag   nudgeflow_timer_lag_seconds: the same percentiles
    dead letters nudgeflow_dead_letters_total by reason
    experiments per (rule, variant), as `nudgeflow report` has them (nudgeflow.app.report):
                attributed = nudgeflow_decided_total of the measured decisions
                (`nudgeflow.core.outcomes.attributed`: dispatched, or suppressed as
                holdout, control or cancelled); converted and cart_recovered from
                nudgeflow_outcomes_total; conversion = converted / attributed; lift
                = conversion minus the rule's `holdout` arm's (absolute), relative
                lift = that over the holdout's (`lift_of`); revenue from
                nudgeflow_outcome_value_total; no outcome counted yet: "no outcomes yet"

Percentiles follow PromQL's `histogram_quantile`: linear within the bucket
that holds the rank, the bucket's upper bound capped at the largest finite
bound. The `source_read` latency is the one shown, since the `kafka_ts` one
includes the producer's clock skew (nudgeflow.core.metrics).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry

from nudgeflow.core.outcomes import CONVERTED, HOLDOUT_ARM, attributed, lift_of
from nudgeflow.core.timeutil import now_ms

__all__ = [
    "BUDGET_S",
    "PERCENTILES",
    "EventRate",
    "Samples",
    "histogram_quantile",
    "summarise",
]

BUDGET_S: Final = 0.2  # event to dispatch, the product's promise (and a bucket bound)
PERCENTILES: Final = (0.5, 0.95, 0.99)
LATENCY_SINCE: Final = "source_read"

_Labels = tuple[tuple[str, str], ...]


class Samples:
    """Every sample of a registry at one instant, looked up by sample name."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._by_name: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
        for family in registry.collect():
            for sample in family.samples:
                self._by_name[sample.name].append((dict(sample.labels), sample.value))

    def has(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> list[tuple[dict[str, str], float]]:
        return self._by_name.get(name, [])

    def total(self, name: str, **where: str) -> float:
        return sum(value for labels, value in self.get(name)
                   if all(labels.get(k) == v for k, v in where.items()))

    def by(self, name: str, *keys: str, **where: str) -> dict[tuple[str, ...], float]:
        """The sum of `name`'s samples grouped by the `keys` labels (PromQL `sum by`)."""
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for labels, value in self.get(name):
            if all(labels.get(k) == v for k, v in where.items()):
                out[tuple(labels.get(k, "") for k in keys)] += value
        return dict(out)


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """PromQL's `histogram_quantile(q, …)` over cumulative `{le: count}`; None when empty."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    finite = [bound for bound, _ in ordered if not math.isinf(bound)]
    for bound, count in ordered:
        if count >= rank and count > below:
            if math.isinf(bound):
                return finite[-1] if finite else None
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return finite[-1] if finite else None


def _buckets(samples: Samples, name: str, **where: str) -> dict[float, float]:
    out: dict[float, float] = defaultdict(float)
    for labels, value in samples.get(f"{name}_bucket"):
        if all(labels.get(k) == v for k, v in where.items()):
            out[float(labels["le"])] += value
    return dict(out)


def _latency(buckets: Mapping[float, float]) -> dict[str, Any]:
    count = max(buckets.values(), default=0.0)
    out: dict[str, Any] = {"count": int(count)}
    for q in PERCENTILES:
        value = histogram_quantile(q, buckets)
        out[f"p{round(q * 100)}_ms"] = None if value is None else round(value * 1000, 1)
    within = buckets.get(BUDGET_S)
    out["within_budget"] = None if not count or within is None else within / count
    return out


class EventRate:
    """Events per second over about the last `window_ms`, from totals seen when polled.

    The page polls every couple of seconds; each poll keeps a sample at most once
    per `step_ms` and the rate is taken against the newest sample at least
    `window_ms` old (or the oldest kept), so any number of open pages agree.
    """

    def __init__(self, window_ms: int = 10_000, step_ms: int = 1_000,
                 clock: Callable[[], int] = now_ms) -> None:
        self.window_ms = window_ms
        self.step_ms = step_ms
        self.clock = clock
        self._samples: deque[tuple[int, float]] = deque()
        self._lock = threading.Lock()

    def observe(self, total: float, at_ms: int | None = None) -> float | None:
        now = self.clock() if at_ms is None else at_ms
        with self._lock:
            samples = self._samples
            if samples and total < samples[-1][1]:
                samples.clear()  # a counter reset (a new process): start again
            while len(samples) > 1 and samples[1][0] <= now - self.window_ms:
                samples.popleft()
            rate = None
            if samples and now > samples[0][0]:
                rate = (total - samples[0][1]) * 1000.0 / (now - samples[0][0])
            if not samples or now - samples[-1][0] >= self.step_ms:
                samples.append((now, total))
            return rate


def _triggers(samples: Samples) -> list[dict[str, Any]]:
    detected = samples.by("nudgeflow_triggers_detected_total", "rule")
    dispatched = samples.by("nudgeflow_triggers_dispatched_total", "rule")
    suppressed = samples.by("nudgeflow_triggers_suppressed_total", "rule", "reason")
    delivered = samples.by("nudgeflow_dispatch_delivered_total", "rule")
    failed = samples.by("nudgeflow_dispatch_failures_total", "rule")
    retried = samples.by("nudgeflow_dispatch_retries_total", "rule")
    rules = sorted({key[0] for table in (detected, dispatched, suppressed, delivered)
                    for key in table})
    rows = []
    for rule in rules:
        reasons = {reason: int(n) for (r, reason), n in sorted(suppressed.items()) if r == rule}
        rows.append({
            "rule": rule,
            "detected": int(detected.get((rule,), 0)),
            "dispatched": int(dispatched.get((rule,), 0)),
            "suppressed": reasons,
            "delivered": int(delivered.get((rule,), 0)),
            "failed": int(failed.get((rule,), 0)),
            "retried": int(retried.get((rule,), 0)),
        })
    return rows


@dataclass(frozen=True, slots=True)
class _Arm:
    rule: str
    variant: str
    attributed: float  # the measured decisions (nudgeflow.core.outcomes.attributed)
    outcomes: dict[str, float]
    revenue: float

    @property
    def converted(self) -> float:
        return self.outcomes.get(CONVERTED, 0.0)

    @property
    def rate(self) -> float | None:
        return self.converted / self.attributed if self.attributed else None


def _measured(samples: Samples) -> dict[tuple[str, str], float]:
    """`nudgeflow_decided_total` of the measured decisions, by (rule, variant).

    An arm whose decisions were all left unmeasured (a frequency cap, say) is
    kept with 0, as the report keeps it.
    """
    out: dict[tuple[str, str], float] = defaultdict(float)
    for labels, value in samples.get("nudgeflow_decided_total"):
        key = (labels.get("rule", ""), labels.get("variant", ""))
        measured = attributed(labels.get("decision", ""), labels.get("reason"))
        out[key] += value if measured else 0.0
    return dict(out)


def _comparison(arm: _Arm, baseline: _Arm | None) -> tuple[float | None, float | None]:
    """(lift, relative lift) against the holdout, when `nudgeflow report` gives them."""
    if not arm.variant or baseline is None or arm is baseline \
            or arm.rate is None or baseline.rate is None:
        return None, None
    return lift_of(arm.rate, baseline.rate)


def _experiments(samples: Samples) -> dict[str, Any]:
    measured = _measured(samples)
    outcomes = samples.by("nudgeflow_outcomes_total", "rule", "variant", "outcome")
    revenue = samples.by("nudgeflow_outcome_value_total", "rule", "variant")
    arms_by_rule: dict[str, list[_Arm]] = defaultdict(list)
    keys = sorted(set(measured) | {(r, v) for r, v, _ in outcomes} | set(revenue))
    for rule, variant in keys:
        arms_by_rule[rule].append(_Arm(
            rule, variant, measured.get((rule, variant), 0.0),
            {o: n for (r, v, o), n in sorted(outcomes.items()) if (r, v) == (rule, variant)},
            revenue.get((rule, variant), 0.0),
        ))
    rows: list[dict[str, Any]] = []
    for rule in sorted(arms_by_rule):
        arms = arms_by_rule[rule]
        baseline = next((arm for arm in arms if arm.variant == HOLDOUT_ARM), None)
        for arm in arms:
            lift, relative = _comparison(arm, baseline)
            rows.append({
                "rule": rule,
                "variant": arm.variant,
                "baseline": arm is baseline,
                "attributed": int(arm.attributed),
                "converted": int(arm.converted),
                "conversion_rate": arm.rate,
                "lift": lift,
                "relative_lift": relative,
                "revenue": arm.revenue,
                "outcomes": {o: int(n) for o, n in arm.outcomes.items()},
            })
    return {
        # Before any outcome the page says so rather than a table of zero conversions.
        "available": any(row["outcomes"] for row in rows),
        "variants": rows,
    }


def summarise(registry: CollectorRegistry, rate: EventRate | None = None,
              at_ms: int | None = None) -> dict[str, Any]:
    """Everything the dashboard shows, from `registry` as it stands now."""
    samples = Samples(registry)
    at = now_ms() if at_ms is None else at_ms
    by_outcome = {k[0]: int(n) for k, n in sorted(samples.by(
        "nudgeflow_events_total", "outcome").items())}
    total = float(sum(by_outcome.values()))
    latency = _latency(_buckets(samples, "nudgeflow_event_to_dispatch_seconds",
                                since=LATENCY_SINCE))
    latency["budget_ms"] = round(BUDGET_S * 1000)
    latency["since"] = LATENCY_SINCE
    latency["by_rule"] = [
        {"rule": rule, **_latency(_buckets(samples, "nudgeflow_event_to_dispatch_seconds",
                                           since=LATENCY_SINCE, rule=rule))}
        for rule in _label_values(samples, "nudgeflow_event_to_dispatch_seconds_count", "rule")
    ]
    return {
        "at_ms": at,
        "events": {
            "total": int(total),
            "by_outcome": by_outcome,
            "per_s": None if rate is None else rate.observe(total, at),
        },
        "triggers": _triggers(samples),
        "latency": latency,
        "timer_lag": _latency(_buckets(samples, "nudgeflow_timer_lag_seconds")),
        "dead_letters": {k[0]: int(n) for k, n in sorted(samples.by(
            "nudgeflow_dead_letters_total", "reason").items())},
        "experiments": _experiments(samples),
    }


def _label_values(samples: Samples, name: str, label: str) -> Iterable[str]:
    return sorted({labels[label] for labels, _ in samples.get(name) if label in labels})

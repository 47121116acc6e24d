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
    experiments nudgeflow_decided_total / nudgeflow_outcomes_total{outcome="converted"}
                per (rule, variant), lift against the rule's holdout or control variant,
                nudgeflow_outcome_value_total; absent series mean "no outcomes yet"

Percentiles follow PromQL's `histogram_quantile`: linear within the bucket
that holds the rank, the bucket's upper bound capped at the largest finite
bound. The `source_read` latency is the one shown, since the `kafka_ts` one
includes the producer's clock skew (nudgeflow.core.metrics).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry

from nudgeflow.core.timeutil import now_ms

__all__ = [
    "BUDGET_S",
    "CONTROL_VARIANTS",
    "CONVERTED",
    "PERCENTILES",
    "EventRate",
    "Samples",
    "histogram_quantile",
    "summarise",
]

BUDGET_S: Final = 0.2  # event to dispatch, the product's promise (and a bucket bound)
PERCENTILES: Final = (0.5, 0.95, 0.99)
LATENCY_SINCE: Final = "source_read"
# The variant a rule's other variants are compared with: its holdout, else one named control.
CONTROL_VARIANTS: Final = ("holdout", "control")
CONVERTED: Final = "converted"

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
    decided: float
    outcomes: dict[str, float]
    value: float

    @property
    def rate(self) -> float | None:
        return self.outcomes.get(CONVERTED, 0.0) / self.decided if self.decided else None


def _control(arms: Sequence[_Arm]) -> _Arm | None:
    for name in CONTROL_VARIANTS:
        for arm in arms:
            if arm.variant == name:
                return arm
    return None


def _experiments(samples: Samples) -> dict[str, Any]:
    names = ("nudgeflow_decided_total", "nudgeflow_outcomes_total",
             "nudgeflow_outcome_value_total")
    decided = samples.by(names[0], "rule", "variant")
    outcomes = samples.by(names[1], "rule", "variant", "outcome")
    values = samples.by(names[2], "rule", "variant")
    arms_by_rule: dict[str, list[_Arm]] = defaultdict(list)
    keys = sorted(set(decided) | {(r, v) for r, v, _ in outcomes} | set(values))
    for rule, variant in keys:
        arms_by_rule[rule].append(_Arm(
            rule, variant, decided.get((rule, variant), 0.0),
            {o: n for (r, v, o), n in sorted(outcomes.items()) if (r, v) == (rule, variant)},
            values.get((rule, variant), 0.0),
        ))
    rows: list[dict[str, Any]] = []
    for rule in sorted(arms_by_rule):
        arms = arms_by_rule[rule]
        control = _control(arms)
        for arm in arms:
            lift = None
            if control is not None and arm is not control and arm.rate is not None \
                    and control.rate:
                lift = arm.rate / control.rate - 1.0
            rows.append({
                "rule": rule,
                "variant": arm.variant,
                "control": arm is control,
                "decided": int(arm.decided),
                "converted": int(arm.outcomes.get(CONVERTED, 0.0)),
                "conversion_rate": arm.rate,
                "lift": lift,
                "value": arm.value,
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

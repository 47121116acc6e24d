"""What the dashboard's tests share: the attribution step's series, as that step names them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


def attribution_counters(registry: CollectorRegistry) -> tuple[Counter, Counter, Counter]:
    """`nudgeflow_decided_total`, `…_outcomes_total`, `…_outcome_value_total` (issue 13).

    Registered here in a test's own registry: the attribution step records them in
    the flow, and the dashboard reads whichever of them exist.
    """
    decided = Counter("nudgeflow_decided", "decisions by variant",
                      ["rule", "variant", "decision"], registry=registry)
    outcomes = Counter("nudgeflow_outcomes", "outcomes by variant",
                       ["rule", "variant", "outcome"], registry=registry)
    value = Counter("nudgeflow_outcome_value", "outcome value by variant",
                    ["rule", "variant"], registry=registry)
    return decided, outcomes, value

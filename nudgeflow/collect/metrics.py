"""Prometheus series of the collector (`GET /metrics` on the collector's own port).

    series                                        labels
    nudgeflow_collect_accepted_total              endpoint: track|page|identify|batch|events,
                                                  kind: event|profile
    nudgeflow_collect_rejected_total              reason: invalid_json|invalid_event|
                                                          unsupported_call|invalid_profile
    nudgeflow_collect_refused_total               reason: unauthorized|body_too_large|
                                                  batch_too_large|rate_limited|
                                                  unsupported_media_type|origin_not_allowed|
                                                  kafka_unavailable|redis_unavailable|
                                                  not_found|method_not_allowed
    nudgeflow_collect_produce_seconds             (histogram: a call's produce to acknowledgement)

`accepted` and `rejected` are counted once a call is answered 200 or 400 (a call
answered 503 is counted when its retry is); `rejected` counts the items refused
inside a call (each one also a dead letter), `refused` whole calls answered
with an error status. The labels are
categories, never the free-text reason: their number stays fixed.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Histogram

from nudgeflow.core.metrics import LATENCY_BUCKETS_S

accepted: Final = Counter(
    "nudgeflow_collect_accepted",
    "Events (to Kafka) and identify calls (to Redis) the collector took, by endpoint",
    ["endpoint", "kind"],
)
rejected: Final = Counter(
    "nudgeflow_collect_rejected", "Items of a call refused and dead-lettered, by reason",
    ["reason"],
)
refused: Final = Counter(
    "nudgeflow_collect_refused", "Calls answered with an error status, by reason", ["reason"],
)
produce_seconds: Final = Histogram(
    "nudgeflow_collect_produce_seconds",
    "From producing a call's events to Kafka's acknowledgement of the last one",
    buckets=LATENCY_BUCKETS_S,
)

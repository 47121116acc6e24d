"""Tumbling counts per hour and day."""

from __future__ import annotations

from nudgeflow.operators.tumbling import TumblingCounter

HOUR = 3_600_000


def test_counts_per_bucket_and_closing_the_previous() -> None:
    counter = TumblingCounter(HOUR)
    assert counter.add(10) is None
    assert counter.add(HOUR - 1) is None
    assert counter.add(HOUR) == (0, 2)  # the first event of a bucket closes the one before
    assert counter.current(HOUR + 5) == 1
    assert counter.current(5) == 2


def test_an_out_of_order_event_counts_in_the_previous_bucket() -> None:
    counter = TumblingCounter(HOUR)
    counter.add(HOUR - 10)
    counter.add(HOUR + 10)
    assert counter.add(HOUR - 5) is None
    assert counter.current(0) == 2
    assert counter.current(3 * HOUR) == 0


def test_the_detector_exposes_hourly_and_daily_counts_as_features() -> None:
    import orjson

    from nudgeflow.core.events import Event, decode_event
    from nudgeflow.core.rules import load_rules
    from nudgeflow.core.settings import DEFAULT_RULES
    from nudgeflow.operators.detector import Detector

    detector = Detector(load_rules(DEFAULT_RULES))
    user = detector.new_user("u1")
    for n, ts in enumerate((0, 10, 2 * HOUR)):
        event = decode_event(orjson.dumps(
            {"event_id": str(n), "user_id": "u1", "type": "page_view", "ts": ts}))
        assert isinstance(event, Event)
        detector.process(user, event)
    features = detector.features(user, 2 * HOUR)
    assert (features["events_this_hour"], features["events_today"]) == (1, 3)

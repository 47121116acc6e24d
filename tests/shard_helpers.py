"""Driving the detect step's shards directly: a partition read at an injected wall time.

Shared by tests/unit/test_shards.py and tests/unit/test_parking.py.
"""

from __future__ import annotations

import orjson

from nudgeflow.core.envelope import Envelope, Origin
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.profiles import Profile
from nudgeflow.core.stream_clock import PartitionClocks, StreamClock
from nudgeflow.operators.detect import Emitted

PROFILE = Profile(segment="regular", opt_in=("email",))


class Partition:
    """A partition of the input (0 unless told), read at wall time `now`.

    It is the wall clock too (`partition()` is `now`), and each read stamps the
    event with the partition's stream clock and publishes the clock's reading.
    """

    def __init__(self, now: int, index: int = 0,
                 partitions: PartitionClocks | None = None) -> None:
        self.now = now
        self.index = index
        self.clock = StreamClock()
        self.partitions = partitions or PartitionClocks()

    def __call__(self) -> int:
        return self.now

    def read(self, user: str, event_id: str, kind: str, ts: int, **fields: object) -> Envelope:
        raw = orjson.dumps({"event_id": event_id, "user_id": user, "type": kind, "ts": ts,
                            **fields})
        event = decode_event(raw)
        assert isinstance(event, Event)
        stamp = self.clock.read(ts, self.now)
        assert self.clock.reading is not None
        self.partitions.publish(f"{self.index}-events", self.clock.reading)
        return Envelope(event, raw, Origin(topic="events", partition=self.index, offset=1),
                        PROFILE,
                        arrived_ms=self.now, stream=stamp, key=user.encode())


def fired(outputs: object) -> list[tuple[str, int]]:
    """(user, fired at) of the decisions among a shard's outputs, sorted."""
    return sorted((o.decision.trigger.user_id, o.decision.trigger.fired_at_ms)
                  for o in outputs if isinstance(o, Emitted))  # type: ignore[attr-defined]

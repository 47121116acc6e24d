"""Live mode on the recording's clock decides what replay decides (TRIGGERS.md "Time").

The live dataflow runs in-process on a testing source of Kafka messages, with
an injected wall clock that moves as the recording's clock did: each message
is read at the largest `ts` read so far. Its decisions must then be replay's,
decision for decision, except replay's end-of-input decisions, which live mode
makes only as its wall clock runs on past the recording (not in this test).
Its outcomes must be replay's, outcome for outcome: no purchase lies past the
recording's end, so the triggers live mode decides after it convert none.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.connectors.kafka import KafkaSourceMessage
from bytewax.testing import TestingSink, TestingSource, run_main

from nudgeflow.app.replay import run_replay
from nudgeflow.app.samples import SampleSpec, generate_lines, generate_profiles
from nudgeflow.core.events import Event, decode_event
from nudgeflow.core.outcomes import Outcome
from nudgeflow.core.profiles import load_profiles
from nudgeflow.core.rules import load_rules
from nudgeflow.core.settings import DEFAULT_RULES, Settings
from nudgeflow.enrich.profile_store import StaticProfiles
from nudgeflow.flows.live import LiveParts, build_live_flow
from nudgeflow.operators.detect import Emitted

DAY = 86_400_000


class RecordingClock:
    """The wall clock of a flow replaying a recording at its own pace: its largest ts read."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now

    def messages(self, lines: list[bytes], run_on_ms: int) -> Iterator[Any]:
        """The lines as Kafka messages of one partition; reading one moves the clock to it.

        After the last line the clock runs on `run_on_ms`, and one more message (not an
        event) is read then, as a live flow reads on while time passes.
        """
        for offset, raw in enumerate(lines):
            event = decode_event(raw)
            key = None
            if isinstance(event, Event):
                self.now = max(self.now, event.ts)
                key = event.user_id.encode()
            yield KafkaSourceMessage(key=key, value=raw, topic="events", partition=0,
                                     offset=offset)
        self.now += run_on_ms
        yield KafkaSourceMessage(key=None, value=b"tick", topic="events", partition=0,
                                 offset=len(lines))


def _key(decision: dict[str, Any]) -> tuple[Any, ...]:
    return (decision["trigger_id"], decision["decision"], decision["reason"],
            decision.get("channel"), decision.get("send_at") if decision["decision"] ==
            "dispatched" and decision["send_at"] != decision["detected_at"] else None)


# The default parks users quiet for a minute; 1 s parks nearly every user between
# any two of their events, and 0 never parks: what is decided must not move.
@pytest.mark.parametrize(("seed", "park_after_s"), [(3, 60.0), (11, 60.0), (3, 1.0), (11, 0.0)])
def test_live_on_the_recordings_clock_decides_what_replay_decides(
    tmp_path: Path, seed: int, park_after_s: float
) -> None:
    spec = SampleSpec(users=150, hours=3.0, seed=seed)
    lines = [line.data for line in generate_lines(spec)]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")
    profiles_file = tmp_path / "profiles.jsonl"
    profiles_file.write_bytes(b"\n".join(orjson.dumps(p) for p in generate_profiles(spec)))

    out = tmp_path / "replay.jsonl"
    outcomes_file = tmp_path / "outcomes.jsonl"
    run_replay(events, out, profiles=profiles_file, outcomes=outcomes_file)
    replayed = {_key(orjson.loads(line)) for line in out.read_bytes().splitlines()}
    end = max(e.ts for raw in lines if isinstance(e := decode_event(raw), Event))

    clock = RecordingClock()
    decisions: list[tuple[str, Emitted]] = []
    outcomes: list[tuple[str, Outcome]] = []
    parts = LiveParts(
        source=TestingSource(clock.messages(lines, run_on_ms=3 * DAY), batch_size=1),
        dispatch=TestingSink([]),
        dead_letters=TestingSink([]),
        decisions=TestingSink(decisions),
        outcomes=TestingSink(outcomes),
        profiles=StaticProfiles(load_profiles(profiles_file)),
        clock=clock,
    )
    settings = Settings(detect_park_after_s=park_after_s)
    run_main(build_live_flow(settings, rules=load_rules(DEFAULT_RULES), parts=parts))
    # Live goes on deciding timers past the recording's end; replay stops there.
    live = {
        _key(emitted.decision.to_json()) for _, emitted in decisions
        if emitted.decision.trigger.fired_at_ms <= end
    }
    assert len(replayed) > 30
    assert live == replayed
    replayed_outcomes = sorted(outcomes_file.read_bytes().splitlines())
    assert replayed_outcomes  # the sample converts some triggers
    assert sorted(orjson.dumps(o.to_json()) for _, o in outcomes) == replayed_outcomes


"""The training set: a feature vector for every event the `high_intent` rule would score.

The events go through the flow's own `Detector` (admission, cart, sessions and
the tumbling counts), one user at a time in arrival order with the replay
stream clock, as `nudgeflow explain` does, with one rule: `high_intent`
without a model and with a `FeatureLog`. So the vectors are the ones the
flow computes for the same stream, bit for bit.

The label of a vector: its session has a purchase at most `horizon` after the
scoring event (the rule stops scoring a session once it has one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from nudgeflow.core.envelope import DeadLetter, Origin, open_envelope
from nudgeflow.core.profiles import NO_PROFILE, Profile, load_profiles
from nudgeflow.core.recording import iter_input_lines
from nudgeflow.core.rules import HighIntentRule, PolicyConfig, RulesConfig, TimeConfig
from nudgeflow.core.stream_clock import StreamClock
from nudgeflow.operators.detector import Detector, UserState
from nudgeflow.operators.intent_logic import HighIntentLogic

RULE_NAME = "high_intent"


@dataclass
class Sample:
    user_id: str
    session: int
    ts: int
    vector: tuple[float, ...]


@dataclass
class FeatureRecorder:
    """The `FeatureLog` of the offline path: every scored vector and every purchase."""

    samples: list[Sample] = field(default_factory=list)
    purchases: dict[tuple[str, int], list[int]] = field(default_factory=dict)

    def scored(self, user_id: str, session: int, ts: int, vector: tuple[float, ...]) -> None:
        self.samples.append(Sample(user_id, session, ts, vector))

    def purchased(self, user_id: str, session: int, ts: int) -> None:
        self.purchases.setdefault((user_id, session), []).append(ts)


@dataclass
class Dataset:
    """Vectors in arrival order, their labels, and the start of each vector's session."""

    samples: list[Sample]
    labels: list[int]
    session_start: list[int]
    horizon_ms: int
    events: int

    def __len__(self) -> int:
        return len(self.samples)


def features_only_detector(
    time: TimeConfig | None = None, policies: PolicyConfig | None = None
) -> tuple[Detector, HighIntentLogic]:
    """A detector with a model-less `high_intent` rule, and that rule's logic."""
    rule = HighIntentRule.model_construct(
        name=RULE_NAME, kind="high_intent", model="", threshold=1.0, enabled=True,
        segment=None, channels=None, delay=0, cancel_delayed_on=[], frequency_capped=False,
        experiment=None, offer={},
    )
    config = RulesConfig.model_construct(
        version=1, time=time or TimeConfig(), policies=policies or PolicyConfig(), rules=[rule]
    )
    detector = Detector(config)
    logic = detector.by_name[RULE_NAME]
    assert isinstance(logic, HighIntentLogic)
    return detector, logic


def iter_events(events: Path, *, progress: bool = False) -> Iterator[tuple[int, bytes]]:
    lines = iter_input_lines(events)
    if progress:
        yield from tqdm(lines, desc="features", unit=" lines", mininterval=0.5)
    else:
        yield from lines


def extract(
    events: Path,
    *,
    profiles: Path | None = None,
    time: TimeConfig | None = None,
    horizon_ms: int = 2 * 3_600_000,
    progress: bool = False,
) -> Dataset:
    """Every vector the rule would score on `events`, with its label."""
    detector, logic = features_only_detector(time)
    recorder = FeatureRecorder()
    logic.log = recorder
    known: dict[str, Profile] = load_profiles(profiles) if profiles is not None else {}
    users: dict[str, UserState] = {}
    stream = StreamClock()
    count = 0
    for number, raw in iter_events(events, progress=progress):
        opened = open_envelope(raw, Origin(line=number))
        if isinstance(opened, DeadLetter):
            continue
        event = opened.event
        stamp = stream.read(event.ts, None)
        state = users.get(event.user_id)
        if state is None:
            state = users[event.user_id] = detector.new_user(event.user_id)
        detector.process(state, event, known.get(event.user_id, NO_PROFILE), stream=stamp)
        count += 1
    return label(recorder, horizon_ms, count)


def label(recorder: FeatureRecorder, horizon_ms: int, events: int) -> Dataset:
    labels: list[int] = []
    starts: list[int] = []
    first: dict[tuple[str, int], int] = {}
    for sample in recorder.samples:
        key = (sample.user_id, sample.session)
        first.setdefault(key, sample.ts)
        starts.append(first[key])
        bought = recorder.purchases.get(key, ())
        labels.append(int(any(sample.ts <= ts <= sample.ts + horizon_ms for ts in bought)))
    return Dataset(recorder.samples, labels, starts, horizon_ms, events)

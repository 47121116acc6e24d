"""Cost of the `high_intent` rule per scored event: `nudgeflow bench --intent [--json FILE]`.

Also `python -m nudgeflow.bench.intent`. On the sample shop's stream (decoded
and stamped beforehand, so only detection is timed), in this process, CPU time
of this thread, median of the runs:

- **amortised** (the target's measure; in a compiled build, whose methods cannot
  be wrapped, the whole detector's difference below): the CPU time spent inside the rule for
  every applied event it is shown (its state, the features, the score, the
  firing), summed over the run and divided by the events it scored, less the
  cost of the timer itself (measured around a no-op the same way);
- **whole detector**: the detector with the default rules minus the same rules
  without `high_intent`, per scored event. This adds what the rule costs the
  rest (more garbage to collect, colder caches) but is the difference of two
  runs, so on a shared machine it is noisy;
- the parts: building the feature vector, the compiled scorer, the array walk
  it replaced, and scikit-learn's `predict_proba` on one row (when installed:
  what calling the library per event would cost).

Target: at most 20 µs amortised per scored event.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import orjson

from nudgeflow.app.intent.dataset import FeatureRecorder, features_only_detector
from nudgeflow.app.samples import SampleSpec, generate_events, generate_profiles
from nudgeflow.bench.stats import machine_info, spread
from nudgeflow.core.envelope import Envelope, Origin, open_envelope
from nudgeflow.core.events import Event
from nudgeflow.core.intent.model import IntentModel, load_model
from nudgeflow.core.profiles import NO_PROFILE, Profile, profile_from_mapping
from nudgeflow.core.rules import HighIntentRule, RulesConfig, load_rules
from nudgeflow.core.settings import DEFAULT_RULES
from nudgeflow.core.stream_clock import StreamClock, StreamStamp
from nudgeflow.operators.detector import Detector
from nudgeflow.operators.intent_logic import HighIntentLogic
from nudgeflow.operators.native import compiled

TARGET_US: Final = 20.0

Stream = list[tuple[Event, StreamStamp, Profile]]


def sample_stream(users: int, hours: float, seed: int = 7) -> Stream:
    spec = SampleSpec(users=users, hours=hours, seed=seed)
    profiles = {p["user_id"]: profile_from_mapping(p) for p in generate_profiles(spec)}
    clock = StreamClock()
    stream: Stream = []
    for number, raw in enumerate(generate_events(spec), 1):
        opened = open_envelope(raw, Origin(line=number))
        if isinstance(opened, Envelope):
            event = opened.event
            stamp = clock.read(event.ts, None)
            stream.append((event, stamp, profiles.get(event.user_id, NO_PROFILE)))
    return stream


def _detect(detector: Detector, stream: Stream) -> None:
    """Every event of `stream` through `detector`, each user's state kept as the flow keeps it."""
    users: dict[str, Any] = {}
    for event, stamp, profile in stream:
        state = users.get(event.user_id)
        if state is None:
            state = users[event.user_id] = detector.new_user(event.user_id)
        detector.process(state, event, profile, stream=stamp)


def _detect_cpu_s(config: RulesConfig, stream: Stream) -> float:
    detector = Detector(config)
    gc.collect()
    start = time.thread_time()
    _detect(detector, stream)
    return time.thread_time() - start


def _inside_rule_s(config: RulesConfig, stream: Stream) -> tuple[float, float] | None:
    """(CPU s inside the high_intent rule, CPU s of the same timer around a no-op).

    None when the rule is compiled (`NUDGEFLOW_MYPYC=1`): its method cannot be wrapped.
    """
    if compiled():
        return None
    detector = Detector(config)
    logic = next(x for x in detector.logics if isinstance(x, HighIntentLogic))
    on_event = logic.on_event
    spent = [0, 0]
    clock = time.thread_time_ns

    def timed(step: Any, event: Event, session: Any) -> None:
        start = clock()
        on_event(step, event, session)
        spent[0] += clock() - start
        start = clock()
        spent[1] += clock() - start

    logic.on_event = timed  # type: ignore[method-assign]
    gc.collect()
    _detect(detector, stream)
    return spent[0] / 1e9, spent[1] / 1e9


def _per_call_us(fn: Callable[[Any], object], items: Sequence[Any]) -> float:
    gc.collect()
    start = time.thread_time()
    for item in items:
        fn(item)
    return (time.thread_time() - start) / max(len(items), 1) * 1e6


def _vectors(stream: Stream) -> list[tuple[float, ...]]:
    detector, logic = features_only_detector()
    recorder = FeatureRecorder()
    logic.log = recorder
    _detect(detector, stream)
    return [s.vector for s in recorder.samples]


def measure(
    *, users: int = 3000, hours: float = 4.0, runs: int = 3, rules: Path = DEFAULT_RULES
) -> dict[str, Any]:
    config = load_rules(rules)
    intent_rules = [r for r in config.enabled_rules if isinstance(r, HighIntentRule)]
    if not intent_rules:
        msg = f"{rules} has no enabled high_intent rule to measure"
        raise ValueError(msg)
    model: IntentModel = load_model(intent_rules[0].model)
    without = config.model_copy(update={"rules": [
        r for r in config.rules if not isinstance(r, HighIntentRule)
    ]})
    stream = sample_stream(users, hours)
    vectors = _vectors(stream)
    # The same number of scored events in the timed run: the rule scores up to a firing.
    scored = _scored_events(config, stream)
    with_s: list[float] = []
    without_s: list[float] = []
    inside: list[float] = []
    parts: dict[str, list[float]] = {"compiled score": [], "array walk + calibration": []}
    classifier = _sklearn_twin(model)
    if classifier is not None:
        parts["sklearn predict_proba, one row"] = []
    for _ in range(runs):
        timed = _inside_rule_s(config, stream)
        with_s.append(_detect_cpu_s(config, stream))
        without_s.append(_detect_cpu_s(without, stream))
        if timed is None:  # compiled: the whole detector's difference stands in
            inside.append((with_s[-1] - without_s[-1]) / max(scored, 1) * 1e6)
        else:
            inside.append((timed[0] - timed[1]) / max(scored, 1) * 1e6)
        parts["compiled score"].append(_per_call_us(model.score, vectors))
        parts["array walk + calibration"].append(
            _per_call_us(lambda v: model.calibrate(model.raw_score_walk(v)), vectors))
        if classifier is not None:
            few = vectors[:200]
            parts["sklearn predict_proba, one row"].append(
                _per_call_us(lambda v: classifier.predict_proba([v]), few))
    difference = [(w - o) / max(scored, 1) * 1e6 for w, o in zip(with_s, without_s, strict=True)]
    result: dict[str, Any] = {
        "events": len(stream),
        "scored_events": scored,
        "model": model.version,
        "trees": len(model.trees),
        "runs": runs,
        "amortised_us_per_scored_event": spread(inside, 2),
        "whole_detector_us_per_scored_event": spread(difference, 2),
        "detector_us_per_event_with": spread([s / len(stream) * 1e6 for s in with_s], 2),
        "detector_us_per_event_without": spread([s / len(stream) * 1e6 for s in without_s], 2),
        "parts_us": {name: spread(values, 2) for name, values in parts.items()},
        "target_us": TARGET_US,
    }
    result["target_met"] = result["amortised_us_per_scored_event"]["median"] <= TARGET_US
    return result


def _scored_events(config: RulesConfig, stream: Stream) -> int:
    detector = Detector(config)
    logic = next(x for x in detector.logics if isinstance(x, HighIntentLogic))
    counter = _Counter()
    logic.log = counter
    _detect(detector, stream)
    return counter.count


class _Counter:
    def __init__(self) -> None:
        self.count = 0

    def scored(self, user_id: str, session: int, ts: int, vector: tuple[float, ...]) -> None:
        self.count += 1

    def purchased(self, user_id: str, session: int, ts: int) -> None:
        pass


def _sklearn_twin(model: IntentModel) -> Any:
    """A fitted scikit-learn model of the same size, to time a per-event library call."""
    try:
        import numpy as np
        from sklearn.ensemble import HistGradientBoostingClassifier
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    x = rng.random((2000, len(model.features)))
    y = (x[:, 0] + rng.random(2000) > 1.0).astype(int)
    return HistGradientBoostingClassifier(max_iter=len(model.trees), early_stopping=False,
                                          random_state=0).fit(x, y)


def render(result: dict[str, Any]) -> str:
    rows = ["| what | CPU µs, median (min-max) |", "|---|---:|"]
    a = result["amortised_us_per_scored_event"]
    rows.append(f"| high_intent, amortised per scored event | {a['median']:.2f} "
                f"({a['min']:.2f}-{a['max']:.2f}) |")
    d = result["whole_detector_us_per_scored_event"]
    rows.append(f"| whole detector: with minus without high_intent, per scored event | "
                f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f}) |")
    for name in ("with", "without"):
        s = result[f"detector_us_per_event_{name}"]
        rows.append(f"| detector per event, default rules {name} high_intent | "
                    f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) |")
    for name, s in result["parts_us"].items():
        rows.append(f"| {name} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) |")
    met = "met" if result["target_met"] else "NOT met"
    rows.append("")
    rows.append(f"{result['events']:,} events, {result['scored_events']:,} scored; model "
                f"{result['model']} ({result['trees']} trees); median of {result['runs']} "
                f"runs; target <= {result['target_us']:g} µs amortised: {met}.")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nudgeflow bench --intent",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rules", type=Path, default=DEFAULT_RULES)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = measure(users=args.users, hours=args.hours, runs=args.runs, rules=args.rules)
    result["machine"] = machine_info()
    print(render(result))
    if args.json is not None:
        args.json.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

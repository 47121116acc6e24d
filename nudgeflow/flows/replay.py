"""The replay dataflow: a recorded file of events through the same detection as live mode.

    lines ─► decode ─┬─ invalid ──────────────────────────────► dead-letter file
                     └─ valid ─► key by user ─► profile ─► detect ─┬─ decisions ─► --out
                                                                   ├─ outcomes ──► --outcomes
                                                                   ├─ late ──────► dead letters
                                                                   └─ tallies ───► counts

Replay mode has no wall clock: the stream clock is the largest `ts` of the
valid lines read so far (stamped on each event where the lines are read, so
it is the same for any number of workers), and after the last line every
timer due by the input's largest `ts` is decided (`end_bound`).
Every output file is written sorted, so the result is the same for any
number of workers or processes. The flow is a factory, so


    python -m bytewax.testing \
        "nudgeflow.flows.replay:build_replay_flow('in.jsonl', 'out.jsonl')" -p 2

runs it as a 2-process cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bytewax.operators as op
import orjson
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import Sink

from nudgeflow.core.envelope import DeadLetter, Envelope, Origin, open_envelope
from nudgeflow.core.metrics import metrics
from nudgeflow.core.profiles import NO_PROFILE, Profile, load_profiles
from nudgeflow.core.recording import iter_input_lines
from nudgeflow.core.rules import RulesConfig, load_rules
from nudgeflow.core.settings import DEFAULT_RULES
from nudgeflow.core.triggers import Decision
from nudgeflow.operators.detect import (
    DEFAULT_SHARDS,
    Emitted,
    EmittedOutcome,
    Tally,
    detect,
    shard_key,
)
from nudgeflow.operators.detector import Detector
from nudgeflow.sinks.files import SortedJsonlSink, TallySink
from nudgeflow.sources.stamped import StampedSource

BATCH_SIZE = 1000


class _LinesPartition(StatefulSourcePartition[tuple[int, bytes], int]):
    def __init__(self, path: Path, resume_line: int) -> None:
        self._lines: Iterator[tuple[int, bytes]] = iter_input_lines(path)
        self._line = resume_line
        if resume_line:
            for number, _ in self._lines:
                if number >= resume_line:
                    break

    def next_batch(self) -> list[tuple[int, bytes]]:
        batch: list[tuple[int, bytes]] = []
        for item in self._lines:
            batch.append(item)
            if len(batch) >= BATCH_SIZE:
                break
        if not batch:
            raise StopIteration
        self._line = batch[-1][0]
        return batch

    def snapshot(self) -> int:
        return self._line


class EventLinesSource(FixedPartitionedSource[tuple[int, bytes], int]):
    """(line number, bytes) of every non-blank line of a JSONL file or a recording, in order."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def list_parts(self) -> list[str]:
        return ["lines"]

    def build_part(
        self, step_id: str, for_part: str, resume_state: int | None
    ) -> _LinesPartition:
        return _LinesPartition(self._path, resume_state or 0)


def _open_line(item: tuple[int, bytes], _now: int | None) -> Envelope | DeadLetter:
    return open_envelope(item[1], Origin(line=item[0]))


def _open_line_timed(item: tuple[int, bytes], _now: int | None) -> Envelope | DeadLetter:
    # The wall time of the read starts the event-to-dispatch latency, as live. It is
    # not the stream clock (replay's stays event time): no decision depends on it.
    # (time_ns: a tenth of timeutil.now_ms's cost, paid on every line.)
    return open_envelope(item[1], Origin(line=item[0]), arrived_ms=time.time_ns() // 1_000_000)


def _count_dead_letter(_step: str, item: tuple[str, DeadLetter]) -> None:
    metrics.record_dead_letter(item[1].reason)


def _count_outcome(_step: str, item: tuple[str, EmittedOutcome]) -> None:
    metrics.record_outcome(item[1].outcome)


def input_end(path: Path) -> int | None:
    """The largest `ts` of the valid events of the input: replay decides timers up to it."""
    end: int | None = None
    for number, raw in iter_input_lines(path):
        opened = open_envelope(raw, Origin(line=number))
        if isinstance(opened, Envelope) and (end is None or opened.event.ts > end):
            end = opened.event.ts
    return end


@dataclass(frozen=True)
class ReplayPaths:
    events: Path
    out: Path
    dead_letter: Path
    tally: Path


def default_dead_letter(out: Path) -> Path:
    """`--dead-letter` defaults to a file next to `--out`: `t.jsonl` -> `t.dlq.jsonl`."""
    return out.with_name(f"{out.stem}.dlq{out.suffix or '.jsonl'}")


def _decision_row(item: tuple[str, Emitted]) -> tuple[Any, bytes]:
    emitted = item[1]
    return emitted.order, orjson.dumps(emitted.decision.to_json())


def _outcome_row(item: tuple[str, EmittedOutcome]) -> tuple[Any, bytes]:
    emitted = item[1]
    return emitted.order, orjson.dumps(emitted.outcome.to_json())


def _dead_letter_row(item: tuple[str, DeadLetter]) -> tuple[Any, bytes]:
    letter = item[1]
    return (letter.origin.line or 0,), letter.to_json_bytes()


def _tally_counts(item: tuple[str, Tally]) -> tuple[str, dict[str, int]]:
    tally = item[1]
    counts = {"applied": tally.applied, "duplicate": tally.duplicate, "late": tally.late}
    return "all", counts


def build_replay_flow(
    events: str | Path,
    out: str | Path,
    *,
    dead_letter: str | Path | None = None,
    profiles: str | Path | None = None,
    rules: str | Path | RulesConfig | None = None,
    dispatch: Sink[tuple[str, Decision]] | None = None,
    record_metrics: bool = False,
    outcomes: str | Path | None = None,
) -> Dataflow:
    """The replay dataflow for one input file. Every argument may be a path string.

    With `outcomes`, each converted trigger's outcome is written there (one line
    per outcome, sorted like the triggers); without it they are not kept.

    With `dispatch`, dispatched decisions are also sent to it (the demo sends
    them to a dispatch API on loopback); replay itself needs no network. With
    `record_metrics` the run counts in `nudgeflow.core.metrics` as a live one
    does (events, dead letters, decisions, outcomes, and latency from each line's read),
    for the demo's dashboard; the output files are the same either way.
    """
    events_path = Path(events)
    out_path = Path(out)
    dlq_path = Path(dead_letter) if dead_letter is not None else default_dead_letter(out_path)
    config = rules if isinstance(rules, RulesConfig) else load_rules(rules or DEFAULT_RULES)
    detector = Detector(config)
    known: dict[str, Profile] = load_profiles(Path(profiles)) if profiles is not None else {}
    end_bound = input_end(events_path)
    # A sink partition that receives nothing is never built, so never writes: start
    # both files empty, and an input without triggers or bad lines still leaves them.
    # (Every process of a cluster builds the flow before any data moves, so this
    # cannot truncate a file another process already wrote.)
    outcomes_path = Path(outcomes) if outcomes is not None else None
    for path in (out_path, dlq_path, outcomes_path):
        if path is not None:
            path.write_bytes(b"")

    flow = Dataflow("nudgeflow_replay")
    # Opened and stamped with the stream clock where the lines are read, in line order.
    opener = _open_line_timed if record_metrics else _open_line
    opened = op.input("lines", flow, StampedSource(EventLinesSource(events_path), opener))
    split = op.branch("valid", opened, lambda x: isinstance(x, Envelope))
    valid: Any = split.trues
    invalid: Any = split.falses

    keyed = op.key_on("by_shard", valid, shard_key(DEFAULT_SHARDS))

    def with_profile(envelope: Envelope) -> Envelope:
        return envelope.with_profile(known.get(envelope.event.user_id, NO_PROFILE))

    enriched = op.map_value("profile", keyed, with_profile)
    # A replay is never resumed: no snapshot is worth its cost.
    detected = detect("detect", enriched, detector, end_bound=end_bound, snapshots=False,
                      shards=DEFAULT_SHARDS, record_metrics=record_metrics)

    keyed_invalid = op.key_on("invalid_key", invalid, lambda _: "dlq")
    letters = op.merge("dead_letters", keyed_invalid, detected.late)
    if record_metrics:
        letters = op.inspect("count_dead_letters", letters, _count_dead_letter)
    op.output("dead_letter_file", op.key_on("dlq_all", letters, lambda _: "all"),
              SortedJsonlSink(dlq_path, _dead_letter_row))
    op.output("triggers_file", op.key_on("out_all", detected.decisions, lambda _: "all"),
              SortedJsonlSink(out_path, _decision_row))
    if record_metrics:  # as the live flow counts them (`nudgeflow.flows.live.counted_outcome`)
        op.inspect("count_outcomes", detected.outcomes, _count_outcome)
    if outcomes_path is not None:
        op.output("outcomes_file", op.key_on("outcomes_all", detected.outcomes, lambda _: "all"),
                  SortedJsonlSink(outcomes_path, _outcome_row))
    if dispatch is not None:
        decisions = op.map_value("decision", detected.decisions, lambda e: e.decision)
        op.output("dispatch", decisions, dispatch)
    tallies = op.map("tally_counts", detected.tallies, _tally_counts)
    op.output("tally", tallies, TallySink(tally_path(out_path)))
    return flow


def tally_path(out: Path) -> Path:
    """Where the replay leaves its counts for the summary (removed once read)."""
    return out.with_name(f".{out.name}.counts.json")

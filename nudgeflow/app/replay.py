"""`nudgeflow replay`: run a recorded file through the replay dataflow and summarise the outcome."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from bytewax.outputs import Sink
from bytewax.run import cli_main

from nudgeflow.core.errors import InputFileError
from nudgeflow.core.profiles import load_profiles
from nudgeflow.core.rules import RulesConfig, load_rules
from nudgeflow.core.triggers import Decision
from nudgeflow.flows.replay import build_replay_flow, default_dead_letter, tally_path


@dataclass
class ReplaySummary:
    """What a replay did: how the input lines ended and what was decided."""

    applied: int = 0
    duplicate: int = 0
    late: int = 0
    invalid: int = 0
    decisions: Counter[tuple[str, str, str]] = field(default_factory=Counter)

    @property
    def triggers(self) -> int:
        return sum(self.decisions.values())

    def lines(self) -> list[str]:
        out = [
            f"events: {self.applied} applied, {self.duplicate} duplicate, "
            f"{self.late} late, {self.invalid} invalid",
            f"triggers: {self.triggers}",
        ]
        width = max((len(t) for t, _, _ in self.decisions), default=12)
        for (trigger_type, decision, reason), count in sorted(self.decisions.items()):
            label = decision if decision == "dispatched" else f"{decision} ({reason})"
            out.append(f"  {trigger_type:<{width}}  {label:<28} {count:>7}")
        return out


def _check_writable(path: Path) -> None:
    probe = path.with_name(path.name + ".part")
    try:
        with probe.open("wb"):
            pass
        probe.unlink()
    except OSError as exc:
        msg = f"cannot write {path}: {exc.strerror or exc}"
        raise InputFileError(msg) from None


def _check_readable(path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise InputFileError(msg) from None
    if path.is_dir():
        msg = f"cannot read {path}: is a directory"
        raise InputFileError(msg)


def run_replay(
    events: Path,
    out: Path,
    *,
    dead_letter: Path | None = None,
    profiles: Path | None = None,
    rules: Path | RulesConfig | None = None,
    workers: int = 1,
    dispatch: Sink[tuple[str, Decision]] | None = None,
    record_metrics: bool = False,
    outcomes: Path | None = None,
) -> ReplaySummary:
    """Replay `events` into `out` (and the dead letters); raise NudgeflowError on unusable input."""
    config = rules if isinstance(rules, RulesConfig) else (load_rules(rules) if rules else None)
    _check_readable(events)
    if profiles is not None:
        load_profiles(profiles)  # fails early, with its own message, if unreadable
    dlq = dead_letter or default_dead_letter(out)
    _check_writable(out)
    _check_writable(dlq)
    if outcomes is not None:
        _check_writable(outcomes)
    flow = build_replay_flow(
        events, out, dead_letter=dlq, profiles=profiles, rules=config, dispatch=dispatch,
        record_metrics=record_metrics,
        outcomes=outcomes,
    )
    cli_main(flow, workers_per_process=workers)
    return summarise(out, dlq)


def summarise(out: Path, dead_letter: Path) -> ReplaySummary:
    summary = ReplaySummary()
    counts_file = tally_path(out)
    if counts_file.exists():
        counts = orjson.loads(counts_file.read_bytes())
        counts_file.unlink()
        summary.applied = counts.get("applied", 0)
        summary.duplicate = counts.get("duplicate", 0)
    with dead_letter.open("rb") as handle:
        for line in handle:
            if orjson.loads(line).get("reason") == "late":
                summary.late += 1
            else:
                summary.invalid += 1
    with out.open("rb") as handle:
        for line in handle:
            row = orjson.loads(line)
            summary.decisions[(row["trigger_type"], row["decision"], row["reason"] or "")] += 1
    return summary

"""`nudgeflow model train EVENTS.jsonl [--profiles P] --out MODEL [--eval-json FILE]`."""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from nudgeflow.app.intent.dataset import extract
from nudgeflow.app.intent.train import TrainConfig, plot_reliability, render, train, write_model
from nudgeflow.core.errors import InputFileError
from nudgeflow.core.rules import TimeConfig, load_rules


def run_train(
    events: Path,
    out: Path,
    *,
    profiles: Path | None = None,
    eval_json: Path | None = None,
    plot: Path | None = None,
    rules: Path | None = None,
    horizon_ms: int = 2 * 3_600_000,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> int:
    config = config or TrainConfig()
    if not events.is_file():
        msg = f"cannot read events {events}: no such file"
        raise InputFileError(msg)
    time = load_rules(rules).time if rules is not None else TimeConfig()
    dataset = extract(events, profiles=profiles, time=time, horizon_ms=horizon_ms,
                      progress=progress)
    document, evaluation = train(dataset, config, progress=progress)
    try:
        write_model(document, out)
        if eval_json is not None:
            eval_json.write_bytes(orjson.dumps(evaluation, option=orjson.OPT_INDENT_2) + b"\n")
    except OSError as exc:
        msg = f"cannot write {exc.filename}: {exc.strerror}"
        raise InputFileError(msg) from None
    for line in render(evaluation):
        print(line)
    picture = plot or (eval_json.with_suffix(".png") if eval_json is not None else None)
    if picture is not None:
        problem = plot_reliability(evaluation, picture)
        print(f"reliability plot: {problem or picture}", file=sys.stderr)
    print(f"model {config.version} ({len(document['trees'])} trees) written to {out}",
          file=sys.stderr)
    return 0

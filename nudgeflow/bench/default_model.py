"""Rebuild the shipped intent model: `python -m nudgeflow.bench.default_model [--out-dir D]`.

Trains on the bundled sample shop with another seed than the demo's (20,000
shoppers, 12 hours, seed 11: the demo's stream is never trained on) and writes
`nudgeflow/config/intent/model.json`, with its evaluation beside the sample in
`--out-dir` (default `bench/results/intent-default`, ignored by git).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from nudgeflow.app.intent.command import run_train
from nudgeflow.app.intent.train import TrainConfig
from nudgeflow.app.samples import SampleSpec, write_sample
from nudgeflow.core.resources import DEFAULT_INTENT_MODEL

VERSION: Final = "sample-shop-1"
SPEC: Final = SampleSpec(users=20_000, hours=12.0, seed=11)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nudgeflow.bench.default_model",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results/intent-default"))
    parser.add_argument("--model", type=Path, default=DEFAULT_INTENT_MODEL)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    events, profiles = write_sample(args.out_dir, SPEC)
    return run_train(events, args.model, profiles=profiles,
                     eval_json=args.out_dir / "evaluation.json",
                     config=TrainConfig(version=VERSION))


if __name__ == "__main__":
    sys.exit(main())

"""`nudgeflow model train` on a small sample stream: the model, its evaluation, its use."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from intent_helpers import rules_text

from nudgeflow.app.samples import SampleSpec, write_sample
from nudgeflow.cli import main
from nudgeflow.core.intent.features import FEATURES
from nudgeflow.core.intent.model import load_model

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, object]]:
    work = tmp_path_factory.mktemp("train")
    events, profiles = write_sample(work, SampleSpec(users=1200, hours=3.0, seed=5))
    model, evaluation = work / "model.json", work / "eval.json"
    assert main(["model", "train", str(events), "--profiles", str(profiles), "--out",
                 str(model), "--eval-json", str(evaluation), "--max-iter", "15",
                 "--model-version", "ci-1", "--no-progress"]) == 0
    return events, model, orjson.loads(evaluation.read_bytes())


def test_the_evaluation_has_the_interface_s_fields(
    trained: tuple[Path, Path, dict[str, object]],
) -> None:
    _, _, evaluation = trained
    for name in ("roc_auc", "pr_auc", "brier", "calibration"):
        assert name in evaluation["model"]  # type: ignore[operator]
        for baseline in ("logistic", "has_cart"):
            assert name in evaluation["baselines"][baseline]  # type: ignore[index]
    at = evaluation["at_threshold"]
    assert at["threshold"] == 0.7  # type: ignore[index]
    assert {"precision", "recall"} <= set(at)  # type: ignore[arg-type]


def test_the_model_learns_what_the_sample_s_buyers_do(
    trained: tuple[Path, Path, dict[str, object]],
) -> None:
    _, _, evaluation = trained
    model, cart = evaluation["model"], evaluation["baselines"]["has_cart"]  # type: ignore[index]
    # Buyers browse differently before they add to the cart: the trees see more than
    # a non-empty cart does, and their probabilities are calibrated.
    assert model["roc_auc"] > cart["roc_auc"] + 0.05
    assert model["brier"] < cart["brier"]
    for row in model["calibration"]:
        if row["count"] >= 200:
            assert abs(row["mean_score"] - row["observed"]) < 0.1


def test_the_trained_model_is_served_by_a_rules_file(
    tmp_path: Path, trained: tuple[Path, Path, dict[str, object]],
) -> None:
    events, model_path, _ = trained
    model = load_model(model_path)
    assert (model.version, model.features, len(model.trees)) == ("ci-1", FEATURES, 15)
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(model_path))
    out = tmp_path / "out.jsonl"
    assert main(["replay", str(events), "--rules", str(rules), "--out", str(out),
                 "--quiet"]) == 0
    scores = [orjson.loads(line)["metadata"]["score"] for line in out.read_bytes().splitlines()]
    assert scores
    assert min(scores) >= 0.7


def test_a_stream_without_purchases_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    lines = [{"event_id": str(n), "user_id": f"u{n % 40}", "type": "page_view",
              "ts": 1_772_359_200_000 + n * 3_600_000 // 7} for n in range(400)]
    events.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    assert main(["model", "train", str(events), "--out", str(tmp_path / "m.json"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("nudgeflow: error: the training period has only sessions without a "
                       "purchase: a model needs both")
    assert not (tmp_path / "m.json").exists()

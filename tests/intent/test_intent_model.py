"""The model file: checked at load, scored in plain Python exactly as scikit-learn would."""

from __future__ import annotations

import math
import random
from pathlib import Path

import orjson
import pytest
from intent_helpers import FEW_VIEWS, MANY_VIEWS, NO_ADD, rules_text, tiny_model, write_model

from nudgeflow.cli import main
from nudgeflow.core.intent.features import FEATURES
from nudgeflow.core.intent.model import load_model, model_from_data
from nudgeflow.core.resources import DEFAULT_RULES
from nudgeflow.core.rules import HighIntentRule, load_rules

ADDS = FEATURES.index("session_cart_adds")
VIEWS = FEATURES.index("session_product_views")


def vector(adds: float, views: float) -> list[float]:
    x = [0.0] * len(FEATURES)
    x[ADDS], x[VIEWS] = adds, views
    return x


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def test_the_tiny_model_scores_what_its_trees_say() -> None:
    model = model_from_data(tiny_model())
    assert model.score(vector(0, 9)) == sigmoid(NO_ADD)
    assert model.score(vector(1, 2)) == sigmoid(FEW_VIEWS)
    assert model.score(vector(2, 3)) == sigmoid(MANY_VIEWS)
    ranked = model.contributions(vector(1, 3))
    assert [name for name, _ in ranked] == ["session_cart_adds", "session_product_views"]
    assert sum(share for _, share in ranked) == MANY_VIEWS - (-1.0)  # leaf minus root


def test_isotonic_calibration_interpolates_and_clips() -> None:
    model = model_from_data(tiny_model(calibration={"x": [-1.0, 1.0], "y": [0.1, 0.5]}))
    assert model.calibrate(-5.0) == 0.1
    assert model.calibrate(0.0) == pytest.approx(0.3)
    assert model.calibrate(7.0) == 0.5


def lines_of(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(("changes", "problem"), [
    ({"features": [*FEATURES[:-1], "clicks"]},
     "was trained on other features than this nudgeflow computes (unknown here: clicks; "
     "not in the model: events_today)"),
    ({"features": list(reversed(FEATURES))}, "the same features in another order"),
    ({"format_version": 2}, "format version 2, this nudgeflow reads 1"),
    ({"format": "xgboost"}, "not a nudgeflow intent model"),
    ({"trees": [{"feature": [0], "threshold": [0.0], "left": [0], "right": [0, 1],
                 "value": [0.0]}]}, "malformed: a tree's node arrays differ in length"),
])
def test_a_model_that_cannot_serve_is_refused_at_start_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, object],
    problem: str,
) -> None:
    model = write_model(tmp_path / "model.json", **changes)
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(model))
    assert main(["rules", "check", str(rules)]) == 2
    (line,) = lines_of(capsys)
    assert line.startswith(f"nudgeflow: error: {rules}:4: rules.0.model: intent model {model}")
    assert problem in line


def test_a_relative_model_path_is_read_from_the_rules_file_s_folder(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    write_model(tmp_path / "models" / "m.json")
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(Path("models/m.json")))
    (rule,) = load_rules(rules).rules
    assert isinstance(rule, HighIntentRule)
    assert Path(rule.model) == tmp_path / "models" / "m.json"


def test_the_shipped_model_serves_the_shipped_rules() -> None:
    (rule,) = [r for r in load_rules(DEFAULT_RULES).rules if isinstance(r, HighIntentRule)]
    model = load_model(rule.model)
    assert rule.threshold == 0.70
    assert model.features == FEATURES
    assert model.version.startswith("sample-shop")
    assert Path(rule.model).stat().st_size < 200_000


def test_exported_trees_score_as_scikit_learn_does(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    ensemble = pytest.importorskip("sklearn.ensemble")
    from nudgeflow.app.intent.export import model_document

    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=(3000, len(FEATURES))).astype(float)
    y = ((x[:, ADDS] + x[:, VIEWS] + rng.normal(0, 1.5, 3000)) > 5).astype(int)
    classifier = ensemble.HistGradientBoostingClassifier(
        max_iter=20, max_leaf_nodes=7, early_stopping=False, random_state=0).fit(x, y)
    document = model_document(classifier, ([], []), version="t", label={}, trained={})
    path = tmp_path / "m.json"
    path.write_bytes(orjson.dumps(document))
    model = load_model(path)
    probe = rng.integers(0, 7, size=(500, len(FEATURES))).astype(float)
    expected = classifier.predict_proba(probe)[:, 1]
    raw = classifier.decision_function(probe)
    for row, p, r in zip(probe.tolist(), expected, raw, strict=True):
        assert model.raw_score(row) == model.raw_score_walk(row)
        assert model.raw_score(row) == pytest.approx(float(r), abs=1e-12)
        assert model.score(row) == pytest.approx(float(p), abs=1e-12)


def test_the_compiled_scorer_equals_the_array_walk_on_the_shipped_model() -> None:
    (rule,) = [r for r in load_rules(DEFAULT_RULES).rules if isinstance(r, HighIntentRule)]
    model = load_model(rule.model)
    rng = random.Random(5)
    for _ in range(2000):
        row = [float(rng.randint(-1, 12)) * rng.choice((1, 0.5, 7.3)) for _ in FEATURES]
        assert model.raw_score(row) == model.raw_score_walk(row)


def test_a_copy_of_the_shipped_rules_finds_the_shipped_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "rules.yaml"
    copy.write_text(DEFAULT_RULES.read_text())
    assert main(["rules", "check", str(copy)]) == 0
    assert capsys.readouterr().out == f"{copy}: ok, 10 rules\n"

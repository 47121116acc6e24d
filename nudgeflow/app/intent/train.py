"""`nudgeflow model train`: fit, calibrate, export and evaluate the intent model.

- Split by time: sessions are ordered by their first scored event; the
  earlier `1 - test_share` of them train, the later ones evaluate. No session
  is in both.
- Within the training period, the last `calibration_share` of its sessions is
  held out: the trees are fitted on the rest, the isotonic calibration (raw
  score -> probability) on that slice.
- The evaluation scores the held-out later period with the *exported* model
  (the plain-Python scorer the flow uses), beside two baselines: a logistic
  regression on the same features (fitted on the whole training period) and
  "has a non-empty cart".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from tqdm import tqdm

from nudgeflow.app.intent.dataset import Dataset
from nudgeflow.app.intent.export import model_document
from nudgeflow.core.errors import UsageError
from nudgeflow.core.intent.features import FEATURES
from nudgeflow.core.intent.model import IntentModel, model_from_data

THRESHOLD = 0.70
_CART_ITEMS = FEATURES.index("cart_items")


@dataclass(frozen=True)
class TrainConfig:
    test_share: float = 0.3
    calibration_share: float = 0.2
    max_iter: int = 40
    max_leaf_nodes: int = 15
    learning_rate: float = 0.1
    version: str = "custom"
    bins: int = 10


@dataclass
class Split:
    train: list[int]
    calibrate: list[int]
    test: list[int]
    cut_ms: int | None


def split_by_time(dataset: Dataset, config: TrainConfig) -> Split:
    """Indices of the fit, calibration and test samples, by their session's start."""
    starts = sorted(set(zip(dataset.session_start, (s.user_id for s in dataset.samples),
                            strict=True)))
    if len(starts) < 10:
        msg = f"only {len(starts)} sessions to learn from: at least 10 are needed"
        raise UsageError(msg)
    test_from = starts[int(len(starts) * (1 - config.test_share))]
    train_keys = [k for k in starts if k < test_from]
    calibrate_from = train_keys[int(len(train_keys) * (1 - config.calibration_share))]
    fit, calibrate, test = [], [], []
    for i, key in enumerate(zip(dataset.session_start, (s.user_id for s in dataset.samples),
                                strict=True)):
        if key >= test_from:
            test.append(i)
        elif key >= calibrate_from:
            calibrate.append(i)
        else:
            fit.append(i)
    return Split(fit, calibrate, test, test_from[0])


def train(
    dataset: Dataset, config: TrainConfig, *, progress: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model document, the evaluation) of `dataset`."""
    try:
        import numpy as np
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.isotonic import IsotonicRegression
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        msg = ("training needs scikit-learn, which serving does not: "
               "pip install 'nudgeflow[train]'")
        raise UsageError(msg) from None

    split = split_by_time(dataset, config)
    x = np.asarray([s.vector for s in dataset.samples], dtype=np.float64)
    y = np.asarray(dataset.labels, dtype=np.int64)
    for name, part in (("training", split.train + split.calibrate), ("test", split.test)):
        if len(set(y[part].tolist())) < 2:
            only = "purchases" if y[part].all() else "sessions without a purchase"
            msg = f"the {name} period has only {only}: a model needs both"
            raise UsageError(msg)
    steps = tqdm(total=4, desc="training", unit=" step", disable=not progress)
    classifier = HistGradientBoostingClassifier(
        max_iter=config.max_iter, max_leaf_nodes=config.max_leaf_nodes,
        learning_rate=config.learning_rate, early_stopping=False, random_state=0,
    )
    fit_rows = split.train if len(set(y[split.train].tolist())) == 2 else (
        split.train + split.calibrate)
    classifier.fit(x[fit_rows], y[fit_rows])
    steps.update()
    raw = classifier.decision_function(x[split.calibrate]) if split.calibrate else None
    if raw is not None and len(set(y[split.calibrate].tolist())) == 2:
        isotonic = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        isotonic.fit(raw, y[split.calibrate])
        calibration = ([float(v) for v in isotonic.X_thresholds_],
                       [float(v) for v in isotonic.y_thresholds_])
    else:  # no usable slice: the booster's own sigmoid
        calibration = ([], [])
    steps.update()
    document = model_document(
        classifier, calibration, version=config.version,
        label={"purchase_in_session_within_hours": dataset.horizon_ms / 3_600_000},
        trained={"samples": len(fit_rows), "calibration_samples": len(split.calibrate),
                 "events": dataset.events, "max_iter": config.max_iter,
                 "max_leaf_nodes": config.max_leaf_nodes,
                 "learning_rate": config.learning_rate},
    )
    model = model_from_data(document)
    logistic = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    train_rows = split.train + split.calibrate
    logistic.fit(x[train_rows], y[train_rows])
    steps.update()
    test_y = [int(v) for v in y[split.test]]
    scores = [model.score(dataset.samples[i].vector) for i in split.test]
    evaluation: dict[str, Any] = {
        "model": metrics(test_y, scores, config.bins),
        "baselines": {
            "logistic": metrics(
                test_y, [float(p) for p in logistic.predict_proba(x[split.test])[:, 1]],
                config.bins),
            "has_cart": metrics(
                test_y, [1.0 if dataset.samples[i].vector[_CART_ITEMS] > 0 else 0.0
                         for i in split.test], config.bins),
        },
        "at_threshold": at_threshold(test_y, scores, THRESHOLD),
        "data": {
            "events": dataset.events, "samples": len(dataset), "positives": int(y.sum()),
            "train_samples": len(split.train), "calibration_samples": len(split.calibrate),
            "test_samples": len(split.test), "test_positives": sum(test_y),
            "test_from": split.cut_ms,
            "label": f"a purchase in the session within {dataset.horizon_ms / 3_600_000:g} h "
                     "of the scored event",
        },
        "model_version": model.version,
    }
    steps.update()
    steps.close()
    return document, evaluation


# --- metrics (plain Python: the same numbers whatever scored) ---------------------------


def metrics(labels: Sequence[int], scores: Sequence[float], bins: int = 10) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    both = len(set(labels)) == 2
    return {
        "roc_auc": float(roc_auc_score(labels, scores)) if both else None,
        "pr_auc": float(average_precision_score(labels, scores)) if both else None,
        "brier": float(brier_score_loss(labels, scores)),
        "calibration": calibration_table(labels, scores, bins),
        **at_threshold(labels, scores, THRESHOLD),
    }


def calibration_table(
    labels: Sequence[int], scores: Sequence[float], bins: int
) -> list[dict[str, Any]]:
    """Per equal-width score bin: its range, count, mean score and observed purchase rate."""
    table = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = [(s, y) for s, y in zip(scores, labels, strict=True)
                   if low <= s < high or (b == bins - 1 and s == 1.0)]
        if not members:
            continue
        table.append({
            "bin": [round(low, 3), round(high, 3)],
            "count": len(members),
            "mean_score": sum(s for s, _ in members) / len(members),
            "observed": sum(y for _, y in members) / len(members),
        })
    return table


def at_threshold(
    labels: Sequence[int], scores: Sequence[float], threshold: float
) -> dict[str, Any]:
    flagged = [y for s, y in zip(scores, labels, strict=True) if s >= threshold]
    positives = sum(labels)
    return {
        "threshold": threshold,
        "flagged": len(flagged),
        "precision": sum(flagged) / len(flagged) if flagged else None,
        "recall": sum(flagged) / positives if positives else None,
    }


# --- output ------------------------------------------------------------------------------


def write_model(document: dict[str, Any], path: Path) -> None:
    path.write_bytes(orjson.dumps(document) + b"\n")


def render(evaluation: dict[str, Any]) -> list[str]:
    """The evaluation as a table for the terminal."""
    data = evaluation["data"]
    rows = [("model (gradient boosting, calibrated)", evaluation["model"]),
            ("baseline: logistic regression", evaluation["baselines"]["logistic"]),
            ("baseline: has a non-empty cart", evaluation["baselines"]["has_cart"])]
    lines = [
        f"label: {data['label']}",
        f"samples: {data['samples']} scored events ({data['positives']} positive); "
        f"train {data['train_samples']} + calibrate {data['calibration_samples']}, "
        f"test {data['test_samples']} ({data['test_positives']} positive), the later period",
        "",
        f"{'':40} {'ROC AUC':>8} {'PR AUC':>8} {'Brier':>8} {'P@0.70':>8} {'R@0.70':>8}",
    ]
    for name, m in rows:
        lines.append(f"{name:40} {_num(m['roc_auc']):>8} {_num(m['pr_auc']):>8} "
                     f"{_num(m['brier']):>8} {_num(m['precision']):>8} {_num(m['recall']):>8}")
    lines += ["", "calibration (model, test period):", f"  {'scores':12} {'count':>7} "
              f"{'mean score':>11} {'observed':>9}"]
    for row in evaluation["model"]["calibration"]:
        low, high = row["bin"]
        lines.append(f"  {low:.1f}-{high:.1f}     {row['count']:>7} {row['mean_score']:>11.3f} "
                     f"{row['observed']:>9.3f}")
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
        f"{value:.3f}")


def plot_reliability(evaluation: dict[str, Any], path: Path) -> str | None:
    """The reliability diagram as PNG; the reason when it cannot be drawn (no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'nudgeflow[bench]')"
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect")
    for name, m in (("model", evaluation["model"]),
                    ("logistic", evaluation["baselines"]["logistic"])):
        table = m["calibration"]
        axes.plot([r["mean_score"] for r in table], [r["observed"] for r in table],
                  marker="o", label=name)
    axes.set_xlabel("predicted purchase probability")
    axes.set_ylabel("observed purchase rate")
    axes.set_title("intent model reliability (test period)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return None


def score_model(model: IntentModel, dataset: Dataset) -> list[float]:
    return [model.score(s.vector) for s in dataset.samples]

"""A fitted HistGradientBoostingClassifier and its isotonic calibration as a model file.

The trees become node arrays (`nudgeflow.core.intent.model`): feature, threshold,
children and value per node, a leaf marked by feature -1. An inner node's value
is the count-weighted mean of its children's (scikit-learn leaves it unset at
the root), so the changes along a path add up to the leaf's value minus the
root's: the per-feature contributions `explain` shows.
"""

from __future__ import annotations

from typing import Any

from nudgeflow.core.intent.features import FEATURES
from nudgeflow.core.intent.model import FORMAT, FORMAT_VERSION


def export_trees(classifier: Any) -> tuple[float, list[dict[str, Any]]]:
    """(baseline, trees) of a binary HistGradientBoostingClassifier on numeric features."""
    baseline = float(classifier._baseline_prediction.ravel()[0])
    trees: list[dict[str, Any]] = []
    for (predictor,) in classifier._predictors:
        nodes = predictor.nodes
        if nodes["is_categorical"].any():
            msg = "categorical splits are not exported"
            raise ValueError(msg)
        size = len(nodes)
        value = [0.0] * size
        count = [int(c) for c in nodes["count"]]
        for node in reversed(range(size)):  # children come after their parent
            if nodes["is_leaf"][node]:
                value[node] = float(nodes["value"][node])
            else:
                left, right = int(nodes["left"][node]), int(nodes["right"][node])
                total = count[left] + count[right]
                value[node] = (value[left] * count[left] + value[right] * count[right]) / total
        trees.append({
            "feature": [-1 if nodes["is_leaf"][n] else int(nodes["feature_idx"][n])
                        for n in range(size)],
            "threshold": [0.0 if nodes["is_leaf"][n] else float(nodes["num_threshold"][n])
                          for n in range(size)],
            "left": [int(nodes["left"][n]) for n in range(size)],
            "right": [int(nodes["right"][n]) for n in range(size)],
            "value": value,
        })
    return baseline, trees


def model_document(
    classifier: Any,
    calibration: tuple[list[float], list[float]],
    *,
    version: str,
    label: dict[str, Any],
    trained: dict[str, Any],
) -> dict[str, Any]:
    baseline, trees = export_trees(classifier)
    xs, ys = calibration
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_version": version,
        "features": list(FEATURES),
        "label": label,
        "trained": trained,
        "baseline": baseline,
        "calibration": {"x": xs, "y": ys},
        "trees": trees,
    }

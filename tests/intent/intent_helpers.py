"""A hand-made intent model whose scores a test can work out by reading it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from nudgeflow.core.intent.features import FEATURES
from nudgeflow.core.intent.model import FORMAT, FORMAT_VERSION

ADDS = FEATURES.index("session_cart_adds")
PRODUCT_VIEWS = FEATURES.index("session_product_views")

# No cart add in the session: sigmoid(-3) = 0.047. A cart add and at most 2 product
# views: sigmoid(0.5) = 0.62. A cart add and 3 or more: sigmoid(3) = 0.953.
NO_ADD, FEW_VIEWS, MANY_VIEWS = -3.0, 0.5, 3.0


def tiny_model(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_version": "tiny-1",
        "features": list(FEATURES),
        "baseline": 0.0,
        "calibration": {"x": [], "y": []},
        "trees": [{
            "feature": [ADDS, -1, PRODUCT_VIEWS, -1, -1],
            "threshold": [0.5, 0.0, 2.5, 0.0, 0.0],
            "left": [1, 0, 3, 0, 0],
            "right": [2, 0, 4, 0, 0],
            "value": [-1.0, NO_ADD, 1.75, FEW_VIEWS, MANY_VIEWS],
        }],
    }
    document.update(changes)
    return document


def write_model(path: Path, **changes: Any) -> Path:
    path.write_bytes(orjson.dumps(tiny_model(**changes)))
    return path


def rules_text(model: Path, threshold: float = 0.7, extra: str = "") -> str:
    return (
        "rules:\n"
        "  - name: high_intent\n"
        "    kind: high_intent\n"
        f"    model: {model}\n"
        f"    threshold: {threshold}\n"
        "    channels: [email]\n"
        f"{extra}"
    )

"""`high_intent` in the flow: a golden replay with a tiny model whose scores are known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from intent_helpers import FEW_VIEWS, MANY_VIEWS, rules_text, write_model

from nudgeflow.cli import main

T0 = 1_772_359_200_000  # 2026-03-01T10:00:00Z
MIN = 60_000


def ev(n: int, kind: str, minute: float, user: str = "u", **fields: Any) -> dict[str, Any]:
    return {"event_id": f"{user}{n}", "user_id": user, "type": kind,
            "ts": T0 + int(minute * MIN), **fields}


def view(n: int, minute: float, product: str, user: str = "u") -> dict[str, Any]:
    return ev(n, "page_view", minute, user, page_type="product", product_id=product)


def add(n: int, minute: float, product: str, user: str = "u") -> dict[str, Any]:
    return ev(n, "add_to_cart", minute, user, product_id=product, price=10.0)


STREAM = [
    view(1, 0, "a"), view(2, 1, "b"),
    add(3, 2, "a"),                      # an add, 2 product views: 0.62, below 0.70
    view(4, 3, "c"),                     # 3 product views: 0.95 -> fires at 0:03
    view(5, 4, "d"),                     # fired in this session already
    view(6, 50, "e"),                    # 47 min later: a new session, no add: 0.05
    add(7, 51, "e"), view(8, 52, "f"), view(9, 53, "g"),   # fires again at 0:53
    view(1, 0, "a", user="w"), view(2, 1, "b", user="w"), add(3, 2, "a", user="w"),
    ev(4, "purchase", 2.5, user="w"),    # a session with a purchase is not scored any more
    view(5, 3, "c", user="w"), view(6, 4, "d", user="w"),
]


def replay(tmp_path: Path, lines: list[dict[str, Any]], workers: int = 1,
           threshold: float = 0.7) -> list[dict[str, Any]]:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(write_model(tmp_path / "tiny.json"), threshold))
    out = tmp_path / f"out-{workers}.jsonl"
    assert main(["replay", str(events), "--rules", str(rules), "--out", str(out),
                 "--workers", str(workers), "--quiet"]) == 0
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def test_fires_once_per_session_at_the_scoring_event_with_the_score(tmp_path: Path) -> None:
    triggers = replay(tmp_path, STREAM)
    fired = [(t["user_id"], t["fired_at"]) for t in triggers]
    assert fired == [("u", "2026-03-01T10:03:00Z"), ("u", "2026-03-01T10:53:00Z")]
    metadata = triggers[0]["metadata"]
    assert metadata["score"] == round(1 / (1 + 2.718281828459045 ** -MANY_VIEWS), 4)
    assert metadata["model"] == "tiny-1"
    assert [f["feature"] for f in metadata["top_features"]] == [
        "session_cart_adds", "session_product_views"]
    assert metadata["top_features"][1]["value"] == 3.0


def test_the_threshold_is_the_rule_s(tmp_path: Path) -> None:
    triggers = replay(tmp_path, STREAM, threshold=0.6)
    # 0.62 now passes: the add itself fires, in each session (w's too, before the purchase)
    assert [(t["user_id"], t["fired_at"][11:16]) for t in triggers] == [
        ("u", "10:02"), ("u", "10:51"), ("w", "10:02")]
    assert triggers[0]["metadata"]["score"] == round(1 / (1 + 2.718281828459045 ** -FEW_VIEWS), 4)


def test_replay_output_is_the_same_on_one_and_on_three_workers(tmp_path: Path) -> None:
    one = replay(tmp_path, STREAM, workers=1)
    three = replay(tmp_path, STREAM, workers=3)
    for trigger in one + three:
        trigger.pop("detected_at")
    assert one == three


def test_explain_shows_the_score_and_what_moved_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(orjson.dumps(line) for line in STREAM) + b"\n")
    rules = tmp_path / "rules.yaml"
    rules.write_text(rules_text(write_model(tmp_path / "tiny.json")))
    assert main(["explain", "--user", "u", str(events), "--rules", str(rules)]) == 0
    out = capsys.readouterr().out
    assert ("high_intent: score 0.622 < 0.7; moved most by session_cart_adds=1 (+2.75), "
            "session_product_views=2 (-1.25)") in out
    assert "high_intent: score 0.953 >= 0.7; moved most by session_cart_adds=1 (+2.75)" in out
    assert "high_intent: fired 2x" in out

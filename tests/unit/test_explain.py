"""`nudgeflow explain`: the user-facing answer to "why didn't this customer get the reminder?"."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from nudgeflow.cli import main

T0 = 1_772_359_200_000
MIN = 60_000


def write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in rows) + b"\n")
    return path


def event(n: int, kind: str, ts: int, user: str = "u1", **fields: object) -> dict[str, object]:
    return {"event_id": str(n), "user_id": user, "type": kind, "ts": ts, **fields}


def explain(tmp_path: Path, rows: list[dict[str, object]], capsys: pytest.CaptureFixture[str],
            profiles: list[dict[str, object]] | None = None) -> str:
    args = ["explain", "--user", "u1", str(write(tmp_path / "events.jsonl", rows))]
    if profiles is not None:
        args += ["--profiles", str(write(tmp_path / "profiles.jsonl", profiles))]
    assert main(args) == 0
    return capsys.readouterr().out


def test_a_purchase_before_the_deadline_is_named_as_the_cancel(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = explain(tmp_path, [
        event(1, "add_to_cart", T0, product_id="p1"),
        event(2, "purchase", T0 + 5 * MIN),
        event(3, "page_view", T0 + 60 * MIN, user="other"),
    ], capsys)
    assert "cart_abandonment: deadline started: 2026-03-01T10:15:00Z" in out
    assert "cart_abandonment: cancelled: by purchase" in out
    assert "cart_abandonment: did not fire; last: cancelled: by purchase" in out


def test_a_suppressing_policy_and_a_segment_mismatch_are_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [event(n, "page_view", T0 + n * MIN) for n in range(1, 4)]
    out = explain(tmp_path, rows, capsys,
                  profiles=[{"user_id": "u1", "segment": "regular", "opt_in": ["email"]}])
    assert "new_visitor_welcome: condition held, but the user's segment is 'regular'" in out
    out = explain(tmp_path, rows, capsys, profiles=[{"user_id": "u1", "opt_in": []}])
    assert "new_visitor_welcome: fired 1x (suppressed (no_channel))" in out


def test_late_and_invalid_lines_of_the_user_are_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = explain(tmp_path, [
        event(1, "page_view", T0 + 10 * MIN),
        event(2, "page_view", T0),
        event(3, "add_to_cart", T0 + 11 * MIN),
    ], capsys)
    assert ("-> late: below the user's clock minus the lateness 2026-03-01T10:09:30Z, "
            "not applied") in out
    assert "line 3: not an event: missing field 'product_id'" in out
    assert "events: 1 applied, 0 duplicate, 1 late, 1 invalid" in out

"""`nudgeflow replay` as TRIGGERS.md's contract describes it: files in, files out, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from nudgeflow.cli import main
from nudgeflow.core.recording import RecordedMessage, recording_header

MIN = 60_000
T0 = 1_772_359_200_000


def line(event_id: str, user: str, kind: str, ts: int, **fields: Any) -> bytes:
    return orjson.dumps({"event_id": event_id, "user_id": user, "type": kind, "ts": ts, **fields})


STREAM = [
    line("1", "ann", "add_to_cart", T0, product_id="p1", quantity=2, price=25.0),
    b"",
    line("2", "bob", "page_view", T0 + MIN, page_type="product", product_id="p9"),
    b"{broken",
    line("3", "ann", "page_view", T0 + 16 * MIN),
    line("4", "ann", "page_view", T0),  # late: 16 min behind
    line("3", "ann", "page_view", T0 + 16 * MIN),  # duplicate
    line("5", "bob", "add_to_cart", T0 + 2 * MIN),  # invalid: no product_id
    line("6", "bob", "page_view", T0 + 3 * MIN),
]
PROFILES = [
    {"user_id": "ann", "segment": "vip", "opt_in": ["sms", "email"], "timezone": "UTC"},
    {"user_id": "bob", "segment": "regular", "opt_in": []},
]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(row) for row in path.read_bytes().splitlines() if row.strip()]


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    events = write_lines(tmp_path / "events.jsonl", STREAM)
    profiles = write_lines(tmp_path / "profiles.jsonl", [orjson.dumps(p) for p in PROFILES])
    return events, profiles


def test_replay_writes_every_trigger_with_its_decision_and_dead_letters_next_to_out(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    events, profiles = inputs
    out = tmp_path / "triggers.jsonl"
    assert main(["replay", str(events), "--profiles", str(profiles), "--out", str(out)]) == 0

    triggers = read_jsonl(out)
    assert [(t["trigger_type"], t["user_id"], t["fired_at"]) for t in triggers] == [
        ("cart_abandonment", "ann", "2026-03-01T10:15:00Z"),
    ]
    cart = triggers[0]
    assert cart["segment"] == "vip"
    assert (cart["decision"], cart["reason"], cart["channel"]) == ("dispatched", None, "sms")
    assert cart["metadata"] == {
        "cart_value": 50.0, "items": [{"product_id": "p1", "quantity": 2, "price": 25.0}]
    }
    assert set(cart) >= {"trigger_id", "detected_at", "send_at"}

    letters = read_jsonl(tmp_path / "triggers.dlq.jsonl")
    assert [(d["line"], d["reason"] == "late") for d in letters] == [
        (4, False), (6, True), (8, False)
    ]
    assert "product_id" in letters[2]["reason"]
    assert letters[0]["raw"] == "{broken"


def test_trigger_ids_are_the_same_on_every_run(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    events, _ = inputs
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for out in outs:
        assert main(["replay", str(events), "--out", str(out), "--quiet"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert read_jsonl(outs[0])[0]["reason"] == "no_channel"  # no profiles: nobody opted in


def test_a_recording_replays_like_the_events_it_holds(
    inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    events, _ = inputs
    recording = tmp_path / "recording.jsonl"
    messages = [
        RecordedMessage(0, n, T0, None, raw).to_json_bytes()
        for n, raw in enumerate(STREAM) if raw
    ]
    write_lines(recording, [recording_header("events"), *messages])
    plain, recorded = tmp_path / "plain.jsonl", tmp_path / "recorded.jsonl"
    assert main(["replay", str(events), "--out", str(plain), "--quiet"]) == 0
    assert main(["replay", str(recording), "--out", str(recorded), "--quiet"]) == 0
    assert plain.read_bytes() == recorded.read_bytes()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["missing.jsonl", "--out", "{tmp}/o.jsonl"], "cannot read missing.jsonl"),
        (["{events}", "--out", "{tmp}/no/such/dir/o.jsonl"], "cannot write"),
        (["{events}", "--out", "{tmp}/o.jsonl", "--rules", "{tmp}/bad.yaml"], "bad.yaml:1"),
        (["{events}", "--out", "{tmp}/o.jsonl", "--profiles", "{tmp}/none.jsonl"],
         "cannot read profiles"),
        (["{events}", "--out", "{tmp}/o.jsonl", "--workers", "0"], "must be at least 1"),
        (["{events}"], "--out"),
    ],
)
def test_unusable_input_is_one_line_and_exit_2(
    inputs: tuple[Path, Path], tmp_path: Path, args: list[str], needle: str
) -> None:
    events, _ = inputs
    (tmp_path / "bad.yaml").write_text("rules: 3\n")
    argv = [a.format(tmp=tmp_path, events=events) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "nudgeflow", "replay", *argv],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_output_is_identical_with_1_and_2_workers_and_2_processes(tmp_path: Path) -> None:
    from nudgeflow.app.samples import SampleSpec, write_sample

    events, profiles = write_sample(tmp_path, SampleSpec(users=400, hours=3.0, seed=11))
    outs = {}
    for name, extra in (("w1", ["--workers", "1"]), ("w2", ["--workers", "2"])):
        out = tmp_path / f"{name}.jsonl"
        argv = ["replay", str(events), "--profiles", str(profiles), "--out", str(out), "--quiet",
                "--outcomes", str(tmp_path / f"{name}.outcomes.jsonl")]
        assert main(argv + extra) == 0
        outs[name] = out
    out = tmp_path / "p2.jsonl"
    flow = (f"nudgeflow.flows.replay:build_replay_flow({str(events)!r}, {str(out)!r}, "
            f"profiles={str(profiles)!r}, outcomes={str(tmp_path / 'p2.outcomes.jsonl')!r})")
    subprocess.run([sys.executable, "-m", "bytewax.testing", flow, "-p", "2"],
                   check=True, capture_output=True, timeout=300)
    outs["p2"] = out
    baseline = outs["w1"].read_bytes()
    assert baseline.count(b"\n") > 20
    for name in ("w2", "p2"):
        assert outs[name].read_bytes() == baseline, name
    dlq = {n: (tmp_path / f"{n}.dlq.jsonl").read_bytes() for n in outs}
    assert dlq["w2"] == dlq["w1"] == dlq["p2"]
    outcomes = {n: (tmp_path / f"{n}.outcomes.jsonl").read_bytes() for n in outs}
    assert outcomes["w1"].count(b"\n") >= 3
    assert outcomes["w2"] == outcomes["w1"] == outcomes["p2"]


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_an_input_with_no_events_leaves_empty_outputs_and_exit_0(
    tmp_path: Path, content: bytes
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(content)
    out = tmp_path / "triggers.jsonl"
    out.write_bytes(b"stale\n")
    assert main(["replay", str(events), "--out", str(out), "--quiet"]) == 0
    assert out.read_bytes() == b""
    assert (tmp_path / "triggers.dlq.jsonl").read_bytes() == b""

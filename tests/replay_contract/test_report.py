"""`nudgeflow report` over replay's decisions and outcomes, checked against plain arithmetic.

The sample shop is replayed with experiments in its rules; the report's
conversion rates, lifts, intervals and p-values must equal what this file
computes from the raw output files with nothing but `math`, and the outcomes
themselves must be what the definition gives from the events file: a measured
trigger converted when its user has a purchase with `ts` in (`fired_at`,
`fired_at` + 24 h].
"""

from __future__ import annotations

import csv
import importlib.util
import io
import math
from collections import defaultdict
from pathlib import Path
from statistics import NormalDist
from typing import Any

import orjson
import pytest

from nudgeflow.app.samples import SampleSpec, write_sample
from nudgeflow.cli import main
from nudgeflow.core.events import Event, decode_event, parse_ts
from nudgeflow.core.resources import DEFAULT_RULES

DAY = 86_400_000
Z = NormalDist().inv_cdf(0.975)
EXPERIMENTS = {
    "cart_abandonment": """    experiment:
      name: cart_timing
      holdout: 0.3
      variants: [{name: now}, {name: in_1h, delay: 1h}]
""",
    "browse_abandonment": """    experiment: {name: browse_holdout, holdout: 0.5}
""",
}


def rules_with_experiments(path: Path) -> Path:
    text = DEFAULT_RULES.read_text(encoding="utf-8")
    blocks = text.split("\n  - name: ")
    for index, block in enumerate(blocks):
        name = block.split("\n", 1)[0]
        if name in EXPERIMENTS:
            blocks[index] = block.rstrip("\n") + "\n" + EXPERIMENTS[name]
    path.write_text("\n  - name: ".join(blocks), encoding="utf-8")
    return path


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def arm(decision: dict[str, Any]) -> str:
    experiment = decision["metadata"].get("experiment")
    if experiment is None:
        return ""
    if experiment["holdout"]:
        return "holdout"
    return experiment["variant"] or "treatment"


def measured(decision: dict[str, Any]) -> bool:
    return decision["decision"] == "dispatched" or decision["reason"] in {"holdout", "cancelled"}


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("report")
    events, profiles = write_sample(tmp, SampleSpec(users=2500, hours=4.0, seed=5))
    files = {"events": events, "triggers": tmp / "triggers.jsonl",
             "outcomes": tmp / "outcomes.jsonl", "json": tmp / "report.json",
             "csv": tmp / "report.csv"}
    rules = rules_with_experiments(tmp / "rules.yaml")
    assert main(["replay", str(events), "--profiles", str(profiles), "--rules", str(rules),
                 "--out", str(files["triggers"]), "--outcomes", str(files["outcomes"]),
                 "--quiet"]) == 0
    assert main(["report", str(files["triggers"]), str(files["outcomes"]),
                 "--json", str(files["json"]), "--csv", str(files["csv"])]) == 0
    return files


def test_outcomes_are_the_purchases_inside_each_measured_triggers_window(
    replayed: dict[str, Path],
) -> None:
    purchases: dict[str, list[int]] = defaultdict(list)
    for line in replayed["events"].read_bytes().splitlines():
        event = decode_event(line)
        if isinstance(event, Event) and event.type == "purchase":
            purchases[event.user_id].append(event.ts)
    expected = set()
    for decision in jsonl(replayed["triggers"]):
        fired = parse_ts(decision["fired_at"])
        if measured(decision) and any(fired < ts <= fired + DAY
                                      for ts in purchases[decision["user_id"]]):
            expected.add(decision["trigger_id"])
    outcomes = jsonl(replayed["outcomes"])
    assert len(expected) >= 20
    assert [o["trigger_id"] for o in outcomes if o["trigger_id"] in expected] == [
        o["trigger_id"] for o in outcomes
    ]
    assert {o["trigger_id"] for o in outcomes} == expected
    assert len(outcomes) == len(expected)  # once per trigger


def test_lift_and_interval_match_an_independent_computation(replayed: dict[str, Path]) -> None:
    converted = {o["trigger_id"] for o in jsonl(replayed["outcomes"])}
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for decision in jsonl(replayed["triggers"]):
        if measured(decision):
            cell = counts[(decision["trigger_type"], arm(decision))]
            cell[0] += decision["trigger_id"] in converted
            cell[1] += 1
    report = orjson.loads(replayed["json"].read_bytes())["rules"]
    compared = 0
    for rule in EXPERIMENTS:
        variants = report[rule]["variants"]
        hc, hn = counts[(rule, "holdout")]
        assert variants["holdout"]["conversion_rate"] == pytest.approx(hc / hn, abs=1e-6)
        assert variants["holdout"]["lift"] is None
        arms = {a for r, a in counts if r == rule} - {"holdout"}
        assert arms == set(variants) - {"holdout"}
        for name in arms:
            c, n = counts[(rule, name)]
            p, q = c / n, hc / hn
            lift = p - q
            se = math.sqrt(p * (1 - p) / n + q * (1 - q) / hn)
            pooled = (c + hc) / (n + hn)
            z = lift / math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / hn))
            got = variants[name]
            assert got["attributed"] == n and got["converted"] == c
            assert got["conversion_rate"] == pytest.approx(p, abs=1e-6)
            assert got["lift"] == pytest.approx(lift, abs=1e-6)
            assert got["ci_low"] == pytest.approx(lift - Z * se, abs=1e-6)
            assert got["ci_high"] == pytest.approx(lift + Z * se, abs=1e-6)
            assert got["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), abs=1e-6)
            assert got["significant"] == (got["p_value"] < 0.05)
            compared += 1
    assert compared == 3  # now and in_1h against the cart holdout; browse's treatment


def test_rule_totals_count_every_decision_once(replayed: dict[str, Path]) -> None:
    decisions = jsonl(replayed["triggers"])
    report = orjson.loads(replayed["json"].read_bytes())["rules"]
    for rule, entry in report.items():
        mine = [d for d in decisions if d["trigger_type"] == rule]
        assert entry["triggered"] == len(mine)
        assert entry["dispatched"] == sum(d["decision"] == "dispatched" for d in mine)
        assert sum(entry["suppressed"].values()) == len(mine) - entry["dispatched"]
        assert ("variants" in entry) == (rule in EXPERIMENTS)
    cart = report["cart_abandonment"]
    assert cart["cart_recovery_rate"] is not None
    assert report["engaged_reader"]["cart_recovery_rate"] is None


def test_the_csv_holds_the_json_numbers(replayed: dict[str, Path]) -> None:
    report = orjson.loads(replayed["json"].read_bytes())["rules"]
    rows = list(csv.DictReader(io.StringIO(replayed["csv"].read_text())))
    by_key = {(r["rule"], r["variant"]): r for r in rows}
    assert len(rows) == len(report) + sum(len(e.get("variants", {})) for e in report.values())
    now = report["cart_abandonment"]["variants"]["now"]
    row = by_key[("cart_abandonment", "now")]
    assert float(row["lift"]) == pytest.approx(now["lift"])
    assert int(row["suppressed_no_channel"]) == now["suppressed"].get("no_channel", 0)
    assert by_key[("engaged_reader", "")]["lift"] == ""


# --- small hand-made inputs -------------------------------------------------------------------


def write_inputs(tmp_path: Path, arms: dict[str, tuple[int, int]],
                 extra: list[dict[str, Any]] | None = None) -> tuple[Path, Path]:
    """`arms`: name -> (converted, measured) of one rule `r`'s experiment."""
    decisions, outcomes = [], []
    for name, (conv, total) in arms.items():
        for k in range(total):
            tid = f"{name}-{k}"
            holdout = name == "holdout"
            decisions.append({
                "trigger_id": tid, "trigger_type": "r", "user_id": tid,
                "fired_at": "2026-03-01T10:00:00Z",
                "metadata": {"experiment": {"name": "x", "variant": None if holdout else name,
                                            "holdout": holdout}},
                "decision": "suppressed" if holdout else "dispatched",
                "reason": "holdout" if holdout else None,
            })
            if k < conv:
                outcomes.append({"trigger_id": tid, "outcome": "converted", "value": 10.0})
    decisions += extra or []
    triggers, outs = tmp_path / "t.jsonl", tmp_path / "o.jsonl"
    triggers.write_bytes(b"\n".join(orjson.dumps(d) for d in decisions) + b"\n")
    # an at-least-once re-delivery repeats an outcome: it counts once
    outs.write_bytes(b"\n".join(orjson.dumps(o) for o in outcomes + outcomes[:1]) + b"\n")
    return triggers, outs


def test_a_clear_difference_is_called_significant(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    triggers, outcomes = write_inputs(tmp_path, {"holdout": (10, 200), "b": (40, 200)})
    assert main(["report", str(triggers), str(outcomes), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "r / b: +15.00 pp" in out and "significant" in out and "not significant" not in out
    b = orjson.loads((tmp_path / "r.json").read_bytes())["rules"]["r"]["variants"]["b"]
    assert b["converted"] == 40 and b["significant"] is True
    assert b["revenue_per_trigger"] == pytest.approx(40 * 10.0 / 200)


def test_no_significance_says_how_many_more_users_it_would_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    triggers, outcomes = write_inputs(tmp_path, {"holdout": (10, 100), "b": (14, 100)})
    assert main(["report", str(triggers), str(outcomes), "--json", str(tmp_path / "r.json")]) == 0
    b = orjson.loads((tmp_path / "r.json").read_bytes())["rules"]["r"]["variants"]["b"]
    # Cohen's h and the normal approximation, 80% power at alpha 0.05, equal arms
    h = 2 * math.asin(math.sqrt(0.14)) - 2 * math.asin(math.sqrt(0.10))
    per_arm = math.ceil(2 * ((Z + NormalDist().inv_cdf(0.8)) / h) ** 2)
    assert b["significant"] is False
    assert b["more_users_needed"] == 2 * (per_arm - 100)
    out = capsys.readouterr().out
    assert f"not significant; about {2 * (per_arm - 100)} more" in out


def test_unmatched_and_repeated_lines_are_counted_once_or_set_aside(tmp_path: Path) -> None:
    repeat = {"trigger_id": "holdout-0", "trigger_type": "r", "user_id": "holdout-0",
              "metadata": {"experiment": {"name": "x", "variant": None, "holdout": True}},
              "decision": "suppressed", "reason": "holdout"}
    triggers, outcomes = write_inputs(tmp_path, {"holdout": (1, 3), "b": (1, 3)}, [repeat])
    with outcomes.open("ab") as handle:
        handle.write(orjson.dumps({"trigger_id": "nobody", "outcome": "converted"}) + b"\n")
    assert main(["report", str(triggers), str(outcomes), "--json", str(tmp_path / "r.json")]) == 0
    report = orjson.loads((tmp_path / "r.json").read_bytes())
    assert report["rules"]["r"]["triggered"] == 6
    assert report["rules"]["r"]["converted"] == 2
    assert report["unmatched_outcomes"] == 1


def test_a_bad_line_is_refused_with_its_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    triggers, outcomes = write_inputs(tmp_path, {"holdout": (1, 2), "b": (1, 2)})
    with triggers.open("ab") as handle:
        handle.write(b"{broken\n")
    assert main(["report", str(triggers), str(outcomes)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{triggers}:5: not JSON" in err
    assert main(["report", str(tmp_path / "missing.jsonl"), str(outcomes)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_the_dispatch_apis_outcomes_give_delivery_and_engagement_rates(tmp_path: Path) -> None:
    triggers, outcomes = write_inputs(tmp_path, {"holdout": (0, 2), "b": (1, 4)})
    delivery = tmp_path / "delivery.jsonl"
    lines = [{"trigger_id": f"b-{k}", "outcome": "sent"} for k in range(4)]
    # b-1's click is reported twice: it counts once
    lines += [{"trigger_id": tid, "outcome": kind} for tid, kind in (
        ("b-0", "opened"), ("b-1", "opened"), ("b-1", "clicked"), ("b-1", "clicked"))]
    delivery.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    out = tmp_path / "r.json"
    assert main(["report", str(triggers), str(outcomes), str(delivery), "--json", str(out)]) == 0
    b = orjson.loads(out.read_bytes())["rules"]["r"]["variants"]["b"]
    assert (b["sent"], b["opened"], b["clicked"], b["failed"]) == (4, 2, 1, 0)
    assert (b["open_rate"], b["click_rate"]) == (0.5, 0.25)
    assert b["converted"] == 1  # delivery lines are not conversions


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_the_png_chart_is_written(tmp_path: Path) -> None:
    triggers, outcomes = write_inputs(tmp_path, {"holdout": (3, 30), "b": (6, 30)})
    png = tmp_path / "lift.png"
    assert main(["report", str(triggers), str(outcomes), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_png_without_matplotlib_is_refused_before_reading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    missing = tmp_path / "missing.jsonl"
    assert main(["report", str(missing), str(missing), "--png", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'nudgeflow[report]'" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra", [[], ["{t}"], ["{t}", "{o}", "--from-topics"]])
def test_report_needs_both_files_or_the_topics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    triggers, outcomes = write_inputs(tmp_path, {"holdout": (0, 1), "b": (0, 1)})
    argv = [a.format(t=triggers, o=outcomes) for a in extra]
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TRIGGERS.jsonl OUTCOMES.jsonl, or --from-topics" in err

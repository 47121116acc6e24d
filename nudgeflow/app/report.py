"""`nudgeflow report`: what each rule and experiment arm achieved, from decisions and outcomes.

    TRIGGERS.jsonl (every decision) + OUTCOMES.jsonl (converted triggers) ─► Report
    or the topics `triggers.decisions` + `triggers.outcomes`, as they stand ─┘
        ─► terminal table | JSON (--json) | CSV (--csv) | PNG chart (--png)

Per rule, and per experiment arm of a rule with an experiment: triggered,
dispatched, suppressed by reason, attributed (the triggers that are measured,
`nudgeflow.core.outcomes`), converted, the conversion rate and revenue per
attributed trigger, the cart recovery rate of cart rules, and for each arm
its lift against the holdout (`nudgeflow.app.lift`).

Outcome lines may come from the flow (`converted`) and from the dispatch API's
outcomes log (`sent`, `failed`, `opened`, `clicked`), in any number of files:
the delivery and engagement counts come from the latter.

Both inputs may hold repeats (a live flow delivers at least once): a trigger
counts once, by `trigger_id` (an outcome once per trigger and kind). An outcome
whose trigger is not among the decisions is counted as `unmatched` and
otherwise left out.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from nudgeflow.app.lift import Comparison, compare
from nudgeflow.core.errors import InputFileError
from nudgeflow.core.outcomes import HOLDOUT_ARM, arm_of, attributed
from nudgeflow.core.recording import numbered_lines

# The JSON's rounding: rates to 6 places, money to cents.
_RATE_DIGITS = 6
# What the dispatch API's outcomes log reports of a dispatched trigger's message.
DELIVERY_OUTCOMES = ("sent", "failed", "opened", "clicked")


@dataclass
class Tally:
    """The counts of one rule, or of one arm of its experiment."""

    triggered: int = 0
    dispatched: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)
    attributed: int = 0
    converted: int = 0
    revenue: float = 0.0
    cart_triggers: int = 0  # attributed triggers that carried a cart
    cart_recovered: int = 0
    delivery: Counter[str] = field(default_factory=Counter)  # DELIVERY_OUTCOMES

    @property
    def conversion_rate(self) -> float | None:
        return self.converted / self.attributed if self.attributed else None

    @property
    def revenue_per_trigger(self) -> float | None:
        return self.revenue / self.attributed if self.attributed else None

    @property
    def cart_recovery_rate(self) -> float | None:
        return self.cart_recovered / self.cart_triggers if self.cart_triggers else None

    def to_json(self) -> dict[str, Any]:
        return {
            "triggered": self.triggered,
            "dispatched": self.dispatched,
            "suppressed": dict(sorted(self.suppressed.items())),
            "attributed": self.attributed,
            "converted": self.converted,
            "conversion_rate": _round(self.conversion_rate),
            "revenue": round(self.revenue, 2),
            "revenue_per_trigger": _round(self.revenue_per_trigger, 4),
            "cart_recovered": self.cart_recovered if self.cart_triggers else None,
            "cart_recovery_rate": _round(self.cart_recovery_rate),
            **{name: self.delivery[name] for name in DELIVERY_OUTCOMES},
            "open_rate": _round(self.of_sent("opened")),
            "click_rate": _round(self.of_sent("clicked")),
        }

    def of_sent(self, name: str) -> float | None:
        """The share of sent messages that were `opened` or `clicked` (None: none sent)."""
        sent = self.delivery["sent"]
        return self.delivery[name] / sent if sent else None


@dataclass
class RuleReport:
    total: Tally = field(default_factory=Tally)
    arms: dict[str, Tally] = field(default_factory=dict)  # empty: the rule has no experiment

    def comparison(self, arm: str) -> Comparison | None:
        """The arm against the holdout; None for the holdout itself, or without one."""
        base = self.arms.get(HOLDOUT_ARM)
        tally = self.arms[arm]
        if arm == HOLDOUT_ARM or base is None or not base.attributed or not tally.attributed:
            return None
        return compare(tally.converted, tally.attributed, base.converted, base.attributed)


@dataclass
class Report:
    rules: dict[str, RuleReport] = field(default_factory=dict)
    unmatched_outcomes: int = 0

    def to_json(self) -> dict[str, Any]:
        rules: dict[str, Any] = {}
        for name, rule in sorted(self.rules.items()):
            entry = rule.total.to_json()
            if rule.arms:
                entry["baseline"] = HOLDOUT_ARM if HOLDOUT_ARM in rule.arms else None
                entry["variants"] = {
                    arm: {**tally.to_json(), **_comparison_json(rule.comparison(arm))}
                    for arm, tally in sorted(rule.arms.items())
                }
            rules[name] = entry
        return {"rules": rules, "unmatched_outcomes": self.unmatched_outcomes}


def _round(value: float | None, digits: int = _RATE_DIGITS) -> float | None:
    return None if value is None else round(value, digits)


def _comparison_json(comparison: Comparison | None) -> dict[str, Any]:
    if comparison is None:
        return {"lift": None, "relative_lift": None, "ci_low": None, "ci_high": None,
                "p_value": None, "significant": None, "more_users_needed": None}
    return {
        "lift": _round(comparison.lift),
        "relative_lift": _round(comparison.relative_lift),
        "ci_low": _round(comparison.ci_low),
        "ci_high": _round(comparison.ci_high),
        "p_value": _round(comparison.p_value),
        "significant": comparison.significant,
        "more_users_needed": comparison.more_needed,
    }


# --- reading ---------------------------------------------------------------------------------


def read_jsonl(path: Path, required: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The objects of a JSONL file; a line that is not one, or lacks a field, is refused."""
    for number, raw in numbered_lines(path):
        if not raw.strip():
            continue
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            msg = f"{path}:{number}: not JSON ({exc})"
            raise InputFileError(msg) from None
        yield _checked(row, f"{path}:{number}", required)


def _checked(row: Any, where: str, required: tuple[str, ...]) -> dict[str, Any]:
    missing = [name for name in required if not isinstance(row, dict) or name not in row]
    if missing:
        msg = f"{where}: missing field {missing[0]!r}"
        raise InputFileError(msg)
    assert isinstance(row, dict)
    return row


def read_topic(bootstrap: str, topic: str, required: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a topic's messages; one that is not is refused with its position."""
    from nudgeflow.app.topic_io import topic_values

    for partition, offset, value in topic_values(bootstrap, topic):
        where = f"topic {topic} partition {partition} offset {offset}"
        try:
            row = orjson.loads(value or b"")
        except orjson.JSONDecodeError as exc:
            msg = f"{where}: not JSON ({exc})"
            raise InputFileError(msg) from None
        yield _checked(row, where, required)


def build_report(decisions: Iterable[dict[str, Any]], outcomes: Iterable[dict[str, Any]]) -> Report:
    """Aggregate decisions (EVENTS.md §2 plus `decision`, `reason`) and outcome lines."""
    report = Report()
    # trigger_id -> (rule, arm, attributed, carries a cart)
    triggers: dict[str, tuple[str, str, bool, bool]] = {}
    for row in decisions:
        trigger_id = str(row["trigger_id"])
        if trigger_id in triggers:
            continue
        metadata = row.get("metadata")
        if not isinstance(metadata, dict):
            metadata = {}
        rule, arm = str(row["trigger_type"]), arm_of(metadata)
        measured = attributed(str(row["decision"]), row.get("reason"))
        has_cart = isinstance(metadata.get("items"), list)
        triggers[trigger_id] = (rule, arm, measured, has_cart)
        rule_report = report.rules.setdefault(rule, RuleReport())
        tallies = [rule_report.total]
        if arm:
            tallies.append(rule_report.arms.setdefault(arm, Tally()))
        for tally in tallies:
            tally.triggered += 1
            if row["decision"] == "dispatched":
                tally.dispatched += 1
            else:
                tally.suppressed[str(row.get("reason"))] += 1
            if measured:
                tally.attributed += 1
                tally.cart_triggers += has_cart
    seen: set[tuple[str, str]] = set()
    for row in outcomes:
        trigger_id, kind = str(row["trigger_id"]), str(row.get("outcome", "converted"))
        if (trigger_id, kind) in seen or kind not in ("converted", *DELIVERY_OUTCOMES):
            continue
        seen.add((trigger_id, kind))
        known = triggers.get(trigger_id)
        if known is None or (kind == "converted" and not known[2]):
            report.unmatched_outcomes += 1
            continue
        rule, arm, _, has_cart = known
        rule_report = report.rules[rule]
        tallies = [rule_report.total] + ([rule_report.arms[arm]] if arm else [])
        if kind != "converted":
            for tally in tallies:
                tally.delivery[kind] += 1
            continue
        value = row.get("value")
        for tally in tallies:
            tally.converted += 1
            if isinstance(value, int | float):
                tally.revenue += float(value)
            if has_cart and row.get("cart_recovered") is True:
                tally.cart_recovered += 1
    return report


DECISION_FIELDS = ("trigger_id", "trigger_type", "decision")
OUTCOME_FIELDS = ("trigger_id",)


def report_files(triggers: Path, *outcomes: Path) -> Report:
    """The report of a decisions file and any number of outcome files."""
    rows = (row for path in outcomes for row in read_jsonl(path, OUTCOME_FIELDS))
    return build_report(read_jsonl(triggers, DECISION_FIELDS), rows)


def report_topics(bootstrap: str, decisions_topic: str, outcomes_topic: str) -> Report:
    """The report of what both topics hold now (a live flow's decisions and outcomes)."""
    return build_report(read_topic(bootstrap, decisions_topic, DECISION_FIELDS),
                        read_topic(bootstrap, outcomes_topic, OUTCOME_FIELDS))


# --- writing ---------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table_lines(report: Report) -> list[str]:
    """The terminal table, then one line per experiment arm saying what its lift means."""
    engagement = any(
        tally.delivery for rule in report.rules.values()
        for tally in [rule.total, *rule.arms.values()]
    )
    extra = f" {'sent':>5} {'open':>6} {'click':>6}" if engagement else ""
    header = (f"{'rule / variant':<30} {'trig':>6} {'disp':>6} {'meas':>6} {'conv':>5} "
              f"{'rate':>6} {'rev/trig':>8} {'cart rec':>8}{extra}  suppressed")
    lines = [header, "-" * len(header)]
    verdicts: list[str] = []
    for name, rule in sorted(report.rules.items()):
        rows = [(name, rule.total)] + [(f"  {arm}", t) for arm, t in sorted(rule.arms.items())]
        for label, tally in rows:
            suppressed = ", ".join(f"{r} {n}" for r, n in sorted(tally.suppressed.items()))
            delivered = ""
            if engagement:
                delivered = (f" {tally.delivery['sent']:>5} "
                             f"{_percent(tally.of_sent('opened')):>6} "
                             f"{_percent(tally.of_sent('clicked')):>6}")
            lines.append(
                f"{label:<30} {tally.triggered:>6} {tally.dispatched:>6} {tally.attributed:>6} "
                f"{tally.converted:>5} {_percent(tally.conversion_rate):>6} "
                f"{_money(tally.revenue_per_trigger):>8} {_percent(tally.cart_recovery_rate):>8}"
                f"{delivered}  {suppressed}"
            )
        for arm in sorted(rule.arms):
            verdict = _verdict(name, arm, rule)
            if verdict is not None:
                verdicts.append(verdict)
    if verdicts:
        lines += ["", "lift against the holdout (conversion rate, percentage points, 95% CI):"]
        lines += verdicts
    if report.unmatched_outcomes:
        lines += ["", f"{report.unmatched_outcomes} outcomes name a trigger not in the "
                      "decisions (or one that is not measured): left out"]
    return lines


def _verdict(rule_name: str, arm: str, rule: RuleReport) -> str | None:
    if arm == HOLDOUT_ARM:
        return None
    label = f"  {rule_name} / {arm}:"
    comparison = rule.comparison(arm)
    if comparison is None:
        base = rule.arms.get(HOLDOUT_ARM)
        reason = "no holdout to compare with" if base is None else "an arm has no trigger"
        return f"{label} {reason}"
    points = (f"{100 * comparison.lift:+.2f} pp "
              f"[{100 * comparison.ci_low:+.2f}, {100 * comparison.ci_high:+.2f}]")
    if comparison.p_value is None:
        return f"{label} {points}, no test possible (no conversions on either side)"
    if comparison.significant:
        return f"{label} {points}, p={comparison.p_value:.3g}: significant"
    more = comparison.more_needed
    if more is None:
        tail = "no difference observed"
    else:
        tail = (f"about {more} more triggers (users) at this split would show a difference "
                "this size (80% power)")
    return f"{label} {points}, p={comparison.p_value:.3g}: not significant; {tail}"


CSV_COLUMNS = (
    "rule", "variant", "triggered", "dispatched", "attributed", "converted", "conversion_rate",
    "revenue", "revenue_per_trigger", "cart_recovery_rate", "lift", "relative_lift",
    "ci_low", "ci_high", "p_value", "significant", "more_users_needed",
    *DELIVERY_OUTCOMES, "open_rate", "click_rate",
)


def to_csv(report: Report) -> str:
    """One row per rule (variant empty) and per arm; a `suppressed_<reason>` column per reason."""
    data = report.to_json()["rules"]
    reasons = sorted({
        reason for name in report.rules
        for tally in [report.rules[name].total, *report.rules[name].arms.values()]
        for reason in tally.suppressed
    })
    columns = [*CSV_COLUMNS, *(f"suppressed_{r}" for r in reasons)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for name, entry in data.items():
        rows = [("", entry), *entry.get("variants", {}).items()]
        for variant, values in rows:
            row = {k: ("" if v is None else v) for k, v in values.items()}
            row.update({f"suppressed_{r}": values["suppressed"].get(r, 0) for r in reasons})
            writer.writerow({**row, "rule": name, "variant": variant})
    return out.getvalue()


def write_json(report: Report, path: Path) -> None:
    _write(path, orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2) + b"\n")


def write_csv(report: Report, path: Path) -> None:
    _write(path, to_csv(report).encode())


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        msg = f"cannot write {path}: {exc.strerror or exc}"
        raise InputFileError(msg) from None

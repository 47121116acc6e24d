"""The rules file: the defaults load; a bad file is refused naming file, line and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from nudgeflow.cli import main
from nudgeflow.core.errors import RulesError
from nudgeflow.core.rules import AbsenceRule, CountInWindowRule, load_rules, parse_rules
from nudgeflow.core.settings import DEFAULT_RULES


def test_the_shipped_rules_are_the_default_rules_of_the_spec_in_table_order() -> None:
    config = load_rules(DEFAULT_RULES)
    assert [r.name for r in config.rules] == [
        "cart_abandonment", "cart_abandonment_followup", "product_interest",
        "product_retargeting", "engaged_reader", "pricing_revisit", "browse_abandonment",
        "vip_concierge", "new_visitor_welcome", "high_intent",
    ]
    cart = config.rules[0]
    assert isinstance(cart, AbsenceRule)
    assert cart.timeout == 15 * 60_000
    interest = config.rules[2]
    assert isinstance(interest, CountInWindowRule)
    assert (interest.window, interest.min_count, interest.cooldown) == (600_000, 3, 86_400_000)
    assert config.time.lateness == 30_000


def refusal(text: str) -> RulesError:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "rules.yaml")
    return info.value


RULE_HEAD = "rules:\n  - name: r\n"


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        (RULE_HEAD + "    kind: absense\n", 2, "unknown rule kind 'absense'"),
        (RULE_HEAD + "    kind: absence\n    after: {event: add_to_cart}\n    timeout: 15 min\n",
         5, "bad duration '15 min'"),
        (RULE_HEAD + "    kind: threshold\n    match: {event: page_leave, where: {colour: red}}\n"
         "    field: dwell_ms\n    above: 1\n", 4, "events have no field 'colour'"),
        (RULE_HEAD + "    kind: threshold\n    match: {event: page_leave}\n"
         "    field: url\n    above: 1\n", 5, "not numeric"),
        (RULE_HEAD + "    kind: count_in_window\n    match: {event: page_view}\n    window: 1m\n",
         2, "missing field 'rules.0.min_count'"),
        (RULE_HEAD + "    kind: nth_event\n    match: {event: page_veiw}\n    n: 3\n",
         4, "unknown event type 'page_veiw'"),
        (RULE_HEAD + "    kind: nth_event\n    match: {event: page_view}\n    n: 3\n"
         "    colour: 1\n", 6, "unknown field 'rules.0.colour'"),
        (RULE_HEAD + "    kind: sequence_count\n    trigger: nope\n    window: 1d\n"
         "    min_count: 2\n", 2, "refers to trigger 'nope'"),
        ("rules: [\n", 2, "not valid YAML"),
        ("- just a list\n", 1, "mapping with a 'rules' list"),
    ],
)
def test_a_bad_rules_file_is_refused_with_line_and_reason(
    text: str, line: int, needle: str
) -> None:
    error = refusal(text)
    assert error.line == line, str(error)
    assert needle in error.problem
    assert str(error).startswith(f"rules.yaml:{line}: ")


def test_rules_check_prints_one_line_and_exits_2_on_a_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text(
        RULE_HEAD + "    kind: absence\n    after: {event: add_to_cart}\n    timeout: x\n"
    )
    assert main(["rules", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"nudgeflow: error: {bad}:5: rules.0.timeout: bad duration 'x': "
                   "expected a whole number and a unit (ms, s, m, h, d, w)"]
    assert main(["rules", "check", str(DEFAULT_RULES)]) == 0


def test_a_new_rule_of_an_existing_kind_needs_no_code(tmp_path: Path) -> None:
    text = DEFAULT_RULES.read_text() + (
        "\n  - name: category_binge\n    kind: count_in_window\n"
        "    match: {event: page_view, where: {page_type: category}}\n"
        "    window: 5m\n    min_count: 5\n"
    )
    config = parse_rules(text)
    assert config.rules[-1].name == "category_binge"

"""The shipped rules as the spec's reference models them: all but `high_intent`.

`high_intent` fires on a trained model's score, which the brute-force reference
(`spec_model.py`) cannot recompute from TRIGGERS.md; the golden and property
tests compare the product with the reference on the other rules, and
`tests/unit/test_high_intent.py` has its own golden replay with a tiny model.
Removing it also keeps its triggers out of the frequency cap the goldens see.
"""

from __future__ import annotations

from nudgeflow.core.rules import RulesConfig, parse_rules
from nudgeflow.core.settings import DEFAULT_RULES

_HIGH_INTENT = "\n  - name: high_intent\n"


def spec_rules_text() -> str:
    text = DEFAULT_RULES.read_text()
    assert text.count(_HIGH_INTENT) == 1, "the shipped rules end with high_intent"
    head, _, tail = text.partition(_HIGH_INTENT)
    assert "\n  - name:" not in tail, "high_intent is the last shipped rule"
    return head + "\n"


def spec_rules() -> RulesConfig:
    return parse_rules(spec_rules_text(), str(DEFAULT_RULES))

"""Rules that many tests share, as the YAML a user writes (one place, so they cannot drift).

Import as ``from rule_texts import CART_ABANDONMENT, rules_yaml`` (``tests/`` is on
``sys.path`` through ``tests/conftest.py``).
"""

from __future__ import annotations

# The default cart rule, reduced to what detection needs: 15 minutes, cancelled by a
# purchase or an emptied cart, by email.
CART_ABANDONMENT = """
  - name: cart_abandonment
    kind: absence
    after: {event: add_to_cart}
    timeout: 15m
    cancel_on: [{event: purchase}, {cart: empty}]
    metadata: cart
    channels: [email]
"""


def rules_yaml(*rules: str, time: str = "{lateness: 30s, dedup_retention: 1d}") -> str:
    """A rules file of `rules` (YAML list items) under the `time` settings."""
    return f"time: {time}\nrules:" + "".join(rules)


# Live tests' rules: seconds, not minutes, so a wall-clock timer fires within a test.
LIVE_RULES = """
version: 1
time: {lateness: 1s, session_gap: 30m}
rules:
  - name: cart_abandonment
    kind: absence
    after: {event: add_to_cart}
    timeout: 2s
    cancel_on: [{event: purchase}, {cart: empty}]
    metadata: cart
    channels: [email]
  - name: product_interest
    kind: count_in_window
    match: {event: page_view, where: {page_type: product}}
    scope: product_id
    window: 10m
    min_count: 3
    cooldown: 24h
    channels: [email]
"""


# A trigger per user that views one product three times: the outage tests' load.
THIRD_LOOK_RULES = """
rules:
  - name: product_interest
    kind: count_in_window
    match: {event: page_view, where: {page_type: product}}
    window: 10m
    min_count: 3
    scope: product_id
    cooldown: 24h
    channels: [email]
"""

"""Sample trigger metadata for checking message templates at start (`Rule.sample_metadata`).

Three samples per rule: `typical`, `minimal` (no name, no url, no prices) and
`long` (long names, ids and lists), so a template that only works on tidy data
is refused before it sends anything.
"""

from __future__ import annotations

from typing import Any, Final

SAMPLE_FIRED_AT: Final = 1_772_359_200_000  # 2026-03-01T10:00:00Z
LONG_URL: Final = (
    "https://shop.example.com/journal/2026/03/how-to-choose-running-shoes-for-trail-and-road"
)


def long_id(n: int) -> str:
    return f"sku-{n:06d}-trail-runner-gore-tex-xxl"


def sample_scope(field: str, sample: str) -> str | None:
    """A value of the scope `field` for `sample`."""
    if sample == "minimal" and field == "url":
        return None  # an event without a url fires scoped to "no url"
    if field == "url":
        return LONG_URL if sample == "long" else "https://shop.example.com/journal/fit-guide"
    return long_id(7) if sample == "long" else "p-1042"


def sample_cart(sample: str) -> dict[str, Any]:
    items: list[dict[str, Any]]
    if sample == "minimal":
        items = [{"product_id": "p1", "quantity": 1, "price": None}]
    elif sample == "long":
        items = [{"product_id": long_id(n), "quantity": 3, "price": 1234.5} for n in range(12)]
    else:
        items = [
            {"product_id": "p-1042", "quantity": 1, "price": 89.9},
            {"product_id": "p-2210", "quantity": 2, "price": 24.5},
        ]
    value = sum(i["quantity"] * i["price"] for i in items if i["price"] is not None)
    return {"cart_value": round(value, 2), "items": items}

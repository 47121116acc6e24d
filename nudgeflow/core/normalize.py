"""Segment-spec events normalised to the canonical event at the edge (EVENTS.md §1).

Accepted: `track` calls with the e-commerce spec names below, and `page` calls.

| Segment                               | canonical                                        |
|---------------------------------------|--------------------------------------------------|
| `messageId`                           | `event_id`                                       |
| `userId`, else `anonymousId`          | `user_id`                                        |
| `timestamp` (else `originalTimestamp`)| `ts`                                             |
| track `Product Viewed`                | `page_view`, `page_type` `product`               |
| track `Product Added` / `Removed`     | `add_to_cart` / `remove_from_cart`               |
| track `Checkout Started`              | `checkout_started`                               |
| track `Order Completed`               | `purchase` (`order_id`, `value` ← `revenue`/`total`) |
| page (name or category)               | `page_view`, `page_type` from the name, else `other` |
| `properties.product_id` (or `sku`)    | `product_id`                                     |
| `properties.quantity`, `price`, `url` | `quantity`, `price`, `url`                        |
| `context.page.url`                    | `url` when the properties have none              |

Everything else in `properties` is kept as `properties`. An unsupported
`track` name is refused with a reason, like any other invalid event.
"""

from __future__ import annotations

from typing import Any, Final

TRACK_TYPES: Final = {
    "Product Viewed": "page_view",
    "Product Added": "add_to_cart",
    "Product Removed": "remove_from_cart",
    "Checkout Started": "checkout_started",
    "Order Completed": "purchase",
}
PAGE_TYPES: Final = {
    "product": "product", "pricing": "pricing", "plans": "pricing", "category": "category",
    "collection": "category", "home": "home", "homepage": "home", "cart": "cart",
    "basket": "cart", "checkout": "checkout", "content": "content", "blog": "content",
    "article": "content",
}
_MAPPED_PROPERTIES: Final = frozenset(
    {"product_id", "sku", "quantity", "price", "url", "order_id", "revenue", "total"}
)


def is_segment(data: dict[str, Any]) -> bool:
    """A Segment call: `type` track/page, a `messageId`, and not already canonical."""
    return (
        "event_id" not in data
        and "messageId" in data
        and data.get("type") in ("track", "page")  # a tuple: compared, never hashed (a list)
    )


def from_segment(data: dict[str, Any]) -> dict[str, Any] | str:
    """The canonical event for a Segment call, or the reason it cannot be one."""
    if data.get("messageId") is None:
        # Segment's libraries always send one; without it a retry could not be deduplicated.
        return "missing field 'messageId' (the event_id that deduplicates retries)"
    props = data.get("properties")
    props = props if isinstance(props, dict) else {}
    out: dict[str, Any] = {
        "event_id": data.get("messageId"),
        "user_id": data.get("userId") if data.get("userId") is not None
        else data.get("anonymousId"),
        "ts": data.get("timestamp") if data.get("timestamp") is not None
        else data.get("originalTimestamp"),
    }
    if data["type"] == "page":
        out["type"] = "page_view"
        out["page_type"] = _page_type(data)
    else:
        name = data.get("event")
        kind = TRACK_TYPES.get(name) if isinstance(name, str) else None
        if kind is None:
            return f"unsupported Segment track event {name!r} (supported: {', '.join(TRACK_TYPES)})"
        out["type"] = kind
        if name == "Product Viewed":
            out["page_type"] = "product"
    product = props.get("product_id", props.get("sku"))
    if product is not None:
        out["product_id"] = product
    for field in ("quantity", "price", "order_id"):
        if props.get(field) is not None:
            out[field] = props[field]
    if out["type"] == "purchase":
        value = props.get("revenue", props.get("total"))
        if value is not None:
            out["value"] = value
    url = props.get("url") or _context_url(data)
    if url is not None:
        out["url"] = url
    rest = {k: v for k, v in props.items() if k not in _MAPPED_PROPERTIES}
    if rest:
        out["properties"] = rest
    return out


def _page_type(data: dict[str, Any]) -> str:
    for candidate in (data.get("category"), data.get("name")):
        if isinstance(candidate, str):
            mapped = PAGE_TYPES.get(candidate.strip().lower())
            if mapped is not None:
                return mapped
    return "other"


def _context_url(data: dict[str, Any]) -> Any:
    context = data.get("context")
    page = context.get("page") if isinstance(context, dict) else None
    return page.get("url") if isinstance(page, dict) else None

"""Attribution: which of a user's triggers a purchase converted (issue 13). Plain Python.

    trigger fired at F (attributed, `nudgeflow.core.outcomes`) ─► watched until F + window
    applied purchase at ts, F < ts <= F + window                ─► Outcome, once per trigger

A trigger is watched from the moment the detector decides it (a delayed send:
when it fires, so its window starts at `fired_at` like its holdout's). A
purchase that was applied *before* the trigger was decided can still fall in
its window (an event that arrived out of order, or a timer decided after the
purchase that followed its deadline), so the purchases of the last moments
are remembered too. Both lists are pruned against the user's watermark
`c - L`, which is at most every future applied `ts` and every future
`fired_at` (ARCHITECTURE.md "Bounded state"):

- a watched trigger whose window ends before it can no longer convert;
- a purchase at or before it can convert no trigger decided from now on.

So the result depends only on the user's own events in arrival order:
exact, and the same for any number of workers. Outcomes wait in `outbox`
until the operator takes them (`drain`), within the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nudgeflow.core.outcomes import Outcome, arm_of, attributed
from nudgeflow.core.triggers import Decision


@dataclass(slots=True)
class Watched:
    """A trigger waiting for a purchase in (`fired_at`, `until`]."""

    trigger_id: str
    trigger_type: str
    user_id: str
    fired_at: int
    until: int
    variant: str
    # product ids of the abandoned cart (cart rules), None for other rules
    products: tuple[str, ...] | None

    def to_data(self) -> tuple[Any, ...]:
        return (self.trigger_id, self.trigger_type, self.user_id, self.fired_at, self.until,
                self.variant, self.products)


@dataclass(frozen=True, slots=True)
class Purchase:
    """An applied purchase, and the product ids of the cart it emptied."""

    ts: int
    value: float | None
    cart: tuple[str, ...]


def _cart_products(metadata: dict[str, Any]) -> tuple[str, ...] | None:
    items = metadata.get("items")
    if not isinstance(items, list):
        return None
    return tuple(str(item["product_id"]) for item in items
                 if isinstance(item, dict) and "product_id" in item)


class Attribution:
    """One user's watched triggers, recent purchases and outcomes not yet taken."""

    __slots__ = ("outbox", "recent", "watching")

    def __init__(
        self, watching: list[Watched] | None = None, recent: list[Purchase] | None = None
    ) -> None:
        self.watching: list[Watched] = watching or []
        self.recent: list[Purchase] = recent or []
        self.outbox: list[Outcome] = []

    def watch(self, decision: Decision, window_ms: int) -> None:
        """A trigger was decided: watch it for a purchase within `window_ms` of `fired_at`."""
        if not attributed(decision.decision, decision.reason):
            return
        trigger = decision.trigger
        watched = Watched(
            trigger.trigger_id, trigger.trigger_type, trigger.user_id, trigger.fired_at_ms,
            trigger.fired_at_ms + window_ms, arm_of(trigger.metadata),
            _cart_products(trigger.metadata),
        )
        for purchase in self.recent:  # in arrival order: the first one in the window counts
            if watched.fired_at < purchase.ts <= watched.until:
                self.outbox.append(_converted(watched, purchase))
                return
        self.watching.append(watched)

    def on_purchase(self, ts: int, value: float | None, cart: tuple[str, ...]) -> None:
        """A purchase was applied; `cart` is the product ids of the cart it empties."""
        purchase = Purchase(ts, value, cart)
        self.recent.append(purchase)
        if not self.watching:
            return
        waiting: list[Watched] = []
        for watched in self.watching:
            if watched.fired_at < ts <= watched.until:
                self.outbox.append(_converted(watched, purchase))
            else:
                waiting.append(watched)
        self.watching = waiting

    def prune(self, watermark: int) -> None:
        """Forget what no applied event at or after `watermark` can change."""
        if self.recent:
            self.recent = [p for p in self.recent if p.ts > watermark]
        if self.watching:
            self.watching = [w for w in self.watching if w.until >= watermark]

    def drain(self) -> list[Outcome]:
        """The outcomes found since the last call, in the order they were found."""
        out, self.outbox = self.outbox, []
        return out

    @property
    def empty(self) -> bool:
        return not self.watching and not self.recent and not self.outbox

    def to_data(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Plain data for snapshots. The outbox is not in it: the operator drains it
        in the batch that filled it, before any snapshot."""
        return ([w.to_data() for w in self.watching],
                [(p.ts, p.value, p.cart) for p in self.recent])

    @classmethod
    def from_data(cls, data: Any) -> Attribution:
        if data is None:  # a snapshot written before attribution existed
            return cls()
        watching, recent = data
        return cls(
            [_watched_from(row) for row in watching],
            [Purchase(ts, value, tuple(cart)) for ts, value, cart in recent],
        )


def _watched_from(row: tuple[Any, ...]) -> Watched:
    trigger_id, trigger_type, user_id, fired_at, until, variant, products = row
    return Watched(trigger_id, trigger_type, user_id, fired_at, until, variant,
                   None if products is None else tuple(products))


def _converted(watched: Watched, purchase: Purchase) -> Outcome:
    recovered = None
    if watched.products is not None:
        bought = set(purchase.cart)
        recovered = bool(watched.products) and all(p in bought for p in watched.products)
    return Outcome(
        trigger_id=watched.trigger_id,
        trigger_type=watched.trigger_type,
        user_id=watched.user_id,
        fired_at_ms=watched.fired_at,
        ts_ms=purchase.ts,
        value=purchase.value,
        variant=watched.variant,
        cart_recovered=recovered,
    )

"""A user's cart, with the arithmetic of TRIGGERS.md "Cart arithmetic"."""

from __future__ import annotations

import sys
from typing import Any, Final


class Cart:
    """Quantities per product, summed; the last known unit price per product.

    Removing a product not in the cart changes nothing; removing more than held
    removes it all; a purchase empties the whole cart.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        # product_id -> [quantity, unit price or None]; insertion order is the order added
        self._items: dict[str, list[Any]] = {}

    def add(self, product_id: str, quantity: int, price: float | None) -> None:
        item = self._items.get(product_id)
        if item is None:
            # Interned: product ids repeat across users, and each user holds a copy otherwise.
            self._items[sys.intern(product_id)] = [quantity, price]
            return
        item[0] += quantity
        if price is not None:
            item[1] = price

    def remove(self, product_id: str, quantity: int) -> None:
        item = self._items.get(product_id)
        if item is None:
            return
        item[0] -= quantity
        if item[0] <= 0:
            del self._items[product_id]

    def clear(self) -> None:
        self._items.clear()

    def to_data(self) -> list[tuple[str, int, float | None]]:
        return [(pid, qty, price) for pid, (qty, price) in self._items.items()]

    @classmethod
    def from_data(cls, data: list[tuple[str, int, float | None]]) -> Cart:
        cart = cls()
        cart._items = {sys.intern(pid): [qty, price] for pid, qty, price in data}
        return cart

    @property
    def empty(self) -> bool:
        return not self._items

    def snapshot(self) -> dict[str, Any]:
        """`items` and `cart_value` for trigger metadata: a copy, never the live state."""
        items = [
            {"product_id": pid, "quantity": qty, "price": price}
            for pid, (qty, price) in self._items.items()
        ]
        value = sum(qty * price for qty, price in self._items.values() if price is not None)
        return {"cart_value": round(value, 2), "items": items}


class _NoCart(Cart):
    """The cart of every user who has none: reads as empty, refuses to change."""

    __slots__ = ()

    def add(self, product_id: str, quantity: int, price: float | None) -> None:
        raise TypeError(_FROZEN)

    def remove(self, product_id: str, quantity: int) -> None:
        raise TypeError(_FROZEN)

    def clear(self) -> None:
        raise TypeError(_FROZEN)


_FROZEN: Final = "the shared empty cart cannot change: use UserState.cart_to_change()"


# Most users have no cart most of the time: they share this one instead of holding two objects.
EMPTY_CART: Final[Cart] = _NoCart()

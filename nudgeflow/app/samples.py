"""Deterministic, realistic shop traffic: the sample data of `nudgeflow demo` and the benchmarks.

`generate_events(spec)` yields the JSON lines (EVENTS.md §1) that a shop's tracker
would send, in **arrival order**, all users interleaved; `generate_profiles(spec)`
yields the customer profiles (TRIGGERS.md, "Segments"); `write_sample` writes both
as `events.jsonl` and `profiles.jsonl`. The same `SampleSpec` always gives the
same bytes, whatever the machine or the Python hash seed.

The model, per user:

- 1-3 **sessions** in the period; the gap before the next one is sometimes under
  30 min (the flow then sees a single session), usually 40 min to 3 h.
- Each session is a **funnel**: a home or category landing page, product pages
  (sometimes one product viewed 3-4 times within a few minutes), now and then a
  category, pricing or journal page, and for about one user in eight a cart:
  `add_to_cart` (quantity, price), sometimes a second product or a
  `remove_from_cart`, the cart page, then `checkout_started` and `purchase`
  — or nothing more: the abandoned carts that cart abandonment exists for.
  Some abandoners come back in a later session and buy.
- **Buyers behave differently from browsers**, so the intent model has
  something to see before the cart: whether a cart session ends in a purchase
  is drawn when the session starts, and a buyer lands on a category page more
  often than on home, views a few products and goes back to them (fewer
  distinct products, more repeat views), stays longer on product pages (dwell
  doubled, capped under 2 minutes: 1.5x on average), looks at pricing more and
  detours less (categories, journal).
- About half the pages end with a `page_leave` carrying `dwell_ms`; a few
  dwell over 2 minutes (mostly journal pages).
- `ts` is a per-user tracker habit: RFC 3339 UTC with `Z`, integer epoch ms, or
  RFC 3339 with `+02:00`; for some users checkout and purchase come from the
  shop's back end as epoch ms.

What a real pipe adds, each marked on `SampleLine.kind`:

- ``out_of_order``: a valid event that arrives after a later event of the same
  user, at most 20 s after its own `ts` (inside the default 30 s lateness);
- ``duplicate``: the same bytes (same `event_id`) re-sent 0.03-4 s later;
- ``invalid``: a malformed line that `nudgeflow.core.events.decode_event` rejects
  (truncated JSON, `add_to_cart` without `product_id`, a float `quantity`, or a
  `ts` without an offset).

Memory stays flat in the number of users: a user costs a few numbers until their
session starts, one session's lines are built when it starts, and sessions are
merged by arrival time through one heap. 100 000 users (~2 million lines) run
in a few hundred MB at most.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache
from heapq import heapify, heappop, heapreplace
from math import exp
from pathlib import Path
from random import Random
from statistics import NormalDist
from typing import Any, Final, Literal, NamedTuple, TypeVar

import orjson

__all__ = [
    "DEFAULT_START_MS",
    "LineKind",
    "SampleLine",
    "SampleSpec",
    "generate_events",
    "generate_lines",
    "generate_profiles",
    "write_sample",
]

DEFAULT_START_MS: Final = 1_772_352_000_000  # 2026-03-01T08:00:00Z

LineKind = Literal["event", "out_of_order", "duplicate", "invalid"]
_T = TypeVar("_T")

_HOUR_MS: Final = 3_600_000
_MINUTE_MS: Final = 60_000

# Out-of-order events arrive at most this long after their own `ts`, duplicates
# and invalid lines at most a few seconds after the line they copy: together far
# less than the shortest gap between two sessions, so a session's lines have all
# arrived before the user's next session starts.
_MAX_DELAY_MS: Final = 20_000
_MIN_SESSION_GAP_MS: Final = 2 * _MINUTE_MS

_SHOP: Final = "https://shop.example.com"
_CATEGORIES: Final = (
    ("sneakers", 89.0),
    ("running", 109.0),
    ("outdoor-jackets", 179.0),
    ("t-shirts", 24.0),
    ("jeans", 69.0),
    ("dresses", 59.0),
    ("bags", 79.0),
    ("watches", 149.0),
    ("sunglasses", 99.0),
    ("kitchen", 39.0),
    ("headphones", 129.0),
    ("skincare", 19.0),
)
_PRODUCTS_PER_CATEGORY: Final = 50
_JOURNAL: Final = (
    "how-to-choose-running-shoes",
    "spring-layering-guide",
    "caring-for-leather-bags",
    "the-capsule-wardrobe",
    "noise-cancelling-explained",
    "our-repair-promise",
    "sunscreen-myths",
    "behind-the-seams",
)
_UTM: Final = (
    "?utm_source=newsletter&utm_medium=email&utm_campaign=spring",
    "?utm_source=google&utm_medium=cpc&utm_campaign=brand",
    "?utm_source=instagram&utm_medium=social",
    "?gclid=Cj0KCQiA",
)
_REFERRERS: Final = (
    "https://www.google.com/",
    "https://www.instagram.com/",
    "https://duckduckgo.com/",
    "https://www.bing.com/",
)
_DEVICES: Final = ("mobile", "mobile", "desktop", "tablet")
_PAYMENTS: Final = ("card", "card", "paypal", "klarna", "apple_pay")
_SIZES: Final = ("XS", "S", "M", "M", "L", "XL")

# Segment codes of the user plan.
_NO_PROFILE: Final = 0
_VIP: Final = 1
_REGULAR: Final = 2
_NEW: Final = 3
_SEGMENT_NAMES: Final = {_VIP: "vip", _REGULAR: "regular", _NEW: "new"}
# Share of users of each segment who put something in a cart in one of their sessions.
_CART_PROPENSITY: Final = {_NO_PROFILE: 0.10, _VIP: 0.26, _REGULAR: 0.15, _NEW: 0.10}

# Of the shoppers with a cart, those who buy in that session; they browse differently
# before it (`_Visitor._browse`): fewer, more focused product views, read longer.
_BUY_SHARE: Final = 0.42
_VIEWS: Final = (1, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 10)
_BUYER_VIEWS: Final = (2, 3, 3, 4, 4, 5, 5, 6)

# ts styles of a user's tracker.
_TS_Z: Final = 0
_TS_EPOCH: Final = 1
_TS_OFFSET: Final = 2
_OFFSET_MINUTES: Final = 120


@dataclass(frozen=True)
class SampleSpec:
    """What to generate. Shares are per valid event (invalid lines come on top)."""

    users: int = 3000
    hours: float = 4.0
    seed: int = 7
    start_ms: int = DEFAULT_START_MS
    invalid_share: float = 0.002
    duplicate_share: float = 0.003
    out_of_order_share: float = 0.01

    def __post_init__(self) -> None:
        if self.users < 0:
            msg = f"users must be >= 0, got {self.users}"
            raise ValueError(msg)
        if not self.hours > 0:
            msg = f"hours must be > 0, got {self.hours}"
            raise ValueError(msg)
        for name in ("invalid_share", "duplicate_share", "out_of_order_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 0.5:
                msg = f"{name} must be within [0, 0.5], got {value}"
                raise ValueError(msg)

    @property
    def end_ms(self) -> int:
        """No session starts at or after this time."""
        return self.start_ms + int(self.hours * _HOUR_MS)


class SampleLine(NamedTuple):
    """One line as it arrives, with what the generator made of it (for tests and benchmarks).

    A named tuple rather than a frozen dataclass: two million of them are made for
    the benchmark sample, and a tuple is made three times faster.
    """

    data: bytes
    kind: LineKind
    user_id: str
    arrival_ms: int


def generate_events(spec: SampleSpec | None = None) -> Iterator[bytes]:
    """The lines of `spec` (JSON, no newline) in arrival order."""
    for line in generate_lines(spec):
        yield line.data


def generate_lines(spec: SampleSpec | None = None) -> Iterator[SampleLine]:
    """The lines of `spec` in arrival order (ties: user, then the user's own order)."""
    spec = spec if spec is not None else SampleSpec()
    catalog = _catalog(spec.seed)
    plan = _plan_users(spec)
    # Heap entries: (arrival_ms, user index, position in `lines`, lines, visitor).
    # A session not started yet waits as a placeholder (position -1, no lines) keyed
    # by its start, which none of its lines can arrive before; its lines are built
    # when it comes first, so only the sessions in progress are in memory.
    heap: list[tuple[int, int, int, list[SampleLine] | None, _Visitor | None]] = [
        (start, index, -1, None, None) for index, start in enumerate(plan.starts)
    ]
    heapify(heap)
    while heap:
        _, index, position, lines, visitor = heap[0]
        if visitor is None:  # the user's first session is starting
            visitor = _Visitor(spec, catalog, index, plan)
        if lines is None:
            lines = visitor.next_session()
            position = 0
        else:
            yield lines[position]
            position += 1
        if position < len(lines):
            heapreplace(heap, (lines[position].arrival_ms, index, position, lines, visitor))
        elif visitor.has_next_session:
            heapreplace(heap, (visitor.next_start, index, -1, None, visitor))
        else:
            heappop(heap)


def generate_profiles(spec: SampleSpec | None = None) -> Iterator[dict[str, Any]]:
    """One profile per user who has one (~85%), in user order.

    Keys: `user_id`, `segment` (`vip` ~5%, `regular` ~60%, `new`), `name`, `email`,
    `timezone`, `opt_in` (a list among `email`, `sms`, `push`; sometimes empty),
    and `phone` / `push_token` only for users who have one (absent, never null).
    """
    spec = spec if spec is not None else SampleSpec()
    plan = _plan_users(spec)
    rng = Random(_derive(spec.seed, "profiles"))
    for index, segment in enumerate(plan.segments):
        if segment == _NO_PROFILE:
            continue
        yield _profile(rng, _user_id(index), _SEGMENT_NAMES[segment])


def write_sample(directory: Path, spec: SampleSpec | None = None) -> tuple[Path, Path]:
    """Write `events.jsonl` and `profiles.jsonl` into `directory` (created if needed)."""
    spec = spec if spec is not None else SampleSpec()
    directory.mkdir(parents=True, exist_ok=True)
    events_path = directory / "events.jsonl"
    profiles_path = directory / "profiles.jsonl"
    with events_path.open("wb", buffering=1 << 20) as handle:
        for data in generate_events(spec):
            handle.write(data)
            handle.write(b"\n")
    with profiles_path.open("wb", buffering=1 << 20) as handle:
        for profile in generate_profiles(spec):
            handle.write(orjson.dumps(profile))
            handle.write(b"\n")
    return events_path, profiles_path


# --- the plan: a few numbers per user, drawn in user order -------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    starts: array[int]  # first session start, epoch ms
    seeds: array[int]  # the user's seed; session k uses Random(seed * 4 + k)
    segments: bytearray  # _NO_PROFILE, _VIP, _REGULAR or _NEW


def _plan_users(spec: SampleSpec) -> _Plan:
    rng = Random(_derive(spec.seed, "users"))
    # First sessions start over the first 90% of the period, so that most users
    # have time for a second one.
    span = int(spec.hours * _HOUR_MS * 0.9)
    starts: array[int] = array("q")
    seeds: array[int] = array("q")
    segments = bytearray()
    for _ in range(spec.users):
        starts.append(spec.start_ms + int(rng.random() * span))
        seeds.append(rng.getrandbits(60))
        roll = rng.random()
        if roll >= 0.85:
            segments.append(_NO_PROFILE)
        elif roll < 0.85 * 0.05:
            segments.append(_VIP)
        elif roll < 0.85 * 0.65:
            segments.append(_REGULAR)
        else:
            segments.append(_NEW)
    return _Plan(starts, seeds, segments)


def _derive(seed: int, label: str) -> int:
    """A stable sub-seed (unlike `hash`, not salted per process)."""
    digest = hashlib.blake2b(f"nudgeflow:{seed}:{label}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _user_id(index: int) -> str:
    return f"u{index + 1:06d}"


# --- the catalog --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Product:
    product_id: str
    category: int
    price: float
    url: str


def _catalog(seed: int) -> tuple[_Product, ...]:
    """`_PRODUCTS_PER_CATEGORY` products per category, in category order."""
    rng = Random(_derive(seed, "catalog"))
    products = []
    for category, (name, typical) in enumerate(_CATEGORIES):
        for rank in range(_PRODUCTS_PER_CATEGORY):
            number = 10_000 + category * 1000 + rank
            price = max(4.99, round(typical * rng.lognormvariate(0.0, 0.45)) - 0.01)
            products.append(
                _Product(
                    product_id=f"sku-{number}",
                    category=category,
                    price=round(price, 2),
                    url=f"{_SHOP}/p/{name}/sku-{number}",
                )
            )
    return tuple(products)


# --- one user -----------------------------------------------------------------------


class _Visitor:
    """One user's traffic, built a session at a time (each from its own `Random`).

    Between sessions only the traits drawn at the first session and the cart
    are kept.
    """

    __slots__ = (
        "_cart",
        "_cart_session",
        "_catalog",
        "_events",
        "_favourites",
        "_index",
        "_last_page",
        "_max_ts",
        "_next_start",
        "_now",
        "_page_start",
        "_pricing_fan",
        "_returns_to_buy",
        "_rng",
        "_seed",
        "_server_ts",
        "_session",
        "_session_id",
        "_session_products",
        "_sessions",
        "_spec",
        "_ts_style",
        "user_id",
    )

    def __init__(
        self, spec: SampleSpec, catalog: tuple[_Product, ...], index: int, plan: _Plan
    ) -> None:
        self._spec = spec
        self._catalog = catalog
        self._index = index
        self._seed = plan.seeds[index]
        self.user_id = _user_id(index)
        self._next_start = plan.starts[index]
        self._session = 0
        self._max_ts = -1
        self._cart: dict[str, list[Any]] = {}  # product_id -> [quantity, price]
        self._returns_to_buy = False
        self._events: list[dict[str, Any]] = []
        self._now = 0
        self._page_start = 0
        self._last_page = ("", "")
        self._session_id = ""
        self._session_products: set[str] = set()
        # The traits come from the first session's generator.
        rng = self._rng = Random(self._seed * 4)
        self._sessions = rng.choices((1, 2, 3), weights=(40, 34, 26))[0]
        self._cart_session = (
            _below(rng, self._sessions)
            if rng.random() < _CART_PROPENSITY[plan.segments[index]]
            else -1
        )
        self._pricing_fan = rng.random() < 0.15
        style = rng.random()
        self._ts_style = _TS_Z if style < 0.70 else _TS_EPOCH if style < 0.85 else _TS_OFFSET
        self._server_ts = rng.random() < 0.4
        first = _below(rng, len(_CATEGORIES))
        self._favourites = (
            first,
            (first + 1 + _below(rng, len(_CATEGORIES) - 1)) % len(_CATEGORIES),
        )

    @property
    def has_next_session(self) -> bool:
        return self._session < self._sessions and self._next_start < self._spec.end_ms

    @property
    def next_start(self) -> int:
        return self._next_start

    def next_session(self) -> list[SampleLine]:
        """The lines of the next session, in arrival order (all before the one after)."""
        if self._session > 0:
            self._rng = Random(self._seed * 4 + self._session)
        rng = self._rng
        self._events = []
        self._session_products = set()
        self._now = self._next_start
        self._session_id = f"s-{rng.getrandbits(64):016x}"
        if self._returns_to_buy and self._cart:
            self._returning_buyer()
        else:
            self._browse(cart=self._session == self._cart_session)
        self._session += 1
        short_gap = rng.random() < 0.35
        gap = _between(rng, 2, 25) if short_gap else _between(rng, 40, 180)
        self._next_start = self._now + max(gap * _MINUTE_MS, _MIN_SESSION_GAP_MS)
        lines = self._lines()
        # Between sessions a user is only their traits and cart (the generator's
        # state alone is 2.5 kB).
        self._events = []
        self._session_products = set()
        del self._rng
        return lines

    # --- the funnel -------------------------------------------------------------

    def _browse(self, *, cart: bool) -> None:
        rng = self._rng
        # A shopper who will buy has decided before the session: drawn first, it
        # shapes the browsing that precedes the cart (what the intent model sees).
        outcome = rng.random() if cart else 1.0
        buyer = outcome < _BUY_SHARE
        landing_props = self._landing_properties() if rng.random() < 0.2 else None
        utm = _pick(rng, _UTM) if rng.random() < 0.15 else ""
        if rng.random() < (0.3 if buyer else 0.6):
            self._page("home", f"{_SHOP}/{utm}", properties=landing_props)
        else:
            category = self._favourites[0] if rng.random() < 0.7 else self._favourites[1]
            self._page("category", self._category_url(category) + utm, properties=landing_props)
        views = _pick(rng, _BUYER_VIEWS if buyer else _VIEWS)
        fixate_at = _below(rng, views) if rng.random() < (0.3 if buyer else 0.04) else -1
        pricing = rng.random() < (0.7 if self._pricing_fan else 0.25 if buyer else 0.03)
        pricing_at = _below(rng, views + 1) if pricing else -1
        journal_at = _below(rng, views + 1) if rng.random() < (0.05 if buyer else 0.18) else -1
        viewed: list[_Product] = []
        for step in range(views + 1):
            if step == pricing_at:
                self._page("pricing", f"{_SHOP}/pricing")
            if step == journal_at:
                self._page("content", f"{_SHOP}/journal/{_pick(rng, _JOURNAL)}")
            if step == views:
                break
            if step and rng.random() < (0.1 if buyer else 0.25):
                self._page("category", self._category_url(self._pick_category()))
            # A buyer compares a few products and goes back to them; a browser wanders.
            product = (_pick(rng, viewed) if buyer and viewed and rng.random() < 0.5
                       else self._pick_product())
            if step == fixate_at:
                self._fixate(product)
            else:
                self._page("product", product.url, product=product, engaged=buyer)
            viewed.append(product)
        if cart:
            self._cart_flow(viewed[-1], outcome)

    def _fixate(self, product: _Product) -> None:
        """One product viewed 3-4 times within a few minutes, with short detours."""
        rng = self._rng
        repeats = _pick(rng, (3, 3, 4))
        for repeat in range(repeats):
            self._page("product", product.url, product=product, quick=True)
            if repeat < repeats - 1 and rng.random() < 0.4:
                other = self._pick_product()
                self._page("product", other.url, product=other, quick=True)

    def _cart_flow(self, product: _Product, outcome: float) -> None:
        rng = self._rng
        self._open_page("product", product.url, product=product)
        self._cart_event("add_to_cart", product, rng.choices((1, 2, 3), weights=(78, 16, 6))[0])
        self._close_page()
        if rng.random() < 0.35:
            other = self._pick_product()
            self._open_page("product", other.url, product=other)
            self._cart_event("add_to_cart", other, 1)
            self._close_page()
        self._open_page("cart", f"{_SHOP}/cart")
        if rng.random() < 0.15:
            product_id = _pick(rng, sorted(self._cart))
            quantity, price = self._cart[product_id]
            self._remove(product_id, quantity, price)
        self._close_page()
        if not self._cart:
            return
        if outcome < _BUY_SHARE:
            self._checkout(purchase=True)
        elif outcome < 0.55:
            self._checkout(purchase=False)
        elif rng.random() < 0.3:
            self._page("product", product.url, product=product)
        # An abandoner may come back in a later session and buy.
        self._returns_to_buy = bool(self._cart) and rng.random() < 0.3

    def _returning_buyer(self) -> None:
        rng = self._rng
        if rng.random() < 0.5:
            self._page("home", f"{_SHOP}/")
        self._page("cart", f"{_SHOP}/cart")
        self._checkout(purchase=rng.random() < 0.8)
        self._returns_to_buy = False

    def _checkout(self, *, purchase: bool) -> None:
        rng = self._rng
        self._open_page("checkout", f"{_SHOP}/checkout")
        self._action("checkout_started")
        if purchase:
            self._now += _between(rng, 30_000, 180_000)
            event = self._action("purchase")
            event["order_id"] = f"o-{rng.getrandbits(40):010x}"
            event["value"] = round(sum(q * p for q, p in self._cart.values()), 2)
            if rng.random() < 0.5:
                event["properties"] = {"payment": _pick(rng, _PAYMENTS), "currency": "EUR"}
            self._cart.clear()
        self._close_page()
        if purchase:
            self._page("other", f"{_SHOP}/checkout/confirmation")

    # --- pages and events -------------------------------------------------------

    def _page(
        self,
        page_type: str,
        url: str,
        *,
        product: _Product | None = None,
        properties: dict[str, Any] | None = None,
        quick: bool = False,
        engaged: bool = False,
    ) -> None:
        self._open_page(page_type, url, product=product, properties=properties)
        self._close_page(quick=quick, engaged=engaged)

    def _open_page(
        self,
        page_type: str,
        url: str,
        *,
        product: _Product | None = None,
        properties: dict[str, Any] | None = None,
    ) -> None:
        event = self._event("page_view")
        event["page_type"] = page_type
        event["url"] = url
        if product is not None:
            event["product_id"] = product.product_id
        if properties is not None:
            event["properties"] = properties
        self._page_start = self._now
        self._last_page = (page_type, url)

    def _close_page(self, *, quick: bool = False, engaged: bool = False) -> None:
        """Leave the open page: maybe a `page_leave`, then a short pause before the next.

        An `engaged` shopper (one who will buy) stays twice as long, under 2 minutes.
        """
        rng = self._rng
        page_type, url = self._last_page
        dwell = self._dwell(page_type, quick=quick)
        if engaged:
            dwell = min(dwell * 2, 115_000)
        dwell = max(dwell, self._now - self._page_start + _between(rng, 1_000, 6_000))
        leave_share = 0.9 if dwell > 120_000 else 0.6
        self._now = self._page_start + dwell
        if rng.random() < leave_share:
            event = self._event("page_leave")
            event["page_type"] = page_type
            event["url"] = url
            event["dwell_ms"] = dwell
        self._now += _between(rng, 150, 2_500)

    def _dwell(self, page_type: str, *, quick: bool) -> int:
        rng = self._rng
        if quick:
            return _between(rng, 8_000, 55_000)
        if page_type in ("cart", "checkout"):
            return _between(rng, 5_000, 60_000)
        long_share = 0.08 if page_type == "content" else 0.003
        if rng.random() < long_share:
            return _between(rng, 121_000, 480_000)
        return _typical_dwells()[int(rng.random() * _DWELL_QUANTILES)]

    def _action(self, kind: str) -> dict[str, Any]:
        """An event on the open page, a few seconds after the last one."""
        self._now += _between(self._rng, 2_000, 25_000)
        return self._event(kind)

    def _cart_event(self, kind: str, product: _Product, quantity: int) -> None:
        event = self._action(kind)
        event["product_id"] = product.product_id
        event["quantity"] = quantity
        event["price"] = product.price
        if kind == "add_to_cart" and self._rng.random() < 0.2:
            event["properties"] = {"size": _pick(self._rng, _SIZES), "list": "product_page"}
        held = self._cart.setdefault(product.product_id, [0, product.price])
        held[0] += quantity

    def _remove(self, product_id: str, quantity: int, price: float) -> None:
        event = self._action("remove_from_cart")
        event["product_id"] = product_id
        event["quantity"] = quantity
        event["price"] = price
        del self._cart[product_id]

    def _event(self, kind: str) -> dict[str, Any]:
        event: dict[str, Any] = {
            "event_id": _uuid(self._rng),
            "user_id": self.user_id,
            "type": kind,
            "ts": self._now,  # epoch ms until `_lines` formats it
            "session_id": self._session_id,
        }
        self._events.append(event)
        return event

    def _landing_properties(self) -> dict[str, Any]:
        rng = self._rng
        return {"referrer": _pick(rng, _REFERRERS), "device": _pick(rng, _DEVICES)}

    def _pick_category(self) -> int:
        roll = self._rng.random()
        if roll < 0.6:
            return self._favourites[0]
        if roll < 0.85:
            return self._favourites[1]
        return _below(self._rng, len(_CATEGORIES))

    def _pick_product(self) -> _Product:
        """A product to look at; one seen in this session already is drawn again once."""
        product = self._draw_product()
        if product.product_id in self._session_products:
            product = self._draw_product()
        self._session_products.add(product.product_id)
        return product

    def _draw_product(self) -> _Product:
        category = self._pick_category()
        # Popular products first: rank 0 is viewed about 8 times as often as rank 49.
        rank = int(_PRODUCTS_PER_CATEGORY * self._rng.random() ** 1.5)
        return self._catalog[category * _PRODUCTS_PER_CATEGORY + rank]

    @staticmethod
    def _category_url(category: int) -> str:
        return f"{_SHOP}/c/{_CATEGORIES[category][0]}"

    # --- from events to arriving lines -------------------------------------------

    def _lines(self) -> list[SampleLine]:
        """Serialise the session's events and add what the pipe does to them."""
        rng = self._rng
        spec = self._spec
        events = self._events
        times = [event["ts"] for event in events]
        count = len(events)
        # Only an event followed closely by the next can be overtaken by it within
        # `_MAX_DELAY_MS`; those candidates carry the whole out-of-order share.
        candidates = sum(1 for i in range(count - 1) if times[i + 1] - times[i] < 15_000)
        late_share = min(1.0, spec.out_of_order_share * count / candidates) if candidates else 0.0
        duplicate_share = spec.duplicate_share
        invalid_limit = duplicate_share + spec.invalid_share
        # (arrival, order, ts, kind, data): `order` makes every key unique.
        records: list[tuple[int, int, int, LineKind, bytes]] = []
        for i, event in enumerate(events):
            ts = times[i]
            event["ts"] = self._format_ts(ts, event["type"])
            data = orjson.dumps(event)
            arrival = ts
            kind: LineKind = "event"
            if i + 1 < count:
                gap = times[i + 1] - ts
                if gap < 15_000 and rng.random() < late_share:
                    arrival = ts + _between(rng, gap + 1, min(_MAX_DELAY_MS, gap + 8_000))
                    kind = "out_of_order"
            records.append((arrival, len(records), ts, kind, data))
            roll = rng.random()
            if roll < duplicate_share:
                records.append(
                    (arrival + _between(rng, 30, 4_000), len(records), ts, "duplicate", data)
                )
            elif roll < invalid_limit:
                bad = self._malformed(event, ts)
                records.append(
                    (arrival + _between(rng, 0, 2_500), len(records), ts, "invalid", bad)
                )
        records.sort()
        lines = []
        max_ts = self._max_ts
        for arrival, _, ts, planned, data in records:
            kind = planned
            if planned in ("event", "out_of_order") and ts >= max_ts:
                # Delayed, but nothing later overtook it: it arrives in order after all.
                kind = "event"
                max_ts = ts
            lines.append(SampleLine(data, kind, self.user_id, arrival))
        self._max_ts = max_ts
        return lines

    def _format_ts(self, ts: int, kind: str) -> str | int:
        if self._server_ts and kind in ("checkout_started", "purchase"):
            return ts
        if self._ts_style == _TS_EPOCH:
            return ts
        if self._ts_style == _TS_OFFSET:
            return _rfc3339(ts, _OFFSET_MINUTES)
        return _rfc3339(ts, 0)

    def _malformed(self, event: dict[str, Any], ts: int) -> bytes:
        """A broken line from a buggy tracker, next to `event`."""
        rng = self._rng
        flaw = _below(rng, 4)
        bad = dict(event, event_id=_uuid(rng))
        if flaw == 0:  # cut off mid-line: never valid JSON (the object is not closed)
            data = orjson.dumps(bad)
            return data[: _between(rng, 8, len(data) - 2)]
        if flaw == 3:  # a local time without an offset
            bad["ts"] = _rfc3339(ts, 0).removesuffix("Z")
            return orjson.dumps(bad)
        product = self._pick_product()
        cart: dict[str, Any] = {
            "event_id": bad["event_id"],
            "user_id": self.user_id,
            "type": "add_to_cart",
            "ts": event["ts"],
            "session_id": self._session_id,
            "product_id": product.product_id,
            "quantity": 1,
            "price": product.price,
        }
        if flaw == 1:  # `product_id` lost
            del cart["product_id"]
        else:  # a float quantity
            cart["quantity"] = float(_pick(rng, (1, 2)))
        return orjson.dumps(cart)


# --- formatting ---------------------------------------------------------------------


_DWELL_QUANTILES: Final = 1024


@lru_cache(maxsize=1)
def _typical_dwells() -> tuple[int, ...]:
    """Quantiles of a usual page's dwell: log-normal, median 20 s, within 1.5 s to 110 s.

    Drawing an index into this table is much cheaper than `lognormvariate`.
    """
    dist = NormalDist(mu=9.9, sigma=0.75)
    return tuple(
        max(1_500, min(int(exp(dist.inv_cdf((i + 0.5) / _DWELL_QUANTILES))), 110_000))
        for i in range(_DWELL_QUANTILES)
    )


def _between(rng: Random, low: int, high: int) -> int:
    """Like `rng.randint(low, high)`, three times faster (a float's 53 bits are plenty here)."""
    return low + int(rng.random() * (high - low + 1))


def _below(rng: Random, bound: int) -> int:
    """Like `rng.randrange(bound)`."""
    return int(rng.random() * bound)


def _pick(rng: Random, items: Sequence[_T]) -> _T:
    """Like `rng.choice(items)`."""
    return items[int(rng.random() * len(items))]


def _uuid(rng: Random) -> str:
    """A version-4 UUID string from `rng` (deterministic, unlike `uuid.uuid4`)."""
    bits = rng.getrandbits
    a, b, c, d, e = bits(32), bits(16), bits(12), 0x8000 | bits(14), bits(48)
    return f"{a:08x}-{b:04x}-4{c:03x}-{d:04x}-{e:012x}"


@lru_cache(maxsize=4096)
def _minute_prefix(minute: int) -> str:
    """`2026-03-01T10:15:` for a minute since the epoch (local to whatever offset)."""
    day, minute_of_day = divmod(minute, 24 * 60)
    hours, minutes = divmod(minute_of_day, 60)
    return f"{(date(1970, 1, 1) + timedelta(days=day)).isoformat()}T{hours:02d}:{minutes:02d}:"


def _rfc3339(ms: int, offset_minutes: int) -> str:
    """`ms` as RFC 3339 with milliseconds, in UTC (`Z`) or at a positive offset."""
    minute, rest = divmod(ms + offset_minutes * _MINUTE_MS, _MINUTE_MS)
    seconds, millis = divmod(rest, 1000)
    suffix = f"+{offset_minutes // 60:02d}:{offset_minutes % 60:02d}" if offset_minutes else "Z"
    return f"{_minute_prefix(minute)}{seconds:02d}.{millis:03d}{suffix}"


# --- profiles -----------------------------------------------------------------------

_TIMEZONES: Final = (
    ("Europe/Berlin", 40),
    ("America/New_York", 25),
    ("UTC", 15),
    ("Asia/Tokyo", 20),
)
_NAMES: Final = {
    "Europe/Berlin": (
        ("Lena", "Jonas", "Mia", "Felix", "Hannah", "Lukas", "Emma", "Paul", "Sophie", "Ben"),
        ("Schmidt", "Weber", "Becker", "Wagner", "Hoffmann", "Koch", "Richter", "Klein"),
    ),
    "America/New_York": (
        ("Olivia", "Liam", "Ava", "Noah", "Isabella", "Ethan", "Mason", "Chloe", "Lucas"),
        ("Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis", "Rodriguez", "Lopez"),
    ),
    "UTC": (
        ("Amelia", "Oliver", "Isla", "Harry", "Freya", "Jack", "Aisha", "Mateo", "Nora"),
        ("Taylor", "Evans", "Silva", "Jensen", "Okafor", "Rossi", "Novak", "Dubois"),
    ),
    "Asia/Tokyo": (
        ("Yuki", "Haruto", "Sakura", "Ren", "Aoi", "Sota", "Hina", "Yuto", "Mei"),
        ("Tanaka", "Suzuki", "Takahashi", "Watanabe", "Ito", "Yamamoto", "Nakamura", "Sato"),
    ),
}
_CHANNELS: Final = ("email", "sms", "push")
_MAIL_DOMAINS: Final = ("example.com", "example.net", "example.org", "mail.example")


def _profile(rng: Random, user_id: str, segment: str) -> dict[str, Any]:
    timezone = rng.choices([tz for tz, _ in _TIMEZONES], weights=[w for _, w in _TIMEZONES])[0]
    firsts, lasts = _NAMES[timezone]
    first, last = _pick(rng, firsts), _pick(rng, lasts)
    email = f"{first}.{last}{_between(rng, 1, 999)}@{_pick(rng, _MAIL_DOMAINS)}".lower()
    profile: dict[str, Any] = {
        "user_id": user_id,
        "segment": segment,
        "name": f"{first} {last}",
        "email": email,
    }
    if rng.random() < 0.8:
        profile["phone"] = _phone(rng, timezone)
    if rng.random() < 0.55:
        profile["push_token"] = f"{rng.getrandbits(256):064x}"
    profile["timezone"] = timezone
    if rng.random() < 0.07:
        opt_in: list[str] = []
    else:
        opt_in = [channel for channel in _CHANNELS if _opts_in(rng, channel, profile)]
    profile["opt_in"] = opt_in
    return profile


def _opts_in(rng: Random, channel: str, profile: dict[str, Any]) -> bool:
    if channel == "email":
        return rng.random() < 0.8
    if channel == "sms":
        return "phone" in profile and rng.random() < 0.45
    return "push_token" in profile and rng.random() < 0.7


def _phone(rng: Random, timezone: str) -> str:
    """A number in a range reserved for fiction or tests where the country has one."""
    if timezone == "Europe/Berlin":
        return f"+4915{_between(rng, 1, 9)}{_between(rng, 0, 99_999_999):08d}"
    if timezone == "America/New_York":
        return f"+1{_pick(rng, ('212', '646', '917'))}55501{_between(rng, 0, 99):02d}"
    if timezone == "Asia/Tokyo":
        return f"+8190{_between(rng, 0, 99_999_999):08d}"
    return f"+447700900{_between(rng, 0, 999):03d}"

"""The intent model's features, computed one applied event at a time (offline and in the flow).

`IntentState` is one user's accumulator: the open session's counts and the
user's history. `observe` takes an applied event with the session the detector
placed it in; `vector` returns the feature values at that event, in the order
of `FEATURES`. The training command and the `high_intent` rule both call these
two methods through the same rule logic, so a model sees in the flow exactly
what it was trained on (tests/unit/test_intent_features.py checks it bit for
bit).

History is kept while the user keeps coming back: a session that starts more
than `HISTORY_MS` after the previous one's latest event starts from nothing,
and `forget_before` drops the state of a user quiet that long (as the
detector forgets a quiet user), so the state stays bounded.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nudgeflow.core.timeutil import MS_PER_DAY, MS_PER_HOUR, MS_PER_MINUTE

# The order of a feature vector. A model records the list it was trained on and is
# refused at start when it differs (`model.load_model`).
FEATURES: Final[tuple[str, ...]] = (
    "session_views",            # page_views in the open session
    "session_product_views",    # of them, product pages
    "session_distinct_products",
    "session_cart_adds",
    "session_cart_removes",
    "session_checkouts",        # checkout_started in the session
    "session_pricing_views",
    "session_dwell_s",          # sum of the session's page_leave dwell_ms, in seconds
    "session_events",
    "session_minutes",          # from the session's first event to this one
    "cart_value",               # the user's cart now (quantity x last known unit price)
    "cart_items",               # distinct products in it
    "local_hour",               # in the profile's timezone (the rules' default without one)
    "past_sessions",            # sessions of the user before this one
    "past_purchases",
    "hours_since_purchase",     # -1: none remembered
    "hours_since_last_session", # from the previous session's latest event; -1: none
    "events_this_hour",         # the detector's tumbling counts (UTC hour, UTC day)
    "events_today",
)

# A user quiet this long is a new visitor again (the detector forgets them after a week too).
HISTORY_MS: Final = 7 * MS_PER_DAY

# The event types the rule scores on: every applied event changes the session's
# features; a purchase ends what the score is for.
SCORED_TYPES: Final = frozenset(
    {"page_view", "page_leave", "add_to_cart", "remove_from_cart", "checkout_started"}
)

_QUARTER_HOUR_MS: Final = 15 * MS_PER_MINUTE


@lru_cache(maxsize=256)
def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


@lru_cache(maxsize=8192)
def _local_hour(zone_name: str, quarter: int) -> int:
    # Every UTC offset in use is a multiple of 15 minutes: the local hour is
    # constant within a UTC quarter hour, so it is computed once per quarter.
    zone = _zone(zone_name) or UTC
    return datetime.fromtimestamp(quarter * _QUARTER_HOUR_MS / 1000, zone).hour


def local_hour(ts: int, zone_name: str) -> int:
    """The hour (0-23) at `ts` in the IANA zone `zone_name` (UTC when it is unknown)."""
    return _local_hour(zone_name, ts // _QUARTER_HOUR_MS)


_FIELDS: Final = (
    "cart_adds", "cart_removes", "checkouts", "dwell_ms", "events", "fired",
    "last_purchase", "latest", "past_purchases", "past_sessions", "previous_latest",
    "pricing_views", "product_views", "products", "purchased", "session", "start", "views",
)


class IntentState:
    """One user's feature accumulator: plain numbers, dumped to a list for snapshots."""

    __slots__ = _FIELDS

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.session = -1        # the detector's index of the open session; -1: none yet
        self.start = 0
        self.latest = 0
        self.views = 0
        self.product_views = 0
        self.products: list[str] = []
        self.cart_adds = 0
        self.cart_removes = 0
        self.checkouts = 0
        self.pricing_views = 0
        self.dwell_ms = 0
        self.events = 0
        self.purchased = False   # the open session has a purchase: nothing more to score
        self.fired = False       # high_intent fired in the open session
        self.past_sessions = 0
        self.past_purchases = 0
        self.last_purchase = -1  # ts of the latest purchase; -1: none
        self.previous_latest = -1  # latest ts of the session before the open one; -1: none

    def observe(self, event: Any, session_index: int, session_start: int) -> None:
        """Count an applied event of the detector's session `session_index` (started then)."""
        if session_index != self.session:
            if self.session >= 0 and session_start - self.latest > HISTORY_MS:
                # Back after a quiet week: a new visitor again. Decided by the user's own
                # events, so replay (which never forgets) and live (which drops a quiet
                # user's state, `forget_before`) compute the same features.
                self.reset()
            if self.session >= 0:
                self.past_sessions += 1
                self.previous_latest = self.latest
            self.session = session_index
            self.start = session_start
            self.latest = session_start
            self.views = self.product_views = self.cart_adds = self.cart_removes = 0
            self.checkouts = self.pricing_views = self.dwell_ms = self.events = 0
            self.products = []
            self.purchased = self.fired = False
        ts = event.ts
        self.latest = max(self.latest, ts)
        self.events += 1
        kind = event.type
        if kind == "page_view":
            self.views += 1
            page_type = event.page_type
            if page_type == "product":
                self.product_views += 1
                product = event.product_id
                if product is not None and product not in self.products:
                    self.products.append(product)
            elif page_type == "pricing":
                self.pricing_views += 1
        elif kind == "page_leave":
            self.dwell_ms += event.dwell_ms or 0
        elif kind == "add_to_cart":
            self.cart_adds += 1
        elif kind == "remove_from_cart":
            self.cart_removes += 1
        elif kind == "checkout_started":
            self.checkouts += 1
        elif kind == "purchase":
            self.purchased = True
            self.past_purchases += 1
            self.last_purchase = max(self.last_purchase, ts)

    def vector(
        self,
        ts: int,
        *,
        cart_value: float,
        cart_items: int,
        zone: str,
        events_this_hour: int,
        events_today: int,
    ) -> tuple[float, ...]:
        """The features at the event with time `ts`, in the order of `FEATURES`."""
        last_purchase = self.last_purchase
        previous = self.previous_latest
        return (
            float(self.views),
            float(self.product_views),
            float(len(self.products)),
            float(self.cart_adds),
            float(self.cart_removes),
            float(self.checkouts),
            float(self.pricing_views),
            self.dwell_ms / 1000.0,
            float(self.events),
            max(0, ts - self.start) / MS_PER_MINUTE,
            float(cart_value),
            float(cart_items),
            float(local_hour(ts, zone)),
            float(self.past_sessions),
            float(self.past_purchases),
            -1.0 if last_purchase < 0 else max(0, ts - last_purchase) / MS_PER_HOUR,
            -1.0 if previous < 0 else max(0, ts - previous) / MS_PER_HOUR,
            float(events_this_hour),
            float(events_today),
        )

    def forget_before(self, watermark: int) -> None:
        """Drop the history of a user quiet since before `watermark - HISTORY_MS`."""
        if self.session >= 0 and self.latest < watermark - HISTORY_MS:
            self.reset()

    @property
    def empty(self) -> bool:
        return self.session < 0

    def to_data(self) -> list[Any]:
        return [getattr(self, name) for name in _FIELDS]

    @classmethod
    def from_data(cls, data: list[Any]) -> IntentState:
        state = cls()
        for name, value in zip(_FIELDS, data, strict=True):
            setattr(state, name, value)
        state.products = list(state.products)
        return state

"""The intent model on public data: `python -m nudgeflow.bench.intent_ecom [--json FILE]`.

Reads the `ecom` clickstream that the `retentioneering` wheel on PyPI ships
(six months of a synthetic electronics shop, 600 users, ~31,000 events,
written by the retentioneering authors): `pip download` puts the wheel in an
ignored cache folder (`bench/cache/`), the CSV is read from inside the wheel's
zip, converted to nudgeflow events and trained on with `nudgeflow model train`
(the earlier sessions train, the later ones, about the last two months,
evaluate). Nothing of it is committed.

The conversion (the dataset has no product ids, prices or dwell times):

| ecom event | nudgeflow event |
|---|---|
| `home` | `page_view` `home` |
| `catalog`, `search`, `filter_results` | `page_view` `category` |
| `product_view` | `page_view` `product`, product `unknown` |
| `promo_page` | `page_view` `pricing` |
| `cart` | `page_view` `cart` |
| `shipping_details`, `payment_details` | `checkout_started` |
| `add_to_cart` | `add_to_cart` of product `unknown` |
| `purchase` | `purchase` |
| anything else | `page_view` `other` |

Timestamps are read as UTC. So `session_distinct_products`, `cart_value` and
`session_dwell_s` carry nothing here; the model learns from the rest.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson

from nudgeflow.app.intent.command import run_train
from nudgeflow.app.intent.train import TrainConfig
from nudgeflow.core.errors import InputFileError

PACKAGE: Final = "retentioneering==5.2.4"
DATA_FILE: Final = "retentioneering/datasets/ecom.csv.gz"
CACHE: Final = Path("bench/cache")

_PAGES: Final = {
    "home": "home", "catalog": "category", "search": "category",
    "filter_results": "category", "product_view": "product", "promo_page": "pricing",
    "cart": "cart",
}
_CHECKOUT: Final = frozenset({"shipping_details", "payment_details"})


def fetch_wheel(cache: Path = CACHE) -> Path:
    """The retentioneering wheel, downloaded into `cache` once (pip, no dependencies)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("retentioneering-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", str(cache), PACKAGE], check=True)
        found = sorted(cache.glob("retentioneering-*.whl"))
    if not found:
        msg = f"pip download {PACKAGE} left no wheel in {cache}"
        raise InputFileError(msg)
    return found[-1]


def read_rows(wheel: Path) -> list[dict[str, str]]:
    with zipfile.ZipFile(wheel) as archive:
        text = gzip.decompress(archive.read(DATA_FILE)).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def to_events(rows: Sequence[dict[str, str]]) -> Iterator[dict[str, Any]]:
    """The rows as nudgeflow events, in time order (the arrival order of a tracker)."""
    stamped = []
    for number, row in enumerate(rows):
        moment = datetime.strptime(row["timestamp"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        stamped.append((int(moment.timestamp() * 1000), number, row))
    stamped.sort(key=lambda item: (item[0], item[1]))
    for ts, number, row in stamped:
        kind = row["event"]
        event: dict[str, Any] = {"event_id": f"ecom-{number}", "user_id": row["user_id"],
                                 "ts": ts, "session_id": row["session_id"]}
        if kind == "add_to_cart":
            event.update(type="add_to_cart", product_id="unknown")
        elif kind == "purchase":
            event.update(type="purchase")
        elif kind in _CHECKOUT:
            event.update(type="checkout_started")
        else:
            page = _PAGES.get(kind, "other")
            event.update(type="page_view", page_type=page)
            if page == "product":
                event["product_id"] = "unknown"
        yield event


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nudgeflow.bench.intent_ecom",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--json", type=Path, default=Path("bench/results/intent-ecom.json"))
    parser.add_argument("--test-share", type=float, default=1 / 3)
    args = parser.parse_args(argv)
    rows = read_rows(fetch_wheel(args.cache))
    events = args.cache / "ecom-events.jsonl"
    with events.open("wb") as handle:
        for event in to_events(rows):
            handle.write(orjson.dumps(event) + b"\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    print(f"{len(rows)} ecom rows from {PACKAGE} -> {events}", file=sys.stderr)
    return run_train(events, args.cache / "ecom-model.json", eval_json=args.json,
                     config=TrainConfig(test_share=args.test_share, version="ecom"))


if __name__ == "__main__":
    sys.exit(main())

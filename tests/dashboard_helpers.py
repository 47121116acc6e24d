"""What the dashboard's tests share: the browser, reading the page and /metrics, and the
experiment arms' decisions and conversions recorded through the real `Metrics`.

The browser is Debian's chromium driven through Debian's chromedriver
(`/usr/bin/…`, scripts/test.sh installs both); nothing downloads a browser.
Without them the browser tests skip, and fail under CI.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from nudgeflow.core.dashboard import histogram_quantile
from nudgeflow.core.metrics import Metrics
from nudgeflow.core.outcomes import HOLDOUT_ARM, TREATMENT_ARM, Outcome
from nudgeflow.core.policies import Assignment
from nudgeflow.core.triggers import Decision, Trigger

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
NO_VALUE = "\u2013"  # the page's en dash for "nothing measured"
WAIT_S = 20  # the page polls every 2 s; a loaded CI machine may be slow to start chromium

Labels = frozenset[tuple[str, str]]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no"}


def chromium() -> Iterator[webdriver.Chrome]:
    """A headless chromium for a module's `browser` fixture (`yield from chromium()`)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"{', '.join(missing)} missing: apt-get install chromium chromium-driver"
        if _in_ci():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1300,1900"):
        options.add_argument(flag)
    # The driver's path is given: Selenium Manager (which could download one) is not run.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def artifacts_dir() -> Path:
    """Where screenshots are kept: `artifacts/` (ignored by git) or `$NUDGEFLOW_ARTIFACTS`."""
    folder = Path(os.environ.get("NUDGEFLOW_ARTIFACTS", ROOT / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def scrape(base: str) -> dict[str, dict[Labels, float]]:
    """`/metrics` parsed: sample name -> {labels: value}."""
    return _parsed(httpx.get(f"{base}/metrics").text)


def scrape_registry(registry: CollectorRegistry) -> dict[str, dict[Labels, float]]:
    """What `/metrics` would serve of `registry` now, parsed as `scrape` parses it."""
    return _parsed(generate_latest(registry).decode())


def _parsed(text: str) -> dict[str, dict[Labels, float]]:
    out: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name][frozenset(sample.labels.items())] = sample.value
    return out


def total(samples: dict[Labels, float], **where: str) -> float:
    want = set(where.items())
    return sum(v for labels, v in samples.items() if want <= labels)


def label_values(samples: dict[Labels, float], label: str) -> set[str]:
    return {value for labels in samples for name, value in labels if name == label}


# Everything the page shows, read in one synchronous script: the page re-renders its
# tables every poll, so cells read one by one could come from two renders (or vanish).
_SNAPSHOT_JS = """
const out = {};
for (const el of document.querySelectorAll("[id]")) {
  out["#" + el.id] = el.innerText;
  if (el.offsetParent === null && el.tagName !== "BODY") out["#" + el.id + ":hidden"] = "";
}
for (const td of document.querySelectorAll("table[id] td[data-col]")) {
  const tr = td.parentElement;
  const keys = Object.entries(tr.dataset).map(([k, v]) => `${k}=${v}`).sort().join(",");
  out[`${tr.closest("table").id}[${keys}].${td.dataset.col}`] = td.innerText;
}
return out;
"""


class Page:
    """The text of every element with an id and of every table cell, at one instant."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.texts: dict[str, str] = driver.execute_script(_SNAPSHOT_JS)

    def __getitem__(self, element_id: str) -> str:
        return self.texts[f"#{element_id}"]

    def hidden(self, element_id: str) -> bool:
        return f"#{element_id}:hidden" in self.texts

    def cell(self, table: str, col: str, **row: str) -> str:
        keys = ",".join(f"{k}={v}" for k, v in sorted(row.items()))
        return self.texts[f"{table}[{keys}].{col}"]

    def rows(self, table: str, key: str) -> set[str]:
        """The values of the rows' `data-KEY` attribute in `table`."""
        found = set()
        for name in self.texts:
            if name.startswith(f"{table}["):
                for pair in name[len(table) + 1:name.index("]")].split(","):
                    k, _, v = pair.partition("=")
                    if k == key:
                        found.add(v)
        return found


def number(shown: str) -> float:
    return float(shown.replace(",", "").removesuffix(" ms").removesuffix("%").lstrip("+"))


def open_and_wait(driver: webdriver.Chrome, url: str, after_ms: int) -> None:
    """Load the page and wait until it shows a summary computed at or after `after_ms`."""
    driver.get(url)
    wait_until_updated(driver, after_ms)


def wait_until_updated(driver: webdriver.Chrome, after_ms: int) -> None:
    def updated(d: webdriver.Chrome) -> bool:
        at = d.find_element(By.ID, "updated").get_attribute("data-at")
        return bool(at) and int(at) >= after_ms

    WebDriverWait(driver, WAIT_S).until(updated)


def shown_ms(q: float, buckets: dict[float, float]) -> str:
    value = histogram_quantile(q, buckets)
    return NO_VALUE if value is None else f"{value * 1000:.1f} ms"


def buckets(scraped: dict[str, dict[Labels, float]], histogram: str, rule: str | None = None,
            **where: str) -> dict[float, float]:
    """A histogram's cumulative buckets from a scrape, summed over the other labels."""
    out: dict[float, float] = defaultdict(float)
    for labels, value in scraped[f"{histogram}_bucket"].items():
        found = dict(labels)
        if rule in (None, found["rule"]) and all(found[k] == v for k, v in where.items()):
            out[float(found["le"])] += value
    return dict(out)


def latency_buckets(scraped: dict[str, dict[Labels, float]], rule: str | None = None
                    ) -> dict[float, float]:
    """The event-to-dispatch latency the page shows: measured from the source's read."""
    return buckets(scraped, "nudgeflow_event_to_dispatch_seconds", rule, since="source_read")


def _experiment_metadata(variant: str) -> dict[str, Any]:
    """What the detector puts in a trigger's metadata for experiment arm `variant` (arm_of)."""
    if not variant:
        return {}
    if variant == HOLDOUT_ARM:
        assignment = Assignment("exp", None, holdout=True)
    else:
        assignment = Assignment("exp", None if variant == TREATMENT_ARM else variant,
                                holdout=False)
    return {"experiment": assignment.to_json()}


def record_arm(
    m: Metrics, rule: str, variant: str, *, dispatched: int = 0,
    suppressed: Mapping[str, int] | None = None, converted: int = 0, cart_recovered: int = 0,
    value_each: float | None = None,
) -> None:
    """Decisions and conversions of one experiment arm, recorded as the flow records them.

    Through the real `Metrics.record_decision` / `record_outcome`, with triggers
    that carry the detector's experiment metadata, so that the series, their
    labels and the arm's name are the flow's own and cannot drift from them.
    """
    metadata = _experiment_metadata(variant)
    reasons = [None] * dispatched + [r for r, n in (suppressed or {}).items() for _ in range(n)]
    for i, reason in enumerate(reasons):
        trigger = Trigger(trigger_id=f"{rule}-{variant}-{i}", trigger_type=rule,
                          user_id=f"u{i}", fired_at_ms=1_000, detected_at_ms=1_000,
                          segment="new", metadata=metadata)
        m.record_decision(Decision(trigger, "dispatched" if reason is None else "suppressed",
                                   reason, channel="email" if reason is None else None))
    for i in range(converted):
        m.record_outcome(Outcome(
            trigger_id=f"{rule}-{variant}-{i}", trigger_type=rule, user_id=f"u{i}",
            fired_at_ms=1_000, ts_ms=2_000, value=value_each, variant=variant,
            cart_recovered=i < cart_recovered,
        ))

"""`nudgeflow demo --serve`: the run's numbers are on the dashboard it keeps up until Ctrl-C."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

STARTUP_S = 60  # the demo's run on a loaded CI machine
EVENTS = re.compile(r"events: (\d+) applied, (\d+) duplicate, (\d+) late, (\d+) invalid")
DECISION = re.compile(r"^\s+(\w+)\s+(dispatched|suppressed \((\w+)\))\s+(\d+)$")
URL = re.compile(r"^dashboard: (http://\S+/dashboard) \(Ctrl-C to stop\)$")


class Demo:
    """The demo in a subprocess, its stdout read line by line as it comes."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nudgeflow.cli", "demo", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def until(self, pattern: re.Pattern[str]) -> re.Match[str]:
        while True:
            line = self.lines.get(timeout=STARTUP_S)
            assert line is not None, f"the demo ended first: {self.seen}"
            self.seen.append(line)
            found = pattern.search(line)
            if found:
                return found


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    return tmp_path / "demo"


@pytest.fixture
def demo(out_dir: Path) -> Iterator[Demo]:
    running = Demo("--users", "120", "--hours", "1", "--serve", "--port", "0",
                   "--out-dir", str(out_dir))
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
        running.process.wait(timeout=10)
        running.reader.join(timeout=10)  # it has read to the end: the pipe can close
        assert running.process.stdout is not None
        running.process.stdout.close()


def test_the_dashboard_shows_the_demos_run_until_ctrl_c(demo: Demo, out_dir: Path) -> None:
    url = demo.until(URL).group(1)
    applied, duplicate, late, invalid = (int(n) for n in EVENTS.search(
        "\n".join(demo.seen)).groups())  # type: ignore[union-attr]
    decisions: Counter[tuple[str, str]] = Counter()
    for line in demo.seen:
        found = DECISION.match(line)
        if found:
            decisions[(found.group(1), found.group(3) or "dispatched")] += int(found.group(4))
    assert decisions, demo.seen

    page = httpx.get(url)
    assert page.status_code == 200 and "nudgeflow: live" in page.text
    assert httpx.get(url.removesuffix("/dashboard") + "/readyz").status_code == 200
    summary = httpx.get(f"{url}.json").json()
    assert summary["events"]["by_outcome"] == {"applied": applied, "duplicate": duplicate,
                                               "late": late}
    assert summary["dead_letters"].get("invalid", 0) == invalid
    shown: Counter[tuple[str, str]] = Counter()
    for row in summary["triggers"]:
        shown[(row["rule"], "dispatched")] += row["dispatched"]
        for reason, n in row["suppressed"].items():
            shown[(row["rule"], reason)] += n
        assert row["delivered"] == row["dispatched"]  # the loopback API accepted every one
    assert +shown == decisions
    # The dispatches caused by an event are timed from the read of its line.
    assert 0 < summary["latency"]["count"] <= sum(r["delivered"] for r in summary["triggers"])
    check_arms_match_the_report(summary["experiments"],
                                orjson.loads((out_dir / "report.json").read_bytes()))

    demo.process.send_signal(signal.SIGINT)
    assert demo.process.wait(timeout=15) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


def check_arms_match_the_report(experiments: dict[str, Any], report: dict[str, Any]) -> None:
    """Each (rule, arm) of the dashboard is the same arm of `nudgeflow report` over the
    run's own files (`report.json`, from triggers.jsonl and outcomes.jsonl)."""
    assert experiments["available"], "the demo's run converted some triggers"
    expected = {}
    for rule, entry in report["rules"].items():
        for variant, arm in entry.get("variants", {"": entry}).items():
            expected[(rule, variant)] = arm
    shown = {(row["rule"], row["variant"]): row for row in experiments["variants"]}
    assert set(shown) == set(expected)
    compared = 0
    for key, row in shown.items():
        arm = expected[key]
        assert row["attributed"] == arm["attributed"], key
        assert row["converted"] == arm["converted"], key
        assert row["outcomes"].get("cart_recovered", 0) == (arm["cart_recovered"] or 0), key
        assert row["revenue"] == pytest.approx(arm["revenue"], abs=0.005), key
        for field in ("conversion_rate", "lift", "relative_lift"):
            # the report rounds to 6 places
            want = arm.get(field)
            assert (row[field] is None) == (want is None), (key, field)
            if want is not None:
                assert row[field] == pytest.approx(want, abs=5e-7), (key, field)
        compared += arm.get("lift") is not None
    assert compared, "an arm compared with its holdout"


def test_a_busy_port_is_one_line_and_exit_2() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "nudgeflow.cli", "demo", "--users", "5", "--hours", "0.1",
             "--serve", "--port", str(port)],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"nudgeflow: error: cannot serve the dashboard on 127.0.0.1:{port}: "
        "Address already in use"
    ]
    assert result.stdout == ""  # refused before the run, not after it

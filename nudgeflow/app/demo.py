"""`nudgeflow demo`: the embedded default, with no Kafka or Redis.

It generates the bundled sample shop (a deterministic, seeded stream of a few
thousand customers over a few hours, `nudgeflow.app.samples`), replays it through
the real dataflow in replay mode, sends every dispatched trigger to the
reference dispatch API running in-process on loopback, and prints what fired
and what it achieved: the report of `nudgeflow report` over the decisions and
outcomes. The demo's rules are the default ones with two experiments added
(`demo_rules`), so the report has lifts to show: the sample shop's shoppers do
not read messages, so an honest report finds no significant difference and
says how many more triggers it would take.

With `serve`, the run counts in the Prometheus registry as a live run does,
the health server (`/dashboard`, `/metrics`) starts before it, and after the
report its URL is printed and it stays up until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

from nudgeflow.app.replay import ReplaySummary, run_replay
from nudgeflow.app.report import report_files, table_lines, write_csv, write_json
from nudgeflow.app.samples import SampleSpec, write_sample
from nudgeflow.core.errors import UsageError
from nudgeflow.core.observability import Health, serve_health
from nudgeflow.core.rules import ExperimentConfig, RulesConfig, load_rules
from nudgeflow.core.settings import DEFAULT_RULES, DispatchSettings
from nudgeflow.dispatch_api.server import ServerThread, create_app
from nudgeflow.sinks.dispatch import DispatchSink


@contextmanager
def _workdir(out_dir: Path | None) -> Iterator[Path]:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        yield out_dir
        return
    with tempfile.TemporaryDirectory(prefix="nudgeflow-demo-") as tmp:
        yield Path(tmp)


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


# The experiments the demo runs on top of the default rules.
DEMO_EXPERIMENTS = {
    "cart_abandonment": ExperimentConfig.model_validate({
        "name": "cart_reminder_timing", "holdout": 0.2,
        "variants": [{"name": "now"}, {"name": "after_1h", "delay": "1h"}],
    }),
    "browse_abandonment": ExperimentConfig.model_validate(
        {"name": "browse_reminder", "holdout": 0.2}
    ),
}


def demo_rules() -> RulesConfig:
    """The default rules with `DEMO_EXPERIMENTS` added (each one validated when built)."""
    config = load_rules(DEFAULT_RULES)
    rules = [
        rule.model_copy(update={"experiment": DEMO_EXPERIMENTS[rule.name]})
        if rule.name in DEMO_EXPERIMENTS else rule
        for rule in config.rules
    ]
    return config.model_copy(update={"rules": rules})


def _start_dashboard(host: str, port: int) -> tuple[ThreadingHTTPServer, Health, str]:
    health = Health()
    try:
        server = serve_health(health, host, port)
    except OSError as exc:
        msg = f"cannot serve the dashboard on {host}:{port}: {exc.strerror or exc}"
        raise UsageError(msg) from None
    shown = f"[{host}]" if ":" in host else host
    return server, health, f"http://{shown}:{server.server_address[1]}/dashboard"


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM (a container stop)."""
    stop = threading.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in signals}
    try:
        stop.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_demo(
    *, users: int = 3000, hours: float = 4.0, workers: int = 1, out_dir: Path | None = None,
    serve: bool = False, host: str = "127.0.0.1", port: int = 9100,
) -> int:
    spec = SampleSpec(users=users, hours=hours)
    dashboard = _start_dashboard(host, port) if serve else None
    try:
        _run(spec, workers, out_dir, record_metrics=serve)
        if dashboard is None:
            return 0
        _, health, url = dashboard
        health.detail = "demo run finished"
        health.ready.set()
        print(f"\ndashboard: {url} (Ctrl-C to stop)", flush=True)
        _wait_for_stop()
        return 0
    finally:
        if dashboard is not None:
            dashboard[0].shutdown()
            dashboard[0].server_close()


def _run(spec: SampleSpec, workers: int, out_dir: Path | None, *, record_metrics: bool) -> None:
    users, hours = spec.users, spec.hours
    with _workdir(out_dir) as work:
        events, profiles = write_sample(work, spec)
        api_log = work / "dispatch-api.jsonl"
        delivered = work / "dispatch-outcomes.jsonl"
        started = time.perf_counter()
        app = create_app(log_path=api_log, outcomes_log=delivered)
        with ServerThread(app) as api:
            sink = DispatchSink(DispatchSettings(url=api.url, timeout_s=2.0))
            summary = run_replay(
                events, work / "triggers.jsonl", profiles=profiles, rules=demo_rules(),
                workers=workers, dispatch=sink, outcomes=work / "outcomes.jsonl",
                record_metrics=record_metrics,
            )
            # Deliver what is due before the API stops (its thread finishes its own round).
            while app.state.scheduler.run_once():
                pass
        elapsed = time.perf_counter() - started
        received = _count_lines(api_log) if api_log.exists() else 0
        _print_report(
            summary, users, hours, received=received, elapsed=elapsed, lines=_count_lines(events)
        )
        report = report_files(work / "triggers.jsonl", work / "outcomes.jsonl", delivered)
        print()
        print("what the triggers achieved (nudgeflow report: a purchase within 24 h converts; "
              "meas = measured triggers):")
        for line in table_lines(report):
            print(line)
        if out_dir is not None:
            write_json(report, work / "report.json")
            write_csv(report, work / "report.csv")
        if out_dir is not None:
            print(f"\nfiles kept in {work}", file=sys.stdout)


def _print_report(
    summary: ReplaySummary, users: int, hours: float, *, received: int, elapsed: float, lines: int
) -> None:
    print(f"nudgeflow demo: {users} shoppers, {hours:g} h of events ({lines} lines), "
          f"replayed in {elapsed:.1f} s")
    print()
    for line in summary.lines():
        print(line)
    dispatched = sum(n for (_, d, _), n in summary.decisions.items() if d == "dispatched")
    print()
    print(f"dispatch API on loopback accepted {received} of {dispatched} dispatched triggers")

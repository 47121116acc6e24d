"""`nudgeflow demo`: the embedded default, with no Kafka or Redis.

It generates the bundled sample shop (a deterministic, seeded stream of a few
thousand customers over a few hours, `nudgeflow.app.samples`), replays it through
the real dataflow in replay mode, sends every dispatched trigger to the
reference dispatch API running in-process on loopback, and prints what fired.

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
from nudgeflow.app.samples import SampleSpec, write_sample
from nudgeflow.core.errors import UsageError
from nudgeflow.core.observability import Health, serve_health
from nudgeflow.core.settings import DispatchSettings
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
        started = time.perf_counter()
        with ServerThread(create_app(log_path=api_log)) as api:
            sink = DispatchSink(DispatchSettings(url=api.url, timeout_s=2.0))
            summary = run_replay(
                events, work / "triggers.jsonl", profiles=profiles, workers=workers,
                dispatch=sink, record_metrics=record_metrics,
            )
        elapsed = time.perf_counter() - started
        received = _count_lines(api_log) if api_log.exists() else 0
        _print_report(
            summary, users, hours, received=received, elapsed=elapsed, lines=_count_lines(events)
        )
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

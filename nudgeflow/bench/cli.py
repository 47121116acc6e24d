"""`nudgeflow bench [--quick] [--json FILE]`: `bench_main(argv)` returns the exit code.

`nudgeflow bench --collector [--smoke] [--runs R] [--json FILE]` measures the
collector instead (`nudgeflow.bench.collector`).

Needs the services of `scripts/services.sh up` (KAFKA_BOOTSTRAP, REDIS_URL in
the environment, or `--brokers` / `--redis-url`). Prints progress and the table
on stderr / stdout; `--json` writes every number with its runs and the machine,
and the latency sweep's plot next to it (`FILE` with `.png`, or `--plot PNG`;
needs matplotlib, the `bench` extra: without it the plot is skipped with a
message).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from nudgeflow.app.argtypes import EXIT_USAGE, OneLineParser, positive_float, positive_int
from nudgeflow.core.errors import NudgeflowError


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="nudgeflow bench", description=(
        "Throughput against a plain-consumer ceiling, event-to-dispatch latency, timer lag "
        "and state per user, on the real Kafka and Redis of scripts/services.sh."
    ))
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="200k-event topic, capped runs: under 5 minutes (default: the full "
                           "run, about 40 minutes)")
    size.add_argument("--smoke", action="store_true",
                      help="every phase at its smallest, 1 round: checks that the bench works "
                           "(CI), its numbers mean nothing")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path,
                   help="the latency sweep's PNG (default: the --json file with .png)")
    p.add_argument("--brokers", help="Kafka bootstrap (default: $KAFKA_BOOTSTRAP)")
    p.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL); the bench uses "
                                       "database --redis-db of that server")
    p.add_argument("--redis-db", type=int, help="Redis database for the profiles (default 15)")
    p.add_argument("--users", type=positive_int, help="shoppers in the generated stream")
    p.add_argument("--runs", type=positive_int, help="runs per measure (default 3)")
    p.add_argument("--max-events", type=positive_int, help="events per flow run, at most")
    p.add_argument("--max-seconds", type=positive_float,
                   help="seconds per flow run from its first read, at most")
    p.add_argument("--latency-seconds", type=positive_float, help="seconds per paced segment")
    p.add_argument("--memory-users", type=positive_int, help="users of the memory measure")
    p.add_argument("--memory-clones", type=positive_int,
                   help="copy the memory measure's states to this many times the users")
    p.add_argument("--memory-runs", type=positive_int, help="runs of the memory measure")
    p.add_argument("--levers", action="store_true",
                   help="instead: measure the levers of issue 4 (nudgeflow/bench/levers.py)")
    p.add_argument("--collector", action="store_true",
                   help="instead: the collector's events/s in batches and p99 of single "
                        "events, on one core (nudgeflow/bench/collector.py); Kafka only")
    p.add_argument("--intent", action="store_true",
                   help="instead: the high_intent rule's cost per scored event "
                        "(nudgeflow/bench/intent.py; needs no services)")
    p.add_argument("--intent-ecom", action="store_true",
                   help="instead: train and evaluate the intent model on the public ecom "
                        "clickstream (nudgeflow/bench/intent_ecom.py; needs nudgeflow[train])")
    return p


def bench_main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.intent or args.intent_ecom:
        return _intent(args)
    bootstrap = args.brokers or os.environ.get("KAFKA_BOOTSTRAP", "").strip()
    redis_url = args.redis_url or os.environ.get("REDIS_URL", "").strip()
    if args.collector:
        return _collector(args, bootstrap)
    if not bootstrap or not redis_url:
        print("nudgeflow bench: error: needs Kafka and Redis: run "
              "'eval \"$(scripts/services.sh up)\"' or pass --brokers and --redis-url",
              file=sys.stderr)
        return EXIT_USAGE
    from nudgeflow.bench import harness

    config = harness.QUICK if args.quick else harness.SMOKE if args.smoke else harness.FULL
    overrides = {
        "users": args.users, "runs": args.runs, "max_events": args.max_events,
        "max_seconds": args.max_seconds,
        "latency_seconds": args.latency_seconds, "memory_users": args.memory_users,
        "memory_clones": args.memory_clones, "memory_runs": args.memory_runs,
        "redis_db": args.redis_db,
    }
    config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
    try:
        if args.levers:
            from nudgeflow.bench import levers

            result = levers.run(config, bootstrap=bootstrap, redis_url=redis_url)
            print(levers.render(result))
        else:
            result = harness.run(config, bootstrap=bootstrap, redis_url=redis_url)
            plot_path = args.plot or (args.json.with_suffix(".png") if args.json else None)
            if plot_path is not None:
                _plot(result, plot_path)
            print(harness.render(result))
    except NudgeflowError as exc:
        print(f"nudgeflow bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return _write_json(result, args.json)


def _write_json(result: Any, path: Path | None) -> int:
    """The result as indented JSON at `path` (when given); the command's exit code."""
    if path is not None:
        try:
            path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as exc:
            print(f"nudgeflow bench: error: cannot write {path}: {exc.strerror}",
                  file=sys.stderr)
            return EXIT_USAGE
    return 0


def _collector(args: argparse.Namespace, bootstrap: str) -> int:
    if not bootstrap:
        print("nudgeflow bench: error: needs Kafka: run 'eval \"$(scripts/services.sh up)\"' "
              "or pass --brokers", file=sys.stderr)
        return EXIT_USAGE
    from nudgeflow.bench import collector

    config = collector.SMOKE if args.smoke else collector.QUICK
    if args.runs is not None:
        config = replace(config, runs=args.runs)
    try:
        result = collector.run(config, bootstrap=bootstrap)
    except NudgeflowError as exc:
        print(f"nudgeflow bench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(collector.render(result))
    return _write_json(result, args.json)


def _intent(args: argparse.Namespace) -> int:
    """The intent model's benches: no Kafka or Redis, so they run before that check."""
    if args.intent_ecom:
        from nudgeflow.bench import intent_ecom

        return intent_ecom.main([] if args.json is None else ["--json", str(args.json)])
    from nudgeflow.bench import intent

    options = [] if args.json is None else ["--json", str(args.json)]
    if args.users is not None:
        options += ["--users", str(args.users)]
    if args.runs is not None:
        options += ["--runs", str(args.runs)]
    return intent.main(options)


def _plot(result: dict[str, Any], path: Path) -> None:
    from nudgeflow.bench.plot import plot

    try:
        problem = plot(result, path)
    except (OSError, ValueError) as exc:
        problem = f"cannot write {path}: {exc}"
    result["plot"] = None if problem else str(path)
    result["plot_note"] = problem
    if problem:
        print(f"nudgeflow bench: plot skipped: {problem}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(bench_main())

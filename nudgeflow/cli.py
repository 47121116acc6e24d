"""The `nudgeflow` command. Every failure the user can fix is one line on stderr and exit 2.

    nudgeflow replay EVENTS.jsonl --out TRIGGERS.jsonl [--profiles P] [--rules R]
                     [--workers N] [--dead-letter DLQ.jsonl] [--outcomes OUTCOMES.jsonl]
    nudgeflow replay RECORDING --to-topic T [--speed X | --as-fast-as-possible]
    nudgeflow record --topic T --out FILE [--from-offset N] [--to-offset N]
                     [--from-time TS] [--to-time TS]
    nudgeflow run [--brokers B] [--topic T] [--dispatch-url U] [--redis-url R] [--workers N]
                  [--processes P | --process-id I --addresses A,B] [--recovery-dir D]
    nudgeflow explain --user U EVENTS.jsonl [--profiles P] [--rules R]
    nudgeflow report TRIGGERS.jsonl OUTCOMES.jsonl [MORE_OUTCOMES…] [--json F] [--csv F] [--png F]
    nudgeflow report --from-topics [--brokers B] [--json F] [--csv F] [--png F]
    nudgeflow bench [--quick] [--json FILE]
    nudgeflow demo [--users N] [--hours H] [--workers N] [--serve [--host H] [--port P]]
    nudgeflow dispatch-api [--host H] [--port P] [--log FILE]
    nudgeflow collect [--host H] [--port P] [--brokers B] [--topic T] [--write-key KEY]…
                      [--redis-url R]
    nudgeflow rules check FILE
    nudgeflow model train EVENTS.jsonl --out MODEL [--profiles P] [--eval-json FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nudgeflow.app.argtypes import (
    EXIT_USAGE,
    OneLineParser,
    port_number,
    positive_float,
    positive_int,
)
from nudgeflow.core.errors import NudgeflowError, UsageError


def _timestamp(text: str) -> int:
    from nudgeflow.core.events import parse_ts

    try:
        return parse_ts(int(text) if text.lstrip("-").isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="nudgeflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    replay = commands.add_parser("replay", help="run a recorded event file through the flow")
    replay.add_argument("events", type=Path, help="events JSONL (or a recording), arrival order")
    replay.add_argument("--out", type=Path, help="triggers JSONL to write")
    replay.add_argument("--to-topic", help="produce the file to this Kafka topic instead")
    replay.add_argument("--brokers", help="with --to-topic [NUDGEFLOW_KAFKA__BOOTSTRAP]")
    pace = replay.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=positive_float, default=1.0,
                      help="with --to-topic: X times faster than recorded (default 1)")
    pace.add_argument("--as-fast-as-possible", action="store_true",
                      help="with --to-topic: no pauses between messages")
    replay.add_argument("--profiles", type=Path, help="profiles JSONL (user_id + fields)")
    replay.add_argument("--rules", type=Path, help="rules file (default: config/rules.yaml)")
    replay.add_argument("--workers", type=positive_int, default=1, help="bytewax workers")
    replay.add_argument(
        "--dead-letter", type=Path, help="dead-letter JSONL (default: next to --out)"
    )
    replay.add_argument(
        "--outcomes", type=Path, help="with --out: write each converted trigger's outcome here"
    )
    replay.add_argument("--quiet", action="store_true", help="no summary on stderr")

    run = commands.add_parser("run", help="live: Kafka in, dispatch API out")
    run.add_argument("--brokers", help="Kafka bootstrap servers [NUDGEFLOW_KAFKA__BOOTSTRAP]")
    run.add_argument("--topic", help="input topic [NUDGEFLOW_KAFKA__INPUT_TOPIC]")
    run.add_argument("--dead-letter-topic", help="[NUDGEFLOW_KAFKA__DEAD_LETTER_TOPIC]")
    run.add_argument("--dispatch-url", help="dispatch API base URL [NUDGEFLOW_DISPATCH__URL]")
    run.add_argument(
        "--redis-url", help="profiles Redis URL, 'none' to skip [NUDGEFLOW_REDIS__URL]"
    )
    run.add_argument("--rules", type=Path, help="rules file [NUDGEFLOW_RULES]")
    run.add_argument("--workers", type=positive_int, help="workers per process [NUDGEFLOW_WORKERS]")
    run.add_argument(
        "--start-at", choices=("beginning", "end"), default="beginning",
        help="where to start reading the input topic (without recovery state)",
    )
    run.add_argument("--processes", type=positive_int, default=1,
                     help="start this many local processes as one cluster")
    run.add_argument("--process-id", type=int, help="this process's index in a cluster")
    run.add_argument("--addresses", help="host:port of every process, comma-separated")
    run.add_argument("--recovery-dir", type=Path,
                     help="snapshot state here; created when absent [NUDGEFLOW_RECOVERY_DIR]")
    run.add_argument("--snapshot-interval", type=positive_float,
                     help="seconds between snapshots [NUDGEFLOW_SNAPSHOT_INTERVAL_S]")

    _add_demo_command(commands)

    _add_api_command(commands)
    _add_collect_command(commands)
    _add_tool_commands(commands)
    rules = commands.add_parser("rules", help="work with rules files")
    rules_commands = rules.add_subparsers(
        dest="rules_command", required=True, parser_class=OneLineParser
    )
    check = rules_commands.add_parser("check", help="validate a rules file")
    check.add_argument("file", type=Path)
    _add_model_commands(commands)
    return parser


def _add_demo_command(commands: Any) -> None:
    demo = commands.add_parser("demo", help="the embedded default: a sample shop, no services")
    demo.add_argument("--users", type=positive_int, default=3000)
    demo.add_argument("--hours", type=float, default=4.0)
    demo.add_argument("--workers", type=positive_int, default=1)
    demo.add_argument("--out-dir", type=Path, help="keep the sample and outputs here")
    demo.add_argument("--serve", action="store_true",
                      help="then keep the dashboard (/dashboard) up until Ctrl-C")
    demo.add_argument("--host", default="127.0.0.1", help="the dashboard's address (--serve)")
    demo.add_argument("--port", type=port_number, default=9100,
                      help="the dashboard's port (--serve; 0 picks a free one)")


def _add_collect_command(commands: Any) -> None:
    collect = commands.add_parser("collect", help="the HTTP collector trackers send events to")
    collect.add_argument("--host", help="[NUDGEFLOW_COLLECT__HOST] (default 127.0.0.1)")
    collect.add_argument("--port", type=port_number,
                         help="[NUDGEFLOW_COLLECT__PORT] (default 8088)")
    collect.add_argument("--brokers", help="Kafka bootstrap servers [NUDGEFLOW_KAFKA__BOOTSTRAP]")
    collect.add_argument("--topic", help="input topic [NUDGEFLOW_KAFKA__INPUT_TOPIC]")
    collect.add_argument("--dead-letter-topic", help="[NUDGEFLOW_KAFKA__DEAD_LETTER_TOPIC]")
    collect.add_argument("--write-key", action="append", dest="write_keys", metavar="KEY",
                         help="a write key that may send (repeat for more) "
                              "[NUDGEFLOW_COLLECT__WRITE_KEYS, a JSON list]")
    collect.add_argument("--redis-url",
                         help="profiles for identify calls, 'none' to skip [NUDGEFLOW_REDIS__URL]")


def _add_api_command(commands: Any) -> None:
    api = commands.add_parser("dispatch-api", help="the reference dispatch API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=port_number, default=8080)
    api.add_argument("--log", type=Path, help="append each accepted trigger as a JSON line")
    api.add_argument("--outcomes-log", type=Path,
                     help="append each delivery outcome and webhook event (opened, clicked)")
    api.add_argument("--redis-url", help="keep idempotency, status and schedule in Redis")
    api.add_argument("--smtp", help="HOST:PORT of the SMTP server for email")
    api.add_argument("--sms-url", help="SMS provider URL")
    api.add_argument("--push-url", help="push provider URL")
    api.add_argument("--token", help="require this bearer token [NUDGEFLOW_API_TOKEN]")
    api.add_argument("--hmac-secret", help="require HMAC-signed bodies [NUDGEFLOW_API_HMAC_SECRET]")


def _add_model_commands(commands: Any) -> None:
    model = commands.add_parser("model", help="the purchase intent model")
    model_commands = model.add_subparsers(
        dest="model_command", required=True, parser_class=OneLineParser
    )
    train = model_commands.add_parser(
        "train", help="train, evaluate and export an intent model (needs nudgeflow[train])"
    )
    train.add_argument("events", type=Path)
    train.add_argument("--out", type=Path, required=True, help="the model file (JSON)")
    train.add_argument("--profiles", type=Path)
    train.add_argument("--eval-json", type=Path, help="write the evaluation here")
    train.add_argument("--plot", type=Path,
                       help="the reliability plot (default: --eval-json with .png)")
    train.add_argument("--rules", type=Path, help="take lateness and session gap from here")
    train.add_argument("--horizon", default="2h",
                       help="label: a purchase in the session within this (default 2h)")
    train.add_argument("--test-share", type=float, default=0.3,
                       help="share of sessions, the latest, kept to evaluate (default 0.3)")
    train.add_argument("--max-iter", type=positive_int, default=40,
                       help="boosting rounds (default 40: README \"Purchase intent\")")
    train.add_argument("--max-leaf-nodes", type=positive_int, default=15)
    train.add_argument("--model-version", default="custom", help="recorded in the model")
    train.add_argument("--no-progress", action="store_true")


def _add_tool_commands(commands: Any) -> None:
    record = commands.add_parser("record", help="write a Kafka topic's messages to a file")
    record.add_argument("--topic", required=True)
    record.add_argument("--out", type=Path, required=True)
    record.add_argument("--brokers", help="[NUDGEFLOW_KAFKA__BOOTSTRAP]")
    record.add_argument("--from-offset", type=int, help="first offset (every partition)")
    record.add_argument("--to-offset", type=int, help="end offset, exclusive (every partition)")
    record.add_argument("--from-time", type=_timestamp, help="RFC 3339 or epoch ms")
    record.add_argument("--to-time", type=_timestamp, help="RFC 3339 or epoch ms, exclusive")
    record.add_argument("--no-progress", action="store_true")

    explain = commands.add_parser("explain", help="why rules fired or not for one user")
    explain.add_argument("events", type=Path)
    explain.add_argument("--user", required=True)
    explain.add_argument("--profiles", type=Path)
    explain.add_argument("--rules", type=Path)

    report = commands.add_parser(
        "report", help="conversion and experiment lift from decisions and outcomes"
    )
    report.add_argument("triggers", type=Path, nargs="?", help="decisions JSONL (replay --out)")
    report.add_argument("outcomes", type=Path, nargs="*",
                        help="outcomes JSONL: replay --outcomes, dispatch-api --outcomes-log")
    report.add_argument("--from-topics", action="store_true",
                        help="read the decisions and outcomes topics instead, as they stand")
    report.add_argument("--brokers", help="with --from-topics [NUDGEFLOW_KAFKA__BOOTSTRAP]")
    report.add_argument("--decisions-topic",
                        help="with --from-topics [NUDGEFLOW_KAFKA__DECISIONS_TOPIC]")
    report.add_argument("--outcomes-topic",
                        help="with --from-topics [NUDGEFLOW_KAFKA__OUTCOMES_TOPIC]")
    report.add_argument("--json", type=Path, help="also write the report as JSON here")
    report.add_argument("--csv", type=Path, help="also write it as CSV here")
    report.add_argument("--png", type=Path,
                        help="draw conversion by variant here (needs nudgeflow[report])")


def main(argv: Sequence[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    if raw[:1] == ["bench"]:
        # The benchmark harness has its own flags (`nudgeflow bench --help`).
        from nudgeflow.bench.cli import bench_main

        try:
            return bench_main(raw[1:])
        except NudgeflowError as exc:
            print(f"nudgeflow: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    args = _parser().parse_args(raw)
    try:
        return _dispatch(args)
    except NudgeflowError as exc:
        print(f"nudgeflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "replay":
        return _replay(args)
    if args.command == "record":
        from nudgeflow.app.topic_io import Bounds, record_topic
        from nudgeflow.core.settings import load_settings

        settings = load_settings(brokers=args.brokers)
        bounds = Bounds(args.from_offset, args.to_offset, args.from_time, args.to_time)
        count = record_topic(settings.kafka.bootstrap, args.topic, args.out, bounds,
                             progress=not args.no_progress)
        print(f"recorded {count} messages of {args.topic} to {args.out}", file=sys.stderr)
        return 0
    if args.command == "run":
        from nudgeflow.core.settings import load_settings
        from nudgeflow.flows.live import run_live, run_local_cluster

        settings = load_settings(
            brokers=args.brokers, topic=args.topic, dead_letter_topic=args.dead_letter_topic,
            dispatch_url=args.dispatch_url, redis_url=args.redis_url, rules=args.rules,
            workers=args.workers, process_id=args.process_id,
            addresses=args.addresses.split(",") if args.addresses else None,
            recovery_dir=args.recovery_dir, snapshot_interval_s=args.snapshot_interval,
        )
        if args.processes > 1 and settings.process_id is None:
            return run_local_cluster(sys.argv[1:], args.processes)
        run_live(settings, start_at_end=args.start_at == "end")
        return 0
    if args.command == "explain":
        from nudgeflow.app.explain import explain_user

        for line in explain_user(args.events, args.user, profiles=args.profiles,
                                 rules=args.rules):
            print(line)
        return 0
    if args.command == "report":
        return _report(args)
    if args.command == "demo":
        from nudgeflow.app.demo import run_demo

        return run_demo(users=args.users, hours=args.hours, workers=args.workers,
                        out_dir=args.out_dir, serve=args.serve, host=args.host, port=args.port)
    if args.command == "dispatch-api":
        from nudgeflow.dispatch_api.server import serve

        serve(
            args.host, args.port, args.log, redis_url=args.redis_url, smtp=args.smtp,
            sms_url=args.sms_url, push_url=args.push_url,
            # secrets from the environment keep them out of `ps` and shell history
            token=args.token or os.environ.get("NUDGEFLOW_API_TOKEN"),
            hmac_secret=args.hmac_secret or os.environ.get("NUDGEFLOW_API_HMAC_SECRET"),
            outcomes_log=args.outcomes_log,
        )
        return 0
    if args.command == "collect":
        return _collect(args)
    if args.command == "model":
        return _model(args)
    if args.command == "rules":
        from nudgeflow.core.rules import load_rules

        config = load_rules(args.file)
        print(f"{args.file}: ok, {len(config.rules)} rules")
        return 0
    msg = f"unknown command {args.command}"
    raise AssertionError(msg)


def _collect(args: argparse.Namespace) -> int:
    from nudgeflow.collect.server import serve
    from nudgeflow.core.observability import configure_logging
    from nudgeflow.core.settings import load_settings

    settings = load_settings(brokers=args.brokers, topic=args.topic,
                             dead_letter_topic=args.dead_letter_topic, redis_url=args.redis_url)
    update = {name: value for name, value in
              {"host": args.host, "port": args.port, "write_keys": args.write_keys}.items()
              if value is not None}
    if update:
        collect = settings.collect.model_validate({**settings.collect.model_dump(), **update})
        settings = settings.model_copy(update={"collect": collect})
    configure_logging(settings.log_level)
    serve(settings)
    return 0


def _report(args: argparse.Namespace) -> int:
    from nudgeflow.app import report

    files = args.triggers is not None and bool(args.outcomes)
    if files == args.from_topics or (not files and args.triggers is not None):
        msg = "report needs TRIGGERS.jsonl OUTCOMES.jsonl, or --from-topics"
        raise UsageError(msg)
    if args.png is not None:
        from nudgeflow.app.report_chart import check_available

        check_available()  # before reading anything
    if files:
        result = report.report_files(args.triggers, *args.outcomes)
    else:
        from nudgeflow.core.settings import load_settings

        kafka = load_settings(brokers=args.brokers).kafka
        result = report.report_topics(kafka.bootstrap, args.decisions_topic or
                                      kafka.decisions_topic,
                                      args.outcomes_topic or kafka.outcomes_topic)
    for line in report.table_lines(result):
        print(line)
    if args.json is not None:
        report.write_json(result, args.json)
    if args.csv is not None:
        report.write_csv(result, args.csv)
    if args.png is not None:
        from nudgeflow.app.report_chart import write_png

        write_png(result, args.png)
    return 0


def _model(args: argparse.Namespace) -> int:
    from nudgeflow.app.intent.command import run_train
    from nudgeflow.app.intent.train import TrainConfig
    from nudgeflow.core.timeutil import parse_duration_ms

    try:
        horizon = parse_duration_ms(args.horizon)
    except ValueError as exc:
        msg = f"--horizon: {exc}"
        raise UsageError(msg) from None
    if not 0 < args.test_share < 1:
        msg = f"--test-share must be between 0 and 1, got {args.test_share:g}"
        raise UsageError(msg)
    config = TrainConfig(test_share=args.test_share, max_iter=args.max_iter,
                         max_leaf_nodes=args.max_leaf_nodes, version=args.model_version)
    return run_train(args.events, args.out, profiles=args.profiles, eval_json=args.eval_json,
                     plot=args.plot, rules=args.rules, horizon_ms=horizon, config=config,
                     progress=not args.no_progress)


def _replay(args: argparse.Namespace) -> int:
    if (args.out is None) == (args.to_topic is None):
        msg = "replay needs exactly one of --out (run the flow) and --to-topic (produce)"
        raise UsageError(msg)
    if args.to_topic is not None and args.outcomes is not None:
        msg = "--outcomes goes with --out (running the flow), not with --to-topic"
        raise UsageError(msg)
    if args.to_topic is not None:
        from nudgeflow.app.topic_io import replay_to_topic
        from nudgeflow.core.settings import load_settings

        settings = load_settings(brokers=args.brokers)
        count = replay_to_topic(
            args.events, settings.kafka.bootstrap, args.to_topic,
            speed=None if args.as_fast_as_possible else args.speed,
            progress=not args.quiet,
        )
        print(f"produced {count} messages to {args.to_topic}", file=sys.stderr)
        return 0
    from nudgeflow.app.replay import run_replay

    summary = run_replay(
        args.events, args.out, dead_letter=args.dead_letter, profiles=args.profiles,
        rules=args.rules, workers=args.workers, outcomes=args.outcomes,
    )
    if not args.quiet:
        for line in summary.lines():
            print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

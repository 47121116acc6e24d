"""The `nudgeflow` command. Every failure the user can fix is one line on stderr and exit 2.

    nudgeflow replay EVENTS.jsonl --out TRIGGERS.jsonl [--profiles P] [--rules R]
                     [--workers N] [--dead-letter DLQ.jsonl]
    nudgeflow run [--brokers B] [--topic T] [--dispatch-url U] [--redis-url R] [--workers N]
    nudgeflow demo [--users N] [--hours H] [--workers N]
    nudgeflow dispatch-api [--host H] [--port P] [--log FILE]
    nudgeflow rules check FILE
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from nudgeflow.errors import NudgeflowError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"nudgeflow: error: {message} (see '{self.prog} --help')\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        msg = f"expected a whole number, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"must be at least 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _parser() -> _Parser:
    parser = _Parser(prog="nudgeflow", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    replay = commands.add_parser("replay", help="run a recorded event file through the flow")
    replay.add_argument("events", type=Path, help="events JSONL (or a recording), arrival order")
    replay.add_argument("--out", type=Path, required=True, help="triggers JSONL to write")
    replay.add_argument("--profiles", type=Path, help="profiles JSONL (user_id + fields)")
    replay.add_argument("--rules", type=Path, help="rules file (default: config/rules.yaml)")
    replay.add_argument("--workers", type=_positive, default=1, help="bytewax workers")
    replay.add_argument(
        "--dead-letter", type=Path, help="dead-letter JSONL (default: next to --out)"
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
    run.add_argument("--workers", type=_positive, help="workers per process [NUDGEFLOW_WORKERS]")
    run.add_argument(
        "--start-at", choices=("beginning", "end"), default="beginning",
        help="where to start reading the input topic",
    )

    demo = commands.add_parser("demo", help="the embedded default: a sample shop, no services")
    demo.add_argument("--users", type=_positive, default=3000)
    demo.add_argument("--hours", type=float, default=4.0)
    demo.add_argument("--workers", type=_positive, default=1)
    demo.add_argument("--out-dir", type=Path, help="keep the sample and outputs here")

    api = commands.add_parser("dispatch-api", help="the reference dispatch API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8080)
    api.add_argument("--log", type=Path, help="append each accepted trigger as a JSON line")

    rules = commands.add_parser("rules", help="work with rules files")
    rules_commands = rules.add_subparsers(dest="rules_command", required=True, parser_class=_Parser)
    check = rules_commands.add_parser("check", help="validate a rules file")
    check.add_argument("file", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except NudgeflowError as exc:
        print(f"nudgeflow: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "replay":
        from nudgeflow.replay import run_replay

        summary = run_replay(
            args.events, args.out, dead_letter=args.dead_letter, profiles=args.profiles,
            rules=args.rules, workers=args.workers,
        )
        if not args.quiet:
            for line in summary.lines():
                print(line, file=sys.stderr)
        return 0
    if args.command == "run":
        from flows.live import run_live
        from nudgeflow.settings import load_settings

        settings = load_settings(
            brokers=args.brokers, topic=args.topic, dead_letter_topic=args.dead_letter_topic,
            dispatch_url=args.dispatch_url, redis_url=args.redis_url, rules=args.rules,
            workers=args.workers,
        )
        run_live(settings, start_at_end=args.start_at == "end")
        return 0
    if args.command == "demo":
        from nudgeflow.demo import run_demo

        return run_demo(users=args.users, hours=args.hours, workers=args.workers,
                        out_dir=args.out_dir)
    if args.command == "dispatch-api":
        from nudgeflow.dispatch_api import serve

        serve(args.host, args.port, args.log)
        return 0
    if args.command == "rules":
        from nudgeflow.rules import load_rules

        config = load_rules(args.file)
        print(f"{args.file}: ok, {len(config.rules)} rules")
        return 0
    msg = f"unknown command {args.command}"
    raise AssertionError(msg)


if __name__ == "__main__":
    sys.exit(main())

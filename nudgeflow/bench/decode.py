"""Decode cost per event: `python -m nudgeflow.bench.decode [--events N] [--json FILE]`.

Generates a realistic stream with `nudgeflow.app.samples` (its invalid lines
included), then times `decode_event` on every line, in this process, against
plain `orjson.loads` of the same lines as the floor. Each run times every
measure once, back to back, so that they share the machine's conditions; the
table shows the median of the runs (min-max), in µs per line of this thread's
CPU time (a shared box deschedules us; the wall-clock median is shown too):

- all lines, valid events only, invalid lines only (these take the detailed
  path that words the reason);
- valid events by the form of their `ts` (epoch ms, RFC 3339 with `Z`, with an
  offset);
- the memory each kept event costs (tracemalloc, the decoded values included).

`--decoder module:function` times another decoder of the same signature (e.g.
a frozen copy of an older `decode_event`, put on `PYTHONPATH`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Final

import orjson

from nudgeflow.app.samples import SampleSpec, generate_lines
from nudgeflow.bench.stats import machine_info, spread
from nudgeflow.core.events import Rejection

__all__ = ["load_decoder", "main", "measure", "render", "sample_lines"]

TARGET_US: Final = 4.0
_EVENTS_PER_USER: Final = 15  # a little under the sample's ~19 lines per user, so N are made
_MEMORY_SAMPLE: Final = 10_000

Decoder = Callable[[bytes], object]


def sample_lines(events: int, seed: int = 7) -> list[bytes]:
    """The first `events` lines of a sample big enough to have them, in arrival order."""
    users = max(1, -(-events // _EVENTS_PER_USER))
    spec = SampleSpec(users=users, seed=seed)
    return [line.data for line in islice(generate_lines(spec), events)]


def load_decoder(spec: str) -> Decoder:
    module, _, name = spec.partition(":")
    decoder: Decoder = getattr(importlib.import_module(module), name or "decode_event")
    return decoder


def _rejected(result: object) -> bool:
    # by name too: a decoder under test (`--decoder`) may have a `Rejection` of its own
    return isinstance(result, Rejection) or type(result).__name__ == "Rejection"


def _ts_form(raw: bytes) -> str:
    ts = orjson.loads(raw).get("ts")
    if isinstance(ts, int):
        return "valid, ts epoch ms"
    if isinstance(ts, str) and ts.endswith("Z"):
        return "valid, ts RFC 3339 Z"
    return "valid, ts RFC 3339 offset"


def _per_line_us(fn: Callable[[Any], object], lines: Sequence[bytes]) -> tuple[float, float]:
    """(CPU, wall) µs per line of `fn` over `lines`."""
    gc.collect()
    cpu, wall = time.thread_time(), time.perf_counter()
    for raw in lines:
        fn(raw)
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return cpu / len(lines) * 1e6, wall / len(lines) * 1e6


def _loads(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None


def _bytes_per_event(decode: Decoder, lines: Sequence[bytes]) -> float:
    """Memory held per decoded event kept (the event and the values it holds)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [decode(raw) for raw in lines]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return held / max(len(kept), 1)


def measure(lines: Sequence[bytes], decode: Decoder, runs: int = 5) -> dict[str, Any]:
    """Per-line timings (µs, median of `runs`) of `decode` and of `orjson.loads`."""
    rejected = [_rejected(decode(raw)) for raw in lines]
    valid = [raw for raw, no in zip(lines, rejected, strict=True) if not no]
    invalid = [raw for raw, no in zip(lines, rejected, strict=True) if no]
    by_form: dict[str, list[bytes]] = {}
    for raw in valid:
        by_form.setdefault(_ts_form(raw), []).append(raw)
    sets: dict[str, tuple[Callable[[Any], object], Sequence[bytes]]] = {
        "orjson.loads, all lines": (_loads, lines),
        "orjson.loads, valid events": (orjson.loads, valid),
        "decode_event, all lines": (decode, lines),
        "decode_event, valid events": (decode, valid),
    }
    if invalid:
        sets["decode_event, invalid lines"] = (decode, invalid)
    for form in sorted(by_form):
        sets[f"decode_event, {form}"] = (decode, by_form[form])
    cpu: dict[str, list[float]] = {name: [] for name in sets}
    wall: dict[str, list[float]] = {name: [] for name in sets}
    for _ in range(runs):
        for name, (fn, subset) in sets.items():
            cpu_us, wall_us = _per_line_us(fn, subset)
            cpu[name].append(cpu_us)
            wall[name].append(wall_us)
    results = {name: spread(values, 2) for name, values in cpu.items()}
    valid_us = results["decode_event, valid events"]["median"]
    floor_us = results["orjson.loads, valid events"]["median"]
    return {
        "lines": len(lines),
        "valid": len(valid),
        "invalid": len(invalid),
        "counts": {name: len(subset) for name, (_, subset) in sets.items()},
        "runs": runs,
        "us_per_line": results,  # CPU time of this thread
        "wall_us_per_line": {name: spread(values, 2) for name, values in wall.items()},
        "valid_over_orjson": round(valid_us / floor_us, 2) if floor_us else None,
        "target_us": TARGET_US,
        "target_met": valid_us <= TARGET_US,
        "bytes_per_kept_event": round(_bytes_per_event(decode, valid[:_MEMORY_SAMPLE])),
        "bytes_per_kept_dict": round(_bytes_per_event(orjson.loads, valid[:_MEMORY_SAMPLE])),
    }


def render(result: dict[str, Any]) -> str:
    rows = [
        "| what | lines | CPU µs per line, median (min-max) | wall µs, median |",
        "|---|---:|---:|---:|",
    ]
    for name, s in result["us_per_line"].items():
        rows.append(
            f"| {name} | {result['counts'][name]:,} | "
            f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
            f"{result['wall_us_per_line'][name]['median']:.2f} |"
        )
    met = "met" if result["target_met"] else "NOT met"
    rows.append("")
    rows.append(
        f"{result['lines']:,} lines ({result['valid']:,} valid, {result['invalid']:,} invalid), "
        f"median of {result['runs']} runs; valid events cost "
        f"{result['valid_over_orjson']}x orjson.loads; target <= {result['target_us']} µs "
        f"(CPU median, valid events): {met}."
    )
    rows.append(
        f"Memory per kept event: {result['bytes_per_kept_event']:,} B "
        f"(the orjson dict alone: {result['bytes_per_kept_dict']:,} B)."
    )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nudgeflow.bench.decode", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--events", type=int, default=50_000, help="lines to decode")
    parser.add_argument("--runs", type=int, default=5, help="runs; the median is reported")
    parser.add_argument("--seed", type=int, default=7, help="seed of the sample")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--decoder", default="nudgeflow.core.events:decode_event",
        help="module:function to time (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.events < 1 or args.runs < 1:
        parser.error("--events and --runs must be >= 1")
    decode = load_decoder(args.decoder)
    lines = sample_lines(args.events, args.seed)
    result = {"decoder": args.decoder, **measure(lines, decode, args.runs)}
    result["machine"] = machine_info()
    print(render(result))
    if args.json is not None:
        args.json.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

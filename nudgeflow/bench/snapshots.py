"""Snapshot time and recovery store growth per epoch, when N users were touched in it.

    python -m nudgeflow.bench.snapshots LINES PROFILES RESULT.json --users N [--users M ...]
                                        [--runs R] [--sqlite-users N ...] [--workdir DIR]

With recovery on, bytewax snapshots every key that its stateful step touched
in an epoch, at the epoch's end: the detect step's `_DetectLogic.snapshot()`
(`nudgeflow.operators.snapshot.encode`) once per touched user, and writes the
bytes to the recovery store (one SQLite file per recovery partition). What it
costs, for N users touched in one epoch:

1. **base**: the recorded stream (LINES, PROFILES as `nudgeflow.bench.memory`
   reads them) through one `_DetectLogic` per user, as the live flow holds them;
2. **N users**: the base users, and when N is more, copies of them under new
   ids (each decoded from a base user's snapshot: nothing shared),
   cycling over the base until there are N;
3. **snapshot**: R times, `logic.snapshot()` of all N users, timed (the GC on,
   as in the flow): `ms` per epoch, and the bytes
   produced (the sum of the snapshots' sizes, what the store must take);
4. **SQLite** (for N in `--sqlite-users`): a bytewax flow, recovery on
   (`init_db_dir(dir, 1)`, one epoch for the whole run), whose stateful step
   holds the N logics and touches each once; the growth of the recovery
   directory (every file, `-wal` included) is the store's growth for that
   epoch. The run's wall time minus that of the same flow without recovery
   is what writing the store adds to the epoch (`recovery_write_ms`; R
   interleaved pairs): bytewax calls `snapshot()` of every key touched in an
   epoch at its end with recovery off too (and drops the bytes), so the
   snapshot time of step 3 is paid by every live flow, recovery or not.

5. **parked**: the stream again as the flow holds it (quiet users parked),
   N of its parked users (copies sharing their original's bytes) in the
   default shards: what an epoch stores for users parked and unchanged.

The result is JSON: per `users_<N>` the spread of `ms`, `bytes`, `bytes_per_user`,
`shards` (`ms`, `ms_unchanged`, `bytes`, and `parked`: `ms`, `bytes`), and with
SQLite `sqlite_growth_bytes` and `recovery_write_ms`.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from nudgeflow.bench.memory import build_logics, load_raw_profiles
from nudgeflow.bench.stats import spread

__all__ = ["main", "measure", "users_label"]


def users_label(users: int) -> str:
    """`users_100k`, `users_1m`, `users_2500`: the JSON key of N users."""
    if users % 1_000_000 == 0:
        return f"users_{users // 1_000_000}m"
    if users % 1000 == 0:
        return f"users_{users // 1000}k"
    return f"users_{users}"


def _grow(built: Any, base: Sequence[Any], logics: list[Any], target: int) -> None:
    """Append copies of the base users to `logics` until it holds `target`.

    A copy is the base user's snapshot decoded under a new id: nothing shared.
    Not a pickle of the state: the compiled build's classes do not all pickle.
    """
    from nudgeflow.operators import snapshot
    from nudgeflow.operators.detect import UserSlot

    blobs = [snapshot.encode(built.detector, slot.state, None, None) for slot in base]
    # Without the collector while millions of objects are made (its full passes over a
    # growing heap would take longer than the copying); one full pass afterwards.
    gc.disable()
    try:
        while len(logics) < target:
            k = len(logics)
            original = base[k % len(base)]
            state = snapshot.decode(built.detector, blobs[k % len(base)])[0]
            state.user_id = f"s{k // len(base)}-{original.user_id}"
            logics.append(UserSlot(state, original.last_arrival, original.source))
    finally:
        gc.enable()
    gc.collect()


def per_user_logics(detector: Any, clock: Any, slots: Sequence[Any]) -> list[Any]:
    """The detect step's logics with per-user keys (`detect_shards=0`): one user each."""
    from nudgeflow.operators.detect import _DetectLogic

    return [_DetectLogic(detector, clock, None, shards=0, users=[slot]) for slot in slots]


def shard_logics(detector: Any, clock: Any, slots: Sequence[Any]) -> list[Any]:
    """The detect step's logics with the default shards, holding `slots` as the flow would."""
    import zlib

    from nudgeflow.operators.detect import DEFAULT_SHARDS, _DetectLogic

    by_shard: dict[int, list[Any]] = {}
    for slot in slots:
        shard = zlib.crc32(slot.user_id.encode()) % DEFAULT_SHARDS
        by_shard.setdefault(shard, []).append(slot)
    return [_DetectLogic(detector, clock, None, shards=DEFAULT_SHARDS, users=users)
            for users in by_shard.values()]


def parked_logics(detector: Any, clock: Any, parked: Sequence[tuple[str, bytes]],
                  target: int) -> list[Any]:
    """`target` parked users in the default shards, cycling over `parked` under new ids.

    A copy shares its original's bytes: a snapshot only slices and joins them, so
    what it costs does not depend on the bytes being copies of their own.
    """
    import zlib

    from nudgeflow.operators.detect import DEFAULT_SHARDS, _DetectLogic

    logics = [_DetectLogic(detector, clock, None, shards=DEFAULT_SHARDS)
              for _ in range(DEFAULT_SHARDS)]
    for k in range(target):
        uid, packed = parked[k % len(parked)]
        new_id = uid if k < len(parked) else f"p{k // len(parked)}-{uid}"
        logics[zlib.crc32(new_id.encode()) % DEFAULT_SHARDS].parked[new_id] = packed
    return logics


def _time_snapshots(logics: Sequence[Any], *, touched: bool = True) -> tuple[float, int]:
    """`snapshot()` of every logic: ms and bytes. `touched`: every user changed since the last."""
    if touched:
        for logic in logics:
            for slot in logic.users.values():
                slot.blob = None
    started = time.perf_counter()
    blobs = [logic.snapshot() for logic in logics]
    elapsed = time.perf_counter() - started
    return elapsed * 1000.0, sum(len(b) for b in blobs)


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _held_flow(logics: Sequence[Any]) -> Any:
    """A bytewax flow whose stateful step holds `logics` (one per key) and touches each once.

    Every user of each logic counts as changed, as when all were touched in the epoch.
    """
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.operators import StatefulBatchLogic
    from bytewax.testing import TestingSource

    from nudgeflow.bench.flowproc import null_sink

    by_id = {str(index): logic for index, logic in enumerate(logics)}
    for logic in logics:
        for slot in logic.users.values():
            slot.blob = None

    class Held(StatefulBatchLogic[str, None, bytes]):
        """One key's `_DetectLogic`, taken on its first value; bytewax snapshots it."""

        def __init__(self) -> None:
            self.inner: Any = None

        def on_batch(self, values: list[str]) -> tuple[Iterable[None], bool]:
            self.inner = by_id[values[0]]
            return [], False

        def snapshot(self) -> bytes:
            blob: bytes = self.inner.snapshot()
            return blob

    flow = Dataflow("bench_snapshots")
    ids = op.input("ids", flow, TestingSource(list(by_id), batch_size=1000))
    keyed = op.key_on("key", ids, lambda uid: uid)
    held = op.stateful_batch("detect", keyed, lambda _resume: Held())
    op.output("out", held, null_sink())
    return flow


def _sqlite_epoch(logics: Sequence[Any], workdir: Path, runs: int) -> dict[str, Any]:
    from bytewax.recovery import RecoveryConfig, init_db_dir
    from bytewax.testing import run_main

    growth: list[int] = []
    write_ms: list[float] = []
    plain_s: list[float] = []
    recovered_s: list[float] = []
    for index in range(runs):
        flow = _held_flow(logics)
        gc.collect()
        started = time.perf_counter()
        run_main(flow, epoch_interval=timedelta(hours=1))
        plain = time.perf_counter() - started
        directory = workdir / f"recovery-{len(logics)}-{index}"
        directory.mkdir(parents=True)
        init_db_dir(directory, 1)
        before = _dir_bytes(directory)
        flow = _held_flow(logics)
        gc.collect()
        started = time.perf_counter()
        run_main(flow, epoch_interval=timedelta(hours=1),
                 recovery_config=RecoveryConfig(str(directory)))
        recovered = time.perf_counter() - started
        growth.append(_dir_bytes(directory) - before)
        shutil.rmtree(directory, ignore_errors=True)
        plain_s.append(plain)
        recovered_s.append(recovered)
        write_ms.append((recovered - plain) * 1000.0)
    return {
        "sqlite_growth_bytes": spread(growth, 0),
        "recovery_write_ms": spread(write_ms, 1),
        "flow_without_recovery_s": spread(plain_s, 3),
        "flow_with_recovery_s": spread(recovered_s, 3),
    }


def measure(lines_path: Path, profiles_path: Path, users: Sequence[int], *, runs: int = 3,
            sqlite_users: Sequence[int] = (), workdir: Path | None = None) -> dict[str, Any]:
    """Every measure above, for each N of `users` (ascending)."""
    raw_profiles = load_raw_profiles(profiles_path)
    started = time.perf_counter()
    # None parked: every user is encoded when touched, the epoch's whole cost.
    built = build_logics(lines_path, raw_profiles, park_after_ms=0)
    build_s = time.perf_counter() - started
    held = list(built.logics.values())
    base = len(held)
    if not base:
        msg = "the stream left no user to snapshot"
        raise ValueError(msg)
    out: dict[str, Any] = {"base_users": base, "base_events": built.events,
                           "build_s": round(build_s, 1), "users": {}}
    # The same stream as the flow holds it (quiet users parked): what an epoch stores
    # for users who were parked and did not change.
    parked = sorted(build_logics(lines_path, raw_profiles).parked.items())
    logics: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="nudgeflow-snapshots-", dir=workdir) as tmp:
        for target in sorted(set(users)):
            if target <= base:
                logics = held[:target]
            else:
                if len(logics) < base:
                    logics = list(held)
                started = time.perf_counter()
                _grow(built, held, logics, target)
                out.setdefault("clone_s", {})[users_label(target)] = round(
                    time.perf_counter() - started, 1)
            per_user = per_user_logics(built.detector, built.clock, logics)
            shards = shard_logics(built.detector, built.clock, logics)
            timings = [_time_snapshots(per_user) for _ in range(runs)]
            shard_timings = [_time_snapshots(shards) for _ in range(runs)]
            # Users unchanged since the last epoch keep their bytes: only joining is left.
            cached = [_time_snapshots(shards, touched=False) for _ in range(runs)]
            size = timings[0][1]
            entry: dict[str, Any] = {
                "users": target,
                "cloned_from": base if target > base else None,
                "ms": spread([ms for ms, _ in timings], 1),
                "bytes": size,
                "bytes_per_user": round(size / target, 1),
                "us_per_user": round(statistics.median(ms for ms, _ in timings) * 1000 / target,
                                     2),
                # Keyed by shard (the default), a touched shard is snapshotted whole: what
                # an epoch costs when every shard was touched, with every user changed
                # (`ms`) or none of them (`ms_unchanged`); the store takes `bytes` either way.
                "shards": {
                    "ms": spread([ms for ms, _ in shard_timings], 1),
                    "ms_unchanged": spread([ms for ms, _ in cached], 1),
                    "bytes": shard_timings[0][1],
                },
            }
            if parked:
                parked_shards = parked_logics(built.detector, built.clock, parked, target)
                parked_timings = [_time_snapshots(parked_shards, touched=False)
                                  for _ in range(runs)]
                entry["shards"]["parked"] = {
                    "ms": spread([ms for ms, _ in parked_timings], 1),
                    "bytes": parked_timings[0][1],
                }
            if target in sqlite_users:
                entry.update(_sqlite_epoch(per_user, Path(tmp), runs))
                entry["shards"].update(_sqlite_epoch(shards, Path(tmp), runs))
            out["users"][users_label(target)] = entry
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nudgeflow.bench.snapshots")
    parser.add_argument("lines", type=Path)
    parser.add_argument("profiles", type=Path)
    parser.add_argument("result", type=Path)
    parser.add_argument("--users", type=int, action="append", required=True)
    parser.add_argument("--sqlite-users", type=int, action="append", default=[])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.lines, args.profiles, args.users, runs=args.runs,
                     sqlite_users=args.sqlite_users, workdir=args.workdir)
    args.result.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

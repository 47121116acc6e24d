"""State per active user: `python -m nudgeflow.bench.memory LINES PROFILES RESULT.json [CLONES
[PARK_AFTER_MS]]`.

Runs the recorded stream through the detection operator's own logic
(`nudgeflow.operators.detect._DetectLogic`, one per shard as bytewax keeps them in
live mode, with the wall clock simulated by each line's arrival time); each
shard holds its users' `UserSlot`s, parking those quiet for PARK_AFTER_MS
(default: the flow's, `operators.detect.DEFAULT_PARK_AFTER_MS`; 0: never) as
the flow does. Measured:

- `rss`: the growth of the process's resident memory from before the first
  event to after the last (after a full GC and `malloc_trim`), divided by the
  users whose state is still held; it includes the allocator's fragmentation,
  which is real memory too;
- `full_gc_ms`: a full garbage collection with every state held (and
  `scaled_full_gc_ms` with the clones), the pause the live flow avoids;
- `pickled`: the size of each user's snapshot (`operators.snapshot.encode`), a
  cross-check that does not depend on the allocator; it is also what a parked
  user is held as;
- `parked`: the users held parked at the end, and `seconds` the time the
  stream took through the logics (what parking and unparking cost, against a
  run with PARK_AFTER_MS = 0).

With CLONES = k > 1 the held states are then copied k-1 times under new user
ids (each copy decoded from the snapshot, so nothing is shared, and parked if
its original is) and the RSS is measured again for k times the users: the cost
at scale, without generating k times the events.

Input files (written by the harness): LINES has one line per message,
`<arrival_ms> <user_id> <message bytes>`; PROFILES one JSON profile per line.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Built", "build_logics", "clone_logic", "load_raw_profiles", "main", "measure",
    "new_detector", "rss_bytes", "user_snapshot",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * _PAGE


def _settle() -> int:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


@dataclass
class Built:
    """Every user's slot after the recorded stream (held by their shard), and what it took."""

    detector: Any
    clock: Any
    shards: dict[str, Any]  # shard key -> its `_DetectLogic` (its heaps of wake-ups too)
    events: int
    decisions: int
    seconds: float

    # Made when asked, not kept: a dict of every user is not what the flow holds.
    @property
    def logics(self) -> dict[str, Any]:
        """User id -> `UserSlot`, of the users held as objects."""
        return {uid: slot for logic in self.shards.values() for uid, slot in logic.users.items()}

    @property
    def parked(self) -> dict[str, bytes]:
        """User id -> `operators.parked` bytes, of the users parked."""
        return {uid: packed for logic in self.shards.values()
                for uid, packed in logic.parked.items()}


def load_raw_profiles(profiles_path: Path) -> dict[str, bytes]:
    """The profile file's lines by user id (parsed into `Profile`s per event, as Redis's are)."""
    import orjson

    raw_profiles: dict[str, bytes] = {}
    with profiles_path.open("rb") as handle:
        for line in handle:
            if line.strip():
                raw_profiles[orjson.loads(line)["user_id"]] = line
    return raw_profiles


def new_detector() -> Any:
    """The default rules' `Detector`, every module the stream needs imported with it."""
    from nudgeflow.core import envelope, events, profiles  # noqa: F401 - imported, not used
    from nudgeflow.core.rules import load_rules
    from nudgeflow.core.settings import DEFAULT_RULES
    from nudgeflow.operators import detect  # noqa: F401
    from nudgeflow.operators.detector import Detector

    return Detector(load_rules(DEFAULT_RULES))


def build_logics(lines_path: Path, raw_profiles: dict[str, bytes],
                 detector: Any | None = None, park_after_ms: int | None = None) -> Built:
    """The stream of LINES through one `_DetectLogic` per shard, kept as bytewax keeps them."""
    import orjson

    from nudgeflow.core.envelope import Envelope, Origin
    from nudgeflow.core.events import Event, decode_event
    from nudgeflow.core.profiles import profile_from_mapping
    from nudgeflow.operators.detect import (
        DEFAULT_PARK_AFTER_MS,
        DEFAULT_SHARDS,
        LiveClock,
        _DetectLogic,
        shard_key,
    )

    if detector is None:
        detector = new_detector()
    wall = [0]
    clock = LiveClock(lambda: wall[0])
    shards: dict[str, _DetectLogic] = {}
    key = shard_key(DEFAULT_SHARDS)
    events = decisions = 0
    started = time.perf_counter()
    with lines_path.open("rb") as handle:
        for line in handle:
            arrival, _user_id, raw = line.rstrip(b"\n").split(b" ", 2)
            event = decode_event(raw)
            if not isinstance(event, Event):
                continue
            wall[0] = int(arrival)
            raw_profile = raw_profiles.get(event.user_id)
            profile = profile_from_mapping(orjson.loads(raw_profile)) if raw_profile else None
            envelope = Envelope(event, raw, Origin(), profile, wall[0])
            shard = key(envelope)
            logic = shards.get(shard)
            if logic is None:
                logic = shards[shard] = _DetectLogic(
                    detector, clock, None, shards=DEFAULT_SHARDS,
                    park_after_ms=DEFAULT_PARK_AFTER_MS if park_after_ms is None
                    else park_after_ms)
            out, discard = logic.on_batch([envelope])
            decisions += sum(1 for _ in out)
            events += 1
            if discard:
                del shards[shard]
    return Built(detector, clock, shards, events, decisions, time.perf_counter() - started)


def clone_logic(detector: Any, clock: Any, slot: Any, new_id: str) -> Any:
    """A copy of the user `slot` under `new_id`, decoded from its snapshot: nothing shared.

    A parked user (`operators.parked` bytes) is copied parked, with their snapshot
    under the new id.
    """
    from nudgeflow.operators import parked, snapshot
    from nudgeflow.operators.detect import UserSlot

    state, last_arrival, source = snapshot.decode(detector, user_snapshot(detector, slot))
    state.user_id = new_id
    if isinstance(slot, bytes):
        return parked.repacked(
            slot, snapshot.compact(snapshot.encode(detector, state, last_arrival, source)))
    return UserSlot(state, last_arrival, source)


def user_snapshot(detector: Any, slot: Any) -> bytes:
    """The user's snapshot: what a parked user holds, encoded for a user held as objects."""
    from nudgeflow.operators import parked, snapshot

    if isinstance(slot, bytes):
        return bytes(parked.snapshot_of(slot))
    if slot.blob is not None:
        return bytes(slot.blob)
    return bytes(snapshot.encode(detector, slot.state, slot.last_arrival, slot.source))


def measure(lines_path: Path, profiles_path: Path, clones: int = 1,
            park_after_ms: int | None = None) -> dict[str, Any]:
    # Raw profiles are loaded before the baseline; the Profile objects made from them
    # per user (as the Redis lookup makes them) count towards the users' state.
    raw_profiles = load_raw_profiles(profiles_path)
    # The code and the rules are loaded before the baseline too: they are not per user.
    detector = new_detector()
    baseline = _settle()
    built = build_logics(lines_path, raw_profiles, detector, park_after_ms)
    after = _settle()
    parked = built.parked
    logics: dict[str, Any] = {**built.logics, **parked}
    users = len(logics)
    snapshots = [user_snapshot(detector, slot) for slot in logics.values()]
    pickled = sum(len(s) for s in snapshots)
    result: dict[str, Any] = {
        "events": built.events,
        "decisions": built.decisions,
        "users": users,
        "parked": len(parked),
        "seconds": round(built.seconds, 2),
        "rss_baseline_bytes": baseline,
        "rss_delta_bytes": after - baseline,
        "rss_per_user": (after - baseline) / users if users else None,
        "pickled_per_user": pickled / users if users else None,
    }
    result["full_gc_ms"] = _full_gc_ms()
    if clones > 1:
        del snapshots
        result.update(_scaled(built.detector, built.clock, logics, clones, baseline))
    return result


def _full_gc_ms() -> float:
    """How long a full collection holds the GIL with every user's state held (median of 3).

    What a live flow would stall for at each automatic full collection; it runs
    without them (`nudgeflow.flows.live.no_full_collections`).
    """
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        gc.collect()
        timings.append((time.perf_counter() - started) * 1000.0)
    return round(sorted(timings)[1], 1)


def _scaled(detector: Any, clock: Any, logics: dict[str, Any], clones: int,
            baseline: int) -> dict[str, Any]:
    """Copy every held state `clones - 1` times under new ids; the RSS per user then."""
    copies: list[dict[str, Any]] = []
    for k in range(1, clones):
        copy: dict[str, Any] = {}
        for uid, slot in logics.items():
            new_id = f"c{k}-{uid}"
            copy[new_id] = clone_logic(detector, clock, slot, new_id)
        copies.append(copy)
    scaled = _settle()
    total = len(logics) * clones
    del copies
    return {
        "clones": clones,
        "scaled_users": total,
        "scaled_rss_delta_bytes": scaled - baseline,
        "scaled_rss_per_user": (scaled - baseline) / total if total else None,
        "scaled_full_gc_ms": _full_gc_ms(),
    }


def main(argv: list[str]) -> int:
    lines, profiles, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    clones = int(argv[3]) if len(argv) > 3 else 1
    park_after_ms = int(argv[4]) if len(argv) > 4 else None
    out.write_text(json.dumps(measure(lines, profiles, clones, park_after_ms)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

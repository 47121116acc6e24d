"""Versioned per-user snapshots: plain data, rule state keyed by rule name and fingerprint.

What bytewax stores for a user (one snapshot per touched user per epoch) is

    b"NFUS" + FORMAT (3) + pickle of builtins only: (user data, wall ms, partition)

or, for a user who has been quiet for a while (`operators.detect`, parking),
the same pickle deflated (`compact`):

    b"NFUS" + DEFLATED (4) + raw deflate of that pickle, with a preset dictionary

The frozen preset dictionary (`operators.snapshot_dictionary`) makes the field
and rule names every user repeats cost a few bytes each: ~0.5 KB instead of
~1.5 KB. A parked user is held as those bytes, so their size is the memory
such a user costs. A user who changed in an epoch is written plain: deflate
would double the epoch's encoding time (~45 µs a user here) for a user who is
likely to change again before they are parked.

Builtins only, so a snapshot does not depend on the names or layout of our
classes: the engine may change how it holds a user in memory, and only
`dump_user`/`load_user` (and a migration from the previous FORMAT, kept with
a snapshot of that format in the tests) change with it.

On resume, each rule is matched by name and by its detection fingerprint
(`RuleBase.detection_fingerprint`: the parameters that shape what it detects):

- a rule that is unchanged keeps its state and pending timers, wherever it
  now stands in the file (ties between timers follow the file as it is now);
- a new rule starts empty;
- a removed rule's state and timers are dropped; a delayed send it had already
  decided still goes out (it can no longer be cancelled by that rule's events);
- a rule whose detection parameters changed starts empty (its pending timer
  too), as if it were new; a rule whose response alone changed (channels,
  delay, segment, experiment, offer, ...) keeps its state. A user's trigger
  history (dedup of trigger ids, frequency cap) is the user's, and is kept.

FORMAT 2 snapshots (trigger ids in full) are still read, so an upgrade
resumes; a snapshot of
another FORMAT is refused when the flow starts (`check_recovery`), in one line,
never half-way through a flow.
"""

from __future__ import annotations

import dataclasses
import pickle
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from nudgeflow.core.errors import ConfigError
from nudgeflow.core.policies import PolicyState
from nudgeflow.core.profiles import held_profile, make_profile
from nudgeflow.core.triggers import Decision
from nudgeflow.operators.attribution import Attribution
from nudgeflow.operators.cart import Cart
from nudgeflow.operators.detector import Detector, UserState
from nudgeflow.operators.event_time import Admission, TimerQueue
from nudgeflow.operators.internal import SENDS, SESSIONS
from nudgeflow.operators.sessions import SessionTracker
from nudgeflow.operators.snapshot_dictionary import DICTIONARY
from nudgeflow.operators.tumbling import TumblingCounter

MAGIC: Final = b"NFUS"
# 3: the policies' trigger ids as digests (PolicyState), not in full; 2 is still read.
# 4 (DEFLATED): format 3 deflated with the preset dictionary, for parked users.
FORMAT: Final = 3
DEFLATED: Final = 4
READABLE: Final = (DEFLATED, FORMAT, 2)
_DEFLATE_LEVEL: Final = 6
_RAW_DEFLATE: Final = -15  # no zlib header or checksum: the pickle checks its own framing
_HEADER: Final = MAGIC + bytes([FORMAT])
_DEFLATED_HEADER: Final = MAGIC + bytes([DEFLATED])
_HEADERS: Final = tuple(MAGIC + bytes([f]) for f in READABLE)


class SnapshotFormatError(ConfigError):
    """A snapshot this version cannot read (another format, or not ours)."""


def dump_user(detector: Detector, user: UserState) -> dict[str, Any]:
    """The user's state as builtins."""
    rules = {
        logic.name: (logic.fingerprint, None if (s := user.rule_states.get(logic.name)) is None
                     else logic.dump(s))
        for logic in detector.logics
    }
    return {
        "user_id": user.user_id,
        "admission": user.admission.to_data(),
        "cart": user.cart.to_data(),
        "sessions": user.sessions.to_data(),
        "timers": user.timers.to_data(),
        "rules": rules,
        "policy": (b"", []) if user.policy_empty else user.policy.to_data(),
        "pending_sends": [(tid, decision.to_data(), rule)
                          for tid, (decision, rule) in user.pending_sends.items()],
        "profile": (user.profile.segment, user.profile.opt_in, user.profile.timezone,
                    user.profile.name),
        "pruned_at": user.pruned_at,
        "stream_at": user.stream_at,
        "hourly": dataclasses.astuple(user.hourly),
        "daily": dataclasses.astuple(user.daily),
        "attribution": user.attribution.to_data(),
    }


def load_user(detector: Detector, data: dict[str, Any], fmt: int = FORMAT) -> UserState:
    """A user from `dump_user`'s data (of format `fmt`), under the rules of `detector`."""
    kept = {
        name for name, (fingerprint, _) in data["rules"].items()
        if name in detector.by_name and detector.by_name[name].fingerprint == fingerprint
    }
    rule_states: dict[str, Any] = {}
    for name in kept:
        state = data["rules"][name][1]
        if state is not None:
            rule_states[name] = detector.by_name[name].load(state)
    pending = {tid: (Decision.from_data(decision), rule)
               for tid, decision, rule in data["pending_sends"]}
    timers = TimerQueue()
    for deadline, name, key in data["timers"]:
        order = _timer_order(detector, name, key, kept, pending)
        if order is not None:
            timers.set(name, order, key, deadline)
    return UserState(
        user_id=data["user_id"],
        admission=Admission.from_data(detector.lateness, detector.dedup_retention,
                                      data["admission"]),
        cart=Cart.from_data(data["cart"]),
        sessions=SessionTracker.from_data(detector.session_gap, data["sessions"]),
        timers=timers,
        rule_states=rule_states,
        policy=_policy(fmt, *data["policy"]),
        pending_sends=pending,
        profile=held_profile(make_profile(*data["profile"])),
        pruned_at=data["pruned_at"],
        stream_at=data["stream_at"],
        hourly=TumblingCounter(*data["hourly"]),
        daily=TumblingCounter(*data["daily"]),
        # absent from the format-2 snapshots written before attribution existed
        attribution=Attribution.from_data(data.get("attribution")),
    )


def _policy(fmt: int, recent: Any, dispatched: list[int]) -> PolicyState:
    if fmt == 2:  # trigger ids in full, trigger_id -> fired_at
        return PolicyState.from_ids(dict(recent), dispatched)
    return PolicyState(recent, dispatched)


def _timer_order(
    detector: Detector, name: str, key: str, kept: set[str],
    pending: dict[str, tuple[Decision, str]],
) -> int | None:
    """Where a restored timer stands among ties now, or None when it is dropped."""
    if name == SESSIONS:
        return detector.sessions.order
    if name == SENDS:
        if key not in pending:
            return None
        rule = detector.by_name.get(pending[key][1])
        return rule.order if rule is not None else len(detector.logics)
    return detector.by_name[name].order if name in kept else None


def encode(detector: Detector, user: UserState, wall_ms: int | None, source: str | None) -> bytes:
    data = (dump_user(detector, user), wall_ms, source)
    return _HEADER + pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)


def compact(blob: bytes) -> bytes:
    """The same snapshot deflated (format 4); a deflated one as it is."""
    if blob.startswith(_DEFLATED_HEADER):
        return blob
    if not blob.startswith(_HEADER):
        raise SnapshotFormatError(describe_format(blob))
    packer = zlib.compressobj(_DEFLATE_LEVEL, zlib.DEFLATED, _RAW_DEFLATE, zdict=DICTIONARY)
    return _DEFLATED_HEADER + packer.compress(blob[len(_HEADER):]) + packer.flush()


def decode(detector: Detector, blob: bytes) -> tuple[UserState, int | None, str | None]:
    """A user, the wall time of their last event and their partition, from `encode`'s bytes."""
    if not blob.startswith(_HEADERS):
        raise SnapshotFormatError(describe_format(blob))
    fmt = blob[len(MAGIC)]
    payload = blob[len(_HEADER):]
    if fmt == DEFLATED:
        unpacker = zlib.decompressobj(_RAW_DEFLATE, zdict=DICTIONARY)
        try:
            payload = unpacker.decompress(payload) + unpacker.flush()
        except zlib.error as exc:
            msg = f"a format-{fmt} user snapshot that does not inflate: {exc}"
            raise SnapshotFormatError(msg) from None
    # Builtins only, written by `encode` into our own recovery store.
    data, wall_ms, source = pickle.loads(payload)
    return load_user(detector, data, fmt), wall_ms, source


def describe_format(blob: bytes) -> str:
    if blob.startswith(MAGIC) and len(blob) > len(MAGIC):
        found = f"format {blob[len(MAGIC)]}"
    elif blob.startswith(b"\x80"):
        found = "format 1 (a pickled UserState, before versioned snapshots)"
    else:
        found = "data that is not a nudgeflow snapshot"
    *first, last = (str(f) for f in sorted(READABLE))
    readable = f"{', '.join(first)} and {last}" if first else last
    return f"per-user state in {found}; this nudgeflow reads formats {readable}"


def first_snapshots(
    directory: Path, step_id: str, where: str = "", params: tuple[Any, ...] = ()
) -> Iterator[Any]:
    """Per SQLite file of a recovery directory, the step's first stored snapshot (or None).

    `where` narrows it (SQL over `ser_change`, with `params`). The value is what our
    `snapshot()` returned, which bytewax pickles into our own recovery store.
    """
    for path in sorted(directory.glob("*.sqlite3")):
        try:
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
                row = db.execute(
                    "SELECT ser_change FROM snaps WHERE step_id = ? AND ser_change IS NOT NULL"
                    f" {where} LIMIT 1",
                    (step_id, *params),
                ).fetchone()
        except sqlite3.Error as exc:
            msg = f"recovery directory {directory}: cannot read {path.name}: {exc}"
            raise ConfigError(msg) from None
        yield None if row is None else pickle.loads(row[0])


def check_recovery(
    directory: Path, step_id: str, unwrap: Callable[[bytes], bytes] = lambda blob: blob
) -> None:
    """Refuse, in one line, a recovery directory holding per-user state this version cannot read.

    Reads only the first bytes of each of the step's snapshots: bytewax pickles
    our bytes (at most 15 bytes of framing), and a user's header follows within
    the first 64, after a shard's header (13 bytes) when the step is keyed by
    shard. `unwrap` gives the first user's bytes of a snapshot, for the message.
    """
    others = " AND ".join("instr(substr(ser_change, 1, 64), ?) = 0" for _ in _HEADERS)
    for blob in first_snapshots(directory, step_id, f"AND {others}", _HEADERS):
        if blob is not None:
            found = describe_format(unwrap(blob) if isinstance(blob, bytes) else b"")
            msg = (f"recovery directory {directory} holds {found}: start with a new (empty) "
                   "recovery directory, or run the nudgeflow that wrote it")
            raise SnapshotFormatError(msg)

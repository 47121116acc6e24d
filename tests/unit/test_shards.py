"""The detect step keyed by shard: users independent, timers found per user, snapshots kept.

Driven directly, as `test_detect_logic` drives the one-user case, with an injected
wall clock and stream clocks stamped as the source partition stamps them.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from rule_texts import CART_ABANDONMENT, rules_yaml
from shard_helpers import Partition, fired

from nudgeflow.core.rules import parse_rules
from nudgeflow.operators import shard_snapshot, snapshot
from nudgeflow.operators.detect import LiveClock, UserSlot, _DetectLogic, shard_key
from nudgeflow.operators.detector import Detector
from nudgeflow.operators.snapshot import check_recovery

RULES = rules_yaml(CART_ABANDONMENT)
MIN = 60_000


def shard(partition: Partition, shards: int = 8) -> _DetectLogic:
    # Not parking: the shard's wake-ups are its users' timers alone (test_parking.py).
    return _DetectLogic(Detector(parse_rules(RULES)), LiveClock(partition, partition.partitions),
                        None, shards=shards, park_after_ms=0)


def test_the_shard_key_is_stable_and_spreads_users() -> None:
    key = shard_key(64)
    envelope = Partition(0).read("u-42", "a", "page_view", 0)
    # Not hash(): another process, with another string hash seed, finds the same shard.
    other = subprocess.run(
        [sys.executable, "-c", "import zlib; print(zlib.crc32(b'u-42') % 64)"],
        env={**os.environ, "PYTHONHASHSEED": "12345"}, capture_output=True, text=True,
        check=True,
    )
    assert key(envelope) == other.stdout.strip()
    users = {key(Partition(0).read(f"u{i}", "a", "page_view", 0)) for i in range(2000)}
    assert len(users) == 64
    assert shard_key(0)(envelope) == "u-42"


def test_a_quiet_users_timer_fires_when_the_partitions_clock_passes_it() -> None:
    partition = Partition(now=100 * MIN)  # a backlog: the events are in the past
    logic = shard(partition)
    out, _ = logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p"),
                             partition.read("bob", "b1", "add_to_cart", 5 * MIN, product_id="p")])
    assert fired(out) == []
    # Other users' events move S: alice's D = 15 min is passed at S = 15 min 30 s + 1 ms,
    # bob's not yet; both are decided by their own clocks, in the same shard.
    partition.now += 100
    out, _ = logic.on_batch([partition.read("carol", "c1", "page_view", 15 * MIN + 30_001)])
    assert fired(out) == [("alice", 15 * MIN)]
    partition.now += 100
    out, _ = logic.on_batch([partition.read("carol", "c2", "page_view", 20 * MIN + 30_001)])
    assert fired(out) == [("bob", 20 * MIN)]


def test_a_backlog_wakes_the_shard_soon_and_its_users_at_the_streams_pace() -> None:
    partition = Partition(now=100 * MIN)
    logic = shard(partition)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p")])
    partition.now += 100
    partition.read("zed", "z1", "page_view", 10 * MIN)  # another shard's user moves S fast
    wake = logic.notify_at()
    assert wake is not None
    assert wake.timestamp() * 1000 <= partition.now + LiveClock.CATCH_UP_POLL_MS
    partition.now += 100
    partition.read("zed", "z2", "page_view", 15 * MIN + 30_001)
    out, _ = logic.on_notify()
    assert fired(out) == [("alice", 15 * MIN)]


def test_the_wall_clock_decides_a_quiet_partitions_users() -> None:
    partition = Partition(now=0)
    logic = shard(partition)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p"),
                    partition.read("bob", "b1", "add_to_cart", 0, product_id="p")])
    wake = logic.notify_at()
    assert wake is not None and wake.timestamp() * 1000 == 15 * MIN + 30_001
    partition.now = 15 * MIN + 30_001
    out, _ = logic.on_notify()
    assert fired(out) == [("alice", 0 + 15 * MIN), ("bob", 15 * MIN)]


def test_a_purchase_cancels_one_user_and_not_the_other() -> None:
    partition = Partition(now=0)
    logic = shard(partition)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p"),
                    partition.read("bob", "b1", "add_to_cart", 0, product_id="p")])
    partition.now = 5 * MIN
    logic.on_batch([partition.read("alice", "a2", "purchase", 5 * MIN)])
    partition.now = 16 * MIN
    out, _ = logic.on_notify()
    assert fired(out) == [("bob", 15 * MIN)]


def test_idle_users_are_freed_and_an_empty_shard_is_discarded() -> None:
    partition = Partition(now=0)
    logic = shard(partition)
    logic.on_batch([partition.read("alice", "a1", "page_view", 0),
                    partition.read("bob", "b1", "page_view", 0)])
    assert set(logic.users) == {"alice", "bob"}
    wake = logic.notify_at()
    assert wake is not None
    partition.now = int(wake.timestamp() * 1000)
    _, discard = logic.on_notify()
    assert logic.users == {} and discard


def test_a_shard_snapshot_restores_every_user_and_their_timers() -> None:
    partition = Partition(now=0)
    logic = shard(partition)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p"),
                    partition.read("bob", "b1", "add_to_cart", MIN, product_id="p")])
    blob = logic.snapshot()
    assert shard_snapshot.layout(blob) == 8
    users = shard_snapshot.decode(logic.detector, blob, 8)
    restored = _DetectLogic(logic.detector, LiveClock(partition), None, shards=8,
                            users=[UserSlot(*user) for user in users])
    assert set(restored.users) == {"alice", "bob"}
    partition.now = 17 * MIN
    out, _ = restored.on_notify()
    assert fired(out) == [("alice", 15 * MIN), ("bob", 16 * MIN)]


def test_an_unchanged_user_is_not_encoded_again() -> None:
    partition = Partition(now=0)
    logic = shard(partition)
    logic.on_batch([partition.read("alice", "a1", "add_to_cart", 0, product_id="p"),
                    partition.read("bob", "b1", "page_view", 0)])
    logic.snapshot()
    alice = logic.users["alice"].blob
    logic.on_batch([partition.read("bob", "b2", "page_view", 1000)])
    assert logic.users["alice"].blob is alice  # kept
    assert logic.users["bob"].blob is None  # changed: encoded at the next snapshot
    users = shard_snapshot.decode(logic.detector, logic.snapshot(), 8)
    assert {user.user_id: user.admission.max_ts for user, _, _ in users} == {
        "alice": 0, "bob": 1000}


def test_a_snapshot_under_another_keying_is_refused() -> None:
    partition = Partition(now=0)
    logic = shard(partition)
    logic.on_batch([partition.read("alice", "a1", "page_view", 0)])
    with pytest.raises(shard_snapshot.ShardLayoutError, match=r"detect_shards=8.*detect_shards=16"):
        shard_snapshot.decode(logic.detector, logic.snapshot(), 16)
    per_user = _DetectLogic(logic.detector, LiveClock(partition), None, shards=0)
    per_user.on_batch([partition.read("bob", "b1", "page_view", 0)])
    with pytest.raises(shard_snapshot.ShardLayoutError, match="per-user keys"):
        shard_snapshot.decode(logic.detector, per_user.snapshot(), 8)
    # Per-user keys write the user's own snapshot, as before shards: it resumes as one.
    blob = per_user.snapshot()
    assert blob.startswith(snapshot.MAGIC)
    [(state, _, source)] = shard_snapshot.decode(logic.detector, blob, 0)
    assert (state.user_id, source) == ("bob", "0-events")


def test_a_recovery_directory_keyed_otherwise_is_refused_at_start(tmp_path: Path) -> None:
    partition = Partition(now=0)
    logic = shard(partition)
    logic.on_batch([partition.read("alice", "a1", "page_view", 0)])
    store = tmp_path / "part-0.sqlite3"
    with sqlite3.connect(store) as db:  # the table bytewax keeps snapshots in
        db.execute("CREATE TABLE snaps (step_id TEXT, state_key TEXT, snap_epoch INTEGER,"
                   " ser_change BLOB)")
        db.execute("INSERT INTO snaps VALUES ('flow.detect', '3', 1, ?)",
                   (pickle.dumps(logic.snapshot()),))
    shard_snapshot.check_layout(tmp_path, "flow.detect", 8)  # the same keying: fine
    check_recovery(tmp_path, "flow.detect", shard_snapshot.first_user)  # a user format we read
    with pytest.raises(shard_snapshot.ShardLayoutError, match=r"recovery directory .*64"):
        shard_snapshot.check_layout(tmp_path, "flow.detect", 64)


def test_a_shard_holding_users_of_another_format_is_refused_at_start(tmp_path: Path) -> None:
    future_user = snapshot.MAGIC + bytes([99]) + b"a layout of a later nudgeflow"
    with sqlite3.connect(tmp_path / "part-0.sqlite3") as db:
        db.execute("CREATE TABLE snaps (step_id TEXT, state_key TEXT, snap_epoch INTEGER,"
                   " ser_change BLOB)")
        db.execute("INSERT INTO snaps VALUES ('flow.detect', '3', 1, ?)",
                   (pickle.dumps(shard_snapshot.encode([future_user], 64)),))
    with pytest.raises(snapshot.SnapshotFormatError, match="format 99"):
        check_recovery(tmp_path, "flow.detect", shard_snapshot.first_user)


def test_a_user_whose_events_move_partition_is_timed_by_the_new_one() -> None:
    first = Partition(now=100 * MIN)
    second = Partition(now=100 * MIN, index=1, partitions=first.partitions)
    logic = _DetectLogic(Detector(parse_rules(RULES)), LiveClock(first, first.partitions),
                         None, shards=8)
    logic.on_batch([first.read("alice", "a1", "add_to_cart", 0, product_id="p")])
    # Her next event comes on partition 1 (a producer that keys by something else): the
    # same timer, now due by partition 1's clock, which other users' events move on.
    logic.on_batch([second.read("alice", "a2", "page_view", 1000)])
    first.now = second.now = first.now + 100
    out, _ = logic.on_batch([second.read("bob", "b1", "page_view", 15 * MIN + 30_001)])
    assert fired(out) == [("alice", 15 * MIN)]

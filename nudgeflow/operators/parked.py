"""A parked user as one bytes object: their snapshot, then their place in the shard's wake-ups.

    snapshot (operators.snapshot, format 4) + wake (i64) + due_at (i64) + due partition (u16)

A user quiet for a while costs a shard this and a dict entry, not a `UserSlot`
with its ints: ~200 bytes less than a slot holding only the same snapshot.
The trailer keeps what the shard's heaps check their entries against (the
wall ms of the user's wake-up, and when their partition's stream clock makes
them due, with that partition as an index into the shard's own list), so a
parked user is woken without being decoded first; the wall time of their last
event and their partition are in the snapshot.
"""

from __future__ import annotations

import struct
from typing import Final

__all__ = ["due_of", "pack", "repacked", "snapshot_of", "wake_of"]

_TRAILER: Final = struct.Struct("<qqH")
_NO_TIME: Final = -(1 << 63)
_NO_SOURCE: Final = 0xFFFF
MAX_SOURCES: Final = _NO_SOURCE  # partitions a shard can name in a trailer


def pack(snapshot: bytes, wake: int | None, due_at: int | None, due_source: int | None) -> bytes:
    """The parked form of a user whose snapshot is `snapshot`; `due_source` indexes the shard's."""
    return snapshot + _TRAILER.pack(
        _NO_TIME if wake is None else wake,
        _NO_TIME if due_at is None else due_at,
        _NO_SOURCE if due_source is None else due_source,
    )


def snapshot_of(packed: bytes) -> memoryview:
    """The user's snapshot, without copying it (what a shard's snapshot joins)."""
    return memoryview(packed)[: len(packed) - _TRAILER.size]


def repacked(packed: bytes, snapshot: bytes) -> bytes:
    """The same user's place in the wake-ups after another snapshot (a copy under a new id)."""
    return snapshot + packed[len(packed) - _TRAILER.size:]


def wake_of(packed: bytes) -> int | None:
    wake: int = _TRAILER.unpack_from(packed, len(packed) - _TRAILER.size)[0]
    return None if wake == _NO_TIME else wake


def due_of(packed: bytes) -> tuple[int, int] | None:
    """(due_at, the shard's index of the partition), or None when no timer is due by it."""
    _, due_at, source = _TRAILER.unpack_from(packed, len(packed) - _TRAILER.size)
    if due_at == _NO_TIME or source == _NO_SOURCE:
        return None
    return int(due_at), int(source)

"""What bytewax stores for a shard of the detect step: its users' versioned snapshots.

    b"NFSH" + FORMAT (one byte) + shard count (u32) + per user: length (u32) + user blob

A user blob is `operators.snapshot`'s per-user snapshot (its own magic and
format), so the rules of resuming a user are the same under either keying.
The shard count is kept because a user belongs to `crc32(user_id) % shards`:
resuming under another count would strand users in shards that never see
their events again, so it is refused (at start, by `check_layout`).

With per-user keys (`shards=0`) a key's snapshot is the user blob alone,
exactly as before shards, so recovery directories written then still resume.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from nudgeflow.operators import snapshot
from nudgeflow.operators.detector import Detector, UserState

MAGIC: Final = b"NFSH"
FORMAT: Final = 1
_HEADER: Final = MAGIC + bytes([FORMAT])
_COUNT: Final = struct.Struct("<I")

UserData = tuple[UserState, int | None, str | None]


class ShardLayoutError(snapshot.SnapshotFormatError):
    """A snapshot written under another keying (per user, or another shard count)."""


def encode(blobs: Sequence[bytes | memoryview], shards: int) -> bytes:
    """A shard's snapshot from its users' blobs; with `shards=0`, the one user's blob."""
    if shards <= 0:
        assert len(blobs) == 1  # per-user keys: bytewax snapshots only keys with a user
        return bytes(blobs[0])
    parts: list[bytes | memoryview] = [_HEADER, _COUNT.pack(shards)]
    for blob in blobs:
        parts.append(_COUNT.pack(len(blob)))
        parts.append(blob)
    return b"".join(parts)


def decode(detector: Detector, blob: bytes, shards: int) -> list[UserData]:
    """The users of a snapshot written by `encode` under the same `shards`."""
    written = layout(blob)
    if written != shards:
        raise ShardLayoutError(mismatch(written, shards))
    if shards <= 0:
        return [snapshot.decode(detector, blob)]
    users = []
    offset = len(_HEADER) + _COUNT.size
    view = memoryview(blob)
    while offset < len(blob):
        (size,) = _COUNT.unpack_from(blob, offset)
        offset += _COUNT.size
        users.append(snapshot.decode(detector, bytes(view[offset:offset + size])))
        offset += size
    return users


def first_user(blob: bytes) -> bytes:
    """The first user's snapshot in a shard's (the blob itself with per-user keys)."""
    if layout(blob) <= 0:
        return blob
    start = len(_HEADER) + 2 * _COUNT.size
    return blob[start:]


def layout(blob: bytes) -> int:
    """The shard count a snapshot was written under (0: per-user keys)."""
    if blob.startswith(_HEADER) and len(blob) >= len(_HEADER) + _COUNT.size:
        (shards,) = _COUNT.unpack_from(blob, len(_HEADER))
        return int(shards)
    return 0


def mismatch(written: int, configured: int) -> str:
    def keying(shards: int) -> str:
        return "per-user keys (detect_shards=0)" if shards <= 0 else f"detect_shards={shards}"

    return (f"the detect step's state was written with {keying(written)} and this flow runs "
            f"with {keying(configured)}: users would land in other shards than their state")


def check_layout(directory: Path, step_id: str, shards: int) -> None:
    """Refuse, in one line, a recovery directory whose detect state is keyed otherwise."""
    for blob in snapshot.first_snapshots(directory, step_id):
        if blob is None:
            continue
        written = layout(blob) if isinstance(blob, bytes) else 0
        if written != shards:
            msg = (f"recovery directory {directory}: {mismatch(written, shards)}; set "
                   "detect_shards back, or start with a new (empty) recovery directory")
            raise ShardLayoutError(msg)
        return

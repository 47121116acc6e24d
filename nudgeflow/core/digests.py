"""Compact memories of ids: 8-byte digests with a time each, packed in one `bytearray`.

Per-user state remembers ids it has seen (event ids for duplicates, trigger
ids for the policies' dedup) for days. Held as strings they cost ~100 bytes
each in a dict; as records of 16 bytes (an 8-byte BLAKE2b digest of the id,
then a signed 64-bit time) in one `bytearray`, they cost 16, and a
lookup is a C `find` over the bytes that creates no objects. Times are in the
machine's byte order, so the times can be read as an int64 view (`oldest`). Two different ids
are taken for one only on a 64-bit collision (ARCHITECTURE.md "Per-user state"
gives the odds).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from hashlib import blake2b
from typing import Final

RECORD: Final = 16
_TIME: Final = struct.Struct("=q")
_RECORDS: Final = struct.Struct("=8sq")


def digest64(text: str) -> bytes:
    """A stable 8-byte hash of `text` (the same in every process and after restarts)."""
    return blake2b(text.encode(), digest_size=8).digest()


def find(records: bytearray, digest: bytes) -> int:
    """The offset of the record of `digest`, or -1."""
    index = records.find(digest)
    while index >= 0 and index % RECORD:
        index = records.find(digest, index + 1)  # matched across two fields: look on
    return index


def time_at(records: bytearray, offset: int) -> int:
    return int(_TIME.unpack_from(records, offset + 8)[0])


def set_time(records: bytearray, offset: int, at: int) -> None:
    _TIME.pack_into(records, offset + 8, at)


def append(records: bytearray, digest: bytes, at: int) -> None:
    records += _RECORDS.pack(digest, at)


def each(records: bytes | bytearray) -> Iterator[tuple[bytes, int]]:
    """(digest, time) of every record, in order."""
    return _RECORDS.iter_unpack(records)


def oldest(records: bytearray) -> int | None:
    """The smallest time of the records (None: there are none), read in C."""
    if not records:
        return None
    # Every view is released before returning: a bytearray with a view cannot grow.
    with memoryview(records) as raw, raw.cast("q") as words, words[1::2] as times:
        return int(min(times))


def kept_since(records: bytearray, horizon: int) -> bytearray | None:
    """The records with time >= `horizon`, or None when every record is kept."""
    first = oldest(records)
    if first is None or first >= horizon:
        return None
    kept = bytearray()
    for digest, at in each(records):
        if at >= horizon:
            kept += _RECORDS.pack(digest, at)
    return kept

"""File sinks for replay: every item gathered on one partition and written sorted at the end.

Replay output must be identical whatever the number of workers or processes.
Workers emit in any interleaving, so the sink routes everything to a single
partition, keeps `(sort key, line)` pairs and writes them in key order when
the dataflow closes it. Triggers are a small share of events, so holding them
until the end is cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

X = TypeVar("X")

SortKey = tuple[Any, ...]


class _SortedPartition(StatefulSinkPartition[X, None], Generic[X]):
    def __init__(self, path: Path, encode: Callable[[X], tuple[SortKey, bytes]]) -> None:
        self._path = path
        self._encode = encode
        self._rows: list[tuple[SortKey, bytes]] = []

    def write_batch(self, values: list[X]) -> None:
        self._rows.extend(self._encode(value) for value in values)

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._rows.sort(key=lambda row: row[0])
        tmp = self._path.with_name(self._path.name + ".part")
        with tmp.open("wb") as handle:
            for _, line in self._rows:
                handle.write(line)
                handle.write(b"\n")
        tmp.replace(self._path)


class SortedJsonlSink(FixedPartitionedSink[X, None], Generic[X]):
    """Writes `encode(item) -> (sort_key, json_line)` to `path`, sorted by key, at the end."""

    def __init__(self, path: Path, encode: Callable[[X], tuple[SortKey, bytes]]) -> None:
        self._path = path
        self._encode = encode

    def list_parts(self) -> list[str]:
        return ["all"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _SortedPartition[X]:
        return _SortedPartition(self._path, self._encode)


class _TallyPartition(StatefulSinkPartition[dict[str, int], None]):
    def __init__(self, path: Path) -> None:
        self._path = path
        self._totals: dict[str, int] = {}

    def write_batch(self, values: list[dict[str, int]]) -> None:
        for counts in values:
            for name, count in counts.items():
                self._totals[name] = self._totals.get(name, 0) + count

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._path.write_bytes(orjson.dumps(self._totals, option=orjson.OPT_SORT_KEYS))


class TallySink(FixedPartitionedSink[dict[str, int], None]):
    """Adds up count dictionaries from every worker and writes the totals as JSON at the end."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def list_parts(self) -> list[str]:
        return ["all"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _TallyPartition:
        return _TallyPartition(self._path)

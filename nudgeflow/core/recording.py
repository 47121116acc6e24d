"""Reading replay input: a plain JSONL of events, or a recording written by `nudgeflow record`.

A recording starts with a header line `{"nudgeflow_recording": 1, …}`; each
following line is one Kafka message with its bytes base64-encoded, so a
recording keeps every message exactly, even one that is not valid JSON.
Replay reads a recording as the sequence of its message values.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from nudgeflow.core.errors import InputFileError

RECORDING_MARK: Final = "nudgeflow_recording"
RECORDING_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One Kafka message as a recording keeps it."""

    partition: int
    offset: int
    timestamp_ms: int | None
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    def to_json_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "partition": self.partition,
                "offset": self.offset,
                "timestamp": self.timestamp_ms,
                "key": _b64(self.key),
                "value": _b64(self.value),
                "headers": [[name, _b64(value)] for name, value in self.headers],
            }
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordedMessage:
        return cls(
            partition=int(data["partition"]),
            offset=int(data["offset"]),
            timestamp_ms=data.get("timestamp"),
            key=_unb64(data.get("key")),
            value=_unb64(data.get("value")),
            headers=tuple((str(n), _unb64(v)) for n, v in data.get("headers") or ()),
        )


def recording_header(topic: str, **extra: Any) -> bytes:
    return orjson.dumps({RECORDING_MARK: RECORDING_VERSION, "topic": topic, **extra})


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


def _unb64(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        msg = "recorded bytes must be base64 strings"
        raise ValueError(msg)
    return base64.b64decode(value, validate=True)


def is_recording_header(line: bytes) -> bool:
    if RECORDING_MARK.encode() not in line:
        return False
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get(RECORDING_MARK) == RECORDING_VERSION


def iter_recording(path: Path) -> Iterator[tuple[int, RecordedMessage]]:
    """(line number, message) of a recording, skipping its header."""
    for number, line in numbered_lines(path):
        if number == 1 or not line.strip():
            continue
        try:
            yield number, RecordedMessage.from_json(orjson.loads(line))
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, binascii.Error) as exc:
            msg = f"{path}:{number}: not a recorded message ({exc})"
            raise InputFileError(msg) from None


def iter_input_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, event bytes) of every non-blank line, in order; blank lines are skipped.

    For a recording, the bytes are each message's value and the number is the
    recording's line, so dead letters still point at a line of the file.
    """
    lines = numbered_lines(path)
    first = next(lines, None)
    if first is None:
        return
    if first[0] == 1 and is_recording_header(first[1]):
        for number, message in iter_recording(path):
            if message.value is not None and message.value.strip():
                yield number, message.value
        return
    if first[1].strip():
        yield first
    for number, line in lines:
        if line.strip():
            yield number, line


def numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, the line without its end) of a file; unreadable: `InputFileError`."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise InputFileError(msg) from None
    with handle:
        for number, line in enumerate(handle, start=1):
            yield number, line.rstrip(b"\r\n")

"""Event time as integer epoch milliseconds (UTC), and the duration syntax of the rules file.

Integer milliseconds keep the hot path cheap and comparisons exact; datetimes
appear only at the edges (parsing `ts`, writing `fired_at`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

MS_PER_SECOND = 1000
MS_PER_MINUTE = 60 * MS_PER_SECOND
MS_PER_HOUR = 60 * MS_PER_MINUTE
MS_PER_DAY = 24 * MS_PER_HOUR

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {
    "ms": 1,
    "s": MS_PER_SECOND,
    "m": MS_PER_MINUTE,
    "h": MS_PER_HOUR,
    "d": MS_PER_DAY,
    "w": 7 * MS_PER_DAY,
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_duration_ms(text: str) -> int:
    """`"15m"` -> 900000. Units: ms, s, m, h, d, w. Raises ValueError on anything else."""
    match = _DURATION.match(text)
    if match is None:
        msg = f"bad duration {text!r}: expected a whole number and a unit (ms, s, m, h, d, w)"
        raise ValueError(msg)
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def format_duration_ms(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


def datetime_to_ms(value: datetime) -> int:
    """An aware datetime as epoch ms; the microseconds below a millisecond are dropped."""
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def ms_to_datetime(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def format_ms(ms: int) -> str:
    """RFC 3339 UTC with a `Z`, milliseconds only when not zero: `2026-03-01T10:15:00Z`."""
    value = ms_to_datetime(ms)
    if ms % 1000:
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def now_ms() -> int:
    return datetime_to_ms(datetime.now(UTC))

"""HMAC signatures of dispatch requests: what the sink signs and the dispatch API checks.

    X-Nudgeflow-Timestamp: 1772359200                       (Unix seconds, when signed)
    X-Nudgeflow-Signature: sha256=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>

The signature covers the exact body bytes sent, prefixed by the timestamp and a
dot, so a captured request cannot be replayed with a fresh timestamp: a receiver
refuses timestamps more than `tolerance_s` away from its clock. The secret is
shared out of band (`NUDGEFLOW_DISPATCH__HMAC_SECRET`) and is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

__all__ = [
    "DEFAULT_TOLERANCE_S",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "sign",
    "signature_problem",
]

SIGNATURE_HEADER: Final = "X-Nudgeflow-Signature"
TIMESTAMP_HEADER: Final = "X-Nudgeflow-Timestamp"
DEFAULT_TOLERANCE_S: Final = 300
_PREFIX: Final = "sha256="


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of `<timestamp>.<body>`."""
    digest = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return _PREFIX + digest.hexdigest()


def signature_problem(
    secret: bytes,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    now_s: float,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
) -> str | None:
    """Why a request's signature is refused, or None when it is good.

    The reasons name the header, never the expected value.
    """
    if signature is None:
        return f"missing {SIGNATURE_HEADER} header"
    if timestamp is None:
        return f"missing {TIMESTAMP_HEADER} header"
    if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 12:
        return f"{TIMESTAMP_HEADER} must be Unix seconds"
    if abs(now_s - int(timestamp)) > tolerance_s:
        return f"{TIMESTAMP_HEADER} is more than {tolerance_s:g} s from the server's clock"
    expected = sign(secret, timestamp, body)
    if not hmac.compare_digest(expected.encode("ascii"), signature.encode("utf-8", "replace")):
        return f"{SIGNATURE_HEADER} does not match the body"
    return None

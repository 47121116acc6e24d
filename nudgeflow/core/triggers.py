"""Triggers (EVENTS.md §2) and the decision each one ends with (TRIGGERS.md, "After detection").

A `Trigger` is what detection found; a `Decision` is that trigger plus what the
response policies made of it. Both are frozen: the flow emits copies, never its
live state.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from nudgeflow.core.timeutil import format_ms

Channel = Literal["email", "sms", "push"]
CHANNELS: Final[tuple[Channel, ...]] = ("email", "sms", "push")
Outcome = Literal["dispatched", "suppressed"]

_ID_NAMESPACE: Final = uuid.UUID("7f3c1a52-9d0e-4f3b-a1c4-6a2f0e9b8d11")


def make_trigger_id(trigger_type: str, user_id: str, fired_at_ms: int, scope: str = "") -> str:
    """Deterministic id: the same input gives the same id across restarts and replays.

    (type, user, scope, fired_at) identifies a firing: every rule fires at most
    once per scope at one event time.
    """
    name = f"{trigger_type}\x1f{user_id}\x1f{scope}\x1f{fired_at_ms}"
    return str(uuid.uuid5(_ID_NAMESPACE, name))


def stable_fraction(*parts: str) -> float:
    """A number in [0, 1) that depends only on `parts`: stable experiment assignment."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# Made per event, so not frozen (the note in nudgeflow.core.envelope); never changed once made.
@dataclass(slots=True)
class Trigger:
    """A detected moment worth acting on (EVENTS.md §2)."""

    trigger_id: str
    trigger_type: str
    user_id: str
    fired_at_ms: int
    detected_at_ms: int
    segment: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "trigger_id": self.trigger_id,
            "trigger_type": self.trigger_type,
            "user_id": self.user_id,
            "fired_at": format_ms(self.fired_at_ms),
            "detected_at": format_ms(self.detected_at_ms),
            "segment": self.segment,
            "metadata": self.metadata,
        }


# Made per event, so not frozen (the note in nudgeflow.core.envelope); never changed once made.
@dataclass(slots=True)
class Decision:
    """A trigger and its outcome: `dispatched` (with channel and send time) or `suppressed`."""

    trigger: Trigger
    decision: Outcome
    reason: str | None
    channel: Channel | None = None
    send_at_ms: int | None = None
    # When what caused it entered the flow (live mode, `nudgeflow.core.metrics.Cause`): the
    # start of the event-to-dispatch latency. Not part of the decision's content.
    cause: Any = field(default=None, compare=False, repr=False)
    # The profile the policies decided with (`nudgeflow.core.profiles.Profile`), so that
    # the dispatch sink renders the message without a second Redis round trip. Not part
    # of the content either, nor of snapshots: a decision resumed from one has None.
    profile: Any = field(default=None, compare=False, repr=False)

    @property
    def dispatched(self) -> bool:
        return self.decision == "dispatched"

    def to_json(self) -> dict[str, Any]:
        out = self.trigger.to_json()
        out["decision"] = self.decision
        out["reason"] = self.reason
        out["channel"] = self.channel
        out["send_at"] = format_ms(self.send_at_ms) if self.send_at_ms is not None else None
        return out

    def to_data(self) -> tuple[Any, ...]:
        """The decision as plain data (snapshots); `from_data` makes it again."""
        t = self.trigger
        return (t.trigger_id, t.trigger_type, t.user_id, t.fired_at_ms, t.detected_at_ms,
                t.segment, t.metadata, self.decision, self.reason, self.channel, self.send_at_ms)

    @classmethod
    def from_data(cls, data: tuple[Any, ...]) -> Decision:
        trigger = Trigger(*data[:7])
        return cls(trigger, *data[7:])

    def dispatch_body(self) -> dict[str, Any]:
        """The JSON body of `POST /api/trigger` (EVENTS.md §3)."""
        body = self.trigger.to_json()
        body["channel"] = self.channel
        body["send_at"] = format_ms(self.send_at_ms) if self.send_at_ms is not None else None
        return body

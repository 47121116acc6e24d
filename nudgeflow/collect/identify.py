"""Segment `identify` calls -> the fields of the profile hash `profile:<user_id>` in Redis.

The flow reads that hash for segments, opt-ins and time zones
(`nudgeflow.core.profiles.profile_from_mapping`) and the dispatch API for contacts
(`email`, `phone`, `push_token`), so the traits an identify call carries arrive
where both look, from the same tracker that sends behaviour.

    trait                                 hash field
    segment                               segment
    opt_in (list or "email,sms")          opt_in   (comma-separated; only known channels)
    timezone (IANA name)                  timezone
    name, else firstName + lastName       name
    email, phone, push_token              the same

Other traits are not stored: the hash holds what nudgeflow reads. Only the
fields a call carries are written; the others keep their value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nudgeflow.core.triggers import CHANNELS

__all__ = ["PROFILE_KEY_PREFIX", "ProfileUpdate", "profile_update"]

PROFILE_KEY_PREFIX: Final = "profile:"
_STRING_TRAITS: Final = ("segment", "name", "email", "phone", "push_token")
_MAX_ID: Final = 128
_MAX_VALUE: Final = 1024


@dataclass(frozen=True, slots=True)
class ProfileUpdate:
    """The hash fields an identify call sets for one user."""

    user_id: str
    fields: dict[str, str]

    @property
    def key(self) -> str:
        return PROFILE_KEY_PREFIX + self.user_id


def profile_update(call: dict[str, Any]) -> ProfileUpdate | str:
    """The update an identify call makes, or the reason it cannot be applied."""
    user_id = call.get("userId") if call.get("userId") is not None else call.get("anonymousId")
    if not isinstance(user_id, str) or not 0 < len(user_id) <= _MAX_ID:
        return "identify needs a userId (or anonymousId): a string of 1..128 characters"
    traits = call.get("traits", {})
    if not isinstance(traits, dict):
        return "field 'traits': must be an object"
    fields: dict[str, str] = {}
    for trait in _STRING_TRAITS:
        value = traits.get(trait)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > _MAX_VALUE:
            return f"field 'traits.{trait}': must be a string of at most {_MAX_VALUE} characters"
        fields[trait] = value
    if "name" not in fields:
        parts = [traits.get("firstName"), traits.get("lastName")]
        joined = " ".join(p for p in parts if isinstance(p, str) and p)
        if joined:
            fields["name"] = joined
    opt_in = _opt_in(traits.get("opt_in"))
    if opt_in is not None:
        if opt_in.startswith("field"):
            return opt_in
        fields["opt_in"] = opt_in
    timezone = traits.get("timezone")
    if timezone is not None:
        problem = _timezone_problem(timezone)
        if problem is not None:
            return problem
        fields["timezone"] = timezone
    if not fields:
        known = ", ".join((*_STRING_TRAITS, "opt_in", "timezone"))
        return f"identify carries none of the traits nudgeflow keeps ({known})"
    return ProfileUpdate(user_id, fields)


def _opt_in(value: object) -> str | None:
    """The stored form (`email,sms`), None when absent, or a reason starting with 'field'."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return "field 'traits.opt_in': must be a list of channels or a comma-separated string"
    unknown = [v for v in value if v not in CHANNELS]
    if unknown:
        return f"field 'traits.opt_in': unknown channel {unknown[0]!r} (channels: " \
               f"{', '.join(CHANNELS)})"
    return ",".join(c for c in CHANNELS if c in value)


def _timezone_problem(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return "field 'traits.timezone': must be an IANA time zone name such as Europe/Berlin"
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return f"field 'traits.timezone': unknown time zone {value!r}"
    return None

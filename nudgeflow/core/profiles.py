"""Customer profiles: the segment and contact preferences that policies and segment rules read.

Live mode reads the Redis hash `profile:<user_id>`; replay reads `--profiles`.
Both go through `profile_from_mapping`, so a profile means the same in both.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import orjson

from nudgeflow.core.errors import InputFileError
from nudgeflow.core.triggers import CHANNELS, Channel

DEFAULT_SEGMENT: Final = "new"


@dataclass(frozen=True, slots=True)
class Profile:
    """What nudgeflow needs of a customer. No profile at all is `Profile()`: segment `new`."""

    segment: str = DEFAULT_SEGMENT
    opt_in: tuple[Channel, ...] = ()
    timezone: str | None = None
    name: str | None = None


NO_PROFILE: Final = Profile()

# Every distinct opt-in list, shared: a user's profile is held with their state.
_OPT_INS: dict[tuple[Channel, ...], tuple[Channel, ...]] = {}


def make_profile(
    segment: str = DEFAULT_SEGMENT,
    opt_in: tuple[Channel, ...] | list[Channel] = (),
    timezone: str | None = None,
    name: str | None = None,
) -> Profile:
    """A `Profile` whose repeated parts (segment, opt-ins, time zone) are shared between users.

    Every active user holds their profile, and the same few segments and zones
    would otherwise be a string copy per user.
    """
    channels = tuple(opt_in)
    shared = _OPT_INS.setdefault(channels, channels)
    if segment == DEFAULT_SEGMENT and not shared and timezone is None and name is None:
        return NO_PROFILE
    return Profile(
        segment=sys.intern(segment),
        opt_in=shared,
        timezone=None if timezone is None else sys.intern(timezone),
        name=name,
    )


# (segment, opt-ins, zone) -> the one `Profile` every user with those holds; bounded, since
# segments are free text: past the bound a profile is held on its own.
_HELD: dict[tuple[str, tuple[Channel, ...], str | None], Profile] = {}
_HELD_MAX: Final = 10_000


def held_profile(profile: Profile) -> Profile:
    """The profile as a user's detection state holds it: what detection reads, shared.

    Detection and the policies read the segment, the opt-ins and the time zone;
    the name is for messages, which read the profile store when they render.
    So the held profile has no name, and users alike share one object.
    """
    if profile is NO_PROFILE:
        return profile
    key = (profile.segment, profile.opt_in, profile.timezone)
    held = _HELD.get(key)
    if held is None:
        held = make_profile(profile.segment, profile.opt_in, profile.timezone, None)
        if len(_HELD) < _HELD_MAX:
            _HELD[key] = held
    return held


def profile_from_mapping(data: Mapping[str, Any]) -> Profile:
    """A profile from a JSON object or a Redis hash (whose values are all strings).

    A segment that is not a string means `new`; `opt_in` is a list of channels or
    a comma-separated string; unknown channels are ignored.
    """
    segment = data.get("segment")
    raw_opt_in = data.get("opt_in")
    if isinstance(raw_opt_in, str):
        raw_opt_in = raw_opt_in.replace(" ", "").split(",") if raw_opt_in else []
    if not isinstance(raw_opt_in, list | tuple):
        raw_opt_in = []
    opt_in = tuple(c for c in CHANNELS if c in raw_opt_in)
    timezone = data.get("timezone")
    name = data.get("name")
    return make_profile(
        segment=segment if isinstance(segment, str) else DEFAULT_SEGMENT,
        opt_in=opt_in,
        timezone=timezone if isinstance(timezone, str) and timezone else None,
        name=name if isinstance(name, str) else None,
    )


def load_profiles(path: Path) -> dict[str, Profile]:
    """`PROFILES.jsonl`: one object per line with `user_id`; the last line for a user wins.

    Lines that are blank, not objects or without a string `user_id` are skipped:
    a profile file is reference data, and one bad line must not hide the others.
    """
    profiles: dict[str, Profile] = {}
    try:
        with path.open("rb") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    data = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(data, dict) and isinstance(data.get("user_id"), str):
                    profiles[data["user_id"]] = profile_from_mapping(data)
    except OSError as exc:
        msg = f"cannot read profiles {path}: {exc.strerror or exc}"
        raise InputFileError(msg) from None
    return profiles

"""Identify traits -> the profile hash, read back as the flow reads it."""

from __future__ import annotations

from typing import Any

import pytest

from nudgeflow.collect.identify import ProfileUpdate, profile_update
from nudgeflow.core.profiles import profile_from_mapping


def test_traits_become_the_profile_the_flow_reads() -> None:
    update = profile_update({"userId": "u1", "traits": {
        "segment": "vip", "opt_in": ["sms", "email"], "timezone": "Europe/Berlin",
        "firstName": "Ada", "lastName": "L", "email": "a@example.com", "plan": "ignored",
    }})
    assert isinstance(update, ProfileUpdate)
    assert update.key == "profile:u1"
    assert update.fields == {"segment": "vip", "opt_in": "email,sms", "timezone": "Europe/Berlin",
                             "name": "Ada L", "email": "a@example.com"}
    profile = profile_from_mapping(update.fields)
    assert (profile.segment, profile.opt_in, profile.timezone) == (
        "vip", ("email", "sms"), "Europe/Berlin")


@pytest.mark.parametrize(("call", "reason"), [
    ({"traits": {"segment": "vip"}}, "identify needs a userId"),
    ({"userId": "u1", "traits": []}, "field 'traits': must be an object"),
    ({"userId": "u1", "traits": {"opt_in": ["fax"]}}, "unknown channel 'fax'"),
    ({"userId": "u1", "traits": {"timezone": "Mars/Olympus"}}, "unknown time zone"),
    ({"userId": "u1", "traits": {"segment": 3}}, "field 'traits.segment'"),
    ({"userId": "u1", "traits": {"plan": "pro"}}, "carries none of the traits"),
])
def test_an_identify_that_cannot_be_stored_says_why(call: dict[str, Any], reason: str) -> None:
    result = profile_update(call)
    assert isinstance(result, str)
    assert reason in result

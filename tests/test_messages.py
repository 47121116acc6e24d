"""Personalised messages: the shipped templates, the checks at start, SMS length, rendering."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import orjson
import pytest

from nudgeflow.core.errors import ConfigError
from nudgeflow.core.profiles import Profile
from nudgeflow.core.rules import RulesConfig, load_rules, parse_rules
from nudgeflow.core.settings import DEFAULT_RULES, DispatchSettings
from nudgeflow.core.triggers import Channel, Decision, Trigger, make_trigger_id
from nudgeflow.enrich.messages import (
    DEFAULT_TEMPLATES_DIR,
    SMS_LIMIT,
    MessageRenderer,
    RenderedMessage,
    SampleRender,
    gsm7_length,
    to_gsm7,
)
from nudgeflow.enrich.profile_store import StaticProfiles
from nudgeflow.sinks.dispatch import Dispatcher, DispatchResult

FIRED_AT_MS = 1_772_359_200_000
# An offer as long as a real one gets: every template's offer branch is rendered too.
LONG_OFFER = {"code": "WELCOMEBACK-2026-XL", "discount": "15%"}


@pytest.fixture(scope="module")
def rules() -> RulesConfig:
    return load_rules(DEFAULT_RULES)


@pytest.fixture(scope="module")
def rules_with_offers(rules: RulesConfig) -> RulesConfig:
    return rules.model_copy(
        update={"rules": [rule.model_copy(update={"offer": LONG_OFFER}) for rule in rules.rules]}
    )


@pytest.fixture(scope="module")
def renderer(rules: RulesConfig) -> MessageRenderer:
    return MessageRenderer.load(DEFAULT_TEMPLATES_DIR, rules)


def all_samples(renderer: MessageRenderer, config: RulesConfig) -> list[SampleRender]:
    return [
        sample for rule in config.rules for sample in renderer.sample_renders(rule, config)
    ]


def sms_overflows(samples: list[SampleRender]) -> list[str]:
    """Every SMS sample whose template output (before any cut) exceeds 160 GSM-7 characters."""
    problems = []
    for sample in samples:
        if sample.channel != "sms":
            continue
        length = gsm7_length(sample.raw_body)
        if length is None or length > SMS_LIMIT:
            problems.append(f"{sample.template} ({sample.sample}): {length} > {SMS_LIMIT}")
    return problems


def decision(
    trigger_type: str = "cart_abandonment",
    channel: Channel = "sms",
    metadata: dict[str, object] | None = None,
) -> Decision:
    trigger = Trigger(
        trigger_id=make_trigger_id(trigger_type, "u1", FIRED_AT_MS),
        trigger_type=trigger_type,
        user_id="u1",
        fired_at_ms=FIRED_AT_MS,
        detected_at_ms=FIRED_AT_MS + 12,
        segment="regular",
        metadata=metadata
        if metadata is not None
        else {
            "cart_value": 113.4,
            "items": [
                {"product_id": "p-1042", "quantity": 1, "price": 89.9},
                {"product_id": "p-2210", "quantity": 1, "price": 23.5},
            ],
        },
    )
    return Decision(trigger, "dispatched", None, channel=channel, send_at_ms=FIRED_AT_MS)


# -- the shipped templates -------------------------------------------------------------------


def test_every_rule_has_a_template_per_channel(
    renderer: MessageRenderer, rules: RulesConfig
) -> None:
    expected = {
        (rule.name, channel)
        for rule in rules.rules
        for channel in (rule.channels or rules.policies.channels)
    }
    assert set(renderer.templates) == expected
    shipped = {path.name for path in DEFAULT_TEMPLATES_DIR.glob("*.j2")}
    assert shipped == {f"{name}.{channel}.j2" for name, channel in expected}


def test_every_sms_template_fits_160_gsm7_characters_with_long_realistic_data(
    rules_with_offers: RulesConfig,
) -> None:
    renderer = MessageRenderer.load(DEFAULT_TEMPLATES_DIR, rules_with_offers)
    samples = all_samples(renderer, rules_with_offers)

    assert {s.sample for s in samples if s.channel == "sms"} == {"typical", "minimal", "long"}
    assert sms_overflows(samples) == []


def test_the_sms_check_refuses_a_template_that_is_too_long(tmp_path: Path) -> None:
    config = parse_rules(
        "rules:\n"
        "  - {name: cart_abandonment, kind: absence, after: {event: add_to_cart},\n"
        "     timeout: 15m, metadata: cart, channels: [sms]}\n"
    )
    (tmp_path / "cart_abandonment.sms.j2").write_text(
        "{{ profile.first_name or 'Hi' }}, your cart holds "
        "{{ cart.items | map(attribute='product_id') | join(', ') }}. Reply STOP to opt out\n"
    )
    renderer = MessageRenderer.load(tmp_path, config)

    problems = sms_overflows(all_samples(renderer, config))

    assert problems == [f"cart_abandonment.sms.j2 (long): 506 > {SMS_LIMIT}"]


def test_emails_have_a_subject_and_pushes_a_title(
    renderer: MessageRenderer, rules_with_offers: RulesConfig
) -> None:
    offers = MessageRenderer.load(DEFAULT_TEMPLATES_DIR, rules_with_offers)
    for sample in all_samples(renderer, rules_with_offers) + all_samples(
        offers, rules_with_offers
    ):
        message = sample.message
        assert message.body, sample
        assert "  " not in message.body.replace("\n", " ").strip() or sample.channel == "email"
        if sample.channel == "sms":
            assert message.subject is None
        else:
            assert message.subject, sample
            assert "\n" not in message.subject


def test_offer_appears_when_the_rule_has_one(rules_with_offers: RulesConfig) -> None:
    renderer = MessageRenderer.load(DEFAULT_TEMPLATES_DIR, rules_with_offers)

    message = renderer.render(decision(), Profile(name="Ada Lovelace"))

    assert message.body == (
        "Ada, your cart (2 items, $113.40) is waiting for you. "
        "Use code WELCOMEBACK-2026-XL at checkout. Reply STOP to opt out"
    )


def test_render_an_email(renderer: MessageRenderer) -> None:
    message = renderer.render(decision(channel="email"), Profile(name="Ada Lovelace"))

    assert message.subject == "Ada, you left something in your cart"
    assert message.body == (
        "Hi Ada,\n\nyou left 2 items in your cart:\n\n"
        "- p-1042 x 1 at $89.90\n- p-2210 x 1 at $23.50\n\n"
        "Total: $113.40\n\nYour cart is saved for you whenever you are ready."
    )


def test_render_without_a_profile_name(renderer: MessageRenderer) -> None:
    message = renderer.render(decision(channel="push"), Profile())

    assert message == RenderedMessage(
        "Still thinking it over?", "Hey, p-1042 and p-2210 are still in your cart."
    )


def test_metadata_items_is_the_metadata_not_a_dict_method(tmp_path: Path) -> None:
    config = parse_rules(
        "rules:\n"
        "  - {name: browse, kind: session_close, channels: [push],\n"
        "     require: [{event: page_view, where: {page_type: product}}]}\n"
    )
    (tmp_path / "browse.push.j2").write_text(
        "{{ trigger.metadata.products | listing(3) }} ({{ trigger.metadata.session_end }})\n"
    )
    renderer = MessageRenderer.load(tmp_path, config)

    message = renderer.render(
        decision("browse", "push", {"products": ["a", "b", "c", "d", "e"], "session_end": "x"}),
        Profile(),
    )

    assert message.body == "a, b, c and 2 more (x)"


# -- refused at start ------------------------------------------------------------------------


ONE_RULE = (
    "rules:\n"
    "  - {name: product_interest, kind: count_in_window, channels: [push],\n"
    "     match: {event: page_view, where: {page_type: product}}, scope: product_id,\n"
    "     window: 10m, min_count: 3}\n"
)


def test_a_missing_variable_is_refused_at_start_naming_file_and_variable(tmp_path: Path) -> None:
    template = tmp_path / "product_interest.push.j2"
    # `cart` exists only for cart rules; this rule counts product views.
    template.write_text("{{ trigger.metadata.product_id }}: {{ cart.value }}\n")

    with pytest.raises(ConfigError) as caught:
        MessageRenderer.load(tmp_path, parse_rules(ONE_RULE))

    message = str(caught.value)
    assert message.startswith(f"{template}: undefined variable: 'cart' is undefined")
    assert "rule 'product_interest', kind count_in_window" in message


def test_a_missing_field_names_its_dotted_path(tmp_path: Path) -> None:
    (tmp_path / "product_interest.push.j2").write_text("{{ trigger.metadata.url }}\n")

    with pytest.raises(ConfigError, match=r"trigger\.metadata\.url is undefined"):
        MessageRenderer.load(tmp_path, parse_rules(ONE_RULE))


def test_an_offer_field_the_rule_lacks_is_refused(tmp_path: Path) -> None:
    (tmp_path / "product_interest.push.j2").write_text(
        "{% if offer.code is defined %}{{ offer.code }}: {{ offer.discount }}{% endif %}\n"
    )
    config = parse_rules(ONE_RULE.replace("min_count: 3}", "min_count: 3, offer: {code: X}}"))

    with pytest.raises(ConfigError, match=r"offer\.discount is undefined"):
        MessageRenderer.load(tmp_path, config)


def test_a_missing_template_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"product_interest\.push\.j2: missing template"):
        MessageRenderer.load(tmp_path, parse_rules(ONE_RULE))


def test_a_syntax_error_is_refused_with_its_line(tmp_path: Path) -> None:
    template = tmp_path / "product_interest.push.j2"
    template.write_text("fine\n{% if %}\n")

    with pytest.raises(ConfigError, match=rf"{template}:2: template syntax error"):
        MessageRenderer.load(tmp_path, parse_rules(ONE_RULE))


def test_an_email_without_subject_is_refused(tmp_path: Path) -> None:
    (tmp_path / "product_interest.email.j2").write_text("Hello\n")
    config = parse_rules(ONE_RULE.replace("channels: [push]", "channels: [email]"))

    with pytest.raises(ConfigError, match="must start with a 'Subject:"):
        MessageRenderer.load(tmp_path, config)


def test_experiment_variant_channels_need_templates_too(tmp_path: Path) -> None:
    (tmp_path / "product_interest.push.j2").write_text("hi\n")
    config = parse_rules(
        ONE_RULE.replace(
            "min_count: 3}",
            "min_count: 3,\n     experiment: {name: x, variants: [{name: a, channels: [sms]}]}}",
        )
    )

    with pytest.raises(ConfigError, match=r"product_interest\.sms\.j2: missing template"):
        MessageRenderer.load(tmp_path, config)


# -- GSM-7 and cutting -----------------------------------------------------------------------


def test_gsm7_length_counts_extension_characters_twice() -> None:
    assert gsm7_length("Hello @ $5") == 10
    assert gsm7_length("{€}") == 6
    assert gsm7_length("emoji 🛒") is None


def test_to_gsm7_transliterates() -> None:
    typographic = "Zo\u00eb \u201c\u0141ucja\u201d \u0106wik \u2013 5 \u00d7 2\u2026"
    assert to_gsm7(typographic) == 'Zoe "?ucja" Cwik - 5 x 2...'
    assert gsm7_length(to_gsm7("Ωmega 🛒 ñ")) is not None


def test_a_non_gsm_name_does_not_leave_gsm7(renderer: MessageRenderer) -> None:
    message = renderer.render(decision(), Profile(name="Renée Ćwik"))

    assert message.body.startswith("Renée, your cart")  # é is GSM-7, Ć is not
    assert gsm7_length(message.body) is not None
    other = renderer.render(decision(), Profile(name="Zoë Ćwik"))
    assert other.body.startswith("Zoe, your cart")
    emoji = renderer.render(decision(), Profile(name="🛒 Ćwik"))
    assert emoji.body.startswith("?, your cart")


def test_an_overlong_sms_is_cut_at_render_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = parse_rules(ONE_RULE.replace("channels: [push]", "channels: [sms]"))
    (tmp_path / "product_interest.sms.j2").write_text(
        "{{ trigger.metadata.product_id }} " + "word " * 40 + "\n"
    )
    renderer = MessageRenderer.load(tmp_path, config)

    with caplog.at_level(logging.WARNING):
        message = renderer.render(
            decision("product_interest", "sms", {"product_id": "p1"}), Profile()
        )

    assert gsm7_length(message.body) == SMS_LIMIT
    assert message.body.endswith("word...")
    assert "cut to 160 characters" in caplog.text


# -- wired into the dispatcher ---------------------------------------------------------------


def test_dispatcher_adds_the_rendered_message_to_the_body(renderer: MessageRenderer) -> None:
    profiles = StaticProfiles({"u1": Profile(name="Ada Lovelace", opt_in=("sms",))})
    bodies: list[dict[str, object]] = []

    async def api(request: httpx.Request) -> httpx.Response:
        bodies.append(orjson.loads(request.content))
        return httpx.Response(202, json={})

    async def go() -> list[DispatchResult]:
        async with Dispatcher(
            DispatchSettings(url="http://api.test"),
            transport=httpx.MockTransport(api),
            render=renderer.for_profiles(profiles),
        ) as dispatcher:
            return await dispatcher.send_all([decision()])

    [result] = asyncio.run(go())

    assert result.ok
    [body] = bodies
    assert body["message"] == {
        "body": "Ada, your cart (2 items, $113.40) is waiting for you. Reply STOP to opt out"
    }


def test_a_decision_that_cannot_be_rendered_is_a_failure_without_an_attempt(
    renderer: MessageRenderer,
) -> None:
    requests: list[httpx.Request] = []
    failures: list[tuple[Decision, DispatchResult]] = []

    async def api(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(202, json={})

    async def go() -> list[DispatchResult]:
        async with Dispatcher(
            DispatchSettings(url="http://api.test"),
            transport=httpx.MockTransport(api),
            render=renderer.for_profiles(StaticProfiles()),
            on_failure=lambda d, r: failures.append((d, r)),
        ) as dispatcher:
            # no template for this type: the rules changed under a running flow
            return await dispatcher.send_all([decision("no_such_rule")])

    [result] = asyncio.run(go())

    assert requests == []
    assert (result.ok, result.attempts) == (False, 0)
    assert result.error == "message not rendered: KeyError: 'no template no_such_rule.sms.j2'"
    assert [r for _, r in failures] == [result]

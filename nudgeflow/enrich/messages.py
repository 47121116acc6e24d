"""Personalised messages: Jinja2 templates per trigger type and channel (issue 3, part 2).

    config/templates/<trigger_type>.<channel>.j2      e.g. cart_abandonment.sms.j2

A template sees four names:

| name       | what                                                                   |
|------------|------------------------------------------------------------------------|
| `profile`  | `name`, `first_name` (None when unknown), `segment`                    |
| `trigger`  | `type`, `user_id`, `fired_at` (RFC 3339), `segment`, `metadata.<key>`  |
| `offer`    | the rule's `offer` fields (`offer: {code: COMEBACK10}` → `offer.code`) |
| `cart`     | cart rules: `items` (`product_id`, `quantity`, `price`), `value`, `count`, `lines` |

`cart.count` is the number of units, `cart.lines` the number of distinct products.
`trigger.metadata` holds what the rule kind puts there (TRIGGERS.md: `product_id`,
`url`, `dwell_ms`, `products`, `count`, `experiment`, …). Filters: `money`
(`1234.5` → `1,234.50`) and `listing(max_items=3, max_chars=None)`, which joins a
list and cuts it sensibly (`p1, p2 and 3 more`).

An email template starts with a `Subject: …` line, then a blank line, then the
body. A push template may start with one too (the notification's title). SMS
bodies are one line of GSM-7 text: whitespace is collapsed, characters outside
GSM-7 are transliterated (`é` → `e`, `“` → `"`), and a body past 160 GSM-7
characters is cut with `...` (and logged: the shipped templates are tested to
stay within it with long, realistic data).

Undefined names are errors (`StrictUndefined`), and they are found at start:
`MessageRenderer.load` renders every template a rule can use against sample
contexts of that rule's kind (typical, minimal and long) and raises
`ConfigError` naming the template file and the missing variable. A missing
template for a channel a rule lists is refused the same way.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jinja2

from nudgeflow.core.errors import ConfigError
from nudgeflow.core.profiles import NO_PROFILE, Profile
from nudgeflow.core.resources import DEFAULT_TEMPLATES
from nudgeflow.core.rules import Rule, RulesConfig
from nudgeflow.core.sample_metadata import SAMPLE_FIRED_AT
from nudgeflow.core.timeutil import format_ms
from nudgeflow.core.triggers import Channel, Decision, Trigger
from nudgeflow.enrich.profile_store import ProfileLookup

__all__ = [
    "DEFAULT_TEMPLATES_DIR",
    "SMS_LIMIT",
    "MessageRenderer",
    "ProfileRender",
    "RenderedMessage",
    "SampleRender",
    "gsm7_length",
    "message_context",
    "to_gsm7",
]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES_DIR: Final = DEFAULT_TEMPLATES
SMS_LIMIT: Final = 160
_SUBJECT: Final = "Subject:"
_ELLIPSIS: Final = "..."

# GSM 03.38: the basic set (1 septet each) and the extension table (2 septets: ESC + char).
_GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED: Final = frozenset("^{}\\[~]|€\f")
# Common typography that GSM-7 lacks, and what it becomes.
_TYPOGRAPHY: Final = {
    "‘": "'", "’": "'", "‚": "'", "“": '"', "”": '"', "„": '"',  # noqa: RUF001
    "–": "-", "—": "-", "…": "...", "\u00a0": " ", "•": "-", "×": "x",  # noqa: RUF001
}


def gsm7_length(text: str) -> int | None:
    """Septets `text` takes in GSM-7 (extension characters count 2); None if not encodable."""
    length = 0
    for char in text:
        if char in _GSM7_BASIC:
            length += 1
        elif char in _GSM7_EXTENDED:
            length += 2
        else:
            return None
    return length


def to_gsm7(text: str) -> str:
    """`text` with every character GSM-7 lacks transliterated (accents dropped) or `?`."""
    if gsm7_length(text) is not None:
        return text
    out: list[str] = []
    for char in text:
        if char in _GSM7_BASIC or char in _GSM7_EXTENDED:
            out.append(char)
            continue
        if char in _TYPOGRAPHY:
            out.append(_TYPOGRAPHY[char])
            continue
        base = "".join(
            c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c)
        )
        out.append(base if base and gsm7_length(base) is not None else "?")
    return "".join(out)


def _fit_sms(text: str, limit: int = SMS_LIMIT) -> str:
    """Cut `text` (GSM-7) to `limit` septets, ending with `...` if it was cut."""
    length = gsm7_length(text)
    if length is not None and length <= limit:
        return text
    budget = limit - len(_ELLIPSIS)
    kept: list[str] = []
    used = 0
    for char in text:
        cost = 2 if char in _GSM7_EXTENDED else 1
        if used + cost > budget:
            break
        kept.append(char)
        used += cost
    return "".join(kept).rstrip() + _ELLIPSIS


# --- the template context ------------------------------------------------------------------


class _Fields:
    """Read-only attribute access to a mapping; knows its path for error messages.

    Unlike a dict it has no methods of its own, so `metadata.items` is the
    metadata's `items`, not `dict.items`.
    """

    __slots__ = ("_path", "_values")

    def __init__(self, path: str, values: Mapping[str, Any]) -> None:
        self._path = path
        self._values = {key: _wrap(f"{path}.{key}", value) for key, value in values.items()}

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __repr__(self) -> str:
        return f"<{self._path}>"


def _wrap(path: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        return _Fields(path, value)
    if isinstance(value, list | tuple):
        return [_wrap(path, item) for item in value]
    return value


class _StrictUndefined(jinja2.StrictUndefined):
    """StrictUndefined whose message names the dotted path: `offer.code is undefined`."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        owner = self._undefined_obj
        if isinstance(owner, _Fields):
            return f"{owner._path}.{self._undefined_name} is undefined"
        return str(super()._undefined_message)


def _first_name(name: str | None) -> str | None:
    if name is None:
        return None
    parts = name.split()
    return parts[0] if parts else None


def message_context(
    trigger: Trigger, profile: Profile, offer: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """What a template sees for `trigger`, `profile` and the rule's `offer`."""
    metadata = trigger.metadata
    context: dict[str, Any] = {
        "profile": _Fields(
            "profile",
            {
                "name": profile.name,
                "first_name": _first_name(profile.name),
                "segment": profile.segment,
            },
        ),
        "trigger": _Fields(
            "trigger",
            {
                "type": trigger.trigger_type,
                "user_id": trigger.user_id,
                "fired_at": format_ms(trigger.fired_at_ms),
                "segment": trigger.segment,
                "metadata": metadata,
            },
        ),
        "offer": _Fields("offer", offer or {}),
    }
    items = metadata.get("items")
    if isinstance(items, list) and "cart_value" in metadata:
        quantities = [
            item.get("quantity", 1) for item in items if isinstance(item, Mapping)
        ]
        context["cart"] = _Fields(
            "cart",
            {
                "items": items,
                "value": metadata["cart_value"],
                "count": sum(q for q in quantities if isinstance(q, int)),
                "lines": len(items),
            },
        )
    return context


def _money(value: Any) -> str:
    if value is None or isinstance(value, jinja2.Undefined):
        return ""
    return f"{float(value):,.2f}"


def _listing(values: Iterable[Any], max_items: int = 3, max_chars: int | None = None) -> str:
    """`a, b and 3 more`: at most `max_items` shown, and the text within `max_chars`."""
    shown = [str(value) for value in values]
    total = len(shown)
    if max_chars is not None:
        # Long names are cut one by one to share the budget.
        per_item = max(max_chars // max(min(total, max_items), 1), 8)
        shown = [s if len(s) <= per_item else s[: per_item - 3] + _ELLIPSIS for s in shown]
    counts = list(range(min(total, max_items), 0, -1))
    if total == max_items + 1:
        counts.insert(0, total)  # "a, b and c" rather than "a, b and 1 more"
    for count in counts:
        head = shown[:count]
        rest = total - count
        if rest == 0:
            text = head[0] if count == 1 else ", ".join(head[:-1]) + " and " + head[-1]
        else:
            text = ", ".join(head) + f" and {rest} more"
        if max_chars is None or len(text) <= max_chars or count == 1:
            return text
    return ""


# --- rendering -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """One message: `subject` (email subject, push title; None for SMS) and `body`."""

    subject: str | None
    body: str

    def to_json(self) -> dict[str, str]:
        out = {"body": self.body}
        if self.subject is not None:
            out["subject"] = self.subject
        return out


@dataclass(frozen=True, slots=True)
class SampleRender:
    """One template rendered against one sample context (for tests and checks)."""

    template: str
    rule: str
    channel: Channel
    sample: str
    message: RenderedMessage
    raw_body: str  # before SMS fitting: what the template itself produced


def _template_name(trigger_type: str, channel: str) -> str:
    return f"{trigger_type}.{channel}.j2"


def _rule_channels(rule: Rule, config: RulesConfig) -> list[Channel]:
    channels: list[Channel] = list(rule.channels or config.policies.channels)
    if rule.experiment is not None:
        for variant in rule.experiment.variants:
            channels.extend(variant.channels or [])
    return list(dict.fromkeys(channels))


class MessageRenderer:
    """Renders the message of a dispatched decision; built and checked by `load`."""

    def __init__(
        self,
        environment: jinja2.Environment,
        templates: Mapping[tuple[str, Channel], jinja2.Template],
        offers: Mapping[str, Mapping[str, str]],
        *,
        sms_limit: int = SMS_LIMIT,
    ) -> None:
        self._environment = environment
        self._templates = dict(templates)
        self._offers = {name: dict(offer) for name, offer in offers.items()}
        self._sms_limit = sms_limit

    @classmethod
    def load(
        cls, templates_dir: Path = DEFAULT_TEMPLATES_DIR, rules_config: RulesConfig | None = None
    ) -> MessageRenderer:
        """Compile the templates every rule needs and render each against sample contexts.

        Raises `ConfigError` naming the template file: missing, not valid Jinja,
        using a variable its rule kind does not provide, or an email without a
        `Subject:` line.
        """
        if rules_config is None:
            msg = "MessageRenderer.load needs the rules config"
            raise ConfigError(msg)
        if not templates_dir.is_dir():
            msg = f"templates directory {templates_dir} does not exist"
            raise ConfigError(msg)
        environment = _environment(templates_dir)
        templates: dict[tuple[str, Channel], jinja2.Template] = {}
        for rule in rules_config.rules:
            for channel in _rule_channels(rule, rules_config):
                name = _template_name(rule.name, channel)
                path = templates_dir / name
                if not path.is_file():
                    msg = (
                        f"{path}: missing template (rule {rule.name!r} lists channel {channel})"
                    )
                    raise ConfigError(msg)
                try:
                    templates[rule.name, channel] = environment.get_template(name)
                except jinja2.TemplateSyntaxError as exc:
                    msg = f"{path}:{exc.lineno}: template syntax error: {exc.message}"
                    raise ConfigError(msg) from None
        offers = {rule.name: rule.offer for rule in rules_config.rules}
        renderer = cls(environment, templates, offers)
        for rule in rules_config.rules:
            for _ in renderer.sample_renders(rule, rules_config, templates_dir):
                pass
        return renderer

    @property
    def templates(self) -> list[tuple[str, Channel]]:
        return sorted(self._templates)

    def render(self, decision: Decision, profile: Profile) -> RenderedMessage:
        """The message for a dispatched decision; KeyError for a type or channel without one."""
        if decision.channel is None:
            msg = f"decision {decision.trigger.trigger_id} has no channel"
            raise ValueError(msg)
        trigger = decision.trigger
        return self.render_trigger(trigger, decision.channel, profile)

    def render_trigger(
        self, trigger: Trigger, channel: Channel, profile: Profile
    ) -> RenderedMessage:
        template = self._templates.get((trigger.trigger_type, channel))
        if template is None:
            msg = f"no template {_template_name(trigger.trigger_type, channel)}"
            raise KeyError(msg)
        context = message_context(trigger, profile, self._offers.get(trigger.trigger_type))
        message, raw = self._render(template, channel, context)
        if raw != message.body:
            log.warning(
                "%s: SMS for %s cut to %d characters",
                template.name,
                trigger.trigger_id,
                self._sms_limit,
            )
        return message

    def for_profiles(self, profiles: ProfileLookup) -> ProfileRender:
        """A `nudgeflow.sinks.dispatch.Render` that looks up the profiles it lacks."""
        return ProfileRender(self, profiles)

    def sample_renders(
        self, rule: Rule, config: RulesConfig, templates_dir: Path | None = None
    ) -> Iterator[SampleRender]:
        """Render each of `rule`'s templates against each sample context of its kind.

        Raises `ConfigError` naming the template file and the undefined variable.
        """
        where = templates_dir if templates_dir is not None else Path()
        for channel in _rule_channels(rule, config):
            template = self._templates[rule.name, channel]
            name = _template_name(rule.name, channel)
            for sample, (trigger, profile) in sample_contexts(rule).items():
                context = message_context(trigger, profile, rule.offer)
                try:
                    message, raw = self._render(template, channel, context)
                except jinja2.UndefinedError as exc:
                    msg = (
                        f"{where / name}: undefined variable: {exc.message} "
                        f"(rule {rule.name!r}, kind {rule.kind}, {sample} sample)"
                    )
                    raise ConfigError(msg) from None
                except (jinja2.TemplateError, ValueError, TypeError) as exc:
                    msg = f"{where / name}: {exc} (rule {rule.name!r}, {sample} sample)"
                    raise ConfigError(msg) from None
                yield SampleRender(name, rule.name, channel, sample, message, raw)

    def _render(
        self, template: jinja2.Template, channel: Channel, context: Mapping[str, Any]
    ) -> tuple[RenderedMessage, str]:
        text = template.render(context)
        subject, body = _split_subject(text)
        if channel == "email":
            if subject is None:
                msg = f"an email template must start with a '{_SUBJECT} …' line"
                raise ValueError(msg)
            body = "\n".join(line.rstrip() for line in body.strip().splitlines())
            return RenderedMessage(subject, body), body
        body = " ".join(body.split())
        if channel == "sms":
            # An SMS has no subject: a template's Subject line, if any, leads the body.
            if subject is not None:
                body = f"{subject} {body}" if body else subject
            raw = to_gsm7(body)
            return RenderedMessage(None, _fit_sms(raw, self._sms_limit)), raw
        return RenderedMessage(subject, body), body


def _environment(templates_dir: Path) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir),
        undefined=_StrictUndefined,
        autoescape=False,  # plain text messages, never HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    environment.filters["money"] = _money
    environment.filters["listing"] = _listing
    return environment


def _split_subject(text: str) -> tuple[str | None, str]:
    stripped = text.lstrip()
    first, _, rest = stripped.partition("\n")
    if first.startswith(_SUBJECT):
        subject = " ".join(first[len(_SUBJECT) :].split())
        return subject, rest
    return None, text


# --- sample contexts per rule kind ---------------------------------------------------------

_LONG_NAME: Final = "Maximiliane Alexandra von Hohenzollern-Sigmaringen"
_PROFILES: Final = {
    "typical": Profile(segment="regular", opt_in=("email", "sms", "push"), name="Ada Lovelace"),
    "minimal": Profile(),
    "long": Profile(segment="vip", opt_in=("email", "sms", "push"), name=_LONG_NAME),
}


def _sample_metadata(rule: Rule, sample: str) -> dict[str, Any]:
    metadata = rule.sample_metadata(sample)
    if rule.experiment is not None:
        variant = rule.experiment.variants[0].name if rule.experiment.variants else None
        metadata["experiment"] = {
            "name": rule.experiment.name,
            "variant": variant,
            "holdout": False,
        }
    return metadata


def sample_contexts(rule: Rule) -> dict[str, tuple[Trigger, Profile]]:
    """Typical, minimal (no name, no url, no prices) and long triggers that `rule` can emit."""
    out: dict[str, tuple[Trigger, Profile]] = {}
    for sample, profile in _PROFILES.items():
        trigger = Trigger(
            trigger_id="00000000-0000-5000-8000-000000000000",
            trigger_type=rule.name,
            user_id="u-sample",
            fired_at_ms=SAMPLE_FIRED_AT,
            detected_at_ms=SAMPLE_FIRED_AT + 12,
            segment=rule.segment or profile.segment,
            metadata=_sample_metadata(rule, sample),
        )
        out[sample] = (trigger, profile)
    return out


class ProfileRender:
    """Renders decisions' messages as JSON (a `nudgeflow.sinks.dispatch.Render`).

    A decision fired by an event carries its profile. One fired by a timer, or
    resumed from a snapshot, has none: its profile is looked up, once for all of
    a batch request's decisions, because each lookup that misses the cache is a
    Redis round trip on the dispatch thread.
    """

    def __init__(self, renderer: MessageRenderer, profiles: ProfileLookup) -> None:
        self._renderer = renderer
        self._profiles = profiles

    def __call__(self, decision: Decision) -> dict[str, str]:
        return self.many([decision])[0]

    def many(self, decisions: Sequence[Decision]) -> list[dict[str, str]]:
        lacking = [d.trigger.user_id for d in decisions if not isinstance(d.profile, Profile)]
        found = self._profiles.lookup(lacking) if lacking else {}
        render = self._renderer.render
        return [
            render(d, d.profile if isinstance(d.profile, Profile)
                   else found.get(d.trigger.user_id, NO_PROFILE)).to_json()
            for d in decisions
        ]

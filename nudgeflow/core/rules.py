"""The rules file (`config/rules.yaml`): its schema, and loading it with errors that name the line.

A rule names its `kind` and parameters; adding a rule of an existing kind
needs no code. The file holds data only: no expressions, no code. A file that
does not validate is refused at start with `file:line: problem`.

Kinds (see README "Rules" for their exact semantics):

- `absence`          a deadline after an event or a trigger, unless cancelled first
- `count_in_window`  N matching events of one scope within a sliding window
- `threshold`        an event whose numeric field is above a value
- `session_close`    a session ends with some events and without others
- `revisit`          a matching event in a new session, within a span of an earlier one
- `sequence_count`   N triggers of one type within a window (over other rules' triggers)
- `nth_event`        the user's Nth matching event ever
- `high_intent`      the intent model scores the open session at `threshold` or more
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nudgeflow.core import sample_metadata as samples
from nudgeflow.core.errors import RulesError
from nudgeflow.core.events import EVENT_TYPES, Event
from nudgeflow.core.intent.model import ModelError, load_model
from nudgeflow.core.outcomes import DEFAULT_ATTRIBUTION_WINDOW_MS
from nudgeflow.core.resources import DEFAULT_INTENT_MODEL
from nudgeflow.core.timeutil import format_duration_ms, format_ms, parse_duration_ms
from nudgeflow.core.triggers import Channel


def _duration(value: object) -> object:
    if isinstance(value, str):
        return parse_duration_ms(value)
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    msg = f"bad duration {value!r}: write a number and a unit, e.g. 15m, 24h, 7d"
    raise ValueError(msg)


Duration = Annotated[int, BeforeValidator(_duration), Field(ge=0)]
PositiveDuration = Annotated[int, BeforeValidator(_duration), Field(gt=0)]

# Event fields a rule may filter or scope on: the scalar fields of the event.
EVENT_FIELDS = frozenset(Event.model_fields) - {"properties"}
NUMERIC_FIELDS = frozenset({"ts", "quantity", "price", "value", "dwell_ms"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_field(name: str) -> str:
    if name not in EVENT_FIELDS:
        msg = f"events have no field {name!r} (known: {', '.join(sorted(EVENT_FIELDS))})"
        raise ValueError(msg)
    return name


class EventMatch(_Strict):
    """Events of one type whose fields equal the given values (a list means any of them)."""

    event: str
    where: dict[str, str | int | float | bool | list[str | int | float]] = Field(
        default_factory=dict
    )

    @field_validator("event")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in EVENT_TYPES:
            msg = f"unknown event type {value!r} (known: {', '.join(sorted(EVENT_TYPES))})"
            raise ValueError(msg)
        return value

    @field_validator("where")
    @classmethod
    def _known_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            _check_field(name)
        return value

    def matches(self, event: Event) -> bool:
        if event.type != self.event:
            return False
        for name, wanted in self.where.items():
            actual = getattr(event, name)
            if isinstance(wanted, list):
                if actual not in wanted:
                    return False
            elif actual != wanted:
                return False
        return True


class TriggerRef(_Strict):
    trigger: str


class CartEmpty(_Strict):
    cart: Literal["empty"]


class VariantConfig(_Strict):
    name: str
    weight: float = Field(default=1.0, gt=0)
    delay: Duration | None = None
    channels: list[Channel] | None = None


class ExperimentConfig(_Strict):
    name: str
    holdout: float = Field(default=0.0, ge=0, lt=1)
    variants: list[VariantConfig] = Field(default_factory=list)


class RuleBase(_Strict):
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
    enabled: bool = True
    segment: str | None = None
    channels: list[Channel] | None = None
    delay: Duration = 0
    cancel_delayed_on: list[EventMatch] = Field(default_factory=list)
    frequency_capped: bool = True
    experiment: ExperimentConfig | None = None
    offer: dict[str, str] = Field(default_factory=dict)
    # A purchase within this span after `fired_at` converts the trigger (its outcome).
    attribution_window: PositiveDuration = DEFAULT_ATTRIBUTION_WINDOW_MS

    # What decides how the rule responds, not what it detects: changing these keeps
    # the rule's per-user state across a restart (`detection_fingerprint`).
    RESPONSE_FIELDS: ClassVar[frozenset[str]] = frozenset({
        "name", "enabled", "segment", "channels", "delay", "cancel_delayed_on",
        "frequency_capped", "experiment", "offer", "attribution_window",
    })

    def detection_fingerprint(self) -> str:
        """A digest of the parameters that shape what the rule detects and the state it keeps."""
        detection = self.model_dump(mode="json", exclude=set(self.RESPONSE_FIELDS))
        return hashlib.blake2b(
            json.dumps(detection, sort_keys=True).encode(), digest_size=8
        ).hexdigest()

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        """The `metadata` of a trigger this rule emits, for the `sample` of template checks."""
        return {}


class AbsenceRule(RuleBase):
    kind: Literal["absence"]
    after: EventMatch | TriggerRef
    timeout: PositiveDuration
    cancel_on: list[EventMatch | CartEmpty] = Field(default_factory=list)
    metadata: Literal["cart", "none"] = "none"

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        return samples.sample_cart(sample) if self.metadata == "cart" else {}


class CountInWindowRule(RuleBase):
    kind: Literal["count_in_window"]
    match: EventMatch
    window: PositiveDuration
    min_count: int = Field(ge=1)
    scope: str | None = None
    cooldown: Duration = 0

    _scope_known = field_validator("scope")(lambda v: v if v is None else _check_field(v))

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {"count": self.min_count,
                                    "window": format_duration_ms(self.window)}
        if self.scope is not None:
            metadata[self.scope] = samples.sample_scope(self.scope, sample)
        return metadata


class ThresholdRule(RuleBase):
    kind: Literal["threshold"]
    match: EventMatch
    field: str
    above: float
    scope: str | None = None
    cooldown: Duration = 0

    @field_validator("field")
    @classmethod
    def _numeric(cls, value: str) -> str:
        _check_field(value)
        if value not in NUMERIC_FIELDS:
            msg = f"field {value!r} is not numeric (numeric: {', '.join(sorted(NUMERIC_FIELDS))})"
            raise ValueError(msg)
        return value

    _scope_known = field_validator("scope")(lambda v: v if v is None else _check_field(v))

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            self.field: int(self.above) + (987_654 if sample == "long" else 1)
        }
        if self.scope is not None:
            metadata[self.scope] = samples.sample_scope(self.scope, sample)
        return metadata


class SessionCloseRule(RuleBase):
    kind: Literal["session_close"]
    require: list[EventMatch] = Field(default_factory=list)
    forbid: list[EventMatch] = Field(default_factory=list)
    cooldown: Duration = 0

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        long = sample == "long"
        count = 1 if sample == "minimal" else (15 if long else 3)
        return {
            "products": [samples.long_id(n) if long else f"p-{1000 + n}" for n in range(count)],
            "session_start": format_ms(samples.SAMPLE_FIRED_AT - 3_600_000),
            "session_end": format_ms(samples.SAMPLE_FIRED_AT - 1_800_000),
        }


class RevisitRule(RuleBase):
    kind: Literal["revisit"]
    match: EventMatch
    within: PositiveDuration
    cooldown: Duration = 0

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        url = None if sample == "minimal" else (
            samples.LONG_URL if sample == "long" else "https://shop.example.com/pricing"
        )
        return {"previous_visit_at": format_ms(samples.SAMPLE_FIRED_AT - 86_400_000),
                "url": url}


class SequenceCountRule(RuleBase):
    kind: Literal["sequence_count"]
    trigger: str
    window: PositiveDuration
    min_count: int = Field(ge=1)
    cooldown: Duration = 0

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        return {
            "count": self.min_count + (7 if sample == "long" else 0),
            "window": format_duration_ms(self.window),
            "of": self.trigger,
            "trigger_id": "5f0c2a4e-2b1d-5c3e-9f7a-0d1e2f3a4b5c",
        }


class NthEventRule(RuleBase):
    kind: Literal["nth_event"]
    match: EventMatch
    n: int = Field(ge=1)

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        return {"count": self.n}


class HighIntentRule(RuleBase):
    """Fires once per session when the intent model scores it at `threshold` or more.

    `model` is `default` (the model shipped inside nudgeflow, so a copy of the
    shipped rules file works anywhere) or a path, relative to the rules file's
    folder; it is loaded and its feature list checked when the rules are
    (`nudgeflow.core.intent.model`).
    """

    kind: Literal["high_intent"]
    model: str
    threshold: float = Field(default=0.70, ge=0, le=1)

    @field_validator("model")
    @classmethod
    def _loadable(cls, value: str, info: ValidationInfo) -> str:
        base = (info.context or {}).get("base_dir")
        path = DEFAULT_INTENT_MODEL if value == "default" else Path(value)
        if not path.is_absolute() and base is not None:
            path = Path(base) / path
        try:
            load_model(path)
        except ModelError as exc:
            raise ValueError(str(exc)) from None
        return str(path)

    def detection_fingerprint(self) -> str:
        # The model's version, not its path: the same model installed elsewhere keeps state.
        version = load_model(self.model).version if self.model else None
        detection = {"kind": self.kind, "threshold": self.threshold, "model": version}
        return hashlib.blake2b(
            json.dumps(detection, sort_keys=True).encode(), digest_size=8
        ).hexdigest()

    def sample_metadata(self, sample: str) -> dict[str, Any]:
        top = [{"feature": "session_cart_adds", "value": 2.0, "effect": 1.2},
               {"feature": "session_product_views", "value": 6.0, "effect": 0.4}]
        return {"score": 0.99 if sample == "long" else 0.83, "model": "sample-model",
                "top_features": [] if sample == "minimal" else top}


Rule = Annotated[
    AbsenceRule
    | CountInWindowRule
    | ThresholdRule
    | SessionCloseRule
    | RevisitRule
    | SequenceCountRule
    | NthEventRule
    | HighIntentRule,
    Field(discriminator="kind"),
]


class TimeConfig(_Strict):
    lateness: Duration = 30_000
    session_gap: PositiveDuration = 30 * 60_000
    # How long past the watermark a seen event_id is remembered (>= the 24 h dedup span).
    dedup_retention: Annotated[int, BeforeValidator(_duration), Field(ge=86_400_000)] = (
        7 * 86_400_000
    )


class FrequencyCap(_Strict):
    per_day: int = Field(default=3, ge=1)
    per_week: int = Field(default=10, ge=1)


def _channels(*names: Channel) -> list[Channel]:
    return list(names)


class QuietHours(_Strict):
    start: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")] = "21:00"
    end: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")] = "08:00"
    channels: list[Channel] = Field(default_factory=lambda: _channels("sms", "push"))


class PolicyConfig(_Strict):
    frequency_cap: FrequencyCap = FrequencyCap()
    quiet_hours: QuietHours = QuietHours()
    channels: list[Channel] = Field(default_factory=lambda: _channels("email", "push", "sms"))
    default_timezone: str = "UTC"


class RulesConfig(_Strict):
    version: Literal[1] = 1
    time: TimeConfig = TimeConfig()
    policies: PolicyConfig = PolicyConfig()
    rules: list[Rule]

    @model_validator(mode="after")
    def _cross_checks(self) -> RulesConfig:
        names = [rule.name for rule in self.rules]
        seen: set[str] = set()
        for index, name in enumerate(names):
            if name in seen:
                msg = f"rules.{index}.name: rule name {name!r} is used twice"
                raise ValueError(msg)
            seen.add(name)
        for index, rule in enumerate(self.rules):
            ref = None
            if isinstance(rule, AbsenceRule) and isinstance(rule.after, TriggerRef):
                ref = rule.after.trigger
            elif isinstance(rule, SequenceCountRule):
                ref = rule.trigger
            if ref is not None and ref not in seen:
                msg = f"rules.{index}: refers to trigger {ref!r}, which no rule defines"
                raise ValueError(msg)
        return self

    @property
    def enabled_rules(self) -> list[Rule]:
        return [rule for rule in self.rules if rule.enabled]


# --- loading with line numbers -------------------------------------------------------------


def load_rules(path: Path | str) -> RulesConfig:
    """Read and validate a rules file; raise `RulesError(file, line, problem)` if it is refused."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(str(path), None, f"cannot read: {exc}") from None
    return parse_rules(text, str(path), base_dir=path.parent)


def parse_rules(
    text: str, source: str = "<rules>", *, base_dir: Path | None = None
) -> RulesConfig:
    """Validate a rules file's text; relative paths in it (a model) are from `base_dir`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise RulesError(source, line, f"not valid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise RulesError(source, None, f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RulesError(source, 1, "the file must be a mapping with a 'rules' list")
    try:
        return RulesConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        loc = _clean_loc(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        # Cross-field checks carry their location at the start of the message.
        if loc == () and ":" in message and message.startswith("rules."):
            head, message = message.split(":", 1)
            loc = tuple(int(p) if p.isdigit() else p for p in head.split("."))
            message = message.strip()
        line = _line_of(node, loc)
        where = ".".join(str(p) for p in loc)
        if error["type"] == "missing":
            message = f"missing field {where!r}"
        elif error["type"] == "extra_forbidden":
            message = f"unknown field {where!r}"
        elif error["type"] == "union_tag_invalid":
            message = (
                f"{where}: unknown rule kind {error.get('input', {}).get('kind')!r} "
                "(known: absence, count_in_window, threshold, session_close, revisit, "
                "sequence_count, nth_event, high_intent)"
            )
        elif error["type"] == "union_tag_not_found":
            message = f"{where}: a rule needs a 'kind'"
        elif where:
            message = f"{where}: {message}"
        raise RulesError(source, line, message) from None


def _clean_loc(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    # Discriminated unions add the tag ('absence') and unions add the member's class
    # name ('EventMatch') to the location; neither is in the file.
    kinds = {"absence", "count_in_window", "threshold", "session_close", "revisit",
             "sequence_count", "nth_event", "high_intent", "EventMatch", "TriggerRef", "CartEmpty"}
    return tuple(p for p in loc if not (isinstance(p, str) and (p in kinds or "[" in p)))


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """The 1-based line of the deepest node of `loc` that the file has."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line

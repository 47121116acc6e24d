"""`nudgeflow explain`: why each rule fired, or did not, for one user — as readable text.

It replays the user's events through the same detector as the flow with a
trace turned on: every rule notes what it saw (a deadline set or moved, a
cancel, a count short of its threshold, a cooldown, a segment that does not
match, the policy outcome), and the trace is told event by event, then as a
verdict per rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson

from nudgeflow.core.envelope import DeadLetter, Origin, open_envelope
from nudgeflow.core.events import Event
from nudgeflow.core.profiles import NO_PROFILE, load_profiles
from nudgeflow.core.recording import iter_input_lines
from nudgeflow.core.rules import load_rules
from nudgeflow.core.settings import DEFAULT_RULES
from nudgeflow.core.stream_clock import StreamClock
from nudgeflow.core.timeutil import format_ms
from nudgeflow.core.triggers import Decision
from nudgeflow.flows.replay import input_end
from nudgeflow.operators.detector import Detector, Trace, UserState
from nudgeflow.operators.event_time import Admit


def _describe(event: Event) -> str:
    parts: list[str] = [event.type]
    if event.page_type and event.type in {"page_view", "page_leave"}:
        parts.append(event.page_type)
    if event.product_id:
        parts.append(event.product_id)
    if event.quantity and event.type in {"add_to_cart", "remove_from_cart"}:
        parts.append(f"x{event.quantity}")
    if event.dwell_ms is not None:
        parts.append(f"dwell {event.dwell_ms} ms")
    if event.url:
        parts.append(event.url)
    return " ".join(parts)


def _line_user(raw: bytes) -> object:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data.get("user_id") if isinstance(data, dict) else None


def explain_user(
    events: Path, user_id: str, *, profiles: Path | None = None, rules: Path | None = None
) -> Iterator[str]:
    config = load_rules(rules or DEFAULT_RULES)
    detector = Detector(config)
    profile = (load_profiles(profiles) if profiles else {}).get(user_id, NO_PROFILE)
    state = detector.new_user(user_id)
    opted = ", ".join(profile.opt_in) or "nothing"
    yield (f"user {user_id}: segment {profile.segment!r}, opted in to {opted}, "
           f"timezone {profile.timezone or config.policies.default_timezone}")

    trace: Trace = []
    fired: dict[str, list[str]] = {}
    counts = {"applied": 0, "duplicate": 0, "late": 0, "invalid": 0}
    body: list[str] = []
    last_notes: dict[str, str] = {}  # latest note per rule: the verdict of one that never fired
    stream = StreamClock()  # every user's lines move it, as in the replay flow
    for number, raw in iter_input_lines(events):
        opened = open_envelope(raw, Origin(line=number))
        if isinstance(opened, DeadLetter):
            if _line_user(raw) == user_id:
                counts["invalid"] += 1
                body.append(f"line {number}: not an event: {opened.reason}")
            continue
        event = opened.event
        stamp = stream.read(event.ts, None)
        if event.user_id != user_id:
            continue
        trace.clear()
        verdict, decisions = detector.process(state, event, profile, trace=trace, stream=stamp)
        counts[verdict.value] += 1
        head = f"{format_ms(event.ts)}  line {number}  {_describe(event)}"
        if verdict is not Admit.APPLY:
            why = ("repeats an event_id seen within 24 h" if verdict is Admit.DUPLICATE
                   else f"below the user's clock minus the lateness "
                        f"{format_ms(state.admission.watermark or 0)}")
            body.append(f"{head}  -> {verdict.value}: {why}, not applied")
            body.extend(_story(trace, last_notes))
            _tally(fired, decisions)
            continue
        body.append(head)
        body.extend(_story(trace, last_notes))
        _tally(fired, decisions)

    end = input_end(events)
    if end is not None:
        body.extend(_end_of_input(detector, state, end, fired, last_notes))

    yield (f"events: {counts['applied']} applied, {counts['duplicate']} duplicate, "
           f"{counts['late']} late, {counts['invalid']} invalid")
    yield ""
    yield from body
    yield ""
    yield "per rule:"
    for logic in detector.logics:
        outcomes = fired.get(logic.name)
        if outcomes:
            yield f"  {logic.name}: fired {len(outcomes)}x ({', '.join(outcomes)})"
        else:
            reason = last_notes.get(logic.name, "no event ever matched this rule")
            yield f"  {logic.name}: did not fire; last: {reason}"


def _tally(fired: dict[str, list[str]], decisions: list[Decision]) -> None:
    for decision in decisions:
        fired.setdefault(decision.trigger.trigger_type, []).append(
            decision.decision if decision.dispatched else f"suppressed ({decision.reason})"
        )


def _end_of_input(
    detector: Detector,
    state: UserState,
    end: int,
    fired: dict[str, list[str]],
    last_notes: dict[str, str],
) -> list[str]:
    trace: Trace = []
    decisions = detector.finish(state, end, trace=trace)
    _tally(fired, decisions)
    for timer in state.timers.pending():
        name = timer.rule if not timer.rule.startswith("@") else "session close"
        message = f"deadline {format_ms(timer.deadline)} is after the end of the input: not decided"
        trace.append((timer.deadline, name, message))
    lines = [f"end of the input ({format_ms(end)}): timers due by then are decided"]
    lines.extend(_story(trace, last_notes))
    return lines


def _story(trace: Trace, last_notes: dict[str, str]) -> list[str]:
    """The trace as indented lines; remembers each rule's latest note for the verdicts."""
    lines = []
    for _, rule, message in trace:
        name = rule or "policy"
        last_notes[name] = message
        lines.append(f"    {name}: {message}")
    return lines

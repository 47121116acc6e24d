"""The bytewax operator around `Detector`: keyed envelopes in, decisions and dead letters out.

    (user_id, Envelope) ──detect──► DetectOut.decisions  (user_id, Emitted)
                                    DetectOut.outcomes   (user_id, EmittedOutcome)
                                    DetectOut.late       (user_id, DeadLetter)   reason "late"
                                    DetectOut.tallies    (user_id, Tally)        replay, at EOF

Built on `stateful_batch` with `notify_at` (not on `EventClock` windows, whose
busy-loop is bytewax bug #578). Each envelope carries the stream clock of the
partition it was read from (`Envelope.stream`); in replay that is all the time
there is, and `on_eof` decides the timers up to the input's end. In live mode
a quiet user's watermark also moves with their partition's stream clock,
read from `PartitionClocks` when the partition is read in this process, and
otherwise extended from the user's last stamp at the wall clock's pace (never
ahead of the true clock), so a silent user's timer is decided within a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import bytewax.operators as op
from bytewax.dataflow import Stream
from bytewax.operators import KeyedStream, StatefulBatchLogic

from nudgeflow.core.envelope import DeadLetter, Envelope
from nudgeflow.core.metrics import Cause, metrics
from nudgeflow.core.outcomes import Outcome
from nudgeflow.core.stream_clock import PartitionClocks
from nudgeflow.core.timeutil import ms_to_datetime
from nudgeflow.core.triggers import Decision
from nudgeflow.operators import snapshot
from nudgeflow.operators.detector import Detector, UserState
from nudgeflow.operators.event_time import Admit

# The stateful step's id inside a flow: its snapshots are checked at start (check_recovery).
DETECT_STEP: Final = "detect"

# Sort keys put the end-of-replay decisions after every line's.
AT_END: Final = 1 << 62


@dataclass(frozen=True, slots=True)
class Emitted:
    """A decision and its place in the output: (line or offset of the cause, index, …)."""

    decision: Decision
    order: tuple[int, int, str, int]


@dataclass(frozen=True, slots=True)
class EmittedOutcome:
    """An outcome and its place in the output, ordered like `Emitted`."""

    outcome: Outcome
    order: tuple[int, int, str, int]


@dataclass(frozen=True, slots=True)
class Tally:
    """How one user's events ended (replay summary): applied, duplicate, late."""

    applied: int
    duplicate: int
    late: int


Output = Emitted | EmittedOutcome | DeadLetter | Tally


@dataclass(frozen=True)
class DetectOut:
    decisions: KeyedStream[Emitted]
    outcomes: KeyedStream[EmittedOutcome]
    late: KeyedStream[DeadLetter]
    tallies: KeyedStream[Tally]


class LiveClock:
    """The wall clock of live mode (injectable for tests) and the partitions' stream clocks."""

    # While a partition is read faster than real time (a backlog), a quiet user's
    # timer may come due sooner than the wall clock's pace says: look again this often.
    CATCH_UP_POLL_MS = 500

    def __init__(
        self, now_ms: Callable[[], int], partitions: PartitionClocks | None = None
    ) -> None:
        self.now_ms = now_ms
        self.partitions = partitions or PartitionClocks()


class _DetectLogic(StatefulBatchLogic[Envelope, Output, bytes]):
    def __init__(
        self,
        detector: Detector,
        state: UserState | None,
        clock: LiveClock | None,
        end_bound: int | None,
        *,
        snapshots: bool = True,
    ) -> None:
        self.detector = detector
        self.snapshots = snapshots
        self.user = state
        self.clock = clock
        self.end_bound = end_bound
        self.last_arrival: int | None = None  # wall ms of the user's last applied event (live)
        self.source: str | None = None  # the input partition of the user's last event (live)
        self.counts = [0, 0, 0]

    def on_batch(self, values: list[Envelope]) -> tuple[Iterable[Output], bool]:
        detector = self.detector
        now = self.clock.now_ms() if self.clock is not None else None
        out: list[Output] = []
        counts = [0, 0, 0]  # this batch's applied, duplicate, late (Admit's order)
        for envelope in values:
            user = self.user
            if user is None:
                user = self.user = detector.new_user(envelope.event.user_id)
            verdict, decisions = detector.process(
                user, envelope.event, envelope.profile, now, stream=envelope.stream
            )
            if now is not None and decisions:  # live: carry each decision's cause for latency
                decisions = metrics.traced(decisions, Cause.of_event(
                    envelope.arrived_ms, envelope.origin.timestamp_ms))
            if verdict is Admit.APPLY:
                counts[0] += 1
                self.last_arrival = envelope.arrived_ms if envelope.arrived_ms is not None else now
                self.source = envelope.origin.source
            elif verdict is Admit.DUPLICATE:
                counts[1] += 1
            else:
                counts[2] += 1
                out.append(DeadLetter(envelope.raw, envelope.origin, "late", envelope.key))
            cause = envelope.origin.line if envelope.origin.line is not None else 0
            if decisions:
                out.extend(Emitted(d, (cause, i, "", 0)) for i, d in enumerate(decisions))
            if user.attribution.outbox:
                out.extend(EmittedOutcome(o, (cause, i, "", 0))
                           for i, o in enumerate(user.attribution.drain()))
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        if now is not None:  # live: the admission outcomes, counted once per batch
            for outcome, count in zip(Admit, counts, strict=True):
                if count:
                    metrics.record_event_outcome(outcome.value, count)
        return out, self._discard()

    def _stream_now(self, user: UserState, now: int) -> int | None:
        """The best lower bound of the user's partition's stream clock at wall time `now`."""
        own = None
        if user.stream_at is not None and self.last_arrival is not None:
            own = min(now, user.stream_at + max(0, now - self.last_arrival))
        reading = None
        if self.clock is not None and self.source is not None:
            reading = self.clock.partitions.get(self.source)
        if reading is None:
            return own
        shared = reading.at(now)
        return shared if own is None else max(own, shared)

    def on_notify(self) -> tuple[Iterable[Output], bool]:
        user, clock = self.user, self.clock
        if user is None or clock is None or user.admission.max_ts is None:
            return [], self._discard()
        now = clock.now_ms()
        stream = self._stream_now(user, now)
        if stream is None:
            return [], self._discard()
        max_ts = user.admission.max_ts
        delayed = set(user.pending_sends)
        decisions = metrics.traced_timers(
            self.detector.advance(user, stream, now, forget=True),
            lateness_ms=self.detector.lateness, last_arrival_ms=self.last_arrival or now,
            max_ts_ms=max_ts, delayed=delayed,
        )
        out: list[Output] = [Emitted(d, (0, i, "", 0)) for i, d in enumerate(decisions)]
        out.extend(EmittedOutcome(o, (0, i, "", 0))
                   for i, o in enumerate(user.attribution.drain()))
        return out, self._discard()

    def on_eof(self) -> tuple[Iterable[Output], bool]:
        user = self.user
        out: list[Output] = []
        if user is not None and self.end_bound is not None:
            decisions = self.detector.finish(user, self.end_bound)
            out.extend(
                Emitted(d, (AT_END, d.trigger.fired_at_ms, user.user_id, i))
                for i, d in enumerate(decisions)
            )
            out.extend(
                EmittedOutcome(o, (AT_END, o.ts_ms, user.user_id, i))
                for i, o in enumerate(user.attribution.drain())
            )
        if self.clock is None and any(self.counts):
            out.append(Tally(*self.counts))
            self.counts = [0, 0, 0]
        return out, self._discard()

    def notify_at(self) -> datetime | None:
        user, clock = self.user, self.clock
        if user is None or clock is None or user.admission.max_ts is None:
            return None
        now = clock.now_ms()
        stream = self._stream_now(user, now)
        if stream is None:
            return None
        due = self.detector.stream_due(user)
        if due is None:
            # Wake once the user has been quiet past the horizon, to forget them; a
            # user whose state outlives that (an nth_event count) is not woken again.
            due = self.detector.stream_expiry(user)
            if due is None or due <= stream:
                return None
        wake = now + max(0, due - stream)
        reading = clock.partitions.get(self.source) if self.source is not None else None
        if reading is not None and reading.catching_up(now):
            wake = min(wake, now + clock.CATCH_UP_POLL_MS)
        return ms_to_datetime(wake)

    def _discard(self) -> bool:
        user = self.user
        return user is not None and self.detector.idle(user)

    def snapshot(self) -> bytes:
        # Bytes are an immutable copy, as bytewax requires of snapshots; the format is
        # versioned plain data (operators.snapshot), so a restart may change the rules.
        assert self.user is not None  # bytewax snapshots only keys that hold a logic
        if not self.snapshots:
            return b""  # nothing keeps it: no recovery directory
        return snapshot.encode(self.detector, self.user, self.last_arrival, self.source)


def detect(
    step_id: str,
    up: KeyedStream[Envelope],
    detector: Detector,
    *,
    clock: LiveClock | None = None,
    end_bound: int | None = None,
    snapshots: bool = True,
) -> DetectOut:
    """Run the detector per user. `clock` makes it live; `end_bound` is replay's input end.

    Without `snapshots` (a run with no recovery directory) a user's snapshot is an
    empty placeholder: bytewax asks for one per touched user per epoch even when
    it keeps none, and encoding them cost more than a tenth of the flow's time.
    """

    def builder(resume: bytes | None) -> _DetectLogic:
        state: UserState | None = None
        last_arrival: int | None = None
        source: str | None = None
        if resume is not None:
            state, last_arrival, source = snapshot.decode(detector, resume)
        logic = _DetectLogic(detector, state, clock, end_bound, snapshots=snapshots)
        logic.last_arrival = last_arrival
        logic.source = source
        return logic

    outputs: KeyedStream[Any] = op.stateful_batch(step_id, up, builder)
    branch_late = op.branch(
        f"{step_id}_late", outputs, lambda kv: isinstance(kv[1], DeadLetter)
    )
    rest: Stream[Any] = branch_late.falses
    branch_tally = op.branch(f"{step_id}_tally", rest, lambda kv: isinstance(kv[1], Tally))
    emitted: Stream[Any] = branch_tally.falses
    branch_outcomes = op.branch(
        f"{step_id}_outcomes", emitted, lambda kv: isinstance(kv[1], EmittedOutcome)
    )
    return DetectOut(
        decisions=branch_outcomes.falses,
        outcomes=branch_outcomes.trues,
        late=branch_late.trues,
        tallies=branch_tally.trues,
    )

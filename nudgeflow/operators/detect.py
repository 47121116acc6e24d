"""The bytewax operator around `Detector`: keyed envelopes in, decisions and dead letters out.

    (shard, Envelope) ──detect──► DetectOut.decisions  (user_id, Emitted)
                                  DetectOut.outcomes   (user_id, EmittedOutcome)
                                  DetectOut.late       (shard, DeadLetter)   reason "late"
                                  DetectOut.tallies    (shard, Tally)        replay, at EOF

Built on `stateful_batch` with `notify_at` (not on `EventClock` windows, whose
busy-loop is bytewax bug #578). Each envelope carries the stream clock of the
partition it was read from (`Envelope.stream`); in replay that is all the time
there is, and `on_eof` decides the timers up to the input's end. In live mode
a quiet user's watermark also moves with their partition's stream clock,
read from `PartitionClocks` when the partition is read in this process, and
otherwise extended from the user's last stamp at the wall clock's pace (never
ahead of the true clock), so a silent user's timer is decided within a second.

The step is keyed by shard (`shard_key`), not by user: a shard's logic holds
a dict of its users, so bytewax's per-key cost (a Python call per key per
batch, a `notify_at` per key per activation) is paid per shard, and a batch
of 500 events makes a few calls instead of hundreds. Users stay independent:
each is driven exactly as a logic of their own would be, and their wake-up
times are kept in a heap so a shard is woken for its earliest user.
`shards=0` keys by user (one user per logic), as before.

A user who has been quiet for a while is parked: held as their snapshot alone
(`operators.snapshot`, deflated: ~0.5 KB) and their place in the shard's
wake-ups, in one bytes object (`operators.parked`), instead of as live objects
(~4 KB); their next event or timer brings them back. A shard looks for such users
every `park_after_ms` of its clock (wall ms live, the stream clock in replay)
and parks those it has not used since its previous look, so a user is parked
after between one and two `park_after_ms` of quiet (live, a shard holding users
wakes for its next look). Parking changes how a user
is held, never what they do: a parked user's wake-ups stay scheduled, and
their snapshot is the one the next epoch would store anyway.
"""

from __future__ import annotations

import heapq
import sys
import zlib
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
from nudgeflow.operators import parked, shard_snapshot, snapshot
from nudgeflow.operators.detector import Detector, UserState
from nudgeflow.operators.event_time import Admit

# The stateful step's id inside a flow: its snapshots are checked at start (check_recovery).
DETECT_STEP: Final = "detect"

# Sort keys put the end-of-replay decisions after every line's.
AT_END: Final = 1 << 62

# Shards of the detect step when nothing says otherwise: enough for 8 workers to share
# evenly, few enough that a batch of 500 events meets each shard several times.
DEFAULT_SHARDS: Final = 64

# Quiet for this long (one to two times it), a user is held as their snapshot. Long
# enough that a shopper's session rarely pays the ~0.1 ms of parking and unparking.
DEFAULT_PARK_AFTER_MS: Final = 60_000


def shard_key(shards: int) -> Callable[[Envelope], str]:
    """The detect step's key of an envelope: its user's shard, or the user with `shards=0`.

    CRC-32 of the user id, not `hash()`: the key must be the same in every process
    and after every restart, since a shard's snapshot holds its users.
    """
    if shards <= 0:
        return lambda envelope: envelope.event.user_id
    return lambda envelope: str(zlib.crc32(envelope.event.user_id.encode()) % shards)


# Made per event, so not frozen (the note in nudgeflow.core.envelope); never changed once made.
@dataclass(slots=True)
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
    """How a shard's events ended (replay summary): applied, duplicate, late."""

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


def _stream_clock(values: list[Envelope]) -> int | None:
    """A replay shard's clock after a batch: the latest stream clock its envelopes carry."""
    for envelope in reversed(values):
        if envelope.stream is not None and envelope.stream.after is not None:
            return envelope.stream.after
    return None


class UserSlot:
    """One user in a shard: their state and what live mode knows of their input."""

    __slots__ = ("blob", "due_at", "due_source", "last_arrival", "source", "state", "used",
                 "user_id", "wake")

    def __init__(
        self, state: UserState, last_arrival: int | None = None, source: str | None = None
    ) -> None:
        self.user_id = state.user_id
        self.state = state
        self.used = True  # since the shard's last look for users to park
        self.last_arrival = last_arrival  # wall ms of the user's last applied event (live)
        self.source = source  # the input partition of the user's last event (live)
        self.wake: int | None = None  # wall ms the shard must wake for this user (live)
        # The stream clock at which their next timer is due, and the partition whose clock
        # it is: where they stand in the shard's heaps (live). Two fields, not a tuple
        # made per change: ~90 B less a held user.
        self.due_at: int | None = None
        self.due_source: str | None = None
        self.blob: bytes | None = None  # the snapshot, until the user changes again


class _DetectLogic(StatefulBatchLogic[Envelope, Output, bytes]):
    """The users of one shard (one user with per-user keys)."""

    def __init__(
        self,
        detector: Detector,
        clock: LiveClock | None,
        end_bound: int | None,
        *,
        shards: int = DEFAULT_SHARDS,
        snapshots: bool = True,
        record_metrics: bool = False,
        users: Iterable[UserSlot] = (),
        park_after_ms: int = DEFAULT_PARK_AFTER_MS,
    ) -> None:
        self.detector = detector
        self.record_metrics = record_metrics
        self.clock = clock
        self.end_bound = end_bound
        self.shards = shards
        self.snapshots = snapshots
        self.users: dict[str, UserSlot] = {slot.user_id: slot for slot in users}
        self.parked: dict[str, bytes] = {}  # the users held as `operators.parked` bytes
        self.park_after_ms = park_after_ms  # 0: never park
        self._looked_at: int | None = None  # the shard's clock at its last look for parking
        self._sources: list[str] = []  # the partitions parked users' trailers name
        self._source_ids: dict[str, int] = {}
        # Live users' next moments, as heaps of (when, user_id); an entry is current while
        # it equals the user's `wake` (wall ms) or `due_at` (their partition's stream clock),
        # held or parked, and the heaps are rebuilt when stale entries outnumber the users.
        self._wakes: list[tuple[int, str]] = []
        self._due: dict[str, list[tuple[int, str]]] = {}  # per input partition
        self._entries = 0  # in all the heaps
        self.counts = [0, 0, 0]
        if clock is not None and self.users:
            self._settle(list(self.users.values()), clock.now_ms())

    # --- bytewax's calls ----------------------------------------------------------------

    def on_batch(self, values: list[Envelope]) -> tuple[Iterable[Output], bool]:
        detector = self.detector
        users = self.users
        now = self.clock.now_ms() if self.clock is not None else None
        out: list[Output] = []
        counts = [0, 0, 0]  # this batch's applied, duplicate, late (Admit's order)
        touched: dict[str, UserSlot] = {}
        for envelope in values:
            uid = envelope.event.user_id
            slot = users.get(uid)
            if slot is None:
                if uid in self.parked:
                    slot = self._unpark(uid)
                else:
                    slot = users[uid] = UserSlot(detector.new_user(uid))
            user = slot.state
            slot.used = True
            verdict, decisions = detector.process(
                user, envelope.event, envelope.profile, now, stream=envelope.stream
            )
            slot.blob = None
            touched[uid] = slot
            if self.record_metrics and decisions:  # carry each decision's cause for latency
                decisions = metrics.traced(decisions, Cause.of_event(
                    envelope.arrived_ms, envelope.origin.timestamp_ms))
            if verdict is Admit.APPLY:
                counts[0] += 1
                slot.last_arrival = envelope.arrived_ms if envelope.arrived_ms is not None else now
                # one string per partition, not a copy per user
                slot.source = sys.intern(envelope.origin.source)
            elif verdict is Admit.DUPLICATE:
                counts[1] += 1
            else:
                counts[2] += 1
                out.append(DeadLetter(envelope.raw, envelope.origin, "late", envelope.key))
            cause = envelope.origin.line if envelope.origin.line is not None else 0
            if decisions:
                out.extend(Emitted(d, (cause, i, "", 0)) for i, d in enumerate(decisions))
            outcomes = user.drain_outcomes()
            if outcomes:
                out.extend(EmittedOutcome(o, (cause, i, "", 0)) for i, o in enumerate(outcomes))
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        if self.record_metrics:  # the admission outcomes, counted once per batch
            for outcome, count in zip(Admit, counts, strict=True):
                if count:
                    metrics.record_event_outcome(outcome.value, count)
        empty = self._settle(touched.values(), now)
        if now is not None:
            out.extend(self._run_due(now))
            empty = self._empty()
        self._look_for_parking(now if now is not None else _stream_clock(values))
        return out, empty

    def on_notify(self) -> tuple[Iterable[Output], bool]:
        clock = self.clock
        if clock is None:
            return [], self._empty()
        now = clock.now_ms()
        due: list[UserSlot] = []
        wakes = self._wakes
        while wakes and wakes[0][0] <= now:
            wake, uid = heapq.heappop(wakes)
            if self._wake_of(uid) == wake:
                slot = self._held(uid)
                slot.wake = None
                due.append(slot)
        out: list[Output] = []
        for slot in due:
            out.extend(self._advance(slot, now))
        self._settle(due, now)
        out.extend(self._run_due(now))
        self._look_for_parking(now)
        return out, self._empty()

    def on_eof(self) -> tuple[Iterable[Output], bool]:
        out: list[Output] = []
        if self.end_bound is not None:
            for uid in list(self.parked):
                self._unpark(uid)
            for uid, slot in self.users.items():
                user = slot.state
                decisions = self.detector.finish(user, self.end_bound)
                slot.blob = None
                if self.record_metrics:  # decided by the input's end: no cause to time
                    for decision in decisions:
                        metrics.record_decision(decision)
                out.extend(
                    Emitted(d, (AT_END, d.trigger.fired_at_ms, uid, i))
                    for i, d in enumerate(decisions)
                )
                out.extend(
                    EmittedOutcome(o, (AT_END, o.ts_ms, uid, i))
                    for i, o in enumerate(user.drain_outcomes())
                )
        if self.clock is None and any(self.counts):
            out.append(Tally(*self.counts))
            self.counts = [0, 0, 0]
        now = self.clock.now_ms() if self.clock is not None else None
        return out, self._settle(list(self.users.values()), now)

    def notify_at(self) -> datetime | None:
        clock = self.clock
        if clock is None:
            return None
        wakes = self._wakes
        at: int | None = None
        while wakes:
            wake, uid = wakes[0]
            if self._wake_of(uid) == wake:
                at = wake
                break
            heapq.heappop(wakes)
        if self.park_after_ms > 0 and self.users and self._looked_at is not None:
            # A shard whose users went quiet is not activated by events: wake it for its
            # next look, so that they are parked, at night too.
            look = self._looked_at + self.park_after_ms
            at = look if at is None else min(at, look)
        if self._due:
            # A partition read faster than real time (a backlog) moves its stream clock,
            # and so its users' timers, ahead of their wall-clock wakes: look again soon.
            now = clock.now_ms()
            for source, heap in self._due.items():
                reading = clock.partitions.get(source)
                if heap and reading is not None and reading.catching_up(now):
                    poll = now + clock.CATCH_UP_POLL_MS
                    at = poll if at is None else min(at, poll)
                    break
        return None if at is None else ms_to_datetime(at)

    def snapshot(self) -> bytes:
        # Bytes are an immutable copy, as bytewax requires of snapshots; the format is
        # versioned plain data (operators.snapshot), so a restart may change the rules.
        if not self.snapshots:
            return b""  # nothing keeps it: no recovery directory
        blobs: list[bytes | memoryview] = []
        for slot in self.users.values():
            # Only users changed since the last snapshot are encoded (a parked user never is).
            blobs.append(slot.blob if slot.blob is not None else self._encode(slot))
        blobs.extend(parked.snapshot_of(packed) for packed in self.parked.values())
        return shard_snapshot.encode(blobs, self.shards)

    # --- parking -----------------------------------------------------------------------

    def _empty(self) -> bool:
        return not self.users and not self.parked

    def _encode(self, slot: UserSlot) -> bytes:
        slot.blob = snapshot.encode(self.detector, slot.state, slot.last_arrival, slot.source)
        return slot.blob

    def _held(self, uid: str) -> UserSlot:
        """The user's slot, unparking them if need be (they are one or the other)."""
        slot = self.users.get(uid)
        return slot if slot is not None else self._unpark(uid)

    def _park(self, slot: UserSlot) -> None:
        source = None
        if slot.due_source is not None:
            source = self._source_ids.get(slot.due_source)
            if source is None:
                if len(self._sources) >= parked.MAX_SOURCES:
                    return  # a trailer cannot name the partition: the user stays held
                source = self._source_ids[slot.due_source] = len(self._sources)
                self._sources.append(slot.due_source)
        blob = snapshot.compact(slot.blob if slot.blob is not None else self._encode(slot))
        self.parked[slot.user_id] = parked.pack(blob, slot.wake, slot.due_at, source)
        del self.users[slot.user_id]

    def _unpark(self, uid: str) -> UserSlot:
        """The parked user back in a slot, decoded from their snapshot (which stays valid)."""
        packed = self.parked.pop(uid)
        blob = bytes(parked.snapshot_of(packed))
        user, last_arrival, source = snapshot.decode(self.detector, blob)
        slot = UserSlot(user, last_arrival, None if source is None else sys.intern(source))
        slot.blob = blob
        slot.wake = parked.wake_of(packed)
        due = parked.due_of(packed)
        if due is not None:
            slot.due_at, slot.due_source = due[0], self._sources[due[1]]
        self.users[uid] = slot
        return slot

    def _wake_of(self, uid: str) -> int | None:
        """The user's current wall-clock wake-up, held or parked (what heap entries match)."""
        slot = self.users.get(uid)
        if slot is not None:
            return slot.wake
        packed = self.parked.get(uid)
        return None if packed is None else parked.wake_of(packed)

    def _due_of(self, uid: str) -> tuple[int, str] | None:
        """When the user's partition's stream clock makes them due, and which, held or parked."""
        slot = self.users.get(uid)
        if slot is not None:
            if slot.due_at is None or slot.due_source is None:
                return None
            return slot.due_at, slot.due_source
        packed = self.parked.get(uid)
        due = None if packed is None else parked.due_of(packed)
        return None if due is None else (due[0], self._sources[due[1]])

    def _look_for_parking(self, at: int | None) -> None:
        """Every `park_after_ms` of the shard's clock, park the users unused since the last look."""
        if at is None or self.park_after_ms <= 0:
            return
        if self._looked_at is None:
            self._looked_at = at
            return
        if at - self._looked_at < self.park_after_ms:
            return
        self._looked_at = at
        quiet = []
        for slot in self.users.values():
            if slot.used:
                slot.used = False
            else:
                quiet.append(slot)
        for slot in quiet:
            self._park(slot)

    # --- one user ----------------------------------------------------------------------

    def _settle(self, slots: Iterable[UserSlot], now: int | None) -> bool:
        """Free the idle among `slots`, schedule the others' wake-ups; True: the shard is empty."""
        detector, users = self.detector, self.users
        for slot in slots:
            user = slot.state
            if detector.idle(user):
                slot.wake = None
                users.pop(slot.user_id, None)
            elif now is not None:
                uid = slot.user_id
                wake = self._wake_at(slot, user, now)
                if wake != slot.wake:
                    slot.wake = wake
                    if wake is not None:
                        heapq.heappush(self._wakes, (wake, uid))
                        self._entries += 1
                source = slot.source
                at = detector.stream_due(user) if source is not None else None
                if at is None or source is None:
                    slot.due_at = slot.due_source = None
                elif at != slot.due_at or source != slot.due_source:
                    # a new time, or the user's events moved partition
                    slot.due_at, slot.due_source = at, source
                    heapq.heappush(self._due.setdefault(source, []), (at, uid))
                    self._entries += 1
        if self._entries > 4 * (len(users) + len(self.parked)) + 64:
            self._rebuild()
        return self._empty()

    def _rebuild(self) -> None:
        users = self.users
        self._wakes = [(s.wake, uid) for uid, s in users.items() if s.wake is not None]
        due: dict[str, list[tuple[int, str]]] = {}
        for uid, s in users.items():
            if s.due_at is not None and s.due_source is not None:
                due.setdefault(s.due_source, []).append((s.due_at, uid))
        for uid in self.parked:
            wake = self._wake_of(uid)
            if wake is not None:
                self._wakes.append((wake, uid))
            at = self._due_of(uid)
            if at is not None:
                due.setdefault(at[1], []).append((at[0], uid))
        heapq.heapify(self._wakes)
        for heap in due.values():
            heapq.heapify(heap)
        self._due = due
        self._entries = len(self._wakes) + sum(len(heap) for heap in due.values())

    def _run_due(self, now: int) -> list[Output]:
        """Decide the timers of users whose partition's stream clock passed their due time.

        What makes a quiet user's timer due is their partition's `S`, read when this
        shard is activated for any reason; the wall-clock wakes are a bound for a
        partition that goes quiet, and for users whose partition another process reads.
        """
        assert self.clock is not None
        partitions = self.clock.partitions
        out: list[Output] = []
        ran: list[UserSlot] = []
        for source, heap in self._due.items():
            reading = partitions.get(source)
            if not heap or reading is None:
                continue
            stream = reading.at(now)
            while heap and heap[0][0] <= stream:
                due, uid = heapq.heappop(heap)
                if self._due_of(uid) != (due, source):
                    continue
                slot = self._held(uid)
                slot.due_at = slot.due_source = None
                out.extend(self._advance(slot, now))
                ran.append(slot)
        if ran:
            self._settle(ran, now)
        return out

    def _stream_now(self, slot: UserSlot, user: UserState, now: int) -> int | None:
        """The best lower bound of the user's partition's stream clock at wall time `now`."""
        own = None
        if user.stream_at is not None and slot.last_arrival is not None:
            own = min(now, user.stream_at + max(0, now - slot.last_arrival))
        reading = None
        if self.clock is not None and slot.source is not None:
            reading = self.clock.partitions.get(slot.source)
        if reading is None:
            return own
        shared = reading.at(now)
        return shared if own is None else max(own, shared)

    def _advance(self, slot: UserSlot, now: int) -> list[Output]:
        """The quiet user's timers the stream clock made due: decisions, then outcomes."""
        user = slot.state
        slot.used = True
        if user.admission.max_ts is None:
            return []
        stream = self._stream_now(slot, user, now)
        if stream is None:
            return []
        slot.blob = None
        max_ts = user.admission.max_ts
        delayed = set(user.pending_sends)
        decisions = metrics.traced_timers(
            self.detector.advance(user, stream, now, forget=True),
            lateness_ms=self.detector.lateness, last_arrival_ms=slot.last_arrival or now,
            max_ts_ms=max_ts, delayed=delayed,
        )
        out: list[Output] = [Emitted(d, (0, i, "", 0)) for i, d in enumerate(decisions)]
        out.extend(EmittedOutcome(o, (0, i, "", 0))
                   for i, o in enumerate(user.drain_outcomes()))
        return out

    def _wake_at(self, slot: UserSlot, user: UserState, now: int) -> int | None:
        """Wall ms at which the user's next timer is due, or they may be forgotten."""
        if self.clock is None or user.admission.max_ts is None:
            return None
        stream = self._stream_now(slot, user, now)
        if stream is None:
            return None
        due = self.detector.stream_due(user)
        if due is None:
            # Wake once the user has been quiet past the horizon, to forget them; a
            # user whose state outlives that (an nth_event count) is not woken again.
            # Forgetting only frees memory, so a backlog read fast need not hurry it.
            expiry = self.detector.stream_expiry(user)
            if expiry is None or expiry <= stream:
                return None
            return now + (expiry - stream)
        return now + max(0, due - stream)


def detect(
    step_id: str,
    up: KeyedStream[Envelope],
    detector: Detector,
    *,
    clock: LiveClock | None = None,
    end_bound: int | None = None,
    snapshots: bool = True,
    shards: int = DEFAULT_SHARDS,
    record_metrics: bool | None = None,
    park_after_ms: int = DEFAULT_PARK_AFTER_MS,
) -> DetectOut:
    """Run the detector per user. `clock` makes it live; `end_bound` is replay's input end.

    `up` must be keyed by `shard_key(shards)`. Without `snapshots` (a run with no
    recovery directory) a shard's snapshot is an empty placeholder: bytewax asks
    for one per touched key per epoch even when it keeps none.

    `record_metrics` (default: when live) counts admissions and decisions in
    `nudgeflow.core.metrics` and gives each decision its cause for the latency
    series; a replay asks for it when something shows them (the demo's dashboard).

    `park_after_ms` (0: never) is how long a user must be quiet, at least, to be
    held as their snapshot until their next event or timer (the module's note).
    """

    counting = clock is not None if record_metrics is None else record_metrics

    def builder(resume: bytes | None) -> _DetectLogic:
        users: list[UserSlot] = []
        if resume is not None:
            users = [UserSlot(*user) for user in shard_snapshot.decode(detector, resume, shards)]
        return _DetectLogic(detector, clock, end_bound, shards=shards, snapshots=snapshots,
                            record_metrics=counting, users=users, park_after_ms=park_after_ms)

    outputs: KeyedStream[Any] = op.stateful_batch(step_id, up, builder)
    branch_late = op.branch(
        f"{step_id}_late", outputs, lambda kv: isinstance(kv[1], DeadLetter)
    )
    rest: Stream[Any] = branch_late.falses
    branch_tally = op.branch(f"{step_id}_tally", rest, lambda kv: isinstance(kv[1], Tally))
    # Downstream, decisions and outcomes are keyed by their user (the sinks' partitions).
    emitted: Stream[Any] = branch_tally.falses
    branch_outcomes = op.branch(
        f"{step_id}_outcomes", emitted, lambda kv: isinstance(kv[1], EmittedOutcome)
    )
    decisions = op.map(f"{step_id}_by_user", branch_outcomes.falses,
                       lambda kv: (kv[1].decision.trigger.user_id, kv[1]))
    outcomes = op.map(f"{step_id}_outcomes_by_user", branch_outcomes.trues,
                      lambda kv: (kv[1].outcome.user_id, kv[1]))
    return DetectOut(decisions=decisions, outcomes=outcomes, late=branch_late.trues,
                     tallies=branch_tally.trues)

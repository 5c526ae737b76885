"""The exporter's in-memory state: per-app tracking, event counters, poll health, API figures.

`AppState.apply(changes)` is the only code that changes what an app knows: the rules (diff for a
cycle, reconcile for a callback) return change sets, and everyone else reads through read-only
views (properties without setters, `Mapping`s). `apply` counts each event, logs it once with
its source, and records what the store must save. All of it runs on the one asyncio loop; the
render thread copies what it reads in one step (`list()` of a dict is one step under the GIL).
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Final

import structlog

from exporter.state.changes import (
    AwaitedUpload,
    ChangeSet,
    EventKind,
    Marks,
    TaskEvent,
    TrackedTask,
    Tracking,
)
from exporter.zego.limits import QUIT_REASONS as ZEGO_QUIT_REASONS
from exporter.zego.models import TaskStatus

COUNTED_EVENTS = tuple(EventKind)
TASK_DURATION_BUCKETS = (10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
                         57600.0, 86400.0)
API_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT_EVENTS = 1000  # counted events kept per app for /api/v1/events (and the state file)
OTHER_ROOMS = "_other"  # room label for rooms past an app's cardinality cap ("*" mode)
# The quit_reason label is one of ZEGO's documented values, "unknown" (none given) or "other"
# (anything else), so a callback body cannot mint labels.
QUIT_REASONS = tuple(str(r) for r in ZEGO_QUIT_REASONS)

log = structlog.get_logger("exporter.state")


@dataclass
class Histogram:
    """Cumulative-on-export histogram: per-bucket counts, sum and count, cheap to persist."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs as Prometheus exposes them, +Inf last."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class Unsaved:
    """What changed since the last save: the store writes these rows and the app's own row."""

    live: set[str] = field(default_factory=set)  # TaskIds to write, or delete if no longer live
    finished: set[str] = field(default_factory=set)  # likewise, for finished TaskIds
    rooms: set[str] = field(default_factory=set)  # room labels whose counters moved
    uploads: set[str] = field(default_factory=set)  # TaskIds whose awaited or settled row moved
    events: int = 0  # counted events not written yet (the newest)


@dataclass(frozen=True)
class Restored:
    """An app's state as the store read it back (every value checked)."""

    tracking: Tracking
    counters: Mapping[str, Mapping[EventKind, int]]
    durations: Mapping[str, tuple[list[int], float]]
    deferred: Sequence[TaskEvent]
    ended_by_reason: Mapping[str, int]
    upload_failures: Mapping[str, int]
    last_success_time: float | None
    last_observed_ms: int | None
    recent: Sequence[TaskEvent] = ()  # oldest first
    stale_live: frozenset[str] = frozenset()  # rows of rooms no longer configured: to delete


class AppState:
    """Everything the exporter knows about one AppId; `apply` is its one writer."""

    def __init__(self, app_id: int, rooms: tuple[str, ...] | None, max_rooms: int = 1000,
                 callbacks: bool = False, persistent: bool = True) -> None:
        self.app_id: Final = app_id
        self.rooms: Final = rooms  # None: every room of the app ("*")
        self.max_rooms: Final = max_rooms
        self._live: dict[str, TrackedTask] = {}
        self._finished: dict[str, int] = {}
        self._awaited: dict[str, AwaitedUpload] = {}
        self._settled: dict[str, int] = {}
        self._recent: deque[TaskEvent] = deque(maxlen=RECENT_EVENTS)
        # (room label, kind) -> the latest counted event: the counters' exemplars.
        self._latest: dict[tuple[str, EventKind], TaskEvent] = {}
        self._marks = Marks()
        self._counters: dict[str, dict[EventKind, int]] = {}
        self._durations = {o: Histogram(TASK_DURATION_BUCKETS) for o in ("normal", "abnormal")}
        # Events of rooms first seen last cycle ("*" mode), counted one cycle late so that their
        # series are scraped at 0 first and the first event shows in increase().
        self._deferred: list[TaskEvent] = []
        self._ended_by_reason: dict[str, int] = {}  # callbacks' quit_reason
        self._upload_failures: dict[str, int] = {}  # room label -> files
        # TaskId -> when (our clock, ms) a callback last flipped its status: a listing taken
        # before that is older news for the task (see diff's `fresher`).
        self._flipped_at_ms: dict[str, int] = {}
        self._unsaved = Unsaved() if persistent else None
        self._up = False
        self._upload_lookups_skipped = 0
        self._cycles_attempted = 0
        self._last_success_time: float | None = None
        self._last_poll_duration: float | None = None
        self._last_error: str | None = None
        self._last_observed_ms: int | None = None  # when the last good cycle's listings began
        # For renders that cost what changed: room label -> its live tasks' statuses, and which
        # labels' series (gauges, counters, exemplars, upload failures) each apply changed.
        self._by_room: dict[str, dict[str, TaskStatus]] = {}
        self._changing: set[str] = set()  # labels the apply under way changes
        self._room_revisions: dict[str, int] = {}  # label -> revision that last changed it
        self._revision = 0
        for room in rooms or ():
            self._room_counters(room)
        if callbacks:  # callback-only series at 0 from the start: the first shows in increase()
            self._ended_by_reason = dict.fromkeys((*QUIT_REASONS, "other"), 0)
            self._upload_failures = dict.fromkeys(rooms or (), 0)
        self._publish()

    # Read-only views.
    @property
    def tracking(self) -> Tracking:
        return Tracking(MappingProxyType(self._live), MappingProxyType(self._finished),
                        self._marks, MappingProxyType(self._awaited),
                        MappingProxyType(self._settled))

    @property
    def counters(self) -> Mapping[str, Mapping[EventKind, int]]:
        return MappingProxyType(self._counters)

    @property
    def durations(self) -> Mapping[str, Histogram]:
        return MappingProxyType(self._durations)

    @property
    def deferred(self) -> Sequence[TaskEvent]:
        return tuple(self._deferred)

    @property
    def recent(self) -> Sequence[TaskEvent]:
        """The last RECENT_EVENTS counted events, oldest first."""
        return tuple(self._recent)

    def latest(self, room: str, kind: EventKind) -> TaskEvent | None:
        """The latest counted event of `kind` in the room label: its counter's exemplar."""
        return self._latest.get((room, kind))

    @property
    def ended_by_reason(self) -> Mapping[str, int]:
        return MappingProxyType(self._ended_by_reason)

    @property
    def upload_failures(self) -> Mapping[str, int]:
        return MappingProxyType(self._upload_failures)

    @property
    def unsaved(self) -> Unsaved:
        """A copy of what changed since the last save (nothing, if no store saves this app)."""
        pending = self._unsaved or Unsaved()
        return Unsaved(set(pending.live), set(pending.finished), set(pending.rooms),
                       set(pending.uploads), pending.events)

    @property
    def upload_lookups_skipped(self) -> int:
        return self._upload_lookups_skipped

    @property
    def up(self) -> bool:
        return self._up

    @property
    def cycles_attempted(self) -> int:
        return self._cycles_attempted

    @property
    def last_success_time(self) -> float | None:
        return self._last_success_time

    @property
    def last_poll_duration(self) -> float | None:
        return self._last_poll_duration

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def last_observed_ms(self) -> int | None:
        return self._last_observed_ms

    def fresher_than(self, taken_ms: int) -> frozenset[str]:
        """Tasks a callback flipped at or after `taken_ms`."""
        return frozenset(t for t, at in self._flipped_at_ms.items() if at >= taken_ms)

    def room_label(self, room_id: str) -> str:
        """The room_id label for a room: itself, or OTHER_ROOMS past the cap in "*" mode."""
        if room_id in self._counters or self.rooms is not None:
            return room_id
        return room_id if len(self._counters) < self.max_rooms else OTHER_ROOMS

    def live_in(self, label: str) -> Counter[TaskStatus]:
        """Status -> number of live tasks in the room label."""
        return Counter(list(self._by_room.get(label, {}).values()))  # list(): one step

    @property
    def revision(self) -> int:
        """How many applies changed a room's series: see `rooms_changed_since`."""
        return self._revision

    def rooms_changed_since(self, revision: int) -> list[str]:
        """Room labels whose series changed after `revision`, newest first. Read `revision`
        before calling (and before reading the rooms): `apply` records its rooms before it
        moves `revision` on, so a change made meanwhile shows again next time, never missed."""
        changed = []
        for label, at in reversed(list(self._room_revisions.items())):  # list(): one step
            if at <= revision:
                break
            changed.append(label)
        return changed

    # The one writer.
    def apply(self, changes: ChangeSet) -> None:
        """Carry out a cycle's or a callback's changes: track, count, log, mark for saving."""
        for task_id in (*changes.untracked, *changes.tracked):
            if (old := self._live.get(task_id)) is not None:
                label = self.room_label(old.room_id)
                self._by_room.get(label, {}).pop(task_id, None)
                self._changing.add(label)
        changes.carry_out(self._live, self._finished, self._awaited, self._settled)
        if self._unsaved is not None:
            self._unsaved.live.update(changes.tracked, changes.untracked)
            self._unsaved.finished.update(changes.finished, changes.forgotten)
            self._unsaved.uploads.update(changes.awaited, changes.settled, changes.forgotten)
        if changes.marks is not None:
            self._marks = changes.marks
        due: list[TaskEvent] = []
        if changes.observed_ms is not None:  # a cycle's listings
            self._last_observed_ms = changes.observed_ms
            # A flip older than the listings is what they show: forget it.
            self._flipped_at_ms = {t: at for t, at in self._flipped_at_ms.items()
                                   if at >= changes.observed_ms}
            due, self._deferred = self._deferred, []  # the deferred events are due
        self._flipped_at_ms.update(dict.fromkeys(changes.flipped, changes.learned_ms))
        first_seen: set[str] = set()
        for event in changes.events:
            if event.at_ms is None:
                event = replace(event, at_ms=changes.learned_ms)
            label = self.room_label(event.room_id)
            if label not in self._counters:
                first_seen.add(label)
                self._room_counters(label)
            (self._deferred if label in first_seen else due).append(event)
        for task_id, task in changes.tracked.items():  # a room's series appear when first seen
            self._index(task_id, task)
        self._count(due)
        self._upload_lookups_skipped += changes.uploads_skipped
        for failure in changes.upload_failures:
            room = self.room_label(failure.room_id)
            self._room_counters(room)
            self._upload_failures[room] = self._upload_failures.get(room, 0) + failure.files
            log.warning("upload_failed", app_id=self.app_id, room_id=failure.room_id,
                        task_id=failure.task_id, files=failure.files)
        if (cycle := changes.cycle) is not None:
            self._cycles_attempted += 1
            self._up = cycle.ok
            self._last_poll_duration = cycle.seconds
            self._last_error = cycle.error
            if cycle.ok:
                self._last_success_time = cycle.finished_s
        self._publish()

    def _index(self, task_id: str, task: TrackedTask) -> None:
        label = self.room_label(task.room_id)
        self._room_counters(label)  # every label with live tasks has counters
        self._by_room.setdefault(label, {})[task_id] = task.status

    def _publish(self) -> None:
        """Record the rooms this apply changed, then move `revision` on (in that order)."""
        if not self._changing:
            return
        revision = self._revision + 1
        for label in self._changing:
            self._room_revisions.pop(label, None)  # newest last
            self._room_revisions[label] = revision
        self._changing.clear()
        self._revision = revision

    def _room_counters(self, label: str) -> dict[EventKind, int]:
        self._changing.add(label)
        counters = self._counters.get(label)
        if counters is None:
            counters = self._counters[label] = dict.fromkeys(COUNTED_EVENTS, 0)
            if self._unsaved is not None:
                self._unsaved.rooms.add(label)
        return counters

    def _count(self, events: Sequence[TaskEvent]) -> None:
        """Count each event, and log it: one line per counted event, with its source (`via`:
        promslog's `source` is the logger)."""
        abnormal = {e.task_id for e in events if e.kind is EventKind.ENDED_ABNORMALLY}
        for event in events:
            label = self.room_label(event.room_id)
            self._room_counters(label)[event.kind] += 1
            if self._unsaved is not None:
                self._unsaved.rooms.add(label)
            if event.kind is EventKind.ENDED and event.duration_s is not None:
                outcome = "abnormal" if event.task_id in abnormal else "normal"
                self._durations[outcome].observe(event.duration_s)
            if event.quit_reason is not None:
                reason = event.quit_reason
                self._ended_by_reason[reason] = self._ended_by_reason.get(reason, 0) + 1
            self._latest[(label, event.kind)] = event
            self._recent.append(event)
            if self._unsaved is not None:
                self._unsaved.events = min(RECENT_EVENTS, self._unsaved.events + 1)
            log.info(f"task_{event.kind.value}", app_id=self.app_id, room_id=event.room_id,
                     task_id=event.task_id, via=event.source.value,
                     **({"duration_s": round(event.duration_s, 3)}
                        if event.duration_s is not None else {}),
                     **({"quit_reason": event.quit_reason} if event.quit_reason else {}))

    # The store's side: what it read back, and what it wrote.
    def restore(self, restored: Restored) -> None:
        """Take the state the store read back (at start, before anything else runs)."""
        self._live = dict(restored.tracking.live)
        self._finished = dict(restored.tracking.finished)
        self._marks = restored.tracking.marks
        self._awaited = dict(restored.tracking.awaited)
        self._settled = dict(restored.tracking.settled)
        self._recent.extend(restored.recent)
        for room, by_kind in restored.counters.items():
            self._counters[room] = {**dict.fromkeys(COUNTED_EVENTS, 0), **by_kind}
        for outcome, (counts, total) in restored.durations.items():
            histogram = self._durations[outcome]
            if len(counts) == len(histogram.counts):  # buckets unchanged
                self._durations[outcome] = Histogram(histogram.bounds, list(counts), total)
        self._deferred = list(restored.deferred)
        self._ended_by_reason = {**self._ended_by_reason, **restored.ended_by_reason}
        self._upload_failures = {**self._upload_failures, **restored.upload_failures}
        self._last_success_time = restored.last_success_time
        self._last_observed_ms = restored.last_observed_ms
        for event in self._recent:  # the exemplars: the latest of each kind, per room
            self._latest[(self.room_label(event.room_id), event.kind)] = event
        for task_id, task in self._live.items():
            self._index(task_id, task)
        for room in (*self._counters, *self._upload_failures):
            self._room_counters(room)
        self._publish()
        if self._unsaved is not None:
            self._unsaved = Unsaved(live=set(restored.stale_live))

    def mark_unsaved(self, failed: Unsaved) -> None:
        """The store could not write `failed` (marked saved when its rows were taken): pending
        again, for the next save."""
        if self._unsaved is not None:
            self._unsaved.live |= failed.live
            self._unsaved.finished |= failed.finished
            self._unsaved.rooms |= failed.rooms
            self._unsaved.uploads |= failed.uploads
            self._unsaved.events = min(RECENT_EVENTS, self._unsaved.events + failed.events)

    def mark_saved(self, saved: Unsaved) -> None:
        """The store wrote `saved`: it is no longer pending."""
        if self._unsaved is not None:
            self._unsaved.live -= saved.live
            self._unsaved.finished -= saved.finished
            self._unsaved.rooms -= saved.rooms
            self._unsaved.uploads -= saved.uploads
            self._unsaved.events = max(0, self._unsaved.events - saved.events)


@dataclass
class ApiStats:
    """What the exporter asked of ZEGO, for the api_* metrics."""

    requests: dict[tuple[int, str, str], int] = field(default_factory=lambda: defaultdict(int))
    durations: dict[str, Histogram] = field(default_factory=dict)

    def observe(self, app_id: int, action: str, label: str, seconds: float) -> None:
        self.requests[(app_id, action, label)] += 1
        self.durations.setdefault(action, Histogram(API_DURATION_BUCKETS)).observe(seconds)


@dataclass
class ExporterState:
    apps: Mapping[int, AppState]
    api: ApiStats = field(default_factory=ApiStats)
    storage_errors: int = 0
    callbacks: dict[tuple[str, str, str], int] = field(default_factory=dict)  # app, event, result
    # Requests refused with a 4xx, by (listener, reason): a client's mistake, never a 500.
    refused: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Unexpected exceptions contained where they arose (a handler, a cycle, a save), by place.
    internal_errors: Counter[str] = field(default_factory=Counter)
    # Web config reloads, by (listener, result): applied, invalid, or refused as weakening.
    web_config_reloads: Counter[tuple[str, str]] = field(default_factory=Counter)

    @classmethod
    def for_apps(cls, apps: Sequence[tuple[int, tuple[str, ...] | None, int]],
                 callbacks: frozenset[int] = frozenset(), persistent: bool = True
                 ) -> ExporterState:
        """State for `apps` (id, rooms, room cap); `callbacks`: apps whose callbacks are
        taken; `persistent`: whether a store saves it (else nothing is kept for one)."""
        return cls({app_id: AppState(app_id, rooms, cap, app_id in callbacks, persistent)
                    for app_id, rooms, cap in apps})

"""The exporter's in-memory state: per-app tracking, event counters, poll health, API figures.

The poller writes it once per cycle; the collector reads it on every scrape. Both run on the one
asyncio loop, so no lock is needed: a cycle's changes are applied in one synchronous step.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from exporter.poll.diff import EventKind, TaskEvent, Tracking
from exporter.zego.models import TaskStatus

COUNTED_EVENTS = tuple(EventKind)
TASK_DURATION_BUCKETS = (10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0,
                         57600.0, 86400.0)
API_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OTHER_ROOMS = "_other"  # room label for rooms past an app's cardinality cap ("*" mode)
# ZEGO's documented quit_reason values of an abnormal end (callback event 2); the label is one
# of these, "unknown" (none given) or "other" (anything else), so a body cannot mint labels.
QUIT_REASONS = tuple(str(r) for r in (1, 2, 3, 4, 5, 6, *range(1001, 1012)))


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
class AppState:
    """Everything the exporter knows about one AppId."""

    app_id: int
    rooms: tuple[str, ...] | None  # None: every room of the app ("*")
    max_rooms: int = 1000
    tracking: Tracking = field(default_factory=Tracking)
    counters: dict[str, dict[EventKind, int]] = field(default_factory=dict)
    durations: dict[str, Histogram] = field(default_factory=dict)  # outcome -> histogram
    up: bool = False
    cycles_attempted: int = 0
    last_success_time: float | None = None
    last_poll_duration: float | None = None
    last_error: str | None = None
    # Events of rooms first seen last cycle ("*" mode), counted one cycle late so that their
    # series are scraped at 0 first and the first event shows in increase().
    deferred: list[TaskEvent] = field(default_factory=list)
    last_observed_ms: int | None = None  # when the last successful cycle's listings began
    ended_by_reason: dict[str, int] = field(default_factory=dict)  # callbacks' quit_reason
    upload_failures: dict[str, int] = field(default_factory=dict)  # room label -> files
    # TaskId -> when (our clock, ms) a callback last flipped its status: a listing taken before
    # that is older news for the task (see diff's `fresher`).
    flipped_at_ms: dict[str, int] = field(default_factory=dict)
    # TaskIds whose live or finished entry a callback changed in place since the last save (a
    # cycle replaces the tracking, and the store then compares it whole).
    unsaved_tasks: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        for room in self.rooms or ():
            self._room_counters(room)
        for outcome in ("normal", "abnormal"):
            self.durations.setdefault(outcome, Histogram(TASK_DURATION_BUCKETS))

    def fresher_than(self, taken_ms: int) -> frozenset[str]:
        """Tasks a callback flipped at or after `taken_ms`; forgets older flips."""
        self.flipped_at_ms = {t: at for t, at in self.flipped_at_ms.items() if at >= taken_ms}
        return frozenset(self.flipped_at_ms)

    def enable_callback_series(self) -> None:
        """Callback-only series at 0 from the start, so the first one shows in increase()."""
        for reason in (*QUIT_REASONS, "other"):
            self.ended_by_reason.setdefault(reason, 0)
        for room in self.rooms or ():
            self.upload_failures.setdefault(room, 0)

    def room_label(self, room_id: str) -> str:
        """The room_id label for a room: itself, or OTHER_ROOMS past the cap in "*" mode."""
        if room_id in self.counters or self.rooms is not None:
            return room_id
        return room_id if len(self.counters) < self.max_rooms else OTHER_ROOMS

    def _room_counters(self, label: str) -> dict[EventKind, int]:
        counters = self.counters.get(label)
        if counters is None:
            counters = self.counters[label] = dict.fromkeys(COUNTED_EVENTS, 0)
        return counters

    def apply(self, tracking: Tracking, events: Sequence[TaskEvent],
              flush_deferred: bool = True, new_live: bool = True) -> None:
        """Take one cycle's (or callback's) result: the new tracking and its events, counted.

        `new_live=False`: the tracking gained no live task (a callback's result), so its rooms
        need no scan; at 50,000 live tasks that scan would be most of a callback's cost."""
        self.tracking = tracking
        first_seen: set[str] = set()
        due: list[TaskEvent] = []
        if flush_deferred:
            due, self.deferred = self.deferred, []
        for event in events:
            label = self.room_label(event.room_id)
            if label not in self.counters:
                first_seen.add(label)
                self._room_counters(label)
            (self.deferred if label in first_seen else due).append(event)
        if new_live and self.rooms is None:  # a room's series appear when it is first seen
            for task in tracking.live.values():
                self._room_counters(self.room_label(task.room_id))
        self._count(due)

    def _count(self, events: Sequence[TaskEvent]) -> None:
        abnormal = {e.task_id for e in events if e.kind is EventKind.ENDED_ABNORMALLY}
        for event in events:
            self.counters[self.room_label(event.room_id)][event.kind] += 1
            if event.kind is EventKind.ENDED and event.duration_s is not None:
                outcome = "abnormal" if event.task_id in abnormal else "normal"
                self.durations[outcome].observe(event.duration_s)

    def live_by_room(self) -> dict[tuple[str, TaskStatus], int]:
        """(room label, status) -> number of live tasks; configured rooms appear at 0."""
        gauges: dict[tuple[str, TaskStatus], int] = defaultdict(int)
        for room in list(self.counters):  # list(): one step, see ExporterCollector
            for status in (TaskStatus.INITIALIZING, TaskStatus.RECORDING, TaskStatus.PAUSED):
                gauges[(room, status)] += 0
        for task in list(self.tracking.live.values()):
            gauges[(self.room_label(task.room_id), task.status)] += 1
        return dict(gauges)


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
    apps: dict[int, AppState]
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
    def for_apps(cls, apps: Sequence[tuple[int, tuple[str, ...] | None, int]]) -> ExporterState:
        return cls({app_id: AppState(app_id, rooms, cap) for app_id, rooms, cap in apps})

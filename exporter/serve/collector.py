"""The metric families of /metrics, built from the state when the exposition renders (once per
change, off the event loop), never per scrape."""

from __future__ import annotations

import array
import bisect
import itertools
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar, Timestamp

from exporter import PYTHON_VERSION, __version__, revision
from exporter.serve.exposition import Block, Row, RowBlocks
from exporter.state.changes import UPLOAD_OUTCOMES, EventKind, TaskEvent
from exporter.state.model import AppState, ExporterState
from exporter.zego.models import TaskStatus
from exporter.zego.ratelimit import RateLimiter

PREFIX = "zego_cloudrecord"

EVENT_COUNTERS = {
    EventKind.STARTED: ("tasks_started", "Recording tasks seen starting."),
    EventKind.ENDED: ("tasks_ended", "Recording tasks that ended, normally or not."),
    EventKind.ENDED_ABNORMALLY: ("tasks_ended_abnormally", "Recording tasks ended abnormally."),
    EventKind.PAUSED: ("tasks_paused", "Recording tasks paused."),
    EventKind.RESUMED: ("tasks_resumed", "Recording tasks resumed after a pause."),
    EventKind.LOST: ("tasks_lost", "Tracked tasks ZEGO no longer knows (final status unknown)."),
}


def _exemplar(event: TaskEvent | None) -> Exemplar | None:
    """The exemplar of a counter whose latest event is `event`: which task it was (OpenMetrics
    only)."""
    # OpenMetrics allows 128 characters of exemplar labels: a longer TaskId (ZEGO's have 16)
    # would make Prometheus refuse the whole scrape.
    if event is None or event.at_ms is None or len("task_id") + len(event.task_id) > 128:
        return None
    return Exemplar({"task_id": event.task_id}, 1, event.at_ms / 1000)


class _Counter(CounterMetricFamily):
    """A counter family whose rows name their exemplar by the event (kept by the state anyway),
    made into an Exemplar only when a block is encoded: 110,000 exemplars held between
    renders would cost about 20 MB at 10,000 rooms."""

    def add_metric(self, labels: Sequence[str], value: float, created: float | None = None,
                   timestamp: Timestamp | float | None = None, exemplar: Any = None) -> None:
        super().add_metric(labels, value, created, timestamp, _exemplar(exemplar))


BLOCK_ROOMS = 2  # rooms per block: what a change to one room costs to rebuild and re-encode
# Blocks' stamps (RowBlocks.stamps), one sequence for every app. A render keeps the stamps, not
# the rows: a block's rows are built from the state only when it is encoded (after a change to
# one of its rooms), and go with the render. Kept rows cost 18-27 MB at 10,000 rooms; the
# signatures (_RoomBlocks) 5 MB.
_STAMPS = itertools.count()
LIVE_STATUSES = (TaskStatus.INITIALIZING, TaskStatus.RECORDING, TaskStatus.PAUSED)
UPLOAD_FAILURES = "upload_failures"
# The per-room families, by name: how each is made empty (RowBlocks.new).
_PER_ROOM: dict[str, Callable[[], Metric]] = {
    "tasks": partial(GaugeMetricFamily, f"{PREFIX}_tasks", "Recording tasks live now, by status.",
                     labels=["app_id", "room_id", "status"]),
    **{name: partial(_Counter, f"{PREFIX}_{name}", doc, labels=["app_id", "room_id"])
       for name, doc in EVENT_COUNTERS.values()},
    "upload_outcomes": partial(
        _Counter, f"{PREFIX}_upload_outcomes",
        "Ended recordings by what became of their files (DescribeRecordStatus or an upload "
        "callback): uploaded, backup, failed, no_files, unknown.",
        labels=["app_id", "room_id", "outcome"]),
    UPLOAD_FAILURES: partial(CounterMetricFamily, f"{PREFIX}_upload_failures",
                             "Recorded files ZEGO callbacks reported not uploaded.",
                             labels=["app_id", "room_id"]),
}
RoomRows = Callable[[str, AppState, str], Iterator[Row]]


# Label values made once: each row (and signature) shares them (4 MB at 10,000 rooms, else).
_STATUS_LABELS = {status: status.label for status in TaskStatus}
_OUTCOME_LABELS = {kind: str(kind.upload_outcome) for kind in UPLOAD_OUTCOMES}


def _task_rows(app_id: str, app: AppState, room: str) -> Iterator[Row]:
    live = app.live_in(room)
    for status in (*LIVE_STATUSES, *(s for s in sorted(live) if s not in LIVE_STATUSES)):
        yield (app_id, room, _STATUS_LABELS[status]), live[status]


def _event_rows(kind: EventKind) -> RoomRows:
    def rows(app_id: str, app: AppState, room: str) -> Iterator[Row]:
        yield (app_id, room), app.counters[room][kind], None, None, app.latest(room, kind)
    return rows


def _upload_outcome_rows(app_id: str, app: AppState, room: str) -> Iterator[Row]:
    by_kind = dict(app.counters[room])  # one C call: the loop may count meanwhile
    for kind in UPLOAD_OUTCOMES:
        yield ((app_id, room, _OUTCOME_LABELS[kind]), by_kind[kind], None, None,
               app.latest(room, kind))


def _upload_failure_rows(app_id: str, app: AppState, room: str) -> Iterator[Row]:
    if (failed := app.upload_failures.get(room)) is not None:
        yield (app_id, room), failed


# Each per-room family's rows of one room label.
_ROOM_ROWS: dict[str, RoomRows] = {
    "tasks": _task_rows,
    **{name: _event_rows(kind) for kind, (name, _) in EVENT_COUNTERS.items()},
    "upload_outcomes": _upload_outcome_rows,
    UPLOAD_FAILURES: _upload_failure_rows,
}


def _signature(rows: Block) -> tuple[Any, ...]:
    """What a block's rows say, in a fifth of their memory: each row's last label (the rest
    are the block's app and room), value and exemplar (_ROOM_ROWS set no created or timestamp)."""
    return tuple(item for row in rows for item in (row[0][-1], row[1], *row[4:]))


class _RoomBlocks:
    """One app's rooms in blocks of BLOCK_ROOMS (in the order the rooms were first seen), and
    per per-room family a stamp and a signature of each block, kept between collects: `update`
    rebuilds the blocks of the rooms the app changed since the last, and gives a new stamp to
    those whose rows changed. The rows themselves are built again when encoded (`_Blocks`)."""

    def __init__(self, label: str, app: AppState) -> None:
        self.label, self.app = label, app
        self._revision = -1
        self.rooms: list[str] = []  # only grows: a block's rooms stay its rooms
        self._where: dict[str, int] = {}  # room label -> its place in rooms
        self.stamps = {name: array.array("q") for name in _PER_ROOM}  # 8 bytes a stamp
        self.signatures: dict[str, list[tuple[Any, ...] | None]] = {n: [] for n in _PER_ROOM}

    def rows(self, name: str, index: int) -> Block:
        return tuple(row for room in self.rooms[index * BLOCK_ROOMS:(index + 1) * BLOCK_ROOMS]
                     for row in _ROOM_ROWS[name](self.label, self.app, room))

    def update(self) -> None:
        app = self.app
        revision = app.revision  # first: see AppState.rooms_changed_since
        changed = app.rooms_changed_since(self._revision)
        known = len(self.rooms)
        for room in list(app.counters)[known:]:  # counters only grow, in order
            self._where[room] = len(self.rooms)
            self.rooms.append(room)
        dirty = {self._where[room] // BLOCK_ROOMS for room in changed if room in self._where}
        if len(self.rooms) > known:  # new rooms: the last block and any new ones
            dirty.update(range(known // BLOCK_ROOMS, math.ceil(len(self.rooms) / BLOCK_ROOMS)))
        for index in sorted(dirty):  # new blocks last, in order
            for name, signatures in self.signatures.items():
                signature, stamps = _signature(self.rows(name, index)), self.stamps[name]
                if index >= len(signatures):
                    signatures.append(signature)
                    stamps.append(next(_STAMPS))
                elif signatures[index] != signature:  # rebuilt the same: not encoded again
                    signatures[index], stamps[index] = signature, next(_STAMPS)
        self._revision = revision

    def encoded(self, name: str, index: int, rows: Block) -> None:
        """`rows` are being encoded for the block's stamp: if the state moved since `update`
        signed it, the signature is dropped, so the next `update` stamps the block anew even if
        the state moves back (it rebuilds the block: the move changed one of its rooms after the
        revision `update` read)."""
        signatures = self.signatures[name]
        if index < len(signatures) and signatures[index] != _signature(rows):
            signatures[index] = None


class _Blocks(Sequence[Block]):
    """A per-room family's blocks across apps, each built from the state when asked for (the
    exposition asks only for those whose stamp is new to it)."""

    def __init__(self, name: str, apps: list[tuple[_RoomBlocks, int]],
                 lock: threading.Lock) -> None:
        self._name = name
        self._apps = apps  # each app's blocks, and how many of them the stamps were given for
        self._starts = list(itertools.accumulate((count for _, count in apps), initial=0))
        self._lock = lock

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> Block:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        place = bisect.bisect_right(self._starts, index) - 1
        blocks, index = self._apps[place][0], index - self._starts[place]
        with self._lock:
            rows = blocks.rows(self._name, index)
            blocks.encoded(self._name, index, rows)
        return rows


class ExporterCollector(Collector):
    def __init__(
        self,
        state: ExporterState,
        limiters: Mapping[tuple[int, str], RateLimiter],
        poll_interval: float,
        overruns: Mapping[int, int] | None = None,
    ) -> None:
        self._state = state
        self._limiters = limiters
        self._poll_interval = poll_interval
        self._overruns = {} if overruns is None else overruns  # PollScheduler.overruns
        self._rooms: dict[str, _RoomBlocks] = {}  # app_id label -> its per-room blocks
        self._lock = threading.Lock()  # renders of two caches may collect at once

    def collect(self) -> Iterator[Metric]:
        # This runs in the render thread while callbacks change the state on the event loop, in
        # place. Every dict that can grow is read through list() or sorted(): one C call, which
        # the GIL does not interleave with the loop's changes, so no iteration sees one happen.
        yield from self._tasks()
        yield from self._polls()
        yield from self._api()
        yield from self._callbacks()
        yield from self._edges()
        errors = CounterMetricFamily(f"{PREFIX}_state_store_errors",
                                     "Failed writes of the state file (--storage.path).")
        errors.add_metric([], self._state.storage_errors)
        yield errors
        info = GaugeMetricFamily(f"{PREFIX}_exporter_build_info",
                                 "Exporter version, source revision and Python version; always 1.",
                                 labels=["version", "revision", "pythonversion"])
        info.add_metric([__version__, revision(), PYTHON_VERSION], 1)  # cached: asks git once
        yield info

    def _tasks(self) -> Iterator[Metric]:
        # The per-room families come in blocks of BLOCK_ROOMS rooms (RowBlocks), kept between
        # renders: only the blocks of rooms that changed are rebuilt, and only those are
        # re-encoded, so a render's cost follows the change, not the number of rooms.
        apps = [(str(app_id), app) for app_id, app in self._state.apps.items()]
        with self._lock:  # another collect may update them too
            for app_id, app in apps:
                self._rooms.setdefault(app_id, _RoomBlocks(app_id, app)).update()
        yield from (self._per_room(name) for name in _PER_ROOM if name != UPLOAD_FAILURES)
        skipped = CounterMetricFamily(
            f"{PREFIX}_upload_lookups_skipped",
            "Upload look-ups due that the DescribeRecordStatus budget left for a later cycle.",
            labels=["app_id"])
        for app_id, app in apps:
            skipped.add_metric([app_id], app.upload_lookups_skipped)
        yield skipped
        durations = HistogramMetricFamily(
            f"{PREFIX}_task_duration_seconds",
            "Length of recordings that ended, by outcome.",
            labels=["app_id", "outcome"],
        )
        for app_id, app in apps:
            for outcome, histogram in app.durations.items():
                durations.add_metric([app_id, outcome], histogram.cumulative(),
                                     histogram.total)
        yield durations

    def _per_room(self, name: str) -> RowBlocks:
        """A per-room family as its blocks' stamps, and the blocks to build when encoded."""
        stamps = array.array("q")  # as kept by the exposition: 8 bytes a block, no int objects
        with self._lock:
            counts = []
            for kept in self._rooms.values():
                counts.append((kept, len(kept.stamps[name])))
                stamps.extend(kept.stamps[name])
        return RowBlocks(_PER_ROOM[name], _Blocks(name, counts, self._lock), stamps)

    def _callbacks(self) -> Iterator[Metric]:
        by_reason = CounterMetricFamily(
            f"{PREFIX}_tasks_ended_abnormally_by_reason",
            "Abnormal ends reported by ZEGO callbacks, by quit_reason.",
            labels=["app_id", "quit_reason"])
        received = CounterMetricFamily(f"{PREFIX}_callbacks",
                                       "ZEGO callbacks received, by event type and result.",
                                       labels=["app_id", "event_type", "result"])
        for app_id, app in self._state.apps.items():
            for reason, count in sorted(app.ended_by_reason.items()):
                by_reason.add_metric([str(app_id), reason], count)
        for labels, count in sorted(self._state.callbacks.items()):
            received.add_metric(list(labels), count)
        yield from (by_reason, self._per_room(UPLOAD_FAILURES), received)

    def _edges(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(f"{PREFIX}_http_requests_refused",
                                      "Requests answered with a 4xx, by listener and reason.",
                                      labels=["listener", "reason"])
        for labels, count in sorted(self._state.refused.items()):
            refused.add_metric(list(labels), count)
        internal = CounterMetricFamily(f"{PREFIX}_internal_errors",
                                       "Unexpected exceptions contained (a bug: see the log).",
                                       labels=["where"])
        for where, count in sorted(self._state.internal_errors.items()):
            internal.add_metric([where], count)
        reloads = CounterMetricFamily(f"{PREFIX}_web_config_reloads",
                                      "Web config reloads, by listener and result.",
                                      labels=["listener", "result"])
        for labels, count in sorted(self._state.web_config_reloads.items()):
            reloads.add_metric(list(labels), count)
        yield from (refused, internal, reloads)

    def _polls(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(f"{PREFIX}_up", "1 if the last poll cycle of the app succeeded.",
                               labels=["app_id"])
        last = GaugeMetricFamily(f"{PREFIX}_last_poll_success_timestamp_seconds",
                                 "Unix time the last successful poll cycle ended.",
                                 labels=["app_id"])
        took = GaugeMetricFamily(f"{PREFIX}_poll_duration_seconds",
                                 "How long the last poll cycle took.", labels=["app_id"])
        interval = GaugeMetricFamily(f"{PREFIX}_poll_interval_seconds",
                                     "Configured time between poll cycles.", labels=["app_id"])
        tracked = GaugeMetricFamily(f"{PREFIX}_finished_tasks_remembered",
                                    "Finished TaskIds kept to count each task once.",
                                    labels=["app_id"])
        overruns = CounterMetricFamily(f"{PREFIX}_poll_overruns",
                                       "Poll cycles that ended after the next was due (the next"
                                       " then started at once).", labels=["app_id"])
        for app_id, app in self._state.apps.items():
            label = [str(app_id)]
            up.add_metric(label, 1 if app.up else 0)
            if app.last_success_time is not None:
                last.add_metric(label, app.last_success_time)
            if app.last_poll_duration is not None:
                took.add_metric(label, app.last_poll_duration)
            interval.add_metric(label, self._poll_interval)
            tracked.add_metric(label, len(app.tracking.finished))
            overruns.add_metric(label, self._overruns.get(app_id, 0))
        yield from (up, last, took, interval, tracked, overruns)

    def request_families(self) -> Iterator[Metric]:
        """The api_* and rate_limit_* families: they move with each request, not each cycle."""
        return self._api()

    def _api(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(f"{PREFIX}_api_requests", "Requests sent to ZEGO, by result"
                                       " code (ZEGO's Code, or a transport failure).",
                                       labels=["app_id", "action", "code"])
        for (app_id, action, code), count in sorted(self._state.api.requests.items()):
            requests.add_metric([str(app_id), action, code], count)
        durations = HistogramMetricFamily(f"{PREFIX}_api_request_duration_seconds",
                                          "Time ZEGO took to answer one request.",
                                          labels=["action"])
        for action, histogram in sorted(self._state.api.durations.items()):
            durations.add_metric([action], histogram.cumulative(), histogram.total)
        waited = CounterMetricFamily(f"{PREFIX}_rate_limit_wait_seconds",
                                     "Time requests waited for the rate limiter.",
                                     labels=["app_id", "action"])
        limit = GaugeMetricFamily(f"{PREFIX}_rate_limit_requests_per_second",
                                  "Configured request budget per app and action.",
                                  labels=["app_id", "action"])
        for (app_id, action), limiter in sorted(self._limiters.items()):
            waited.add_metric([str(app_id), action], limiter.waited_seconds)
            limit.add_metric([str(app_id), action], limiter.limit)
        yield from (requests, durations, waited, limit)

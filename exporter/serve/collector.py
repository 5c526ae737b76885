"""The metric families of /metrics, built from the state when the exposition renders (once per
change, off the event loop), never per scrape."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import partial

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from exporter import PYTHON_VERSION, __version__, revision
from exporter.serve.exposition import RowBlocks
from exporter.state.changes import UPLOAD_OUTCOMES, EventKind
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


def _exemplar(app: AppState, room: str, kind: EventKind) -> Exemplar | None:
    """The room's latest event of `kind`: which task it was (OpenMetrics only)."""
    event = app.latest(room, kind)
    # OpenMetrics allows 128 characters of exemplar labels: a longer TaskId (ZEGO's have 16)
    # would make Prometheus refuse the whole scrape.
    if event is None or event.at_ms is None or len("task_id") + len(event.task_id) > 128:
        return None
    return Exemplar({"task_id": event.task_id}, 1, event.at_ms / 1000)


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
        # One family at a time: the renderer consumes each before the next is built. The
        # per-room families come as rows in blocks (RowBlocks): a render re-encodes only the
        # blocks whose rows changed, so its cost follows the change, not the number of rooms.
        apps = [(str(app_id), app) for app_id, app in self._state.apps.items()]
        labels = [""] * (max(TaskStatus) + 1)  # by value: an enum's hash is Python code
        for status in TaskStatus:
            labels[status] = status.label
        yield RowBlocks.of(
            partial(GaugeMetricFamily, f"{PREFIX}_tasks", "Recording tasks live now, by status.",
                    labels=["app_id", "room_id", "status"]),
            ([((app_id, room, labels[status]), count)
              for (room, status), count in app.live_by_room().items()] for app_id, app in apps))
        rooms = [[((app_id, room), by_kind) for room, by_kind in list(app.counters.items())]
                 for app_id, app in apps]  # each room's labels, shared by its six counters
        for kind, (name, doc) in EVENT_COUNTERS.items():
            yield RowBlocks.of(
                partial(CounterMetricFamily, f"{PREFIX}_{name}", doc,
                        labels=["app_id", "room_id"]),
                ([(labels, by_kind[kind], None, None, _exemplar(app, labels[1], kind))
                  for labels, by_kind in counters]
                 for (_, app), counters in zip(apps, rooms, strict=True)))
        yield RowBlocks.of(
            partial(CounterMetricFamily, f"{PREFIX}_upload_outcomes",
                    "Ended recordings by what became of their files (DescribeRecordStatus or an "
                    "upload callback): uploaded, backup, failed, no_files, unknown.",
                    labels=["app_id", "room_id", "outcome"]),
            ([((*labels, str(kind.upload_outcome)), by_kind[kind], None, None,
               _exemplar(app, labels[1], kind))
              for labels, by_kind in counters for kind in UPLOAD_OUTCOMES]
             for (_, app), counters in zip(apps, rooms, strict=True)))
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
        uploads = RowBlocks.of(
            partial(CounterMetricFamily, f"{PREFIX}_upload_failures",
                    "Recorded files ZEGO callbacks reported not uploaded.",
                    labels=["app_id", "room_id"]),
            ([((str(app_id), room), count) for room, count in sorted(app.upload_failures.items())]
             for app_id, app in self._state.apps.items()))
        yield from (by_reason, uploads, received)

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

"""The exposition: names, labels and values built from the state, valid for Prometheus."""

from __future__ import annotations

import gzip
import platform
import subprocess
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as text_string_to_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.clock import ManualClock
from exporter.serve.collector import BLOCK_ROOMS, ExporterCollector
from exporter.serve.exposition import PROMETHEUS_ACCEPT, ExpositionCache, RowBlocks
from exporter.state.changes import (
    ChangeSet,
    EventKind,
    Source,
    TaskEvent,
    TrackedTask,
    UploadFailure,
)
from exporter.state.model import OTHER_ROOMS, ExporterState
from exporter.zego.models import TaskStatus
from exporter.zego.ratelimit import RateLimiter
from tests.conftest import cycle, require_binary


def render(state: ExporterState) -> str:
    registry = CollectorRegistry(auto_describe=False)
    limiters = {(7, "DescribeTasks"): RateLimiter(10, ManualClock())}
    registry.register(ExporterCollector(state, limiters, poll_interval=15.0))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def test_configured_rooms_exist_at_zero_before_any_event() -> None:
    text = render(ExporterState.for_apps([(7, ("a", "b"), 1000)]))
    for room in ("a", "b"):
        assert value(text, "zego_cloudrecord_tasks_started_total", app_id="7", room_id=room) == 0
        assert value(text, "zego_cloudrecord_tasks_ended_abnormally_total", app_id="7",
                     room_id=room) == 0
        assert value(text, "zego_cloudrecord_tasks", app_id="7", room_id=room,
                     status="recording") == 0


def test_events_count_per_room_and_durations_per_outcome() -> None:
    state = ExporterState.for_apps([(7, ("a", "b"), 1000)])
    app = state.apps[7]
    app.apply(cycle(
        TaskEvent(EventKind.STARTED, "t1", "a"),
        TaskEvent(EventKind.ENDED, "t1", "a", duration_s=120.0),
        TaskEvent(EventKind.ENDED_ABNORMALLY, "t1", "a"),
        TaskEvent(EventKind.STARTED, "t2", "b"),
        TaskEvent(EventKind.PAUSED, "t2", "b"),
        live=[TrackedTask("t2", "b", TaskStatus.PAUSED, 0)]))
    text = render(state)
    assert value(text, "zego_cloudrecord_tasks_started_total", app_id="7", room_id="a") == 1
    assert value(text, "zego_cloudrecord_tasks_ended_abnormally_total", app_id="7",
                 room_id="a") == 1
    assert value(text, "zego_cloudrecord_tasks_paused_total", app_id="7", room_id="b") == 1
    assert value(text, "zego_cloudrecord_tasks", app_id="7", room_id="b", status="paused") == 1
    assert value(text, "zego_cloudrecord_task_duration_seconds_count", app_id="7",
                 outcome="abnormal") == 1
    assert value(text, "zego_cloudrecord_task_duration_seconds_bucket", app_id="7",
                 outcome="abnormal", le="300.0") == 1
    assert value(text, "zego_cloudrecord_task_duration_seconds_bucket", app_id="7",
                 outcome="abnormal", le="60.0") == 0
    assert value(text, "zego_cloudrecord_task_duration_seconds_count", app_id="7",
                 outcome="normal") == 0


def test_all_rooms_mode_caps_room_series_and_aggregates_the_rest() -> None:
    state = ExporterState.for_apps([(7, None, 2)])
    state.apps[7].apply(cycle(*(TaskEvent(EventKind.STARTED, f"t{i}", f"room{i}")
                                for i in range(5))))
    state.apps[7].apply(cycle())
    text = render(state)
    rooms = {dict(labels)["room_id"] for (name, labels) in samples(text)
             if name == "zego_cloudrecord_tasks_started_total"}
    assert rooms == {"room0", "room1", OTHER_ROOMS}
    assert value(text, "zego_cloudrecord_tasks_started_total", app_id="7",
                 room_id=OTHER_ROOMS) == 3


def test_a_room_first_seen_in_all_rooms_mode_shows_at_zero_before_its_first_event() -> None:
    state = ExporterState.for_apps([(7, None, 1000)])
    app = state.apps[7]
    died = [TaskEvent(EventKind.STARTED, "t", "new"),
            TaskEvent(EventKind.ENDED, "t", "new", duration_s=9.0),
            TaskEvent(EventKind.ENDED_ABNORMALLY, "t", "new")]
    app.apply(cycle(*died))
    first = render(state)
    assert value(first, "zego_cloudrecord_tasks_ended_abnormally_total", app_id="7",
                 room_id="new") == 0
    app.apply(cycle())
    second = render(state)
    assert value(second, "zego_cloudrecord_tasks_ended_abnormally_total", app_id="7",
                 room_id="new") == 1
    assert value(second, "zego_cloudrecord_task_duration_seconds_count", app_id="7",
                 outcome="abnormal") == 1


def test_no_task_id_label_anywhere() -> None:
    state = ExporterState.for_apps([(7, ("a",), 1000)])
    state.apps[7].apply(cycle(TaskEvent(EventKind.STARTED, "t", "a"),
                              live=[TrackedTask("t", "a", TaskStatus.RECORDING, 0)]))
    assert all("task_id" not in dict(labels) for _, labels in samples(render(state)))


def test_exposition_passes_promtool_check_metrics() -> None:
    promtool = require_binary("promtool", "prometheus")
    state = ExporterState.for_apps([(7, ("a",), 1000)])
    state.apps[7].apply(cycle(TaskEvent(EventKind.STARTED, "t", "a"),
                              TaskEvent(EventKind.ENDED, "t", "a", duration_s=5.0)))
    state.api.observe(7, "DescribeTasks", "0", 0.02)
    result = subprocess.run([promtool, "check", "metrics"], input=render(state).encode(),
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_openmetrics_exposition_is_produced_too() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(ExporterState.for_apps([(7, ("a",), 1000)]), {}, 15.0))
    text = generate_openmetrics(registry).decode()
    assert text.endswith("# EOF\n")
    assert 'zego_cloudrecord_tasks_started_total{app_id="7",room_id="a"} 0' in text


def test_build_info_names_the_version_the_commit_and_the_python() -> None:
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
    text = render(ExporterState.for_apps([(7, ("r",), 10)]))
    assert value(text, "zego_cloudrecord_exporter_build_info", version=__version__,
                 revision=head, pythonversion=platform.python_version()) == 1


def test_event_counters_carry_their_latest_task_as_an_openmetrics_exemplar() -> None:
    state = ExporterState.for_apps([(7, ("a",), 1000)])
    state.apps[7].apply(cycle(TaskEvent(EventKind.STARTED, "t1", "a"),
                              TaskEvent(EventKind.STARTED, "t2", "a"),
                              TaskEvent(EventKind.UPLOAD_FAILED, "t0", "a"),
                              at_ms=1_750_000_000_500))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(state, {}, poll_interval=15.0))
    families = {f.name: f for f in text_string_to_openmetrics(generate_openmetrics(registry)
                                                              .decode())}
    started = families["zego_cloudrecord_tasks_started"].samples[0]
    assert started.exemplar is not None
    assert started.exemplar.labels == {"task_id": "t2"}
    assert float(started.exemplar.timestamp) == 1_750_000_000.5
    failed = [s for s in families["zego_cloudrecord_upload_outcomes"].samples
              if s.labels.get("outcome") == "failed"]
    assert failed[0].value == 1 and failed[0].exemplar.labels == {"task_id": "t0"}
    assert all(s.exemplar is None for s in families["zego_cloudrecord_tasks_ended"].samples)
    assert "task_id" not in render(state)  # the text format has no exemplars


ROOMS = tuple(f"r{i}" for i in range(40))  # several blocks of BLOCK_ROOMS
TASKS = tuple(f"t{i}" for i in range(60))
LIVE = (TaskStatus.INITIALIZING, TaskStatus.RECORDING, TaskStatus.PAUSED)


@st.composite
def change_sets(draw: st.DrawFn) -> ChangeSet:
    tasks, rooms = st.sampled_from(TASKS), st.sampled_from(ROOMS)
    return ChangeSet(
        draw(st.sampled_from(Source)), draw(st.integers(0, 10**6)),
        events=tuple(draw(st.lists(st.builds(TaskEvent, st.sampled_from(EventKind), tasks,
                                             rooms), max_size=4))),
        tracked={t.task_id: t for t in draw(st.lists(st.builds(
            TrackedTask, tasks, rooms, st.sampled_from(LIVE), st.just(0)), max_size=4))},
        untracked=frozenset(draw(st.lists(tasks, max_size=3))),
        upload_failures=tuple(draw(st.lists(st.builds(UploadFailure, tasks, rooms,
                                                      st.integers(1, 3)), max_size=2))),
        observed_ms=draw(st.none() | st.just(0)))  # a cycle's: releases deferred events


def openmetrics(collector: ExporterCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_openmetrics(registry).decode()


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([ROOMS, None]), st.lists(change_sets(), min_size=1, max_size=12))
def test_the_kept_blocks_always_render_what_a_fresh_collector_renders(
        rooms: tuple[str, ...] | None, changes: list[ChangeSet]) -> None:
    """Rows kept between renders are rebuilt for every room a change touched (its tasks, its
    counters and exemplars, its upload failures, a room first seen, the cap's `_other`)."""
    state = ExporterState.for_apps([(7, rooms, 25)], callbacks=frozenset({7}))
    kept = ExporterCollector(state, {}, poll_interval=15.0)
    openmetrics(kept)
    for change in changes:
        state.apps[7].apply(change)
        assert openmetrics(kept) == openmetrics(ExporterCollector(state, {}, poll_interval=15.0))


def _blocks(collector: ExporterCollector) -> dict[str, RowBlocks]:
    return {f.name: f for f in collector.collect() if isinstance(f, RowBlocks)}


def test_a_change_to_one_room_renews_only_its_blocks_stamps() -> None:
    """Only the changed room's block is rebuilt; its stamp is new in the families whose rows
    changed there, and only in those (a render re-encodes by stamp)."""
    state = ExporterState.for_apps([(7, ROOMS, 1000)], callbacks=frozenset({7}))
    collector = ExporterCollector(state, {}, poll_interval=15.0)
    before = {name: (list(f.blocks), list(f.stamps or ()))
              for name, f in _blocks(collector).items()}
    state.apps[7].apply(ChangeSet(Source.CALLBACK, 1, (TaskEvent(
        EventKind.ENDED_ABNORMALLY, "t", "r20", Source.CALLBACK),)))
    after = _blocks(collector)
    changed = ROOMS.index("r20") // BLOCK_ROOMS
    renewed = set()
    for name, (was, was_stamps) in before.items():
        now, stamps = list(after[name].blocks), list(after[name].stamps or ())
        assert len(now) == len(was) == len(stamps) == -(-len(ROOMS) // BLOCK_ROOMS) > 2
        for index, block in enumerate(now):
            if index == changed and stamps[index] != was_stamps[index]:
                renewed.add(name)
                assert block != was[index]
            else:
                assert block == was[index] and stamps[index] == was_stamps[index], (name, index)
    assert renewed == {"zego_cloudrecord_tasks_ended_abnormally"}


def test_a_block_encoded_after_the_state_moved_is_stamped_anew_even_if_it_moves_back() -> None:
    """The rows are built when encoded, after the stamps were given: a block whose rows then
    differ from what its stamp stood for gets a new stamp at the next collect, even if the state
    is back where it was (else the text encoded meanwhile would stay)."""
    state = ExporterState.for_apps([(7, ROOMS, 1000)], callbacks=frozenset({7}))
    collector = ExporterCollector(state, {}, poll_interval=15.0)
    app, name = state.apps[7], "zego_cloudrecord_tasks"
    index = ROOMS.index("r20") // BLOCK_ROOMS
    tracked = ChangeSet(Source.POLL, 1, tracked={"t": TrackedTask(
        "t", "r20", TaskStatus.RECORDING, 0)})
    app.apply(tracked)
    family = _blocks(collector)[name]
    stamp = list(family.stamps or ())[index]
    app.apply(ChangeSet(Source.POLL, 2, untracked=frozenset({"t"})))  # while the render runs
    encoded = family.blocks[index]
    assert (("7", "r20", "recording"), 0) in encoded  # built from the state as it is now
    app.apply(tracked)  # and back
    assert list(_blocks(collector)[name].stamps or ())[index] != stamp


async def test_a_room_first_seen_in_one_app_moves_the_next_apps_blocks_and_renders_follow(
) -> None:
    """Blocks are told apart by stamp, not place: a room new to the first app shifts every
    block of the second, and the kept render still equals prometheus_client's own."""
    state = ExporterState.for_apps([(7, None, 25), (8, None, 25)], callbacks=frozenset({7, 8}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(state, {}, poll_interval=15.0))
    cache = ExpositionCache(registry, in_thread=False, accepts=(PROMETHEUS_ACCEPT,))
    content_type = choose_encoder(PROMETHEUS_ACCEPT)[1]
    for number, (app_id, room) in enumerate(
            [(8, "b1"), (7, "a1"), (8, "b2"), (8, "b3"), (7, "a2"), (7, "a3"), (8, "b4")]):
        state.apps[app_id].apply(ChangeSet(Source.CALLBACK, 1, (TaskEvent(
            EventKind.ENDED_ABNORMALLY, f"t{number}", room, Source.CALLBACK),)))
        cache.invalidate()
        ours = gzip.decompress((await cache.get(content_type)).gzipped).decode()
        assert ours == openmetrics(ExporterCollector(state, {}, poll_interval=15.0)), room

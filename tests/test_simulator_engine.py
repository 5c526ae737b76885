"""The simulator's lifecycle engine: determinism, lifecycle invariants, scripted control, ledger."""

from __future__ import annotations

import contextlib
import random
import re
from collections import defaultdict
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.clock import ManualClock
from exporter.simulator import engine as engine_module
from exporter.simulator.engine import (
    MAX_RECORD_SECONDS,
    LifecycleRates,
    RoomCounts,
    SimEngine,
    SimError,
    Transition,
    is_valid_transition,
    room_names,
    summarize,
)
from exporter.zego.errors import Code
from exporter.zego.models import FileStatus, TaskStatus
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START

BUSY = LifecycleRates(arrivals_per_hour=30, mean_duration_s=900, abnormal_probability=0.2,
                      pause_probability=0.4, mean_pause_s=60)
QUIET = LifecycleRates(arrivals_per_hour=0)


def busy_engine(seed: int = 1, rates: LifecycleRates = BUSY) -> tuple[ManualClock, SimEngine]:
    clock = ManualClock(START)
    engine = SimEngine(clock, {APP: SECRET, 42: "other"}, seed=seed, rooms=room_names(4),
                       rates=rates)
    return clock, engine


def run_for(clock: ManualClock, engine: SimEngine, seconds: float) -> None:
    clock.advance(seconds)
    engine.advance_to(clock.time())


def quiet_engine() -> tuple[ManualClock, SimEngine]:
    clock = ManualClock(START)
    return clock, SimEngine(clock, {APP: SECRET}, seed=1, rooms=["room-1"], rates=QUIET)


def test_same_seed_gives_the_same_ledger_whatever_the_query_pattern() -> None:
    clock_a, engine_a = busy_engine()
    run_for(clock_a, engine_a, 12 * 3600)

    clock_b, engine_b = busy_engine()
    pattern = random.Random(99)
    while clock_b.time() < START + 12 * 3600:
        clock_b.advance(min(pattern.expovariate(1 / 120), START + 12 * 3600 - clock_b.time()))
        if pattern.random() < 0.5:
            now_ms = int(clock_b.time() * 1000)
            engine_b.list_tasks(APP, None, now_ms - 86_400_000, now_ms,
                                frozenset(TaskStatus))
        else:
            engine_b.advance_to(clock_b.time())
    engine_b.advance_to(clock_b.time())

    assert len(engine_a.ledger) > 500
    assert engine_a.ledger == engine_b.ledger


def test_different_seeds_give_different_ledgers() -> None:
    clock_a, engine_a = busy_engine(seed=1)
    clock_b, engine_b = busy_engine(seed=2)
    run_for(clock_a, engine_a, 3600)
    run_for(clock_b, engine_b, 3600)
    assert engine_a.ledger != engine_b.ledger


def test_task_ids_look_like_zegos_and_are_unique() -> None:
    clock, engine = busy_engine()
    run_for(clock, engine, 24 * 3600)
    created = [t.task_id for t in engine.ledger if t.from_status is None]
    assert len(created) > 1000
    assert len(set(created)) == len(created)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{16}", task_id) for task_id in created)


def test_every_transition_follows_the_lifecycle_in_time_order() -> None:
    clock, engine = busy_engine()
    run_for(clock, engine, 24 * 3600)
    last: dict[str, int | None] = {}
    times = [t.at for t in engine.ledger]
    assert times == sorted(times)
    for t in engine.ledger:
        assert t.from_status == last.get(t.task_id), t
        assert is_valid_transition(t.from_status, t.to_status), t
        last[t.task_id] = t.to_status
    seen = {(t.from_status, t.to_status) for t in engine.ledger}
    assert {(None, 1), (1, 2), (2, 5), (5, 2), (2, 3), (2, 4)} <= seen


def test_no_task_lives_longer_than_max_record_time() -> None:
    long_rates = LifecycleRates(arrivals_per_hour=2, mean_duration_s=20 * 3600)
    clock, engine = busy_engine(rates=long_rates)
    run_for(clock, engine, 4 * 86_400)
    begins: dict[str, float] = {}
    lifetimes = []
    for t in engine.ledger:
        if t.from_status is None:
            begins[t.task_id] = t.at
        elif t.to_status in (3, 4):
            lifetimes.append(t.at - begins[t.task_id])
    assert max(lifetimes) <= MAX_RECORD_SECONDS
    assert any(life == pytest.approx(MAX_RECORD_SECONDS) for life in lifetimes)
    assert all(t.at - begins[t.task_id] <= MAX_RECORD_SECONDS for t in engine.ledger)


def test_a_task_that_reaches_max_record_time_ends_abnormally() -> None:
    clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1")
    run_for(clock, engine, MAX_RECORD_SECONDS + 1)
    end = engine.ledger[-1]
    assert (end.task_id, end.to_status) == (task_id, TaskStatus.ENDED_ABNORMALLY)
    assert end.at == pytest.approx(START + MAX_RECORD_SECONDS)


def test_summary_counts_starts_ends_abnormal_ends_pauses_and_resumes() -> None:
    ledger = [
        Transition(APP, "a", "t1", None, 1, 1.0), Transition(APP, "a", "t1", 1, 2, 2.0),
        Transition(APP, "a", "t1", 2, 5, 3.0), Transition(APP, "a", "t1", 5, 2, 4.0),
        Transition(APP, "a", "t1", 2, 3, 5.0), Transition(APP, "a", "t2", None, 1, 6.0),
        Transition(APP, "a", "t2", 1, 4, 7.0), Transition(APP, "b", "t3", None, 1, 8.0),
        Transition(APP, "b", "t3", 1, 2, 9.0), Transition(APP, "b", "t3", 2, 5, 9.5),
        Transition(APP, "b", "t3", 5, 4, 9.9),
    ]
    assert summarize(ledger) == {
        (APP, "a"): RoomCounts(started=2, ended=2, ended_abnormally=1, paused=1, resumed=1),
        (APP, "b"): RoomCounts(started=1, ended=1, ended_abnormally=1, paused=1, resumed=0),
    }


def test_summary_of_a_busy_day_adds_up() -> None:
    clock, engine = busy_engine()
    run_for(clock, engine, 24 * 3600)
    summary = engine.summary()
    assert set(summary) == {(app, room) for app in (APP, 42) for room in room_names(4)}
    live: defaultdict[tuple[int, str], int] = defaultdict(int)
    for task in engine.live_tasks():
        live[(task.app_id, task.room_id)] += 1
    for key, counts in summary.items():
        assert counts.started == counts.ended + live[key]
        assert 0 < counts.ended_abnormally < counts.ended
        assert counts.resumed <= counts.paused


def test_no_arrivals_without_an_arrival_rate() -> None:
    clock, engine = quiet_engine()
    run_for(clock, engine, 7 * 86_400)
    assert engine.ledger == []


def test_warmup_simulates_history_before_the_start() -> None:
    clock = ManualClock(START)
    engine = SimEngine(clock, {APP: SECRET}, seed=3, rooms=room_names(2), rates=BUSY,
                       warmup_s=3600)
    assert engine.ledger
    assert engine.ledger[0].at >= START - 3600
    assert engine.ledger[-1].at <= START


def test_scripted_start_initialises_then_records_until_stopped() -> None:
    clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1")
    run_for(clock, engine, 3 * 3600)
    engine.stop(task_id)
    steps = [(t.from_status, t.to_status) for t in engine.ledger]
    assert steps == [(None, 1), (1, 2), (2, 3)]
    assert engine.ledger[1].at - START < 10
    assert engine.ledger[2].at == START + 3 * 3600


def test_control_ops_at_a_later_time_apply_when_the_clock_gets_there() -> None:
    clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1", at=START + 100)
    engine.pause(task_id, at=START + 200)
    engine.resume(task_id, at=START + 300)
    engine.abort(task_id, at=START + 400)
    run_for(clock, engine, 150)
    assert [t.to_status for t in engine.ledger] == [1, 2]
    run_for(clock, engine, 1000)
    assert [(t.to_status, t.at - START) for t in engine.ledger][2:] == [
        (5, 200), (2, 300), (4, 400)]


def test_control_at_a_past_time_applies_now() -> None:
    clock, engine = quiet_engine()
    run_for(clock, engine, 50)
    engine.start(APP, "room-1", at=START)
    assert engine.ledger[0].at == START + 50


def test_room_only_ops_pick_the_newest_live_task() -> None:
    clock, engine = quiet_engine()
    older = engine.start(APP, "room-1")
    run_for(clock, engine, 10)
    newer = engine.start(APP, "room-1")
    run_for(clock, engine, 10)
    assert engine.control("abort", app_id=APP, room_id="room-1") == newer
    assert engine.control("stop", app_id=APP, room_id="room-1") == older


def test_pausing_a_task_that_is_not_recording_is_refused() -> None:
    _clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1")
    with pytest.raises(SimError) as refused:
        engine.pause(task_id)
    assert refused.value.code == Code.INVALID_PARAMETER


def test_resuming_a_task_that_is_not_paused_is_refused() -> None:
    clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1")
    run_for(clock, engine, 60)
    with pytest.raises(SimError) as refused:
        engine.resume(task_id)
    assert refused.value.code == Code.INVALID_PARAMETER


def test_stopping_an_ended_task_answers_already_ended() -> None:
    _clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1")
    engine.stop(task_id)
    with pytest.raises(SimError) as refused:
        engine.stop(task_id)
    assert refused.value.code == Code.TASK_ALREADY_ENDED


def test_ops_on_an_unknown_task_answer_not_found() -> None:
    _clock, engine = quiet_engine()
    with pytest.raises(SimError) as refused:
        engine.stop("AAAAAAAAAAAAAAAA")
    assert refused.value.code == Code.TASK_NOT_FOUND


def test_a_paused_natural_task_keeps_paused_until_resumed_by_script() -> None:
    clock, engine = busy_engine()
    run_for(clock, engine, 600)
    task = next(t for t in engine.live_tasks() if t.status == TaskStatus.RECORDING)
    engine.pause(task.task_id)
    run_for(clock, engine, 12 * 3600)
    assert engine.task(task.app_id, task.task_id, clock.time()) is not None
    assert task.status == TaskStatus.PAUSED
    engine.resume(task.task_id)
    assert engine.ledger[-1].to_status == TaskStatus.RECORDING


def test_a_forgotten_task_is_neither_listed_nor_described() -> None:
    clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1")
    run_for(clock, engine, 60)
    engine.forget(task_id)
    now_ms = int(clock.time() * 1000)
    assert engine.task(APP, task_id, clock.time()) is None
    assert engine.list_tasks(APP, None, now_ms - 3_600_000, now_ms, frozenset(TaskStatus)) == []
    assert engine.forgotten == {task_id}


def test_a_forgotten_task_makes_no_more_transitions() -> None:
    clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1")
    engine.forget(task_id)
    run_for(clock, engine, 2 * 86_400)
    assert [t.to_status for t in engine.ledger] == [1]


def test_tasks_begun_more_than_three_days_ago_are_not_described() -> None:
    clock, engine = quiet_engine()
    task_id = engine.start(APP, "room-1")
    engine.stop(task_id)
    run_for(clock, engine, 3 * 86_400 - 1)
    assert engine.task(APP, task_id, clock.time()) is not None
    run_for(clock, engine, 2)
    assert engine.task(APP, task_id, clock.time()) is None


def test_tasks_of_another_app_are_not_described() -> None:
    clock, engine = busy_engine()
    task_id = engine.start(APP, "room-1")
    assert engine.task(42, task_id, clock.time()) is None


def test_files_record_then_upload_then_settle() -> None:
    rates = LifecycleRates(arrivals_per_hour=0, no_stream_probability=0.0, upload_s=(5, 5))
    clock = ManualClock(START)
    engine = SimEngine(clock, {APP: SECRET}, seed=1, rooms=["room-1"], rates=rates)
    task_id = engine.start(APP, "room-1")
    task = engine.task(APP, task_id, clock.time())
    assert task is not None
    assert "RecordFiles" not in task.describe(clock.time())  # initialising: no files yet
    run_for(clock, engine, 600)
    recording = task.describe(clock.time())
    assert {f["Status"] for f in recording["RecordFiles"]} == {FileStatus.RECORDING}
    assert recording["RecordEndTimestamp"] == 0
    engine.stop(task_id)
    assert {f["Status"] for f in task.describe(clock.time())["RecordFiles"]} == {
        FileStatus.UPLOADING}
    run_for(clock, engine, 6)
    final = task.describe(clock.time())
    assert final["RecordEndTimestamp"] == int(clock.time() * 1000) - 6000
    assert all(f["Status"] in (3, 4, 5) for f in final["RecordFiles"])
    assert all(f["Duration"] > 590_000 for f in final["RecordFiles"])


def test_some_uploads_fail() -> None:
    rates = LifecycleRates(arrivals_per_hour=60, mean_duration_s=60,
                           upload_failure_probability=0.3, upload_s=(1, 1))
    clock, engine = busy_engine(rates=rates)
    run_for(clock, engine, 6 * 3600)
    now_ms = int(clock.time() * 1000)
    tasks = engine.list_tasks(APP, None, now_ms - 5 * 3_600_000, now_ms,
                              frozenset({TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY}))
    statuses = {f["Status"] for t in tasks for f in t.describe(clock.time()).get("RecordFiles",
                                                                                 [])}
    assert statuses == {FileStatus.UPLOADED, FileStatus.IN_BACKUP_STORAGE,
                        FileStatus.UPLOAD_FAILED}


def test_ledger_since_returns_only_later_transitions() -> None:
    clock, engine = busy_engine()
    run_for(clock, engine, 3600)
    middle = START + 1800
    assert engine.ledger_since(middle) == [t for t in engine.ledger if t.at >= middle]


def test_after_a_week_the_last_three_days_are_still_all_listed() -> None:
    clock, engine = busy_engine(rates=LifecycleRates(arrivals_per_hour=4, mean_duration_s=600))
    run_for(clock, engine, 7 * 86_400)
    now_ms = int(clock.time() * 1000)
    since_ms = now_ms - 3 * 86_400_000
    listed = {t.task_id for t in engine.list_tasks(APP, None, since_ms, now_ms,
                                                   frozenset(TaskStatus))}
    created = {t.task_id for t in engine.ledger
               if t.from_status is None and t.app_id == APP and t.at * 1000 >= since_ms}
    assert len(created) > 500
    assert listed == created
    # Older tasks are pruned, not kept for good: none begun over 3 days and 2 hours ago is held.
    first = [t.task_id for t in engine.ledger if t.from_status is None]
    old = [t for t in engine.ledger if t.from_status is None and t.at < clock.time() - 3 * 86_400
           - 7_200]
    assert len(old) > 500 and all(engine.find(t.task_id) is None for t in old)
    assert engine.find(first[-1]) is not None


LISTED = [frozenset(TaskStatus), frozenset({TaskStatus.RECORDING}), frozenset(
    {TaskStatus.INITIALIZING, TaskStatus.RECORDING, TaskStatus.PAUSED}),
    frozenset({TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY})]


OPS = ["wait", "start", "stop", "pause", "forget", "list", "next", "keep_up"]


@pytest.mark.parametrize("in_place", [engine_module._EDITS_IN_PLACE, 0])  # edits one by one,
# or all in one pass of slices (what a listing a while behind takes)
@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 3), st.integers(0, 3),
                          st.integers(1, 900)), min_size=1, max_size=60), st.integers(1, 5))
def test_a_kept_listing_is_always_what_a_fresh_filter_gives(
        in_place: int, ops: list[tuple[str, int, int, int]], seed: int) -> None:
    """list_tasks keeps each listing and replays the tasks touched since, and starts the next
    cycle's listing from the last: whatever happened in between (arrivals, transitions, control
    ops, forgetting, the server's keeping up), it answers what a scan does."""
    with mock.patch.object(engine_module, "_EDITS_IN_PLACE", in_place):
        check_listings_against_scans(ops, seed)


def check_listings_against_scans(ops: list[tuple[str, int, int, int]], seed: int) -> None:
    clock, engine = busy_engine(seed)
    rooms = [*room_names(4)]
    windows: list[tuple[str | None, int, int]] = []
    for op, room, pick, seconds in ops:
        now_ms = int(clock.time() * 1000)
        live = [t for t in engine.live_tasks() if t.app_id == APP]
        task = live[pick % len(live)] if live else None
        if op == "wait":
            run_for(clock, engine, seconds)
        elif op == "keep_up":  # what the server does every few ms, with or without requests
            clock.advance(seconds)
            engine.keep_up()
        elif op == "start":
            engine.start(APP, rooms[room])
        elif op == "next" and windows:  # the next cycle's listing: a later start, up to now
            scope, begin_from, begin_to = windows[-1]
            windows.append((scope, min(begin_from + seconds * 10_000, begin_to), now_ms))
        elif op in ("list", "next") or task is None:
            windows.append((None if pick == 0 else rooms[room], now_ms - seconds * 60_000,
                            now_ms + (seconds if pick % 2 else 0)))
        else:
            with contextlib.suppress(SimError):  # pausing a task not recording, say
                getattr(engine, op)(task.task_id)
        for scope, begin_from, begin_to in windows[-2:]:
            for statuses in LISTED:
                kept = engine.list_tasks(APP, scope, begin_from, begin_to, statuses)
                assert kept == engine.scan_tasks(APP, scope, begin_from, begin_to, statuses)
                total, page = engine.list_page(APP, scope, begin_from, begin_to, statuses, 2, 3)
                assert (total, page) == (len(kept), kept[2:5])


def test_a_listing_started_from_a_kept_one_that_ends_later_leaves_out_the_later_tasks() -> None:
    clock, engine = quiet_engine()
    now_ms = int(clock.time() * 1000)
    every = frozenset(TaskStatus)
    assert engine.list_tasks(APP, None, now_ms - 60_000, now_ms + 3_600_000, every) == []
    run_for(clock, engine, 10)
    first = engine.start(APP, "room-1")
    run_for(clock, engine, 10)
    engine.start(APP, "room-1")  # begun 20 s on: after the window below
    listed = engine.list_tasks(APP, None, now_ms - 30_000, now_ms + 15_000, every)
    assert [t.task_id for t in listed] == [first]

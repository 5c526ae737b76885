"""The simulator's RecordFiles: one file per stream, uploads after the end (1 -> 2 -> 3, 4 or 5),
recordings without streams, and each ended task's upload outcome in the ledger."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from exporter.clock import ManualClock
from exporter.simulator.engine import (
    FilesSettled,
    LifecycleRates,
    RoomCounts,
    SimEngine,
    SimTask,
    Transition,
    UploadOutcome,
    room_names,
    summarize,
    upload_outcome,
)
from exporter.simulator.scenario import ScenarioError, parse_scenario
from exporter.zego.models import FileStatus, TaskStatus
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START

ENDED = frozenset({TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY})
BUSY = LifecycleRates(arrivals_per_hour=60, mean_duration_s=300, min_duration_s=20,
                      abnormal_probability=0.2, pause_probability=0.3, mean_pause_s=30,
                      no_stream_probability=0.1, upload_failure_probability=0.3,
                      backup_probability=0.6, upload_s=(5, 60), slow_upload_probability=0.1,
                      slow_upload_s=(300, 900))


def scripted_engine(**rates: object) -> tuple[ManualClock, SimEngine]:
    clock = ManualClock(START)
    settings: dict[str, object] = {"arrivals_per_hour": 0, "no_stream_probability": 0.0,
                                   **rates}
    return clock, SimEngine(clock, {APP: SECRET}, seed=3, rooms=["room-1"],
                            rates=LifecycleRates(**settings))  # type: ignore[arg-type]


def busy_engine(seed: int = 5, rates: LifecycleRates = BUSY) -> tuple[ManualClock, SimEngine]:
    clock = ManualClock(START)
    return clock, SimEngine(clock, {APP: SECRET, 42: "other"}, seed=seed, rooms=room_names(3),
                            rates=rates)


def run_for(clock: ManualClock, engine: SimEngine, seconds: float) -> None:
    clock.advance(seconds)
    engine.advance_to(clock.time())


def recorded_task(clock: ManualClock, engine: SimEngine, seconds: float = 120) -> SimTask:
    """A scripted task that recorded `seconds` and was then stopped."""
    task_id = engine.start(APP, "room-1")
    run_for(clock, engine, seconds)
    engine.stop(task_id)
    task = engine.find(task_id)
    assert task is not None and task.end is not None
    return task


def statuses(task: SimTask, at: float) -> list[int]:
    return [f["Status"] for f in task.describe(at).get("RecordFiles", [])]


def ended_tasks(clock: ManualClock, engine: SimEngine, app_id: int = APP) -> list[SimTask]:
    now_ms = int(clock.time() * 1000)
    return engine.list_tasks(app_id, None, now_ms - 3 * 86_400_000 + 1000, now_ms, ENDED)


@pytest.mark.parametrize(("failure", "backup", "final", "outcome"), [
    (0.0, 0.0, FileStatus.UPLOADED, UploadOutcome.UPLOADED),
    (1.0, 1.0, FileStatus.IN_BACKUP_STORAGE, UploadOutcome.BACKUP),
    (1.0, 0.0, FileStatus.UPLOAD_FAILED, UploadOutcome.FAILED),
])
def test_files_record_then_upload_then_settle_and_the_task_outcome_is_written(
        failure: float, backup: float, final: FileStatus, outcome: UploadOutcome) -> None:
    clock, engine = scripted_engine(upload_failure_probability=failure,
                                    backup_probability=backup, upload_s=(30, 30))
    task_id = engine.start(APP, "room-1")
    task = engine.find(task_id)
    assert task is not None
    assert statuses(task, clock.time()) == []  # initialising: no RecordFiles yet
    run_for(clock, engine, 300)
    assert set(statuses(task, clock.time())) == {FileStatus.RECORDING}
    engine.pause(task_id)
    run_for(clock, engine, 30)
    assert set(statuses(task, clock.time())) == {FileStatus.RECORDING}
    engine.stop(task_id)
    end = clock.time()
    assert set(statuses(task, end)) == {FileStatus.UPLOADING}
    assert engine.outcome(task_id) is None and engine.outcomes == []
    run_for(clock, engine, 29.9)
    assert set(statuses(task, clock.time())) == {FileStatus.UPLOADING}
    assert engine.outcome(task_id) is None
    run_for(clock, engine, 0.1)
    assert set(statuses(task, clock.time())) == {final}
    settled = engine.outcome(task_id)
    assert settled == FilesSettled(APP, "room-1", task_id, outcome,
                                   tuple([int(final)] * len(task.files)), end + 30)
    assert engine.outcomes == [settled]
    assert settled.files_not_uploaded == (0 if final == FileStatus.UPLOADED else len(task.files))
    run_for(clock, engine, 2 * 86_400)  # settled for good, and written once
    assert set(statuses(task, clock.time())) == {final}
    assert engine.outcomes == [settled]


def test_a_recording_without_streams_has_no_record_files_and_ends_as_no_files() -> None:
    clock, engine = scripted_engine(no_stream_probability=1.0)
    task_id = engine.start(APP, "room-1")
    run_for(clock, engine, 600)
    task = engine.find(task_id)
    assert task is not None and task.status == TaskStatus.RECORDING
    assert "RecordFiles" not in task.describe(clock.time())
    engine.abort(task_id)
    settled = engine.outcome(task_id)  # no files to wait for: settled at the end
    assert settled == FilesSettled(APP, "room-1", task_id, UploadOutcome.NO_FILES, (),
                                   clock.time())
    assert "RecordFiles" not in task.describe(clock.time() + 3600)


def test_a_task_that_never_recorded_has_no_files_whatever_its_streams() -> None:
    clock, engine = scripted_engine()
    task_id = engine.start(APP, "room-1")
    engine.stop(task_id)  # before it left initialisation
    task = engine.find(task_id)
    assert task is not None and task.files  # it would have had streams
    settled = engine.outcome(task_id)
    assert settled is not None and settled.outcome == UploadOutcome.NO_FILES
    run_for(clock, engine, 3600)
    assert "RecordFiles" not in task.describe(clock.time())


def test_slow_uploads_stay_uploading_for_the_slow_range() -> None:
    clock, engine = scripted_engine(slow_upload_probability=1.0, slow_upload_s=(600, 600),
                                    upload_s=(1, 1))
    task = recorded_task(clock, engine)
    assert all(f.slow and f.upload_s == 600 for f in task.files)
    run_for(clock, engine, 599)
    assert set(statuses(task, clock.time())) == {FileStatus.UPLOADING}
    assert engine.outcome(task.task_id) is None
    run_for(clock, engine, 1)
    assert FileStatus.UPLOADING not in statuses(task, clock.time())
    assert engine.outcome(task.task_id) is not None


def test_each_file_settles_on_its_own_and_the_task_when_its_last_file_does() -> None:
    clock, engine = scripted_engine(upload_s=(5, 120), max_streams=6)
    task = next(t for t in (recorded_task(clock, engine) for _ in range(50))
                if len({f.upload_s for f in t.files}) > 1)
    end = task.end
    assert end is not None
    first, last = sorted(f.upload_s for f in task.files)[::len(task.files) - 1]
    middle = statuses(task, end + (first + last) / 2)
    assert FileStatus.UPLOADING in middle and set(middle) - {FileStatus.UPLOADING}
    run_for(clock, engine, last)
    settled = engine.outcome(task.task_id)
    assert settled is not None and settled.at == pytest.approx(end + last)


def test_one_file_per_stream_with_distinct_streams_and_zegos_fields() -> None:
    clock, engine = scripted_engine(max_streams=5)
    tasks = [recorded_task(clock, engine) for _ in range(60)]
    counts = Counter((t.record_mode, len(t.files)) for t in tasks)
    assert {n for mode, n in counts if mode == 2} == {1}  # mixed: one output stream
    assert {n for mode, n in counts if mode == 1} == {1, 2, 3, 4, 5}
    for task in tasks:
        files = task.describe(task.end or 0)["RecordFiles"]
        assert len({f["StreamId"] for f in files}) == len({f["FileId"] for f in files}) \
            == len(task.files)
        for f in files:
            assert f["FileId"].startswith(task.task_id) and f["FileUrl"].endswith(f["FileId"])
            assert f["OutputFileFormat"] == "mp4" and f["MediaTrackType"] == 3
            assert f["BeginTimestamp"] >= task.begin_ms and f["Duration"] > 100_000


def test_upload_outcome_rules() -> None:
    assert upload_outcome([]) == UploadOutcome.NO_FILES
    assert upload_outcome([3, 3]) == UploadOutcome.UPLOADED
    assert upload_outcome([3, 4]) == UploadOutcome.BACKUP
    assert upload_outcome([4, 4]) == UploadOutcome.BACKUP
    assert upload_outcome([3, 5]) == UploadOutcome.FAILED
    assert upload_outcome([4, 5, 3]) == UploadOutcome.FAILED


def test_summarize_counts_outcomes_per_room() -> None:
    ledger = [Transition(APP, "a", "t1", None, 1, 1.0), Transition(APP, "a", "t1", 1, 3, 2.0)]
    outcomes = [
        FilesSettled(APP, "a", "t1", UploadOutcome.BACKUP, (3, 4, 4), 9.0),
        FilesSettled(APP, "a", "t2", UploadOutcome.FAILED, (5,), 9.5),
        FilesSettled(APP, "b", "t3", UploadOutcome.UPLOADED, (3,), 10.0),
        FilesSettled(APP, "b", "t4", UploadOutcome.NO_FILES, (), 11.0),
        FilesSettled(APP, "b", "t5", UploadOutcome.UPLOADED, (3, 3), 12.0),
    ]
    assert summarize(ledger, outcomes) == {
        (APP, "a"): RoomCounts(started=1, ended=1, backup=1, failed=1, files_not_uploaded=3),
        (APP, "b"): RoomCounts(uploaded=2, no_files=1),
    }
    assert summarize(ledger) == {(APP, "a"): RoomCounts(started=1, ended=1)}


def test_every_ended_task_settles_once_as_its_files_say() -> None:
    clock, engine = busy_engine()
    run_for(clock, engine, 12 * 3600)
    run_for(clock, engine, 0)
    ended = ended_tasks(clock, engine) + ended_tasks(clock, engine, 42)
    by_task = {o.task_id: o for o in engine.outcomes}
    assert len(by_task) == len(engine.outcomes)  # once each
    assert [o.at for o in engine.outcomes] == sorted(o.at for o in engine.outcomes)
    assert Counter(o.outcome for o in engine.outcomes).keys() == set(UploadOutcome)
    now = clock.time()
    for task in ended:
        settle_at = task.settle_at
        assert settle_at is not None
        files = statuses(task, now)
        if settle_at > now:
            assert task.task_id not in by_task
            assert FileStatus.UPLOADING in files
            continue
        settled = by_task.pop(task.task_id)
        assert (settled.app_id, settled.room_id, settled.at) == (
            task.app_id, task.room_id, settle_at)
        assert list(settled.file_statuses) == files
        assert settled.outcome == upload_outcome(files) == task.outcome()
        assert set(files) <= {3, 4, 5}
        assert (settled.outcome == UploadOutcome.NO_FILES) == (not task.has_files)
    assert by_task == {}  # no outcome for a task that did not end
    assert any(f.slow for t in ended for f in t.files)


def test_the_summary_counts_each_rooms_outcomes() -> None:
    clock, engine = busy_engine()
    run_for(clock, engine, 6 * 3600)
    summary = engine.summary()
    for (app_id, room), counts in summary.items():
        mine = [o for o in engine.outcomes if (o.app_id, o.room_id) == (app_id, room)]
        assert counts.uploaded + counts.backup + counts.failed + counts.no_files == len(mine)
        assert counts.uploaded + counts.backup + counts.failed + counts.no_files <= counts.ended
        assert counts.files_not_uploaded == sum(o.files_not_uploaded for o in mine)
        assert counts.failed == sum(o.outcome == UploadOutcome.FAILED for o in mine)
    assert sum(c.backup for c in summary.values()) > 0
    assert sum(c.no_files for c in summary.values()) > 0


def test_outcomes_since_returns_only_later_ones() -> None:
    clock, engine = busy_engine()
    run_for(clock, engine, 4 * 3600)
    middle = START + 2 * 3600
    assert engine.outcomes_since(middle) == [o for o in engine.outcomes if o.at >= middle]
    assert engine.outcomes_since() == engine.outcomes


def test_the_same_seed_gives_the_same_outcomes_whatever_the_query_pattern() -> None:
    clock_a, engine_a = busy_engine()
    run_for(clock_a, engine_a, 8 * 3600)
    clock_b, engine_b = busy_engine()
    pattern = random.Random(3)
    while clock_b.time() < START + 8 * 3600:
        clock_b.advance(min(pattern.expovariate(1 / 90), START + 8 * 3600 - clock_b.time()))
        if pattern.random() < 0.3:
            engine_b.summary()
        else:
            engine_b.advance_to(clock_b.time())
    engine_b.advance_to(clock_b.time())
    assert len(engine_a.outcomes) > 200
    assert engine_a.outcomes == engine_b.outcomes
    _clock_c, engine_c = busy_engine(seed=6)
    run_for(_clock_c, engine_c, 8 * 3600)
    assert engine_c.outcomes != engine_a.outcomes


def test_upload_knobs_change_only_the_uploads() -> None:
    """Backup and slow-upload settings leave the tasks' lives (the ledger) and, for the slow
    ones, every file's final status as they were."""
    base = LifecycleRates(arrivals_per_hour=30, mean_duration_s=300,
                          upload_failure_probability=0.5)
    clock_a, engine_a = busy_engine(rates=base)
    run_for(clock_a, engine_a, 6 * 3600)
    slow = LifecycleRates(arrivals_per_hour=30, mean_duration_s=300,
                          upload_failure_probability=0.5, slow_upload_probability=0.5)
    clock_b, engine_b = busy_engine(rates=slow)
    run_for(clock_b, engine_b, 6 * 3600)
    all_backup = LifecycleRates(arrivals_per_hour=30, mean_duration_s=300,
                                upload_failure_probability=0.5, backup_probability=1.0)
    clock_c, engine_c = busy_engine(rates=all_backup)
    run_for(clock_c, engine_c, 6 * 3600)
    assert engine_a.ledger == engine_b.ledger == engine_c.ledger
    outcomes_a = {o.task_id: o.file_statuses for o in engine_a.outcomes}
    outcomes_b = {o.task_id: o.file_statuses for o in engine_b.outcomes}
    assert all(outcomes_a[t] == s for t, s in outcomes_b.items() if t in outcomes_a)
    assert len(outcomes_b) < len(outcomes_a)  # some are still uploading slowly
    assert {o.outcome for o in engine_c.outcomes} <= {UploadOutcome.UPLOADED,
                                                     UploadOutcome.BACKUP, UploadOutcome.NO_FILES}


def test_rates_reject_bad_upload_knobs() -> None:
    for bad in ({"backup_probability": 1.5}, {"slow_upload_probability": -0.1},
                {"slow_upload_s": (10.0, 5.0)}, {"max_streams": 0}, {"max_streams": 2.5}):
        with pytest.raises(ValueError, match="must"):
            LifecycleRates(**bad)  # type: ignore[arg-type]


def test_a_scenario_sets_the_upload_knobs() -> None:
    scenario = parse_scenario({"apps": [{"app_id": 1, "server_secret": "s"}], "lifecycle": {
        "no_stream_probability": 0.3, "max_streams": 4, "upload_failure_probability": 0.2,
        "backup_probability": 0.5, "upload_seconds": [1, 2], "slow_upload_probability": 0.1,
        "slow_upload_seconds": [60, 120]}})
    rates = scenario.rates
    assert (rates.no_stream_probability, rates.max_streams, rates.upload_failure_probability,
            rates.backup_probability, rates.upload_s, rates.slow_upload_probability,
            rates.slow_upload_s) == (0.3, 4, 0.2, 0.5, (1.0, 2.0), 0.1, (60.0, 120.0))
    assert isinstance(rates.max_streams, int)


@pytest.mark.parametrize("lifecycle", [{"max_streams": 1.5}, {"max_streams": "two"},
                                       {"backup_probability": 2},
                                       {"slow_upload_seconds": [5, 1]}])
def test_a_bad_upload_knob_in_a_scenario_is_an_error_naming_lifecycle(
        lifecycle: dict[str, object]) -> None:
    with pytest.raises(ScenarioError, match="lifecycle"):
        parse_scenario({"apps": [{"app_id": 1, "server_secret": "s"}], "lifecycle": lifecycle})


def test_pruned_tasks_keep_their_outcome_in_the_ledger() -> None:
    clock, engine = scripted_engine()
    task = recorded_task(clock, engine)
    run_for(clock, engine, 4 * 86_400)
    assert engine.task(APP, task.task_id, clock.time()) is None  # beyond the 3-day horizon
    assert [o.task_id for o in engine.outcomes] == [task.task_id]
    assert engine.summary()[(APP, "room-1")].ended == 1

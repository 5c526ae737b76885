"""The SQLite state file: exact round trips, restarts that keep counters true, clear refusals."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.cli import main
from exporter.daemon import Exporter
from exporter.demo import free_port
from exporter.state.changes import (
    AwaitedUpload,
    ChangeSet,
    CycleOutcome,
    EventKind,
    Marks,
    Source,
    TaskEvent,
    TrackedTask,
)
from exporter.state.model import AppState, Unsaved
from exporter.state.store import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, Store, StoreError
from exporter.zego.limits import HORIZON_MS
from exporter.zego.models import TaskStatus
from tests.conftest import APP_ID, SECRET, Rig, cycle, make_config

Factory = Callable[..., Any]


def busy_app() -> AppState:
    app = AppState(7, ("a", "b"))
    app.apply(ChangeSet(
        Source.POLL, 99_000,
        (TaskEvent(EventKind.STARTED, "t1", "a"),
         TaskEvent(EventKind.ENDED, "t1", "a", duration_s=42.0),
         TaskEvent(EventKind.ENDED_ABNORMALLY, "t1", "a"), TaskEvent(EventKind.PAUSED, "t2", "b")),
        tracked={"t2": TrackedTask("t2", "b", TaskStatus.PAUSED, 1000)},
        finished={"t1": 99_000, "t0": 50_000},
        marks=Marks(12_345, frozenset({"a", "b"}), 10_000, {"b": 11_000}),
        observed_ms=98_000, cycle=CycleOutcome(True, 1.0, None, 1_750_000_000.5)))
    return app


def as_plain(app: AppState) -> dict[str, Any]:
    """What the file keeps of an app's tracking and counters, as plain values (a copy)."""
    tracking = app.tracking
    return {"live": dict(tracking.live), "finished": dict(tracking.finished),
            "awaited": dict(tracking.awaited), "settled": dict(tracking.settled),
            "counters": {room: dict(kinds) for room, kinds in app.counters.items()}}


def same(one: AppState, other: AppState) -> bool:
    """Do two apps hold the same state?"""
    return vars(one) == vars(other)


def test_an_app_round_trips_exactly(tmp_path: Path) -> None:
    saved = busy_app()
    store = Store(tmp_path / "state.db")
    store.save(saved)
    store.close()
    loaded = AppState(7, ("a", "b"))
    assert Store(tmp_path / "state.db").load(loaded)
    assert loaded.tracking == saved.tracking
    assert loaded.counters == saved.counters
    assert loaded.durations == saved.durations
    assert loaded.deferred == saved.deferred
    assert loaded.last_success_time == saved.last_success_time
    assert loaded.last_observed_ms == saved.last_observed_ms == 98_000


def test_deferred_events_round_trip_with_their_source_and_reason(tmp_path: Path) -> None:
    """Events of a room first seen ("*" mode) wait one cycle, across a restart too."""
    app = AppState(7, None)
    app.apply(ChangeSet(Source.CALLBACK, 5_000, (
        TaskEvent(EventKind.ENDED, "t", "new", Source.CALLBACK, 9.0),
        TaskEvent(EventKind.ENDED_ABNORMALLY, "t", "new", Source.CALLBACK, quit_reason="3"))))
    assert len(app.deferred) == 2
    store = Store(tmp_path / "state.db")
    store.save(app)
    loaded = AppState(7, None)
    assert Store(tmp_path / "state.db").load(loaded)
    assert loaded.deferred == app.deferred
    loaded.apply(cycle())
    assert loaded.counters["new"][EventKind.ENDED_ABNORMALLY] == 1
    assert loaded.ended_by_reason == {"3": 1}


def test_a_schema_1_file_is_migrated_and_keeps_its_counters(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(f"{MIGRATIONS[1]}\nPRAGMA user_version=1;")
        db.execute("INSERT INTO apps VALUES (7, 12345, NULL, NULL, NULL, '{}', '[]', '{}', '{}')")
        db.execute("INSERT INTO counters VALUES (7, 'a', 'ended', 3)")
    loaded = AppState(7, ("a", "b"))
    assert Store(path).load(loaded)
    assert loaded.counters["a"][EventKind.ENDED] == 3
    assert loaded.tracking.marks.ended_since_ms == 12345
    assert loaded.tracking.marks.baseline_ms is None  # unknown: every first sighting counts
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


def test_a_schema_2_file_keeps_finished_ids_at_least_as_long_as_before(tmp_path: Path) -> None:
    """Schema 2 stored when to forget an id (begin + 3 days + margin); 3 stores when its end was
    learned. The migration takes begin + 24 h and the margin, never before the end."""
    path = tmp_path / "state.db"
    begin, margin = 1_700_000_000_000, 600_000
    with sqlite3.connect(path) as db:
        db.executescript(f"{MIGRATIONS[1]}\n{MIGRATIONS[2]}\nPRAGMA user_version=2;")
        db.execute("INSERT INTO apps VALUES "
                   "(7, 1, NULL, NULL, NULL, '{}', '[]', '{}', '{}', NULL, '{}')")
        db.execute("INSERT INTO finished_tasks VALUES (7, 't', ?)",
                   (begin + HORIZON_MS + margin,))
    loaded = AppState(7, ("a",))
    assert Store(path).load(loaded)
    assert loaded.tracking.finished == {"t": begin + 24 * 3_600_000 + margin}


def test_forgotten_task_ids_leave_the_file(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    app = busy_app()
    store.save(app)
    app.apply(ChangeSet(Source.POLL, 120_000, finished={"t3": 120_000},
                        forgotten=frozenset({"t0"}), marks=Marks(20_000)))
    store.save(app)
    loaded = AppState(7, ("a", "b"))
    Store(tmp_path / "state.db").load(loaded)
    assert loaded.tracking.finished == {"t1": 99_000, "t3": 120_000}


def test_each_save_writes_what_changed_and_the_file_stays_exact(tmp_path: Path) -> None:
    """Saves write only the rows that changed since the last (`AppState.unsaved`), whether a
    cycle or a callback changed them; after a restart (a new Store that loaded the file) too."""
    path = tmp_path / "state.db"
    app = busy_app()
    Store(path).save(app)
    for step in range(4):
        store = Store(path)
        app = AppState(7, ("a", "b"))
        store.load(app)
        for by_callback in (False, True):
            tid = f"n{step}{by_callback:d}"
            task = TrackedTask(tid, "a", TaskStatus.RECORDING, 2000 + step)
            t2 = replace(app.tracking.live["t2"], status=TaskStatus(2 + 3 * (step % 2)))
            started = (TaskEvent(EventKind.STARTED, tid, "a"),)
            if by_callback:
                gone = f"n{step}0"
                changes = ChangeSet(Source.CALLBACK, 3000 + step, started, {tid: task, "t2": t2},
                                    frozenset({gone}), {gone: 3000 + step})
            else:
                changes = ChangeSet(Source.POLL, 3000 + step, started, {tid: task, "t2": t2},
                                    frozenset({f"n{step - 1}1"}), observed_ms=3000 + step)
            app.apply(changes)
            assert app.unsaved.live == {tid, "t2", *changes.untracked}
            store.save(app)
            assert app.unsaved == Unsaved()  # written: the sets do not grow without end
            store.save(app)  # nothing changed: nothing to write, nothing lost
            loaded = AppState(7, ("a", "b"))
            Store(path).load(loaded)
            assert loaded.tracking == app.tracking
            assert loaded.counters == app.counters
    assert set(loaded.tracking.live) == {"t2", "n31"}
    assert {"n00", "n30"} <= loaded.tracking.finished.keys()
    assert loaded.counters["a"][EventKind.STARTED] == 9


def test_rows_write_the_state_as_it_was_when_taken(tmp_path: Path) -> None:
    """The rows are taken on the event loop and written in the writer thread while the loop
    goes on applying: what the write puts in the file is the state when they were taken."""
    path = tmp_path / "state.db"
    store = Store(path)
    app = busy_app()
    store.save(app)
    app.apply(ChangeSet(Source.POLL, 6_000, (TaskEvent(EventKind.ENDED, "t2", "b"),),
                        {"t3": TrackedTask("t3", "a", TaskStatus.RECORDING, 5000)},
                        untracked=frozenset({"t2"}), finished={"t2": 6_000},
                        awaited={"t2": AwaitedUpload("b", 6_000)}, observed_ms=6_000))
    taken = as_plain(app)
    rows = store.rows(app)
    app.mark_saved(rows.pending)
    # Meanwhile every part of what the rows hold changes again (t2 back: only to tell).
    app.apply(ChangeSet(Source.CALLBACK, 7_000,
                        (TaskEvent(EventKind.ENDED, "t3", "a", duration_s=2.0),),
                        {"t2": TrackedTask("t2", "b", TaskStatus.RECORDING, 1000)},
                        untracked=frozenset({"t3"}), finished={"t3": 7_000},
                        forgotten=frozenset({"t2"}), awaited={"t3": AwaitedUpload("a", 7_000)}))
    store.write(rows)
    loaded = AppState(7, ("a", "b"))
    Store(path).load(loaded)
    assert as_plain(loaded) == taken
    assert set(loaded.tracking.live) == {"t3"} and set(loaded.tracking.awaited) == {"t2"}


def test_a_failed_save_loses_nothing_and_the_next_save_writes_it(tmp_path: Path) -> None:
    """A write that fails (a fault injected in SQLite itself) leaves the file as it was, and
    what it did not write stays pending for the next save."""
    path = tmp_path / "state.db"
    store = Store(path)
    app = busy_app()
    store.save(app)
    app.apply(ChangeSet(Source.CALLBACK, 5_000, untracked=frozenset({"t2"}),
                        finished={"t2": 5_000}))
    with sqlite3.connect(path) as db:
        db.execute("CREATE TRIGGER full BEFORE INSERT ON finished_tasks "
                   "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.Error, match="disk full"):
        store.save(app)
    assert app.unsaved == Unsaved({"t2"}, {"t2"})
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER full")
    store.save(app)
    assert app.unsaved == Unsaved()
    loaded = AppState(7, ("a", "b"))
    Store(path).load(loaded)
    assert loaded.tracking == app.tracking
    assert "t2" not in loaded.tracking.live and loaded.tracking.finished["t2"] == 5_000


def test_rooms_no_longer_configured_are_dropped_on_load(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.save(busy_app())
    loaded = AppState(7, ("a",))
    store.load(loaded)
    assert set(loaded.counters) == {"a"}
    assert loaded.tracking.live == {}
    store.save(loaded)  # and their live tasks leave the file
    both = AppState(7, ("a", "b"))
    Store(tmp_path / "state.db").load(both)
    assert both.tracking.live == {}


def test_an_app_never_saved_loads_nothing(tmp_path: Path) -> None:
    assert not Store(tmp_path / "state.db").load(AppState(8, ("a",)))


def test_corrupt_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match=f"{path}: not a usable state file.*Move it away"):
        Store(path)
    assert path.read_bytes().startswith(b"this is not sqlite")  # left as it was


def test_file_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA application_id={APPLICATION_ID}")
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer exporter"):
        Store(path)


def test_unwritable_location_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot open the state file"):
        Store(tmp_path / "file" / "state.db")


def test_wal_mode_schema_version_and_our_mark_are_set(tmp_path: Path) -> None:
    Store(tmp_path / "state.db").close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_cli_exits_1_naming_the_corrupt_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    config = tmp_path / "config.yml"
    config.write_text('apps: [{app_id: 7, rooms: ["1"], server_secret: "abc"}]\n')
    state = tmp_path / "state.db"
    state.write_bytes(b"garbage" * 1000)
    assert main([f"--config.file={config}", f"--storage.path={state}",
                 "--web.listen-address=127.0.0.1:0"]) == 1
    assert str(state) in capsys.readouterr().err


async def test_a_restart_keeps_counters_and_counts_what_happened_while_down(
    rig_factory: Factory, tmp_path: Path
) -> None:
    path = str(tmp_path / "state.db")
    rig: Rig = await rig_factory(storage_path=path)
    await rig.cycle()
    long_a = rig.engine.start(APP_ID, "r1")
    long_b = rig.engine.start(APP_ID, "r2")
    await rig.cycle(advance=700)
    await rig.cycle()
    before = dict(rig.counters("r1"))
    assert before[EventKind.STARTED] == 1

    # Down for 20 minutes: a tracked task dies, a task starts and dies, another starts.
    rig.clock.advance(300)
    rig.engine.abort(long_a)
    short = rig.engine.start(APP_ID, "r3")
    rig.clock.advance(60)
    rig.engine.stop(short)
    rig.engine.start(APP_ID, "r3")
    rig.clock.advance(840)
    await rig.restart(path)
    assert rig.counters("r1") == before  # continued, not reset
    await rig.cycle()
    await rig.cycle()
    rig.assert_counters_match_ledger(["r1", "r2", "r3"])
    assert rig.counters("r1")[EventKind.ENDED_ABNORMALLY] == 1
    assert rig.counters("r3")[EventKind.STARTED] == 2
    assert long_b in rig.exporter.state.apps[APP_ID].tracking.live


async def test_without_storage_a_restart_starts_from_a_baseline(rig_factory: Factory) -> None:
    rig: Rig = await rig_factory()
    await rig.cycle()
    rig.engine.start(APP_ID, "r1")
    await rig.cycle()
    await rig.restart(None)
    assert rig.counters("r1")[EventKind.STARTED] == 0
    await rig.cycle()
    assert rig.counters("r1")[EventKind.STARTED] == 0  # the baseline counts nothing


def test_kill_9_loses_nothing(tmp_path: Path) -> None:
    """Real processes: the exporter is SIGKILLed while a task lives, the task dies meanwhile."""
    sim_port, exporter_port = free_port(), free_port()
    scenario = tmp_path / "scenario.yml"
    scenario.write_text(yaml.safe_dump({
        "seed": 1, "lifecycle": {"arrivals_per_hour": 0, "init_seconds": [0, 0]},
        "apps": [{"app_id": APP_ID, "server_secret": SECRET, "rooms": ["r1"]}]}))
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({
        "zego": {"endpoint": f"http://127.0.0.1:{sim_port}/"}, "poll_interval": "1s",
        "apps": [{"app_id": APP_ID, "server_secret": SECRET, "rooms": ["r1"]}]}))
    simulator = subprocess.Popen(
        [sys.executable, "-m", "exporter.simulator", "--scenario", str(scenario),
         "--listen-address", f"127.0.0.1:{sim_port}"], stderr=subprocess.DEVNULL)
    exporter_cmd = [sys.executable, "-m", "exporter", f"--config.file={config}",
                    f"--storage.path={tmp_path / 'state.db'}",
                    f"--web.listen-address=127.0.0.1:{exporter_port}"]
    exporter = subprocess.Popen(exporter_cmd, stderr=subprocess.DEVNULL)

    def counter(name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{exporter_port}/metrics",
                                        timeout=2) as response:
                text = response.read().decode()
        except OSError:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == f"zego_cloudrecord_tasks_{name}_total":
                    return sample.value
        return None

    def wait_for(name: str, value: float) -> None:
        deadline = time.monotonic() + 30
        while counter(name) != value:
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.2)

    def control(op: str, **body: Any) -> str:
        request = urllib.request.Request(
            f"http://127.0.0.1:{sim_port}/_sim/control", method="POST",
            data=json.dumps({"op": op, "app_id": APP_ID, **body}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(json.loads(response.read())["task_id"])

    try:
        wait_for("started", 0)  # the baseline cycle ran
        task = control("start", room_id="r1")
        wait_for("started", 1)
        exporter.kill()  # SIGKILL: no shutdown code runs
        exporter.wait(10)
        control("abort", task_id=task)
        exporter = subprocess.Popen(exporter_cmd, stderr=subprocess.DEVNULL)
        wait_for("ended_abnormally", 1)
        assert counter("started") == 1  # continued, not reset to 0 nor counted again
        assert counter("ended") == 1
    finally:
        for process in (exporter, simulator):
            process.kill()
            process.wait(10)


async def test_a_room_added_to_the_config_is_a_baseline_not_starts(
    rig_factory: Factory, tmp_path: Path
) -> None:
    path = str(tmp_path / "state.db")
    rig: Rig = await rig_factory(rooms=("r1",), sim_rooms=("r1", "r2"), storage_path=path)
    rig.engine.start(APP_ID, "r2")  # recording long before r2 is watched
    await rig.cycle()
    await rig.cycle()
    await rig.exporter.stop()
    rig.exporter = Exporter(make_config(rig.sim.url, ("r1", "r2")), clock=rig.clock,
                            storage_path=path)
    await rig.exporter.start(listen=None, schedule=False)
    await rig.cycle()
    assert rig.counters("r2")[EventKind.STARTED] == 0
    rig.engine.start(APP_ID, "r2")
    await rig.cycle()
    assert rig.counters("r2")[EventKind.STARTED] == 1


# What the loader refuses: everything it reads is outside input.

def saved_file(path: Path) -> Path:
    store = Store(path)
    store.save(busy_app())
    store.close()
    return path


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


MOVE_IT_AWAY = r"Move it away to start from an empty state \(counters restart at 0\)"


@pytest.mark.parametrize(("sql", "where", "problem"), [
    ("UPDATE live_tasks SET status = 9", r"table live_tasks, rowid \d+ \(task_id 't2'\)",
     "status 9 is not a live ZEGO status"),
    ("UPDATE live_tasks SET status = 3", r"table live_tasks, rowid \d+ \(task_id 't2'\)",
     "status 3 is not a live ZEGO status"),
    ("UPDATE live_tasks SET begin_ms = 'soon'", "table live_tasks",
     "'soon' is not an integer"),
    ("UPDATE live_tasks SET task_id = 'a' || char(0) || 'b'", "table live_tasks",
     r"'a\\x00b' contains control characters"),
    ("UPDATE live_tasks SET task_id = char(27) || '[31m'", "table live_tasks",
     "contains control characters"),
    ("UPDATE live_tasks SET task_id = CAST(X'EDA080' AS TEXT)", "table live_tasks",
     "cannot be read"),
    ("UPDATE live_tasks SET task_id = X'00'", "table live_tasks", "1-byte blob is bytes"),
    ("UPDATE live_tasks SET task_id = ''", "table live_tasks", "'' is empty"),
    ("UPDATE live_tasks SET task_id = printf('%.257c', 'x')", "table live_tasks",
     "is longer than 256 bytes"),
    ("UPDATE live_tasks SET room_id = printf('%.129c', 'x')", "table live_tasks",
     "is longer than 128 bytes"),
    ("UPDATE finished_tasks SET learned_ms = -1", "table finished_tasks", "-1 is not an integer"),
    ("UPDATE counters SET kind = 'bogus' WHERE kind = 'lost'",
     r"table counters, rowid \d+ \(room_id '[ab]'\)",
     "'bogus' is not one of started, paused"),
    ("UPDATE counters SET value = -3", "table counters", "-3 is not an integer from 0"),
    ("UPDATE counters SET value = 1.5", "table counters", "1.5 is not an integer"),
    ("UPDATE counters SET value = 9007199254740992", "table counters", "is not an integer"),
    ("UPDATE apps SET durations = '{'", "table apps, row of app 7, column durations",
     "is not well-formed JSON"),
    ("UPDATE apps SET durations = json_replace(durations, '$.normal.total', 'x')",
     "table apps, row of app 7, column durations", "at key 'normal': 'x' is not a finite number"),
    ("""UPDATE apps SET durations = '{"normal": {"counts": [0], "total": NaN}}'""",
     "table apps, row of app 7, column durations", "nan is not a finite number"),
    ("""UPDATE apps SET durations = '{"normal": {"counts": [-1], "total": 0}}'""",
     "table apps, row of app 7, column durations", r"at \[0\]: -1 is not an integer"),
    ("""UPDATE apps SET durations = '{"odd": {"counts": [], "total": 0}}'""",
     "table apps, row of app 7, column durations", "'odd' is not one of normal, abnormal"),
    ("UPDATE apps SET deferred = '{}'", "table apps, row of app 7, column deferred",
     "is not a JSON array"),
    ("""UPDATE apps SET deferred = '[{"kind": "lost", "task_id": "\\ud800", "room_id": "b"}]'""",
     "table apps, row of app 7, column deferred", "invalid Unicode"),
    ("""UPDATE apps SET deferred = '[{"kind": "gone", "task_id": "t", "room_id": "b"}]'""",
     "table apps, row of app 7, column deferred", "'gone' is not one of started"),
    ("""UPDATE apps SET ended_by_reason = '{"1": -1}'""",
     "table apps, row of app 7, column ended_by_reason",
     "at key '1': -1 is not an integer"),
    ("UPDATE apps SET upload_failures = '[]'",
     "table apps, row of app 7, column upload_failures", "not a JSON object"),
    ("""UPDATE apps SET room_baselines = '{"\\u0007": 1}'""",
     "table apps, row of app 7, column room_baselines",
     "contains control characters"),
    ("UPDATE apps SET baseline_rooms = printf('%.100000c', '[')",
     "table apps, row of app 7, column baseline_rooms",
     "not well-formed JSON"),
    ("UPDATE apps SET last_success_time = 'yesterday'",
     "table apps, row of app 7, column last_success_time",
     "'yesterday' is not a finite number"),
    ("UPDATE apps SET ended_since_ms = -1",
     "table apps, row of app 7, column ended_since_ms", "-1 is not an integer"),
], ids=lambda v: v if isinstance(v, str) and v.startswith("UPDATE") else "")
def test_a_value_this_exporter_never_writes_is_refused_naming_where(
        tmp_path: Path, sql: str, where: str, problem: str) -> None:
    path = saved_file(tmp_path / "state.db")
    with sqlite3.connect(path) as db:
        db.execute(sql)
    with pytest.raises(StoreError, match=f"^{path}: {where}.*{problem}.*{MOVE_IT_AWAY}"):
        Store(path).load(AppState(7, ("a", "b")))


def test_a_refused_load_leaves_the_app_untouched(tmp_path: Path) -> None:
    path = saved_file(tmp_path / "state.db")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE counters SET kind = 'bogus' WHERE room_id = 'b' AND kind = 'lost'")
    app = AppState(7, ("a", "b"))
    with pytest.raises(StoreError):
        Store(path).load(app)
    assert same(app, AppState(7, ("a", "b")))


def test_a_dropped_table_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = saved_file(tmp_path / "state.db")
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE live_tasks")
    with pytest.raises(StoreError, match=f"damaged: missing tables: live_tasks. {MOVE_IT_AWAY}"):
        Store(path).load(AppState(7, ("a", "b")))


def test_a_corrupted_page_is_refused_when_the_file_is_opened(tmp_path: Path) -> None:
    """Before any app is loaded, wherever the damage is: here in another app's rows."""
    path = tmp_path / "state.db"
    store = Store(path)
    store.save(busy_app())
    other = AppState(8, ("a",))
    other.apply(cycle(live=[TrackedTask(f"task-{i:05d}", "a", TaskStatus.RECORDING, i)
                            for i in range(3000)]))
    store.save(other)
    store.close()  # the WAL is folded into the file
    size = path.stat().st_size
    assert size > 40 * 4096
    with path.open("r+b") as file:
        file.seek(size // 2)
        file.write(b"\xa5" * 2048)
    with pytest.raises(StoreError, match=f"^{path}: damaged .* {MOVE_IT_AWAY}"):
        Store(path)


def test_cli_exits_1_naming_a_row_it_refuses(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yml"
    config.write_text('apps: [{app_id: 7, rooms: ["a", "b"], server_secret: "abc"}]\n')
    path = saved_file(tmp_path / "state.db")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE live_tasks SET status = 9")
    assert main([f"--config.file={config}", f"--storage.path={path}",
                 "--web.listen-address=127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert f"{path}: table live_tasks" in err and "status 9" in err and "Move it away" in err


# Whose file it is: ours (marked, or from before the mark), new, or another program's.

def foreign_tables(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE foo (bar TEXT)")
    db.execute("INSERT INTO foo VALUES ('theirs')")


def our_tables_and_theirs(db: sqlite3.Connection) -> None:
    db.executescript(f"{MIGRATIONS[1]}\n{MIGRATIONS[2]}\n{MIGRATIONS[3]}\nPRAGMA user_version=3;")
    foreign_tables(db)


def our_tables_without_a_version(db: sqlite3.Connection) -> None:
    db.executescript(f"{MIGRATIONS[1]}\n{MIGRATIONS[2]}\n{MIGRATIONS[3]}")


@pytest.mark.parametrize(("make", "mark", "problem"), [
    (foreign_tables, 0x12345678, "another program's SQLite file .application_id 0x12345678"),
    (our_tables_and_theirs, 0x12345678, "another program's SQLite file"),
    (foreign_tables, 0, r"not this exporter's file \(schema 0, tables: foo\)"),
    (our_tables_and_theirs, 0, "not this exporter's file"),
    (our_tables_without_a_version, 0, "not this exporter's file"),
])
def test_another_programs_file_is_refused_and_left_as_it_was(
        tmp_path: Path, make: Callable[[sqlite3.Connection], None], mark: int,
        problem: str) -> None:
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as db:
        make(db)
        db.execute(f"PRAGMA application_id={mark}")
    db.close()
    before = file_state(path)
    time.sleep(0.01)  # a write now would change the mtime
    with pytest.raises(StoreError, match=f"{problem}.*a file of the exporter's own"):
        Store(path)
    assert file_state(path) == before


def test_a_file_from_before_the_mark_is_adopted_and_marked(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(f"{MIGRATIONS[1]}\n{MIGRATIONS[2]}\n{MIGRATIONS[3]}\n"
                         "PRAGMA user_version=3;")
        db.execute("INSERT INTO apps VALUES "
                   "(7, 1, NULL, NULL, NULL, '{}', '[]', '{}', '{}', NULL, '{}')")
        db.execute("INSERT INTO counters VALUES (7, 'a', 'started', 4)")
    db.close()
    loaded = AppState(7, ("a",))
    assert Store(path).load(loaded)
    assert loaded.counters["a"][EventKind.STARTED] == 4
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID


def test_a_schema_1_file_from_before_the_mark_is_migrated_and_marked(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.executescript(f"{MIGRATIONS[1]}\nPRAGMA user_version=1;")
    db.close()
    Store(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_blank_sqlite_file_is_a_first_start(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE scratch (x)")
        db.execute("DROP TABLE scratch")
    db.close()
    assert path.stat().st_size > 0
    store = Store(path)
    assert not store.load(AppState(7, ("a",)))
    store.save(busy_app())


def test_an_empty_file_is_refused_not_started_from_zero(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.touch()
    with pytest.raises(StoreError, match=r"the file is empty \(0 bytes\).*delete it"):
        Store(path)
    assert path.stat().st_size == 0


# Saves: a value that cannot be written, or would be refused on load, fails the save whole.

def _ended(**fields: Any) -> ChangeSet:
    return cycle(TaskEvent(EventKind.ENDED, "t", "a", **fields))


# Values no edge lets in (a bug could): the save refuses them rather than poison the file.
@pytest.mark.parametrize("spoil", [
    pytest.param(cycle(live=[TrackedTask("\ud800", "a", TaskStatus.RECORDING, 1)]),
                 id="lone surrogate"),
    pytest.param(cycle(live=[TrackedTask("t\x07", "a", TaskStatus.RECORDING, 1)]),
                 id="control character"),
    pytest.param(cycle(finished={"t5": 2**64}), id="huge timestamp"),
    pytest.param(_ended(duration_s=math.nan), id="nan"),
    pytest.param(cycle(TaskEvent(EventKind.ENDED_ABNORMALLY, "t", "a", quit_reason="x" * 200)),
                 id="long reason"),
])
def test_a_value_that_cannot_be_written_fails_the_save_and_changes_nothing(
        tmp_path: Path, spoil: ChangeSet) -> None:
    path = saved_file(tmp_path / "state.db")
    store = Store(path)
    app = AppState(7, ("a", "b"))
    store.load(app)
    before = AppState(7, ("a", "b"))
    Store(path).load(before)
    app.apply(spoil)
    with pytest.raises(StoreError, match=f"^{path}: app 7's state not saved"):
        store.save(app)
    after = AppState(7, ("a", "b"))
    Store(path).load(after)
    assert same(after, before)

"""SQLite persistence of each app's tracking and counters, so restarts keep counters exact.

One file (WAL mode), written in one transaction per poll cycle. A schema version and ordered
migrations from day one; a file that is corrupt, from a newer version or unwritable is refused
with a clear error, never silently replaced by an empty state.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from exporter.diff import HORIZON_MS, MAX_RECORD_MS, EventKind, TaskEvent, TrackedTask, Tracking
from exporter.state import AppState, Histogram
from exporter.zego.models import TaskStatus

SCHEMA_VERSION = 3
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE apps (
        app_id INTEGER PRIMARY KEY,
        ended_since_ms INTEGER,
        baseline_rooms TEXT,
        last_success_time REAL,
        last_observed_ms INTEGER,
        durations TEXT NOT NULL,
        deferred TEXT NOT NULL,
        ended_by_reason TEXT NOT NULL,
        upload_failures TEXT NOT NULL
    );
    CREATE TABLE counters (
        app_id INTEGER NOT NULL, room_id TEXT NOT NULL, kind TEXT NOT NULL,
        value INTEGER NOT NULL,
        PRIMARY KEY (app_id, room_id, kind)
    );
    CREATE TABLE live_tasks (
        app_id INTEGER NOT NULL, task_id TEXT NOT NULL, room_id TEXT NOT NULL,
        status INTEGER NOT NULL, begin_ms INTEGER NOT NULL,
        PRIMARY KEY (app_id, task_id)
    );
    CREATE TABLE finished_tasks (
        app_id INTEGER NOT NULL, task_id TEXT NOT NULL, forget_after_ms INTEGER NOT NULL,
        PRIMARY KEY (app_id, task_id)
    );
    """,
    2: """
    ALTER TABLE apps ADD COLUMN baseline_ms INTEGER;
    ALTER TABLE apps ADD COLUMN room_baselines TEXT NOT NULL DEFAULT '{}';
    """,
    # Finished ids: when the end was learned, instead of when to forget them (begin + 3 days +
    # a margin). The old value less 3 days, plus 24 h (no recording lasts longer), is at or
    # after the end: kept as long as before, never shorter.
    3: f"""
    ALTER TABLE finished_tasks RENAME COLUMN forget_after_ms TO learned_ms;
    UPDATE finished_tasks SET learned_ms = learned_ms - {HORIZON_MS} + {MAX_RECORD_MS};
    """,
}


class StoreError(Exception):
    """The state file cannot be used; the message names the file and what to do."""


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # What the file holds, per app: each save writes only what differs from it. Live tasks
        # are compared by identity (the diff keeps a task's object while it is unchanged).
        self._finished_saved: dict[int, set[str]] = {}
        self._live_saved: dict[int, dict[str, object]] = {}
        self._counters_saved: dict[int, dict[str, tuple[int, ...]]] = {}
        # The tracking object last saved: while it is the app's, only `unsaved_tasks` changed.
        self._tracking_saved: dict[int, Tracking] = {}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a kill -9
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{self.path}: not a usable state file ({exc}). Move it away to start from an "
                "empty state (counters restart at 0), or point --storage.path elsewhere."
            ) from None
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot open the state file ({exc.strerror}). Make its directory "
                "writable, choose another --storage.path, or --storage.path='' for no persistence."
            ) from None

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer exporter (schema {version}, this one knows "
                f"{SCHEMA_VERSION}). Upgrade the exporter, or point --storage.path elsewhere."
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            self._db.executescript(
                f"BEGIN;\n{MIGRATIONS[target]}\nPRAGMA user_version={target};\nCOMMIT;"
            )
        self._db.execute("SELECT count(*) FROM apps").fetchone()  # reads the pages: corruption

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # a failed COMMIT too: never leave it open
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    def load(self, app: AppState) -> bool:
        """Fill `app` from the file; False if the file holds nothing for this app."""
        row = self._db.execute(
            "SELECT ended_since_ms, baseline_rooms, last_success_time, last_observed_ms, "
            "durations, deferred, ended_by_reason, upload_failures, baseline_ms, room_baselines "
            "FROM apps WHERE app_id = ?",
            (app.app_id,)).fetchone()
        if row is None:
            return False
        (ended_since, baseline_rooms, last_success, last_observed, durations, deferred,
         by_reason, uploads, baseline_ms, room_baselines) = row
        in_scope = (lambda room: True) if app.rooms is None else set(app.rooms).__contains__
        rows: dict[str, object] = {}  # a room no longer configured: gone at the next save
        live: dict[str, TrackedTask] = {}
        for task_id, room, status, begin in self._db.execute(
                "SELECT task_id, room_id, status, begin_ms FROM live_tasks WHERE app_id = ?",
                (app.app_id,)):
            rows[task_id] = None
            if in_scope(room):
                rows[task_id] = live[task_id] = TrackedTask(task_id, room, TaskStatus(status),
                                                            begin)
        self._live_saved[app.app_id] = rows
        finished = dict(self._db.execute(
            "SELECT task_id, learned_ms FROM finished_tasks WHERE app_id = ?",
            (app.app_id,)).fetchall())
        self._finished_saved[app.app_id] = set(finished)
        rooms = None if baseline_rooms is None else frozenset(json.loads(baseline_rooms))
        app.tracking = Tracking(live, finished, ended_since, rooms, baseline_ms,
                                {r: ms for r, ms in json.loads(room_baselines).items()
                                 if in_scope(r)})
        app.last_success_time = last_success
        app.last_observed_ms = last_observed
        app.ended_by_reason = json.loads(by_reason)
        app.upload_failures = {r: n for r, n in json.loads(uploads).items() if in_scope(r)}
        for room, kind, value in self._db.execute(
                "SELECT room_id, kind, value FROM counters WHERE app_id = ?", (app.app_id,)):
            if in_scope(room):
                app.counters.setdefault(room, dict.fromkeys(EventKind, 0))[EventKind(kind)] = value
        self._counters_saved[app.app_id] = {room: tuple(by_kind.values())
                                            for room, by_kind in app.counters.items()}
        for outcome, saved in json.loads(durations).items():
            histogram = app.durations[outcome]
            if len(saved["counts"]) == len(histogram.counts):  # buckets unchanged
                app.durations[outcome] = Histogram(histogram.bounds, saved["counts"],
                                                   saved["total"])
        app.deferred = [TaskEvent(EventKind(e["kind"]), e["task_id"], e["room_id"],
                                  e.get("duration_s")) for e in json.loads(deferred)]
        return True

    def save(self, app: AppState) -> None:
        """Write one app's whole state in one transaction: the rows that changed since the last.

        After a cycle every task is compared with what was saved; after callbacks, only the
        tasks they changed (`AppState.unsaved_tasks`). `python -m bench.store` measures both."""
        tracking = app.tracking
        finished_saved = self._finished_saved.setdefault(app.app_id, set())
        live_saved = self._live_saved.setdefault(app.app_id, {})
        if self._tracking_saved.get(app.app_id) is tracking:  # changed in place: by callbacks
            ids = app.unsaved_tasks
            changed_live = [t for tid in ids if (t := tracking.live.get(tid)) is not None
                            and live_saved.get(tid) is not t]
            gone_live = {tid for tid in ids if tid in live_saved and tid not in tracking.live}
            new_finished = {tid for tid in ids if tid in tracking.finished} - finished_saved
            gone_finished: set[str] = set()  # only a cycle forgets finished ids
        else:  # a cycle's new tracking: compare it whole
            changed_live = [t for tid, t in tracking.live.items() if live_saved.get(tid) is not t]
            gone_live = live_saved.keys() - tracking.live.keys()
            new_finished = tracking.finished.keys() - finished_saved
            gone_finished = finished_saved - tracking.finished.keys()
        counters_saved = self._counters_saved.setdefault(app.app_id, {})
        changed_rooms = {room: values for room, by_kind in app.counters.items()
                         if counters_saved.get(room) != (values := tuple(by_kind.values()))}
        try:
            self._write(app, changed_rooms, changed_live, gone_live, new_finished, gone_finished)
        except BaseException:
            # The file is as it was, and so are the mirrors: the next save compares everything
            # (and the changed tasks need not be kept, however long the file stays unwritable).
            self._tracking_saved.pop(app.app_id, None)
            app.unsaved_tasks.clear()
            raise
        finished_saved -= gone_finished
        finished_saved |= new_finished
        for task_id in gone_live:
            del live_saved[task_id]
        live_saved.update((t.task_id, t) for t in changed_live)
        counters_saved.update(changed_rooms)
        self._tracking_saved[app.app_id] = tracking
        app.unsaved_tasks.clear()

    def _write(self, app: AppState, changed_rooms: Iterable[str],
               changed_live: Iterable[TrackedTask], gone_live: Iterable[str],
               new_finished: Iterable[str], gone_finished: Iterable[str]) -> None:
        tracking = app.tracking
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO apps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (app.app_id, tracking.ended_since_ms,
                 None if tracking.rooms is None else json.dumps(sorted(tracking.rooms)),
                 app.last_success_time, app.last_observed_ms,
                 json.dumps({o: {"counts": h.counts, "total": h.total}
                             for o, h in app.durations.items()}),
                 json.dumps([{"kind": e.kind.value, "task_id": e.task_id, "room_id": e.room_id,
                              "duration_s": e.duration_s} for e in app.deferred]),
                 json.dumps(app.ended_by_reason), json.dumps(app.upload_failures),
                 tracking.baseline_ms, json.dumps(tracking.room_baselines_ms)))
            self._db.executemany(
                "INSERT OR REPLACE INTO counters VALUES (?, ?, ?, ?)",
                ((app.app_id, room, kind.value, value) for room in changed_rooms
                 for kind, value in app.counters[room].items()))
            self._db.executemany(
                "DELETE FROM live_tasks WHERE app_id = ? AND task_id = ?",
                ((app.app_id, task_id) for task_id in gone_live))
            self._db.executemany(
                "INSERT OR REPLACE INTO live_tasks VALUES (?, ?, ?, ?, ?)",
                ((app.app_id, t.task_id, t.room_id, int(t.status), t.begin_ms)
                 for t in changed_live))
            self._db.executemany(
                "DELETE FROM finished_tasks WHERE app_id = ? AND task_id = ?",
                ((app.app_id, task_id) for task_id in gone_finished))
            self._db.executemany(
                "INSERT OR REPLACE INTO finished_tasks VALUES (?, ?, ?)",
                ((app.app_id, task_id, tracking.finished[task_id]) for task_id in new_finished))

    def app_ids(self) -> Iterable[int]:
        return [row[0] for row in self._db.execute("SELECT app_id FROM apps")]


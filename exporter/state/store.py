"""SQLite persistence of each app's tracking and counters, so restarts keep counters exact.

One file (WAL mode), written in one transaction per poll cycle. A schema version and ordered
migrations from day one. The file is outside input: everything in it is checked before it is
used, and a file that is not usable is refused with a clear error (StoreError: the file, what is
wrong, what to do), never silently replaced by an empty state nor partly loaded.

What `Store(path)` accepts, before it writes a byte to the file:

- no file: a first start, a new file;
- a file marked with APPLICATION_ID, of schema 1..SCHEMA_VERSION, holding that schema's tables;
- an unmarked file (application_id 0) that is either empty of tables and of schema 0 (a blank
  SQLite file), or holds exactly this exporter's tables of schema 1..SCHEMA_VERSION (written by
  an exporter from before the mark): it is migrated and marked.

It refuses a 0-byte file (most likely truncated: a full disk, a bad copy; a file meant to start
from zero is deleted, not emptied), another program's file (another application_id, or tables
this exporter did not create), a newer schema, and a damaged file. `load` refuses a row it could
not have written: ids that are empty, too long, not valid Unicode or with control characters,
statuses that are not live, counts and timestamps that are not integers from 0 to 2^53-1, JSON
columns of the wrong shape. `save` raises StoreError or sqlite3.Error, and changes nothing, if
it cannot write, or if a value would be refused on load.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from exporter.state.changes import (
    AwaitedUpload,
    EventKind,
    Marks,
    Source,
    TaskEvent,
    TrackedTask,
    Tracking,
)
from exporter.state.model import RECENT_EVENTS, AppState, Restored, Unsaved
from exporter.text import text_problem
from exporter.zego.limits import HORIZON_MS, MAX_RECORD_MS, MAX_ROOM_ID_BYTES, MAX_TASK_ID_BYTES
from exporter.zego.models import LIVE_STATUSES, MAX_SAFE_INT, TaskStatus

# PRAGMA application_id of our files: "ZGCR" in ASCII. It tells them from other programs' files.
APPLICATION_ID = int.from_bytes(b"ZGCR", "big")  # 0x5A474352
# ZEGO documents no limit for a TaskId; the ones it issues are a few dozen characters.
MAX_REASON_BYTES = 128  # a callback's quit_reason, kept as a label value
_WHAT_TO_DO = ("Move it away to start from an empty state (counters restart at 0), or point "
               "--storage.path elsewhere.")

SCHEMA_VERSION = 4
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
    # The last counted events (/api/v1/events, and the counters' exemplars), and the ended
    # tasks whose files are awaited (settled_ms NULL) or settled (counted once).
    4: """
    CREATE TABLE events (
        app_id INTEGER NOT NULL, seq INTEGER NOT NULL, event TEXT NOT NULL,
        PRIMARY KEY (app_id, seq)
    );
    CREATE TABLE uploads (
        app_id INTEGER NOT NULL, task_id TEXT NOT NULL, room_id TEXT NOT NULL,
        ended_ms INTEGER NOT NULL, checked_ms INTEGER, settled_ms INTEGER,
        PRIMARY KEY (app_id, task_id)
    );
    """,
}



T = TypeVar("T")


class StoreError(Exception):
    """The state file cannot be used; the message names the file and what to do."""


class _Invalid(ValueError):
    """A value this exporter never writes; the message says what is wrong with it."""


def _show(value: object) -> str:
    """A value, shortened and escaped: it goes into an error message and a log line."""
    if isinstance(value, str):
        return repr(value[:40]) + ("…" if len(value) > 40 else "")
    if isinstance(value, bytes):
        return f"a {len(value)}-byte blob"
    if isinstance(value, list | dict):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    return repr(value)[:40]


def _plain(error: object) -> str:
    """SQLite's message, one line, printable and short: it may quote the file's bytes."""
    text = " ".join(str(error).split())
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text[:200])
    return text + ("…" if len(str(error)) > 200 else "")


def _text(value: object, max_bytes: int) -> str:
    # Ids become label values, log fields and keys: printable, valid Unicode, bounded.
    problem = text_problem(value, max_bytes)
    if problem is not None:
        raise _Invalid(f"{_show(value)} {problem}")
    assert isinstance(value, str)
    return value


def check_task_id(value: object) -> str:
    return _text(value, MAX_TASK_ID_BYTES)


def check_room_id(value: object) -> str:
    return _text(value, MAX_ROOM_ID_BYTES)


def _reason(value: object) -> str:
    return _text(value, MAX_REASON_BYTES)


def _count(value: object) -> int:
    """A count or a timestamp (ms): an integer JSON carries exactly, never negative."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SAFE_INT:
        raise _Invalid(f"{_show(value)} is not an integer from 0 to 2^53-1")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, int) and not isinstance(value, bool):
        return float(_count(value))
    if not isinstance(value, float) or not math.isfinite(value) or value < 0:
        raise _Invalid(f"{_show(value)} is not a finite number of seconds, 0 or more")
    return value


def _optional(check: Callable[[object], T]) -> Callable[[object], T | None]:
    return lambda value: None if value is None else check(value)


def _live_status(value: object) -> TaskStatus:
    if isinstance(value, int) and value in _LIVE_STATUS_VALUES:
        return TaskStatus(value)
    raise _Invalid(f"status {_show(value)} is not a live ZEGO status (1, 2 or 5)")


_LIVE_STATUS_VALUES = frozenset(status.value for status in LIVE_STATUSES)


def _one_of(names: Collection[str]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in names:
            raise _Invalid(f"{_show(value)} is not one of {', '.join(names)}")
        return value
    return check


def _event_kind(value: object) -> EventKind:
    return EventKind(_EVENT_KIND(value))


_EVENT_KIND = _one_of([kind.value for kind in EventKind])


def _json(value: object) -> Any:
    if not isinstance(value, str):
        raise _Invalid(f"{_show(value)} is not JSON text")
    try:
        return json.loads(value)
    except (ValueError, RecursionError):  # RecursionError: nested too deep
        raise _Invalid(f"{_show(value)} is not well-formed JSON") from None


def _object(value: object, key: Callable[[object], str], item: Callable[[object], T]
            ) -> dict[str, T]:
    if not isinstance(value, dict):
        raise _Invalid(f"{_show(value)} is not a JSON object")
    checked = {}
    for k, v in value.items():
        try:
            checked[key(k)] = item(v)
        except _Invalid as exc:
            raise _Invalid(f"at key {_show(k)}: {exc}") from None
    return checked


def _array(value: object, item: Callable[[object], T]) -> list[T]:
    if not isinstance(value, list):
        raise _Invalid(f"{_show(value)} is not a JSON array")
    checked = []
    for i, v in enumerate(value):
        try:
            checked.append(item(v))
        except _Invalid as exc:
            raise _Invalid(f"at [{i}]: {exc}") from None
    return checked


_SOURCE = _one_of([source.value for source in Source])
_EVENT_KEYS = ("kind", "task_id", "room_id", "source", "duration_s", "quit_reason", "at_ms")


def _stored_event(value: object) -> TaskEvent:
    if not isinstance(value, dict) or not {"kind", "task_id", "room_id"} <= value.keys() \
            <= set(_EVENT_KEYS):
        raise _Invalid(f"{_show(value)} is not an object of {', '.join(_EVENT_KEYS)}")
    return TaskEvent(_event_kind(value["kind"]), check_task_id(value["task_id"]),
                     check_room_id(value["room_id"]),
                     Source(_SOURCE(value.get("source", Source.POLL.value))),
                     _optional(_seconds)(value.get("duration_s")),
                     _optional(_reason)(value.get("quit_reason")),
                     _optional(_count)(value.get("at_ms")))


def _event_json(event: TaskEvent) -> dict[str, object]:
    return {"kind": event.kind.value, "task_id": event.task_id, "room_id": event.room_id,
            "source": event.source.value, "duration_s": event.duration_s,
            "quit_reason": event.quit_reason, "at_ms": event.at_ms}


def _upload(row: Sequence[object]) -> tuple[str, AwaitedUpload, int | None]:
    """(TaskId, its awaited upload, when it settled): a settled row needs no more."""
    task_id, settled_ms = check_task_id(row[0]), _optional(_count)(row[4])
    if settled_ms is not None:
        return task_id, AwaitedUpload("", 0), settled_ms
    return (task_id, AwaitedUpload(check_room_id(row[1]), _count(row[2]),
                                   _optional(_count)(row[3])), None)


def _histogram(value: object) -> tuple[list[int], float]:
    if not isinstance(value, dict) or value.keys() != {"counts", "total"}:
        raise _Invalid(f"{_show(value)} is not an object of counts and total")
    return _array(value["counts"], _count), _seconds(value["total"])


def _live_task(row: Sequence[object]) -> TrackedTask:
    return TrackedTask(check_task_id(row[0]), check_room_id(row[1]), _live_status(row[2]),
                       _count(row[3]))


def _finished_task(row: Sequence[object]) -> tuple[str, int]:
    return check_task_id(row[0]), _count(row[1])


def _counter(row: Sequence[object]) -> tuple[str, EventKind, int]:
    return check_room_id(row[0]), _event_kind(row[1]), _count(row[2])


def _difference(expected: dict[str, tuple[str, ...]], found: dict[str, tuple[str, ...]]
                ) -> str:
    """How the tables found differ from a schema's, in words."""
    parts = [f"{what}: {', '.join(sorted(names))}" for what, names in (
        ("missing tables", expected.keys() - found.keys()),
        ("tables it should not have", found.keys() - expected.keys()),
        ("tables with other columns",
         {t for t in expected.keys() & found.keys() if expected[t] != found[t]})) if names]
    return "; ".join(parts)


@functools.cache
def _schema(version: int) -> dict[str, tuple[str, ...]]:
    """Our tables and their columns at `version`, as the migrations make them."""
    db = sqlite3.connect(":memory:")
    for step in range(1, version + 1):
        db.executescript(MIGRATIONS[step])
    tables = _tables(db)
    db.close()
    return tables


def _tables(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    names = [name for (name,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite^_%' "
        "ESCAPE '^'")]
    return {name: tuple(col for (col,) in db.execute("SELECT name FROM pragma_table_info(?)",
                                                     (name,)))
            for name in names}


@dataclass(frozen=True)
class Rows:
    """One save of one app, as plain rows: (statement, its parameter rows) in order."""

    app_id: int
    pending: Unsaved  # what the rows write: AppState.mark_saved takes it
    statements: tuple[tuple[str, Iterable[tuple[Any, ...]]], ...]  # each iterated once
    next_event: int  # the seq of the app's next event row once these are written


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._next_event: dict[int, int] = {}  # app -> the seq of its next event row
        try:
            version = self._inspect()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One thread at a time: the daemon writes from one worker thread, reads and its
            # last save on stop() come when no write is under way.
            self._db = sqlite3.connect(self.path, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a kill -9
            self._migrate(version)
        except sqlite3.DatabaseError as exc:
            raise self._refusal(f"not a usable state file ({_plain(exc)})") from None
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot open the state file ({exc.strerror}). Make its directory "
                "writable, choose another --storage.path, or --storage.path='' for no persistence."
            ) from None

    def _refusal(self, problem: str, what_to_do: str = _WHAT_TO_DO) -> StoreError:
        return StoreError(f"{self.path}: {problem}. {what_to_do}")

    def _inspect(self) -> int:
        """The file's schema version (0: new), once it is known to be ours and sound.

        Read-only: a file refused here is left exactly as it was (opening it in WAL mode, or
        marking it, would write to it)."""
        try:
            if self.path.stat().st_size == 0:
                raise self._refusal(
                    "the file is empty (0 bytes), most likely truncated (a full disk, a bad copy)",
                    "Restore it from a backup; if you meant to start from zero, delete it.")
        except FileNotFoundError:
            return 0  # a first start
        db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            mark = int(db.execute("PRAGMA application_id").fetchone()[0])
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            if mark not in (0, APPLICATION_ID):
                raise self._refusal(
                    f"another program's SQLite file (application_id {mark:#010x}, this "
                    f"exporter's is {APPLICATION_ID:#010x})",
                    "Point --storage.path at a file of the exporter's own.")
            if version > SCHEMA_VERSION and mark == APPLICATION_ID:
                raise self._refusal(
                    f"written by a newer exporter (schema {version}, this one knows "
                    f"{SCHEMA_VERSION})",
                    "Upgrade the exporter, or point --storage.path elsewhere.")
            tables = _tables(db)
            expected = _schema(version) if version <= SCHEMA_VERSION else None
            if tables != expected and mark == 0:
                raise self._refusal(
                    f"not this exporter's file (schema {version}, tables: "
                    f"{', '.join(sorted(tables)) or 'none'})",
                    "Point --storage.path at a file of the exporter's own.")
            if tables != expected:
                raise self._refusal(f"damaged: {_difference(_schema(version), tables)}")
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise self._refusal(f"damaged ({_plain(problem)})")
            return version
        finally:
            db.close()

    def _migrate(self, version: int) -> None:
        if version == SCHEMA_VERSION and self._mark() == APPLICATION_ID:
            return
        steps = "".join(f"{MIGRATIONS[target]}\n" for target in range(version + 1,
                                                                          SCHEMA_VERSION + 1))
        # One transaction: the file is marked ours exactly when it holds our tables.
        self._db.executescript(
            f"BEGIN;\n{steps}PRAGMA user_version={SCHEMA_VERSION};\n"
            f"PRAGMA application_id={APPLICATION_ID};\nCOMMIT;")

    def _mark(self) -> int:
        return int(self._db.execute("PRAGMA application_id").fetchone()[0])

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

    def _rows(self, table: str, columns: str, app_id: int) -> list[tuple[Any, ...]]:
        """The app's rows of `table`: the columns, then the rowid (to name a row refused)."""
        try:
            return self._db.execute(
                f"SELECT {columns}, rowid FROM {table} WHERE app_id = ?", (app_id,)).fetchall()
        except sqlite3.Error as exc:
            raise self._refusal(f"table {table} cannot be read ({_plain(exc)})") from None

    def _checked_rows(self, table: str, columns: str, app_id: int,
                      check: Callable[[tuple[Any, ...]], T]) -> list[T]:
        checked = []
        for row in self._rows(table, columns, app_id):
            try:
                checked.append(check(row))
            except _Invalid as exc:
                key = columns.partition(",")[0]
                raise self._refusal(f"table {table}, rowid {row[-1]} ({key} {_show(row[0])}): "
                                    f"{exc}") from None
        return checked

    def load(self, app: AppState) -> bool:
        """Fill `app` from the file; False if the file holds nothing for this app.

        Every value is checked first: StoreError, and `app` unchanged, if one is not valid."""
        found = self._rows(
            "apps", "ended_since_ms, baseline_rooms, last_success_time, last_observed_ms, "
            "durations, deferred, ended_by_reason, upload_failures, baseline_ms, room_baselines",
            app.app_id)
        if not found:
            return False
        values = dict(zip(
            ("ended_since_ms", "baseline_rooms", "last_success_time", "last_observed_ms",
             "durations", "deferred", "ended_by_reason", "upload_failures", "baseline_ms",
             "room_baselines"), found[0][:-1], strict=True))

        def column(name: str, check: Callable[[object], T]) -> T:
            try:
                return check(values[name])
            except _Invalid as exc:
                raise self._refusal(f"table apps, row of app {app.app_id}, column {name}: "
                                    f"{exc}") from None

        timestamp = _optional(_count)
        ended_since = column("ended_since_ms", timestamp)
        baseline_ms = column("baseline_ms", timestamp)
        last_observed = column("last_observed_ms", timestamp)
        last_success = column("last_success_time", _optional(_seconds))
        baseline_rooms = column("baseline_rooms", _optional(
            lambda v: frozenset(_array(_json(v), check_room_id))))
        room_baselines = column("room_baselines",
                                lambda v: _object(_json(v), check_room_id, _count))
        by_reason = column("ended_by_reason", lambda v: _object(_json(v), _reason, _count))
        uploads = column("upload_failures", lambda v: _object(_json(v), check_room_id, _count))
        deferred = column("deferred", lambda v: _array(_json(v), _stored_event))
        outcomes = _one_of(app.durations)
        durations = column("durations", lambda v: _object(_json(v), outcomes, _histogram))

        in_scope = (lambda room: True) if app.rooms is None else set(app.rooms).__contains__
        stale: set[str] = set()  # a room no longer configured: its rows go at the next save
        live: dict[str, TrackedTask] = {}
        for task in self._checked_rows("live_tasks", "task_id, room_id, status, begin_ms",
                                       app.app_id, _live_task):
            if in_scope(task.room_id):
                live[task.task_id] = task
            else:
                stale.add(task.task_id)
        finished = dict(self._checked_rows("finished_tasks", "task_id, learned_ms", app.app_id,
                                           _finished_task))
        counters: dict[str, dict[EventKind, int]] = {}
        for room, kind, value in self._checked_rows("counters", "room_id, kind, value",
                                                    app.app_id, _counter):
            if in_scope(room):
                counters.setdefault(room, dict.fromkeys(EventKind, 0))[kind] = value
        marks = Marks(ended_since, baseline_rooms, baseline_ms,
                      {r: ms for r, ms in room_baselines.items() if in_scope(r)})
        awaited: dict[str, AwaitedUpload] = {}
        settled: dict[str, int] = {}
        for task_id, upload, settled_ms in self._checked_rows(
                "uploads", "task_id, room_id, ended_ms, checked_ms, settled_ms", app.app_id,
                _upload):
            if settled_ms is not None:
                settled[task_id] = settled_ms
            elif in_scope(upload.room_id):
                awaited[task_id] = upload
        events = sorted(self._checked_rows("events", "seq, event", app.app_id,
                                           lambda row: (_count(row[0]),
                                                        _stored_event(_json(row[1])))),
                        key=lambda pair: pair[0])
        self._next_event[app.app_id] = events[-1][0] + 1 if events else 0
        app.restore(Restored(
            Tracking(live, finished, marks, awaited, settled), counters, durations, deferred,
            by_reason, {r: n for r, n in uploads.items() if in_scope(r)}, last_success,
            last_observed, [e for _, e in events[-RECENT_EVENTS:] if in_scope(e.room_id)],
            frozenset(stale)))
        return True

    def save(self, app: AppState) -> None:
        """Write one app's state in one transaction: its own row, and the rows of the tasks
        and rooms that changed since the last save (`AppState.unsaved`): the cost of a save
        follows the change. `python -m bench.store` measures it.

        Raises sqlite3.Error (the file could not be written) or StoreError (a value could not
        be, or load would refuse it); either way the file keeps its last saved state, and what
        was not saved stays pending for the next save. Callers count both as failed saves."""
        rows = self.rows(app)
        self.write(rows)
        app.mark_saved(rows.pending)

    def rows(self, app: AppState) -> Rows:
        """What a save of `app` writes, taken from the state now (on the event loop), so that
        `write` can run anywhere (a worker thread). One `write` at a time, and the next `rows`
        after it: the events' sequence numbers follow the last write."""
        pending = app.unsaved
        try:
            _check_saved(app, pending)
            return self._rows_of(app, pending)
        except Exception as exc:  # a value load would refuse, or JSON cannot take
            raise StoreError(f"{self.path}: app {app.app_id}'s state not saved, the file keeps "
                             f"the last saved state ({type(exc).__name__}: {exc})") from exc

    def write(self, rows: Rows) -> None:
        """Write `rows` in one transaction (see `save` for what it raises)."""
        try:
            with self._transaction():
                for statement, parameters in rows.statements:
                    self._db.executemany(statement, parameters)
        except BaseException as exc:
            if isinstance(exc, sqlite3.Error) or not isinstance(exc, Exception):
                raise
            # Anything else (a value SQLite cannot take) is a failed save too, for the caller
            # to count: never a half-written or poisoned file.
            raise StoreError(f"{self.path}: app {rows.app_id}'s state not saved, the file "
                             f"keeps the last saved state ({type(exc).__name__}: {exc})"
                             ) from exc
        self._next_event[rows.app_id] = rows.next_event

    def _rows_of(self, app: AppState, pending: Unsaved) -> Rows:
        """The rows to write, as generators over what is taken here, on the event loop: frozen
        values and their ids, never the tracking the loop goes on changing. A busy cycle at
        10,000 rooms writes over 100,000 rows; made as the writer thread reads them, they are
        never all in memory at once (as lists, about 10 MB beside the cycle's own)."""
        tracking, app_id = app.tracking, app.app_id
        marks = tracking.marks
        live = [tracking.live[t] for t in pending.live if t in tracking.live]
        live_gone = [t for t in pending.live if t not in tracking.live]
        finished = [(t, tracking.finished[t]) for t in pending.finished if t in tracking.finished]
        finished_gone = [t for t in pending.finished if t not in tracking.finished]
        uploads = [(t, tracking.awaited.get(t), tracking.settled.get(t)) for t in pending.uploads]
        first = self._next_event.get(app_id, 0)
        new = list(app.recent)[len(app.recent) - pending.events:]
        # The counters as a room's kinds and values (two tuples a room).
        counts = [(room, tuple(counters), tuple(counters.values()))
                  for room in pending.rooms for counters in (app.counters[room],)]
        statements: list[tuple[str, Iterable[tuple[Any, ...]]]] = [
            ("INSERT OR REPLACE INTO apps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
             [(app_id, marks.ended_since_ms,
               None if marks.rooms is None else json.dumps(sorted(marks.rooms)),
               app.last_success_time, app.last_observed_ms,
               json.dumps({o: {"counts": h.counts, "total": h.total}
                           for o, h in app.durations.items()}),
               json.dumps([_event_json(e) for e in app.deferred]),
               json.dumps(dict(app.ended_by_reason)), json.dumps(dict(app.upload_failures)),
               marks.baseline_ms, json.dumps(dict(marks.room_baselines_ms)))]),
            ("INSERT OR REPLACE INTO counters VALUES (?, ?, ?, ?)",
             ((app_id, room, kind.value, value) for room, kinds, values in counts
              for kind, value in zip(kinds, values, strict=True))),
            ("DELETE FROM live_tasks WHERE app_id = ? AND task_id = ?",
             ((app_id, t) for t in live_gone)),
            ("INSERT OR REPLACE INTO live_tasks VALUES (?, ?, ?, ?, ?)",
             ((app_id, t.task_id, t.room_id, int(t.status), t.begin_ms) for t in live)),
            ("DELETE FROM finished_tasks WHERE app_id = ? AND task_id = ?",
             ((app_id, t) for t in finished_gone)),
            ("INSERT OR REPLACE INTO finished_tasks VALUES (?, ?, ?)",
             ((app_id, t, learned_ms) for t, learned_ms in finished)),
            ("DELETE FROM uploads WHERE app_id = ? AND task_id = ?",
             ((app_id, t) for t, awaited, settled_ms in uploads
              if awaited is None and settled_ms is None)),
            ("INSERT OR REPLACE INTO uploads VALUES (?, ?, ?, ?, ?, ?)",
             (_upload_row(app_id, t, awaited, settled_ms) for t, awaited, settled_ms in uploads
              if awaited is not None or settled_ms is not None)),
            ("INSERT OR REPLACE INTO events VALUES (?, ?, ?)",
             ((app_id, first + i, json.dumps(_event_json(e))) for i, e in enumerate(new))),
            ("DELETE FROM events WHERE app_id = ? AND seq < ?",
             [(app_id, first + len(new) - RECENT_EVENTS)]),
        ]
        return Rows(app_id, pending, tuple(statements), first + len(new))

    def app_ids(self) -> Iterable[int]:
        return [row[0] for row in self._db.execute("SELECT app_id FROM apps")]



def _upload_row(app_id: int, task_id: str, awaited: AwaitedUpload | None,
                settled_ms: int | None) -> tuple[object, ...]:
    upload = awaited or AwaitedUpload("", 0)  # settled: no room needed
    return app_id, task_id, upload.room_id, upload.ended_ms, upload.checked_ms, settled_ms


def _check_saved(app: AppState, pending: Unsaved) -> None:
    """What a save writes, load accepts: a refused value fails the save, not the next start.

    Only what changed is checked (the cost of a save follows the change); room baselines are
    configured rooms, checked by the config; counts only grow from 0 in AppState."""
    tracking = app.tracking
    for tid in pending.live & tracking.live.keys():
        task = tracking.live[tid]
        _live_task([task.task_id, task.room_id, int(task.status), task.begin_ms])
    for tid in pending.finished & tracking.finished.keys():
        _finished_task([tid, tracking.finished[tid]])
    for room in pending.rooms:
        check_room_id(room)
        _array(list(app.counters[room].values()), _count)
    for event in (*app.deferred, *list(app.recent)[len(app.recent) - pending.events:]):
        _stored_event(json.loads(json.dumps(_event_json(event))))
    for task_id in pending.uploads:
        if task_id in tracking.awaited or task_id in tracking.settled:
            _upload(_upload_row(0, task_id, tracking.awaited.get(task_id),
                                tracking.settled.get(task_id))[1:])
    _object(dict(app.ended_by_reason), _reason, _count)
    for room in app.upload_failures.keys() - app.counters.keys():  # counters' rooms: checked
        check_room_id(room)
    for histogram in app.durations.values():
        _array(histogram.counts, _count), _seconds(histogram.total)
    marks = tracking.marks
    for ms in (marks.ended_since_ms, marks.baseline_ms, app.last_observed_ms):
        _optional(_count)(ms)
    _optional(_seconds)(app.last_success_time)

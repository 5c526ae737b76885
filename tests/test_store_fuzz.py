"""The state file's rows as an attacker or a bit flip would write them: load refuses or is sound.

Rows of random SQLite values (integers up to 64 bits, floats with NaN and infinities, text with
control characters, invalid UTF-8, blobs, NULL, JSON of every shape) go into each table of a
valid state file. Loading it either raises StoreError or yields only values this exporter could
have written, which it can write back.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from exporter.config import MAX_ROOM_ID_BYTES
from exporter.state.changes import EventKind
from exporter.state.model import AppState
from exporter.state.store import MAX_TASK_ID_BYTES, Store, StoreError
from exporter.zego.models import LIVE_STATUSES, MAX_SAFE_INT
from tests.test_store import busy_app

APP_ID = 7


class InvalidUtf8(bytes):
    """Bytes stored as TEXT (with CAST): what another program, or a bit flip, can leave."""


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
    | st.text(st.characters(codec=None), max_size=8),  # lone surrogates too
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(st.characters(codec=None), max_size=8), inner, max_size=4),
    max_leaves=12)
sqlite_values = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=300),
    st.binary(max_size=20), st.binary(max_size=8).map(InvalidUtf8),
    json_values.map(json.dumps))
# Characters an id must not have: C0 and C1 controls, DEL, line and paragraph separators,
# format characters, and (in JSON only: SQLite cannot take them) lone surrogates.
BAD_CHARS = ["\x00", "\n", "\x1b", "\x7f", "\x85", "\u2028", "\u200b", "\ufeff", "\ud800"]


def either(first: st.SearchStrategy[Any], second: st.SearchStrategy[Any]
           ) -> st.SearchStrategy[Any]:
    """Half from each (`|` would flatten them into one list of branches, drawn evenly)."""
    return st.sampled_from([first, second]).flatmap(lambda chosen: chosen)


def near_misses(valid: Any, in_json: bool) -> st.SearchStrategy[Any]:
    """Values just past a rule's edge, next to `valid`: random draws alone rarely reach them."""
    if isinstance(valid, bool) or valid is None or isinstance(valid, list | dict):
        return st.sampled_from([None, True, 0, "x", [], {}, [[]], {"": 0}])
    if isinstance(valid, int):
        return st.integers(-2, 10) | st.sampled_from(
            [2**53 - 1, 2**53, 2**63 - 1, -(2**63), *([10**30] if in_json else []), str(valid),
             valid + 0.5, float(valid)])
    if isinstance(valid, float):
        return st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -0.0, 1e308, str(valid),
                                int(valid)])
    bad = [c for c in BAD_CHARS if in_json or c != "\ud800"]
    texts = st.sampled_from(["", " ", "x" * 128, "x" * 129, "x" * 256, "x" * 257, "é" * 65,
                             "started", "lost", "normal", "[", "{}", "[]"])
    with_bad_char = st.builds(lambda i, c: valid[:i] + c + valid[i:], st.integers(0, len(valid)),
                              st.sampled_from(bad))
    if in_json:
        return either(with_bad_char, texts)
    return st.one_of(with_bad_char, texts, st.just(valid.encode()),
                     st.just(InvalidUtf8(valid.encode() + b"\xff")))


def places(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value: itself, its items, and (marked "key") its keys."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += [(*path, ("key", key)), *places(item, (*path, key))]
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += places(item, (*path, index))
    return found


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    step, rest = path[0], path[1:]
    if isinstance(step, tuple):  # a key renamed
        return {(new if k == step[1] else k): v for k, v in value.items()}
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[step] = replaced(value[step], rest, new)
    return copy


HISTOGRAM = {"counts": [0] * 12, "total": 0.0}
VALID_ROWS: dict[str, tuple[Any, ...]] = {
    "apps": (APP_ID, 12345, ["a", "b"], 1.5e9, 1, {"normal": HISTOGRAM, "abnormal": HISTOGRAM},
             [{"kind": "lost", "task_id": "t9", "room_id": "b", "duration_s": 1.0}],
             {"1": 2}, {"a": 0}, 10_000, {"b": 11000}),
    "live_tasks": (APP_ID, "t2", "b", 5, 1000),
    "finished_tasks": (APP_ID, "t1", 99_000),
    "counters": (APP_ID, "a", "ended", 3),
    "events": (APP_ID, 4, {"kind": "upload_failed", "task_id": "t1", "room_id": "a",
                           "source": "callback", "duration_s": None, "quit_reason": "6",
                           "at_ms": 99_000}),
    "uploads": (APP_ID, "t1", "a", 99_000, 120_000, None),
}


COLUMNS = [(table, index) for table, row in VALID_ROWS.items() for index in range(1, len(row))]


@st.composite
def spoiled_rows(draw: st.DrawFn) -> tuple[str, tuple[Any, ...]]:
    """A valid row with one column, or one place in a JSON column, drawn at random: each check
    is reached, one at a time."""
    table, index = draw(st.sampled_from(COLUMNS))
    row = list(VALID_ROWS[table])
    value = row[index]
    if not isinstance(value, list | dict):
        row[index] = draw(either(near_misses(value, in_json=False), sqlite_values))
    elif draw(st.integers(0, 3)) == 0:
        row[index] = draw(sqlite_values)
    else:
        path = draw(st.sampled_from(places(value)))
        target: Any = value
        for step in path:
            target = step[1] if isinstance(step, tuple) else target[step]
        near = near_misses(target, in_json=True)
        if path and isinstance(path[-1], tuple):  # a key: a text, as JSON has them
            new = draw(near.filter(lambda v: isinstance(v, str)))
        else:
            new = draw(either(near, json_values))
        row[index] = json.dumps(replaced(value, path, new))
    row = [json.dumps(v) if isinstance(v, list | dict) else v for v in row]
    return table, tuple(row)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file holding an app 7 with rows in every table: the rows drawn replace or join them."""
    path = tmp_path_factory.mktemp("fuzz") / "state.db"
    store = Store(path)
    store.save(busy_app())
    store.close()
    return path


def insert(db: sqlite3.Connection, table: str, row: tuple[Any, ...]) -> None:
    marks = ", ".join("CAST(? AS TEXT)" if isinstance(v, InvalidUtf8) else "?" for v in row)
    values = [bytes(v) if isinstance(v, InvalidUtf8) else v for v in row]
    with contextlib.suppress(sqlite3.IntegrityError):  # NULL in a NOT NULL column
        db.execute(f"INSERT OR REPLACE INTO {table} VALUES ({marks})", values)


def assert_clean_text(text: object, max_bytes: int) -> None:
    assert isinstance(text, str) and text and text.isprintable()
    assert len(text.encode()) <= max_bytes  # raises on a lone surrogate


def assert_count(value: object) -> None:
    assert type(value) is int and 0 <= value <= MAX_SAFE_INT


def assert_seconds(value: object) -> None:
    assert type(value) is float and math.isfinite(value) and value >= 0


def assert_sound(app: AppState) -> None:
    tracking = app.tracking
    for task_id, task in tracking.live.items():
        assert task.task_id == task_id
        assert_clean_text(task_id, MAX_TASK_ID_BYTES)
        assert_clean_text(task.room_id, MAX_ROOM_ID_BYTES)
        assert task.status in LIVE_STATUSES
        assert_count(task.begin_ms)
    for task_id, learned_ms in tracking.finished.items():
        assert_clean_text(task_id, MAX_TASK_ID_BYTES)
        assert_count(learned_ms)
    for ms in (tracking.marks.ended_since_ms, tracking.marks.baseline_ms, app.last_observed_ms,
               *tracking.marks.room_baselines_ms.values()):
        if ms is not None:
            assert_count(ms)
    marks = tracking.marks
    for room in (*(marks.rooms or ()), *marks.room_baselines_ms, *app.upload_failures,
                 *app.counters):
        assert_clean_text(room, MAX_ROOM_ID_BYTES)
    for by_kind in app.counters.values():
        assert list(by_kind) == list(EventKind)
        for count in by_kind.values():
            assert_count(count)
    for reason, count in app.ended_by_reason.items():
        assert_clean_text(reason, 128)
        assert_count(count)
    for count in app.upload_failures.values():
        assert_count(count)
    for histogram in app.durations.values():
        assert len(histogram.counts) == len(histogram.bounds) + 1
        for count in histogram.counts:
            assert_count(count)
        assert_seconds(histogram.total)
    for task_id, upload in tracking.awaited.items():
        assert_clean_text(task_id, MAX_TASK_ID_BYTES)
        assert_clean_text(upload.room_id, MAX_ROOM_ID_BYTES)
        assert_count(upload.ended_ms)
        if upload.checked_ms is not None:
            assert_count(upload.checked_ms)
    for task_id, settled_ms in tracking.settled.items():
        assert_clean_text(task_id, MAX_TASK_ID_BYTES)
        assert_count(settled_ms)
    for deferred in (*app.deferred, *app.recent):
        assert isinstance(deferred.kind, EventKind)
        assert_clean_text(deferred.task_id, MAX_TASK_ID_BYTES)
        assert_clean_text(deferred.room_id, MAX_ROOM_ID_BYTES)
        if deferred.duration_s is not None:
            assert_seconds(deferred.duration_s)
    if app.last_success_time is not None:
        assert_seconds(app.last_success_time)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(spoiled_rows(), min_size=1, max_size=2),
       rooms=st.sampled_from([None, ("a", "b")]))
def test_any_rows_load_as_sound_values_or_are_refused_with_store_error(
        valid_file: Path, rows: list[tuple[str, tuple[Any, ...]]],
        rooms: tuple[str, ...] | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.db"
        shutil.copy(valid_file, path)
        with sqlite3.connect(path) as db:
            for table, row in rows:
                insert(db, table, row)
        db.close()
        app = AppState(APP_ID, rooms)
        try:
            store = Store(path)
            store.load(app)
        except StoreError as exc:
            event(f"refused: {str(exc).split()[2].rstrip(',')}")  # the table
            return
        event("loaded")
        assert_sound(app)
        store.save(app)  # what load accepts, save writes back
        store.close()

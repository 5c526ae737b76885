"""ZEGO callbacks over real HTTP: verified, deduplicated, and reconciled with polling."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exporter.callbacks import MAX_CLOCK_SKEW_S, CallbackReceiver
from exporter.clock import ManualClock
from exporter.config import AppConfig, Secret
from exporter.daemon import CALLBACK_SAVE_DELAY_S, Exporter, ListenAddress
from exporter.state.changes import EventKind
from exporter.state.model import AppState, ExporterState, Unsaved
from exporter.state.store import Rows, Store
from exporter.zego.callback_signing import callback_signature
from exporter.zego.models import TaskStatus
from tests.conftest import APP_ID, Rig

Factory = Callable[..., Any]
CALLBACK_SECRET = "cb-secret-0123456789"
_nonces = itertools.count(1)


def signed(rig: Rig, task_id: str, room_id: str, event_type: int, sequence: int,
           detail: dict[str, Any] | None = None, secret: str = CALLBACK_SECRET,
           age_s: float = 0.0, nonce: str | None = None, **override: Any) -> dict[str, Any]:
    timestamp = str(int(rig.clock.time() - age_s))
    nonce = nonce or str(next(_nonces))
    body = {"app_id": APP_ID, "task_id": task_id, "room_id": room_id, "event_type": event_type,
            "message": "", "nonce": nonce, "timestamp": timestamp,
            "signature": callback_signature(secret, timestamp, nonce), "sequence": sequence,
            "detail": detail or {}}
    body.update(override)
    return body


@pytest.fixture
async def rig(rig_factory: Factory) -> AsyncIterator[Rig]:
    rig: Rig = await rig_factory()
    await rig.exporter.stop()
    config = rig.exporter.config
    app = config.apps[0]
    with_secret = AppConfig(app.app_id, app.server_secret, app.rooms,
                            callback_secret=Secret(CALLBACK_SECRET))
    rig.exporter = Exporter(replace(config, apps=(with_secret,)), clock=rig.clock)
    await rig.exporter.start(None, schedule=False,
                             callback_listen=ListenAddress("127.0.0.1", 0))
    yield rig


async def post(rig: Rig, body: dict[str, Any] | bytes) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{rig.exporter.callback_port}/callback"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(url, data=data) as response:
        text = await response.text()
        return response.status, json.loads(text) if text.startswith("{") else {}


def results(rig: Rig) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, _, result), count in rig.exporter.state.callbacks.items():
        out[result] = out.get(result, 0) + count
    return out


async def live_task(rig: Rig, room: str = "r1") -> str:
    await rig.cycle()
    task = rig.engine.start(APP_ID, room)
    await rig.cycle()
    return task


async def test_abnormal_end_counts_at_once_with_its_reason_and_polling_agrees(rig: Rig) -> None:
    task = await live_task(rig)
    rig.engine.abort(task)
    status, _ = await post(rig, signed(rig, task, "r1", 2, 0, {"quit_reason": 6}))
    assert status == 200
    counters = rig.counters("r1")
    assert counters[EventKind.ENDED_ABNORMALLY] == 1
    assert rig.exporter.state.apps[APP_ID].ended_by_reason["6"] == 1
    for _ in range(3):
        await rig.cycle()
    rig.assert_counters_match_ledger(["r1", "r2", "r3"])


async def test_polling_first_then_the_callback_is_recognised(rig: Rig) -> None:
    task = await live_task(rig)
    rig.engine.abort(task)
    await rig.cycle()
    assert rig.counters("r1")[EventKind.ENDED_ABNORMALLY] == 1
    assert (await post(rig, signed(rig, task, "r1", 2, 0, {"quit_reason": 1})))[0] == 200
    assert rig.counters("r1")[EventKind.ENDED_ABNORMALLY] == 1
    assert results(rig) == {"recognised": 1}


async def test_a_repeated_callback_changes_nothing(rig: Rig) -> None:
    task = await live_task(rig)
    body = signed(rig, task, "r1", 2, 0, {"quit_reason": 6})
    for _ in range(3):  # ZEGO's retries carry the same task, event and sequence
        again = {**body, "nonce": str(next(_nonces))}
        again["signature"] = callback_signature(CALLBACK_SECRET, again["timestamp"],
                                                again["nonce"])
        assert (await post(rig, again))[0] == 200
    assert rig.counters("r1")[EventKind.ENDED_ABNORMALLY] == 1
    assert results(rig) == {"applied": 1, "duplicate": 2}


@pytest.mark.parametrize(
    ("mutate", "status", "result"),
    [
        (lambda b: {**b, "signature": "0" * 40}, 401, "bad_signature"),
        (lambda b: {**b, "app_id": 42}, 401, "unknown_app"),
        (lambda b: {**b, "task_id": 5}, 400, "malformed"),
        (lambda b: b"{not json", 400, "malformed"),
        (lambda b: b"x" * (300 * 1024), 413, "too_large"),
    ],
    ids=["bad-signature", "unknown-app", "wrong-type", "not-json", "oversized"],
)
async def test_bad_callbacks_are_rejected_and_change_nothing(
    rig: Rig, mutate: Callable[[dict[str, Any]], Any], status: int, result: str
) -> None:
    task = await live_task(rig)
    assert (await post(rig, mutate(signed(rig, task, "r1", 2, 0))))[0] == status
    assert rig.counters("r1")[EventKind.ENDED] == 0
    assert task in rig.exporter.state.apps[APP_ID].tracking.live
    assert results(rig) == {result: 1}


async def test_stale_and_replayed_callbacks_are_rejected(rig: Rig) -> None:
    task = await live_task(rig)
    assert (await post(rig, signed(rig, task, "r1", 201, 0, age_s=3600)))[0] == 401
    body = signed(rig, task, "r1", 201, 1)
    assert (await post(rig, body))[0] == 200
    forged = {**body, "event_type": 2, "sequence": 2}  # same signature, different body
    assert (await post(rig, forged))[0] == 401
    assert results(rig) == {"stale": 1, "applied": 1, "replayed": 1}
    assert rig.counters("r1")[EventKind.ENDED] == 0


async def test_pause_and_resume_count_once_whoever_sees_them_first(rig: Rig) -> None:
    task = await live_task(rig)
    rig.engine.pause(task)
    await post(rig, signed(rig, task, "r1", 201, 0))
    await rig.cycle()  # polling sees status 5: recognised, not a second pause
    rig.engine.resume(task)
    await rig.cycle()  # polling sees the resume first
    await post(rig, signed(rig, task, "r1", 202, 1, age_s=20))  # sent before that poll
    counters = rig.counters("r1")
    assert (counters[EventKind.PAUSED], counters[EventKind.RESUMED]) == (1, 1)
    rig.assert_counters_match_ledger(["r1"])


async def test_a_late_resume_never_flips_a_newer_pause(rig: Rig) -> None:
    task = await live_task(rig)
    await post(rig, signed(rig, task, "r1", 201, 0))
    await post(rig, signed(rig, task, "r1", 202, 1))
    await post(rig, signed(rig, task, "r1", 201, 2))
    status, answer = await post(rig, signed(rig, task, "r1", 202, 1, nonce="late"))  # retry
    assert (status, answer["message"]) == (200, "duplicate")
    await post(rig, signed(rig, task, "r1", 202, 0))  # never applied, and older than seq 2
    counters = rig.counters("r1")
    assert (counters[EventKind.PAUSED], counters[EventKind.RESUMED]) == (2, 1)
    assert results(rig) == {"applied": 3, "duplicate": 1, "out_of_order": 1}


async def test_upload_failures_are_counted_per_room(rig: Rig) -> None:
    task = await live_task(rig, "r2")
    files = [{"file_id": "a", "status": 3}, {"file_id": "b", "status": 5},
             {"file_id": "c", "status": 4}]
    await post(rig, signed(rig, task, "r2", 1, 3, {"upload_status": 2, "file_info": files}))
    app = rig.exporter.state.apps[APP_ID]
    assert app.upload_failures == {"r1": 0, "r2": 2, "r3": 0}


async def test_callback_for_a_room_not_watched_is_ignored(rig: Rig) -> None:
    await rig.cycle()
    assert (await post(rig, signed(rig, "elsewhere", "lobby", 2, 0)))[0] == 200
    assert results(rig) == {"ignored": 1}
    assert all(c[EventKind.ENDED] == 0 for c in rig.exporter.state.apps[APP_ID].counters.values())


async def test_short_task_ended_before_polling_saw_it_is_started_and_ended_once(rig: Rig
                                                                              ) -> None:
    await rig.cycle()
    task = rig.engine.start(APP_ID, "r3")
    rig.clock.advance(3)
    rig.engine.abort(task)
    await post(rig, signed(rig, task, "r3", 2, 0, {"quit_reason": 2}))
    await rig.cycle()
    await rig.cycle()
    rig.assert_counters_match_ledger(["r3"])
    assert rig.counters("r3")[EventKind.STARTED] == 1


@pytest.fixture
async def stored_rig(rig: Rig, tmp_path: Path) -> AsyncIterator[Rig]:
    """The rig's exporter with a state file, as it runs by default."""
    await rig.exporter.stop()
    rig.exporter = Exporter(rig.exporter.config, clock=rig.clock,
                            storage_path=tmp_path / "state.db")
    await rig.exporter.start(None, schedule=False,
                             callback_listen=ListenAddress("127.0.0.1", 0))
    yield rig
    await rig.exporter.stop()


def stored(path: Path) -> AppState:
    app = AppState(APP_ID, ("r1", "r2"))
    Store(path).load(app)
    return app


async def test_a_burst_of_callbacks_reaches_the_state_file_in_one_write_within_a_second(
        stored_rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = stored_rig
    await rig.cycle()
    tasks = [rig.engine.start(APP_ID, "r1") for _ in range(4)]
    await rig.cycle()
    paused = tasks.pop()
    await rig.exporter.saves_settled()  # the cycles' writes
    writes: list[int] = []
    real_write = Store.write

    def counted_write(self: Store, rows: Rows) -> None:
        writes.append(rows.app_id)
        real_write(self, rows)

    monkeypatch.setattr(Store, "write", counted_write)
    for sequence, task in enumerate(tasks):
        rig.engine.abort(task)
        assert (await post(rig, signed(rig, task, "r1", 2, sequence, {"quit_reason": 6})))[0] == 200
    rig.engine.pause(paused)
    assert (await post(rig, signed(rig, paused, "r1", 201, 0)))[0] == 200
    assert writes == []  # not one transaction per callback
    await asyncio.sleep(CALLBACK_SAVE_DELAY_S + 0.5)
    await rig.exporter.saves_settled()
    assert writes == [APP_ID]
    saved = stored(tmp_path / "state.db")
    assert saved.counters["r1"][EventKind.ENDED_ABNORMALLY] == 3
    assert saved.ended_by_reason["6"] == 3
    assert set(tasks) <= saved.tracking.finished.keys()
    assert saved.tracking.live == rig.exporter.state.apps[APP_ID].tracking.live
    assert saved.tracking.live[paused].status is TaskStatus.PAUSED


async def test_callbacks_not_yet_written_are_written_on_stop(stored_rig: Rig,
                                                             tmp_path: Path) -> None:
    rig = stored_rig
    task = await live_task(rig)
    rig.engine.abort(task)
    assert (await post(rig, signed(rig, task, "r1", 2, 0, {"quit_reason": 6})))[0] == 200
    await rig.exporter.stop()
    saved = stored(tmp_path / "state.db")
    assert saved.counters["r1"][EventKind.ENDED_ABNORMALLY] == 1
    assert task in saved.tracking.finished


def test_nonces_are_remembered_for_as_long_as_their_timestamp_is_accepted() -> None:
    """Not a count: a busy app's callbacks must not push a nonce out while a replay of it would
    still pass the timestamp check (ZEGO's signature binds no body, only timestamp and nonce)."""
    clock = ManualClock()
    app = AppState(APP_ID, ("r1",))
    receiver = CallbackReceiver(ExporterState({APP_ID: app}), {APP_ID: Secret(CALLBACK_SECRET)},
                                clock)

    def body(nonce: str, sent: float, task: str = "t") -> bytes:
        timestamp = str(int(sent))
        return json.dumps({
            "app_id": APP_ID, "task_id": task, "room_id": "r1", "event_type": 4, "message": "",
            "nonce": nonce, "timestamp": timestamp, "sequence": 0, "detail": {},
            "signature": callback_signature(CALLBACK_SECRET, timestamp, nonce)}).encode()

    ahead = clock.time() + MAX_CLOCK_SKEW_S - 10  # ZEGO's clock ahead of ours, within the skew
    first = body("n-0", ahead)
    assert receiver.handle(first)[2] != "replayed"
    for i in range(1, 150_001):  # more callbacks than any count cap would keep
        if i % 10_000 == 0:
            clock.advance(75)
        receiver.handle(body(f"n-{i}", clock.time(), task=f"t{i}"))
    assert clock.time() - (ahead - MAX_CLOCK_SKEW_S) > MAX_CLOCK_SKEW_S
    replay = body("n-0", ahead, task="another")  # its signature, another body
    assert receiver.handle(replay)[2] == "replayed"  # 1,125 s on: its timestamp still passes
    clock.advance(MAX_CLOCK_SKEW_S)
    assert receiver.handle(replay)[2] == "stale"


async def test_a_failed_write_of_callbacks_is_tried_again_on_stop(stored_rig: Rig,
                                                                 tmp_path: Path) -> None:
    rig = stored_rig
    task = await live_task(rig)
    await rig.exporter.saves_settled()  # the cycles' writes, before the fault
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as db:  # a fault injected in SQLite: every write fails
        db.execute("CREATE TRIGGER full BEFORE INSERT ON counters "
                   "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    rig.engine.abort(task)
    assert (await post(rig, signed(rig, task, "r1", 2, 0, {"quit_reason": 6})))[0] == 200
    await asyncio.sleep(CALLBACK_SAVE_DELAY_S + 0.5)
    assert rig.exporter.state.storage_errors == 1
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER full")
    await rig.exporter.stop()
    saved = stored(path)
    assert saved.counters["r1"][EventKind.ENDED_ABNORMALLY] == 1
    assert saved.ended_by_reason["6"] == 1


def hold_writes(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """State-file writes wait until the returned event is set (a slow disk, injected)."""
    release = threading.Event()
    real_write = Store.write

    def slow_write(self: Store, rows: Rows) -> None:
        assert release.wait(10)
        real_write(self, rows)

    monkeypatch.setattr(Store, "write", slow_write)
    return release


async def test_a_change_made_while_its_app_is_written_stays_pending_and_is_written_next(
        stored_rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file is written in a worker thread from rows taken on the loop: a callback's
    change arriving meanwhile is not marked saved by that write, and a save asked for during
    it follows it."""
    rig = stored_rig
    task = await live_task(rig)
    await rig.exporter.saves_settled()
    release = hold_writes(monkeypatch)
    app = rig.exporter.state.apps[APP_ID]
    rig.engine.pause(task)
    assert (await post(rig, signed(rig, task, "r1", 201, 0)))[0] == 200
    rig.exporter._save(app)  # its write (the task paused) is held up
    rig.engine.resume(task)
    assert (await post(rig, signed(rig, task, "r1", 202, 1)))[0] == 200  # meanwhile
    release.set()
    await rig.exporter.saves_settled()
    assert task in app.unsaved.live  # that write took its rows before the resume
    assert stored(tmp_path / "state.db").tracking.live[task].status is TaskStatus.PAUSED
    release.clear()
    rig.exporter._save(app)
    rig.exporter._save(app)  # asked for during the write: follows it
    release.set()
    await rig.exporter.saves_settled()
    assert rig.exporter.state.storage_errors == 0
    assert app.unsaved.live == set()
    assert stored(tmp_path / "state.db").tracking.live[task].status is TaskStatus.RECORDING


async def test_a_callback_during_a_write_is_written_on_stop(
        stored_rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of that write does not take the app off the list of apps stop() must save."""
    rig = stored_rig
    task = await live_task(rig)
    await rig.exporter.saves_settled()
    release = hold_writes(monkeypatch)
    rig.exporter._save(rig.exporter.state.apps[APP_ID])  # a cycle's save, held up
    rig.engine.abort(task)
    assert (await post(rig, signed(rig, task, "r1", 2, 0, {"quit_reason": 6})))[0] == 200
    release.set()
    await rig.exporter.saves_settled()
    await rig.exporter.stop()  # before the callback's own save was due
    saved = stored(tmp_path / "state.db")
    assert saved.counters["r1"][EventKind.ENDED_ABNORMALLY] == 1
    assert task in saved.tracking.finished


async def test_without_a_state_file_nothing_waits_to_be_written(rig: Rig) -> None:
    """The tasks callbacks changed are kept for the next write; with no file, for nobody."""
    task = await live_task(rig)
    rig.engine.abort(task)
    assert (await post(rig, signed(rig, task, "r1", 2, 0, {"quit_reason": 6})))[0] == 200
    assert results(rig) == {"applied": 1}
    assert rig.exporter.state.apps[APP_ID].unsaved == Unsaved()

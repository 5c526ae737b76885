"""Upload outcomes: the rules of exporter/poll/uploads.py as tables, and how ends make files
awaited and callbacks settle them, counted once whichever source comes first."""

from __future__ import annotations

from typing import Any

import pytest

from exporter.callbacks.parse import Callback
from exporter.callbacks.reconcile import reconcile
from exporter.poll import uploads
from exporter.poll.diff import NOT_FOUND, Snapshot, diff
from exporter.state.changes import (
    UPLOAD_OUTCOMES,
    AwaitedUpload,
    EventKind,
    Marks,
    TrackedTask,
    Tracking,
)
from exporter.zego.models import RecordFile, RecordingTask, RecordStatus, TaskStatus
from tests.conftest import APP_ID

K = EventKind
NOW = 1_700_000_000_000
ENDED = NOW - 120_000  # the end was learned two minutes ago


@pytest.mark.parametrize(("statuses", "outcome"), [
    ((3, 3), K.UPLOAD_UPLOADED),
    ((3, 4), K.UPLOAD_BACKUP),
    ((4, 5), K.UPLOAD_FAILED),
    ((3, 5), K.UPLOAD_FAILED),
    ((), K.UPLOAD_NO_FILES),
    ((3, 2), None),  # one still uploading
    ((1,), None),  # still recording
    ((0,), None),  # a status ZEGO does not document: not settled, never guessed
])
def test_the_files_statuses_decide_the_outcome(statuses: tuple[int, ...],
                                               outcome: EventKind | None) -> None:
    assert uploads.outcome_of(statuses) is outcome


def awaiting(**ended: int) -> Tracking:
    return Tracking(awaited={t: AwaitedUpload("r", at) for t, at in ended.items()},
                    marks=Marks(NOW - 600_000))


def answer(task_id: str, *files: int, status: TaskStatus = TaskStatus.ENDED,
           room: str = "r") -> RecordStatus:
    return RecordStatus(task_id, room, status, ENDED - 60_000, ENDED,
                        tuple(RecordFile(f"f{i}", f"s{i}", s) for i, s in enumerate(files)))


CASES = {
    "uploaded": ({"t": answer("t", 3, 3)}, [(K.UPLOAD_UPLOADED, "t")], set()),
    "failed": ({"t": answer("t", 3, 5)}, [(K.UPLOAD_FAILED, "t")], set()),
    "no files": ({"t": answer("t")}, [(K.UPLOAD_NO_FILES, "t")], set()),
    "ZEGO forgot it": ({"t": None}, [(K.UPLOAD_UNKNOWN, "t")], set()),
    "still uploading: checked, waits": ({"t": answer("t", 2)}, [], {"t"}),
    "another room's answer: not news": ({"t": answer("t", 3, room="x")}, [], {"t"}),
    "a failed look-up: waits unchecked": ({}, [], set()),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_settle(case: tuple[dict[str, RecordStatus | None], list[tuple[EventKind, str]],
                            set[str]]) -> None:
    answers, events, checked = case
    tracking = awaiting(t=ENDED)
    changes = uploads.settle(tracking, answers, NOW)
    assert [(e.kind, e.task_id) for e in changes.events] == events
    assert changes.settled == {task for _, task in events}
    assert set(changes.awaited) == checked
    assert all(u.checked_ms == NOW for u in changes.awaited.values())
    after = tracking.after(changes)
    assert ("t" in after.awaited) == (not events)
    assert ("t" in after.settled) == bool(events)


def test_files_unsettled_an_hour_after_the_end_are_unknown_without_a_look_up() -> None:
    tracking = awaiting(old=NOW - uploads.UNSETTLED_AFTER_MS, young=ENDED)
    assert uploads.due(tracking, NOW) == ["young"]  # no look-up for the old one
    changes = uploads.settle(tracking, {}, NOW)
    assert [(e.kind, e.task_id) for e in changes.events] == [(K.UPLOAD_UNKNOWN, "old")]


def test_look_ups_wait_for_the_upload_and_go_oldest_end_first() -> None:
    tracking = awaiting(fresh=NOW - 5_000, older=NOW - 90_000, old=NOW - 200_000)
    assert uploads.due(tracking, NOW) == ["old", "older"]
    # With callbacks, the upload callback usually settles it first: look up much later.
    assert uploads.due(tracking, NOW, callbacks=True) == []
    checked = Tracking(awaited={"t": AwaitedUpload("r", NOW - 600_000, NOW - 10_000)})
    assert uploads.due(checked, NOW) == []  # asked 10 s ago: again after RECHECK_MS
    assert uploads.due(checked, NOW + uploads.RECHECK_MS) == ["t"]


def row(task_id: str, status: TaskStatus) -> RecordingTask:
    return RecordingTask(task_id, "r", status, NOW - 60_000)


def test_every_counted_end_awaits_its_files_and_nothing_else_does() -> None:
    tracked = {t: TrackedTask(t, "r", TaskStatus.RECORDING, NOW - 60_000)
               for t in ("ends", "aborts", "lost", "stays")}
    tracking = Tracking(tracked, marks=Marks(NOW - 600_000, baseline_ms=NOW - 3_600_000))
    snapshot = Snapshot(NOW, {"stays": row("stays", TaskStatus.RECORDING)},
                        {"ends": row("ends", TaskStatus.ENDED),
                         "aborts": row("aborts", TaskStatus.ENDED_ABNORMALLY),
                         "short": row("short", TaskStatus.ENDED)})
    changes = diff(tracking, snapshot, {"lost": NOT_FOUND}, 600_000).changes
    assert set(changes.awaited) == {"ends", "aborts", "short"}
    assert all(u == AwaitedUpload("r", NOW) for u in changes.awaited.values())


def test_the_baseline_awaits_nothing() -> None:
    changes = diff(Tracking(), Snapshot(NOW, {}, {"e": row("e", TaskStatus.ENDED)}), {},
                   600_000).changes
    assert changes.awaited == {}


def upload_callback(*statuses: int, sent_s: int = NOW // 1000) -> Callback:
    return Callback(1, "t", "r", 1, 1, sent_s, "unknown", statuses)


def test_an_upload_callback_and_polling_count_the_outcome_once() -> None:
    ended = Tracking({"t": TrackedTask("t", "r", TaskStatus.RECORDING, NOW - 60_000)},
                     marks=Marks(NOW - 600_000))
    _, end = reconcile(ended, Callback(1, "t", "r", 5, 0, NOW // 1000, "unknown"), NOW,
                       NOW - 5_000)
    assert end is not None and set(end.awaited) == {"t"}
    tracking = ended.after(end)
    result, changes = reconcile(tracking, upload_callback(3, 5), NOW + 1_000, NOW - 5_000)
    assert result == "applied" and changes is not None
    assert [e.kind for e in changes.events] == [K.UPLOAD_FAILED]
    settled = tracking.after(changes)
    assert "t" not in settled.awaited and "t" in settled.settled
    # Polling finds nothing left to ask; a repeat of the callback is recognised.
    assert uploads.settle(settled, {"t": answer("t", 3, 5)}, NOW + 2_000).events == ()
    assert reconcile(settled, upload_callback(3, 5), NOW + 3_000, NOW - 5_000)[0] == "recognised"


def test_polling_first_then_the_upload_callback_is_recognised() -> None:
    tracking = awaiting(t=ENDED)
    tracking = tracking.after(uploads.settle(tracking, {"t": answer("t", 3)}, NOW))
    result, changes = reconcile(tracking, upload_callback(3), NOW + 1_000, NOW - 5_000)
    assert (result, changes) == ("recognised", None)


def test_an_upload_callback_before_the_end_is_known_settles_it_and_the_end_awaits_nothing(
        ) -> None:
    tracking = Tracking({"t": TrackedTask("t", "r", TaskStatus.RECORDING, NOW - 60_000)},
                        marks=Marks(NOW - 600_000))
    _, changes = reconcile(tracking, upload_callback(3), NOW, NOW - 5_000)
    assert changes is not None
    tracking = tracking.after(changes)
    ended = diff(tracking, Snapshot(NOW + 15_000, {}, {"t": row("t", TaskStatus.ENDED)}), {},
                 600_000).changes
    assert [e.kind for e in ended.events] == [K.ENDED] and ended.awaited == {}


async def test_polling_looks_ended_tasks_up_until_their_files_settle_and_counts_each_once(
        rig_factory: Any) -> None:
    """Over real HTTP against the simulator: outcomes equal its ledger, each counted once, and
    no look-up is made for a settled task."""
    rig = await rig_factory(rooms=("r1",))
    await rig.cycle()  # the baseline
    tasks = [rig.engine.start(APP_ID, "r1") for _ in range(6)]
    await rig.cycle()
    for task in tasks[:3]:
        rig.engine.stop(task)
    for task in tasks[3:]:
        rig.engine.abort(task)
    for _ in range(12):  # three minutes: uploads take up to 30 s, look-ups come a minute apart
        await rig.cycle()
    app = rig.exporter.state.apps[APP_ID]
    assert app.tracking.awaited == {} and set(tasks) <= app.tracking.settled.keys()
    want = rig.expected("r1")
    got = {kind.upload_outcome: app.counters["r1"][kind] for kind in UPLOAD_OUTCOMES}
    assert got == {"uploaded": want.uploaded, "backup": want.backup, "failed": want.failed,
                   "no_files": want.no_files, "unknown": 0}
    assert sum(got.values()) == 6
    asked = rig.exporter.state.api.requests[(APP_ID, "DescribeRecordStatus", "0")]
    for _ in range(4):
        await rig.cycle()
    assert rig.exporter.state.api.requests[(APP_ID, "DescribeRecordStatus", "0")] == asked


async def test_upload_look_ups_the_budget_cannot_take_wait_and_are_counted_skipped(
        rig_factory: Any) -> None:
    rig = await rig_factory(rooms=("r1",), rate_limit=0.5)  # 7 requests per 15 s interval
    await rig.cycle()
    tasks = [rig.engine.start(APP_ID, "r1") for _ in range(9)]
    await rig.cycle()
    for task in tasks:
        rig.engine.stop(task)
    await rig.cycle(advance=30)  # the ends (the ended listing shows them: no look-up)
    await rig.cycle()  # 30 s on: nine look-ups due, the cycle's budget and time take fewer
    app = rig.exporter.state.apps[APP_ID]
    assert app.upload_lookups_skipped >= 3
    for _ in range(20):
        await rig.cycle(advance=60)
    assert app.tracking.awaited == {}  # all settled, a few per cycle
    assert sum(app.counters["r1"][kind] for kind in UPLOAD_OUTCOMES) == 9

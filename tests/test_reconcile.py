"""Each rule of `reconcile`, as a table: (tracked state, callback) → result and change set."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from exporter.callbacks.parse import Callback
from exporter.callbacks.reconcile import reconcile
from exporter.state.changes import EventKind, Marks, Source, TrackedTask, Tracking
from exporter.zego.models import TaskStatus

S = TaskStatus
K = EventKind
NOW_MS = 1_700_000_100_000
OBSERVED_MS = 1_700_000_000_000  # the last good cycle's listings began here
AFTER_S = OBSERVED_MS // 1000 + 30  # a callback sent after that cycle
BEFORE_S = OBSERVED_MS // 1000 - 30
ABNORMAL, NORMAL, UPLOADED, PAUSED, RESUMED = 2, 5, 1, 201, 202


def tracking(status: TaskStatus | None = None, finished: bool = False,
             baseline: bool = True) -> Tracking:
    """Task "t" of room "r": tracked with `status`, finished, or unknown."""
    live = {} if status is None else {"t": TrackedTask("t", "r", status, OBSERVED_MS - 60_000)}
    return Tracking(live, {"t": OBSERVED_MS} if finished else {},
                    Marks(OBSERVED_MS - 600_000 if baseline else None))


def callback(event_type: int, sent_s: int = AFTER_S, quit_reason: str = "unknown",
             file_statuses: tuple[int, ...] = ()) -> Callback:
    return Callback(1, "t", "r", event_type, 0, sent_s, quit_reason, file_statuses)


@dataclass(frozen=True)
class Case:
    state: Tracking
    callback: Callback
    result: str
    events: tuple[EventKind, ...] = ()
    status: TaskStatus | None = None  # the task's tracked status after, if still live
    finished: bool = False  # the task is finished after


CASES = {
    # Ends
    "end of a tracked task": Case(tracking(S.RECORDING), callback(NORMAL), "applied",
                                  (K.ENDED,), finished=True),
    "abnormal end of a paused task": Case(tracking(S.PAUSED), callback(ABNORMAL, quit_reason="3"),
                                          "applied", (K.ENDED, K.ENDED_ABNORMALLY), finished=True),
    "end of a task never tracked": Case(tracking(), callback(NORMAL), "applied",
                                        (K.STARTED, K.ENDED), finished=True),
    "end before any baseline": Case(tracking(baseline=False), callback(ABNORMAL), "applied",
                                    (K.ENDED, K.ENDED_ABNORMALLY), finished=True),
    "end of a finished task": Case(tracking(finished=True), callback(ABNORMAL), "recognised",
                                   finished=True),
    "old end of a tracked task (still news)": Case(tracking(S.RECORDING),
                                                   callback(NORMAL, BEFORE_S), "applied",
                                                   (K.ENDED,), finished=True),
    # Pauses and resumes of tracked tasks
    "pause of a recording task": Case(tracking(S.RECORDING), callback(PAUSED), "applied",
                                      (K.PAUSED,), S.PAUSED),
    "pause of an initializing task": Case(tracking(S.INITIALIZING), callback(PAUSED), "applied",
                                          (K.PAUSED,), S.PAUSED),
    "resume of a paused task": Case(tracking(S.PAUSED), callback(RESUMED), "applied",
                                    (K.RESUMED,), S.RECORDING),
    "pause of a paused task": Case(tracking(S.PAUSED), callback(PAUSED), "recognised",
                                   status=S.PAUSED),
    "resume of a recording task": Case(tracking(S.RECORDING), callback(RESUMED), "recognised",
                                       status=S.RECORDING),
    "pause sent before the last cycle": Case(tracking(S.RECORDING), callback(PAUSED, BEFORE_S),
                                             "recognised", status=S.RECORDING),
    "pause of a finished task": Case(tracking(finished=True), callback(PAUSED), "recognised",
                                     finished=True),
    # Implied transitions: a task polling never saw
    "pause of a task never tracked": Case(tracking(), callback(PAUSED), "applied",
                                          (K.STARTED, K.PAUSED), S.PAUSED),
    "resume of a task never tracked": Case(tracking(), callback(RESUMED), "applied",
                                           (K.STARTED, K.PAUSED, K.RESUMED), S.RECORDING),
    "old pause of a task never tracked": Case(tracking(), callback(PAUSED, BEFORE_S),
                                              "recognised"),
    "pause before any baseline": Case(tracking(baseline=False), callback(PAUSED), "recognised"),
    # Uploads and the rest
    "upload with failed files": Case(tracking(S.RECORDING),
                                     callback(UPLOADED, file_statuses=(2, 1)),
                                     "applied", status=S.RECORDING),
    "upload, every file uploaded": Case(tracking(S.RECORDING), callback(UPLOADED), "counted",
                                        status=S.RECORDING),
    "another event type": Case(tracking(S.RECORDING), callback(3), "counted", status=S.RECORDING),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_reconcile(case: Case) -> None:
    result, changes = reconcile(case.state, case.callback, NOW_MS, OBSERVED_MS)
    assert result == case.result
    assert (changes is not None) == (result == "applied")
    after = case.state if changes is None else case.state.after(changes)
    events = () if changes is None else changes.events
    assert tuple(e.kind for e in events) == case.events
    assert all(e.source is Source.CALLBACK and e.task_id == "t" and e.room_id == "r"
               for e in events)
    live = after.live.get("t")
    assert (live.status if live else None) == case.status
    assert ("t" in after.finished) == case.finished


def test_an_abnormal_end_carries_its_quit_reason_and_duration() -> None:
    _, changes = reconcile(tracking(S.RECORDING), callback(ABNORMAL, quit_reason="1003"),
                           NOW_MS, OBSERVED_MS)
    assert changes is not None
    ended, abnormal = changes.events
    assert ended.duration_s == (NOW_MS - (OBSERVED_MS - 60_000)) / 1000
    assert abnormal.quit_reason == "1003" and ended.quit_reason is None
    assert changes.finished == {"t": NOW_MS} and changes.untracked == {"t"}


def test_a_task_a_callback_tracks_begins_no_later_than_the_callback_was_sent() -> None:
    _, changes = reconcile(tracking(), callback(PAUSED), NOW_MS, OBSERVED_MS)
    assert changes is not None
    assert changes.tracked["t"].begin_ms == AFTER_S * 1000
    assert changes.flipped == {"t"}  # a cycle under way must not flip it back


def test_an_upload_failure_names_its_task_and_files() -> None:
    _, changes = reconcile(tracking(S.RECORDING), callback(UPLOADED, file_statuses=(2, 1)),
                           NOW_MS, OBSERVED_MS)
    assert changes is not None
    assert [(f.task_id, f.room_id, f.files) for f in changes.upload_failures] == [("t", "r", 2)]
    assert changes.events == ()

"""What became of an ended task's files: the rules, pure like the diff.

After a task ends, whichever source saw the end, it is awaited until its files settle, then its
outcome is counted once: **uploaded** (every file status 3), **backup** (a file 4, none 5),
**failed** (a file 5), **no_files** (no RecordFiles: nothing was recorded), or **unknown** (not
settled an hour after the end, or ZEGO no longer knows the task). DescribeRecordStatus look-ups
rank below end detection: they use what the cycle's budget leaves, oldest end first, and the
rest wait for a later cycle (counted as skipped). An upload callback settles a task the same
way, and whichever comes first counts it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from exporter.state.changes import AwaitedUpload, ChangeSet, EventKind, Source, TaskEvent, Tracking
from exporter.zego.models import FileStatus, RecordStatus

UNSETTLED_AFTER_MS = 3600 * 1000  # an end this old with files still moving: outcome unknown
FIRST_CHECK_MS = 30 * 1000  # ZEGO uploads after the end: no look-up sooner
FIRST_CHECK_WITH_CALLBACKS_MS = 300 * 1000  # the upload callback usually comes first
RECHECK_MS = 60 * 1000
_SETTLED = {FileStatus.UPLOADED, FileStatus.IN_BACKUP_STORAGE, FileStatus.UPLOAD_FAILED}


def outcome_of(file_statuses: Iterable[int]) -> EventKind | None:
    """The outcome the files' statuses show, or None while a file is still moving."""
    statuses = list(file_statuses)
    if not statuses:
        return EventKind.UPLOAD_NO_FILES
    if any(s not in _SETTLED for s in statuses):
        return None
    if FileStatus.UPLOAD_FAILED in statuses:
        return EventKind.UPLOAD_FAILED
    if FileStatus.IN_BACKUP_STORAGE in statuses:
        return EventKind.UPLOAD_BACKUP
    return EventKind.UPLOAD_UPLOADED


def _timed_out(upload: AwaitedUpload, now_ms: int) -> bool:
    return now_ms - upload.ended_ms >= UNSETTLED_AFTER_MS


def due(tracking: Tracking, now_ms: int, callbacks: bool = False) -> list[str]:
    """Awaited tasks a look-up should ask about now, oldest end first (not the timed-out ones:
    `settle` counts them unknown without a look-up)."""
    first = FIRST_CHECK_WITH_CALLBACKS_MS if callbacks else FIRST_CHECK_MS

    def ready(upload: AwaitedUpload) -> bool:
        if _timed_out(upload, now_ms):
            return False
        if upload.checked_ms is None:
            return now_ms - upload.ended_ms >= first
        return now_ms - upload.checked_ms >= RECHECK_MS

    waiting = [(u.ended_ms, t) for t, u in tracking.awaited.items() if ready(u)]
    return [t for _, t in sorted(waiting)]


def settle(tracking: Tracking, answers: Mapping[str, RecordStatus | None], now_ms: int,
           skipped: int = 0) -> ChangeSet:
    """The outcomes look-ups showed. `answers`: a task's status, or None if ZEGO does not know
    it; a task not in `answers` (a failed look-up) stays awaited unless it timed out."""
    events: list[TaskEvent] = []
    settled: set[str] = set()
    checked: dict[str, AwaitedUpload] = {}
    for task_id, upload in tracking.awaited.items():
        answered = task_id in answers
        answer = answers.get(task_id)
        if answered and answer is None:
            outcome: EventKind | None = EventKind.UPLOAD_UNKNOWN  # ZEGO forgot the task
        elif answer is not None and not answer.status.live and answer.room_id in (
                "", upload.room_id):
            outcome = outcome_of(f.status for f in answer.files)
        else:
            outcome = None
        if outcome is None and _timed_out(upload, now_ms):
            outcome = EventKind.UPLOAD_UNKNOWN
        if outcome is not None:
            events.append(TaskEvent(outcome, task_id, upload.room_id))
            settled.add(task_id)
        elif answered:
            checked[task_id] = AwaitedUpload(upload.room_id, upload.ended_ms, now_ms)
    return ChangeSet(Source.POLL, now_ms, tuple(events), awaited=checked,
                     settled=frozenset(settled), uploads_skipped=skipped)

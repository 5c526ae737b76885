"""The event rules for one verified callback: a pure function of tracking and the callback.

Like the diff, no I/O, no clock, no metrics. A callback counts only what polling has not
counted; the result is ("applied", the change set) or a result saying why nothing changes:

- An end (event 2 or 5) of a finished task: **recognised**. Otherwise **ended** (and **ended
  abnormally**, with its quit_reason, for event 2), and **started** too if the task was never
  tracked (it began and ended between two polls, or during an outage) once a baseline exists.
- A pause or resume (201, 202) of a finished task, or one sent before the last good cycle's
  listings began (that cycle saw the task later: the transition is counted or missed for good),
  or of a tracked task already in that status: **recognised**.
- A pause or resume of a tracked task: **paused** or **resumed**, and the listing of a cycle
  already under way must not flip it back (`flipped`).
- A pause of a task never tracked (it started during an outage, or between two polls):
  **started** and **paused**, as ZEGO's tasks go 1 → 2 → 5. A resume of one: **started**,
  **paused** and **resumed** (its pause callback was lost, or is late: a late one is refused by
  its lower sequence). The task is then tracked, so polling recognises all of it.
- An upload (event 1) whose files settled: the upload outcome (exporter/poll/uploads.py),
  unless polling settled it first (**recognised**); files not uploaded also count as upload
  failures. An end makes the task's files awaited, as polling's ends do.
- Anything else: **counted** (in the callbacks metric only).
"""

from __future__ import annotations

from exporter.callbacks.parse import Callback
from exporter.poll.uploads import outcome_of
from exporter.state.changes import (
    AwaitedUpload,
    ChangeSet,
    EventKind,
    Source,
    TaskEvent,
    TrackedTask,
    Tracking,
    UploadFailure,
)
from exporter.zego.limits import (
    EVENT_ABNORMAL_END,
    EVENT_NORMAL_END,
    EVENT_PAUSED,
    EVENT_RESUMED,
    EVENT_UPLOADED,
)
from exporter.zego.models import TaskStatus

Reconciled = tuple[str, ChangeSet | None]


def reconcile(tracking: Tracking, callback: Callback, now_ms: int,
              observed_ms: int | None) -> Reconciled:
    """What `callback`, received at `now_ms`, changes; `observed_ms`: when the last good
    cycle's listings began (None: no cycle yet)."""
    if callback.event_type in (EVENT_ABNORMAL_END, EVENT_NORMAL_END):
        return _ended(tracking, callback, now_ms)
    if callback.event_type in (EVENT_PAUSED, EVENT_RESUMED):
        return _paused_or_resumed(tracking, callback, now_ms, observed_ms)
    if callback.event_type == EVENT_UPLOADED:
        return _uploaded(tracking, callback, now_ms)
    return "counted", None


def _uploaded(tracking: Tracking, callback: Callback, now_ms: int) -> Reconciled:
    if callback.task_id in tracking.settled:
        return "recognised", None  # its files were counted: by polling, or an earlier callback
    outcome = outcome_of(callback.file_statuses) if callback.file_statuses else None
    failures = (UploadFailure(callback.task_id, callback.room_id, callback.failed_files),) \
        if callback.failed_files else ()
    if outcome is None:
        if not failures:
            return "counted", None
        return "applied", ChangeSet(Source.CALLBACK, now_ms, upload_failures=failures)
    return "applied", ChangeSet(Source.CALLBACK, now_ms, (_event(outcome, callback),),
                                settled=frozenset({callback.task_id}), upload_failures=failures)


def _event(kind: EventKind, callback: Callback, duration_s: float | None = None,
           quit_reason: str | None = None) -> TaskEvent:
    return TaskEvent(kind, callback.task_id, callback.room_id, Source.CALLBACK, duration_s,
                     quit_reason)


def _ended(tracking: Tracking, callback: Callback, now_ms: int) -> Reconciled:
    task_id = callback.task_id
    if task_id in tracking.finished:
        return "recognised", None
    task = tracking.live.get(task_id)
    events = []
    if task is None and tracking.has_baseline:
        events.append(_event(EventKind.STARTED, callback))
    duration = None if task is None else max(0.0, (now_ms - task.begin_ms) / 1000)
    events.append(_event(EventKind.ENDED, callback, duration))
    if callback.event_type == EVENT_ABNORMAL_END:
        events.append(_event(EventKind.ENDED_ABNORMALLY, callback,
                             quit_reason=callback.quit_reason))
    awaited = {} if task_id in tracking.settled else {
        task_id: AwaitedUpload(callback.room_id, now_ms)}
    return "applied", ChangeSet(Source.CALLBACK, now_ms, tuple(events),
                                untracked=frozenset({task_id}) if task else frozenset(),
                                finished={task_id: now_ms}, awaited=awaited)


def _paused_or_resumed(tracking: Tracking, callback: Callback, now_ms: int,
                       observed_ms: int | None) -> Reconciled:
    task_id = callback.task_id
    sent_ms = callback.sent_s * 1000
    if task_id in tracking.finished or sent_ms < (observed_ms or 0):
        return "recognised", None
    paused = callback.event_type == EVENT_PAUSED
    status = TaskStatus.PAUSED if paused else TaskStatus.RECORDING
    task = tracking.live.get(task_id)
    if task is not None:
        if (task.status is TaskStatus.PAUSED) == paused:
            return "recognised", None
        events = [_event(EventKind.PAUSED if paused else EventKind.RESUMED, callback)]
        tracked = TrackedTask(task_id, task.room_id, status, task.begin_ms)
    elif not tracking.has_baseline:
        return "recognised", None  # the baseline will take the task as it finds it
    else:
        kinds = [EventKind.STARTED, EventKind.PAUSED] + ([] if paused else [EventKind.RESUMED])
        events = [_event(kind, callback) for kind in kinds]
        # The begin is not in a callback; it was before the callback was sent (the first
        # listing that shows the task corrects it).
        tracked = TrackedTask(task_id, callback.room_id, status, sent_ms)
    return "applied", ChangeSet(Source.CALLBACK, now_ms, tuple(events), {task_id: tracked},
                                flipped=frozenset({task_id}))

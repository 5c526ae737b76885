"""Turns what one poll cycle saw into a change set: a pure function of tracking and observation.

No I/O, no clock, no metrics: everything the rules need comes in as arguments, and the result
says exactly what changes (events, tasks tracked and untracked, ids finished and forgotten, the
new watermark), so every rule can be tested on its own. The rules, in the order they apply
to one app:

1. The very first cycle with no stored state is the baseline: live tasks are remembered, ended
   ones are marked as already counted, and no event is emitted.
2. A live row whose TaskId was never seen before: **started**, and **paused** too if it is
   paused (ZEGO's tasks go 1 → 2 → 5); unless it began before the baseline of its room: a task
   the baseline's listing missed is tracked, not counted.
3. A tracked task whose status changed: 2→5 **paused**, 5→2 **resumed** (1→2 is no event).
4. A tracked task missing from the live rows is never assumed ended. An ended row for it
   (Status=3 listing) or ZEGO's DescribeRecordStatus decides: 3 **ended**, 4 **ended** and
   **ended abnormally**, 1/2/5 still live (the row was lost to page drift); "task does not
   exist", or a task older than ZEGO's 3-day horizon, is **lost**; a failed look-up keeps the
   task pending until the next cycle.
5. An ended row whose TaskId was never seen (it started and ended between two cycles):
   **started** and **ended** (and **ended abnormally** for status 4); only the end if it began
   before the baseline of its room.
6. A task's started and terminal events count once, ever: finished TaskIds are remembered until
   no listing can show them again: an hour (a lagging live listing's grace) and two clock-skew
   margins after the exporter learned of the end, and before the ended-listing watermark; in
   any case 3 days and a margin after that.
7. A counted end makes the task's files awaited (exporter/poll/uploads.py), unless an upload
   callback settled them already.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace

from exporter.state.changes import (
    AwaitedUpload,
    ChangeSet,
    EventKind,
    Marks,
    Source,
    TaskEvent,
    TrackedTask,
    Tracking,
)
from exporter.zego.limits import HORIZON_MS, MAX_RECORD_MS
from exporter.zego.models import RecordingTask, RecordStatus, TaskStatus

LIVE_GRACE_MS = 3600 * 1000  # how long after its end a task may still be listed live (generous)


@dataclass(frozen=True)
class Snapshot:
    """One cycle's successful listings of one app, de-duplicated by TaskId."""

    taken_ms: int  # when the cycle's first read began
    live: Mapping[str, RecordingTask]  # rows of Status=2 reads
    ended: Mapping[str, RecordingTask]  # rows of Status=3 reads
    consistent: bool = True  # False if pages shifted while they were read


class LookupFailed(enum.Enum):
    """DescribeRecordStatus gave no answer this cycle (the task stays pending)."""

    FAILED = "failed"


NOT_FOUND = "not_found"  # DescribeRecordStatus answered 300001000
Lookup = RecordStatus | str | LookupFailed


@dataclass(frozen=True)
class DiffResult:
    changes: ChangeSet
    pending: list[str]  # TaskIds whose look-up failed and will be asked again
    before: Tracking = field(default_factory=Tracking, repr=False)

    @property
    def events(self) -> tuple[TaskEvent, ...]:
        return self.changes.events

    @property
    def tracking(self) -> Tracking:
        """The tracking after this cycle (built on demand: the exporter applies the changes)."""
        return self.before.after(self.changes)


def _terminal_rows(snapshot: Snapshot) -> dict[str, RecordingTask]:
    """Rows that show a task ended: Status=3 rows, and terminal rows in a Status=2 read."""
    rows = {tid: row for tid, row in snapshot.live.items() if not row.status.live}
    rows.update({tid: row for tid, row in snapshot.ended.items() if not row.status.live})
    return rows


def _rows(snapshot: Snapshot) -> tuple[dict[str, RecordingTask], dict[str, RecordingTask]]:
    """(live rows, terminal rows): a task with a terminal row anywhere is not live."""
    ended = _terminal_rows(snapshot)
    return {t: r for t, r in snapshot.live.items() if r.status.live and t not in ended}, ended


def horizon_start_ms(now_ms: int, margin_ms: int) -> int:
    """The oldest begin time ZEGO still lists, kept `margin_ms` off the edge."""
    return now_ms - HORIZON_MS + margin_ms


def _row_of(task: TrackedTask, rows: Mapping[str, RecordingTask]) -> RecordingTask | None:
    """The task's row, if there is one in the task's own room (another room's is not news)."""
    row = rows.get(task.task_id)
    return row if row is not None and row.room_id == task.room_id else None


def needs_lookup(tracking: Tracking, snapshot: Snapshot, margin_ms: int) -> list[str]:
    """Tracked tasks that vanished from the listings and that ZEGO can still describe."""
    live_rows, terminal_rows = _rows(snapshot)
    oldest = horizon_start_ms(snapshot.taken_ms, margin_ms)
    return [
        tid for tid, task in tracking.live.items()
        if _row_of(task, live_rows) is None and _row_of(task, terminal_rows) is None
        and task.begin_ms >= oldest
    ]


def _ended_events(task: TrackedTask | RecordingTask, status: TaskStatus, duration_s: float
                  ) -> list[TaskEvent]:
    events = [TaskEvent(EventKind.ENDED, task.task_id, task.room_id,
                        duration_s=max(0.0, duration_s))]
    if status is TaskStatus.ENDED_ABNORMALLY:
        events.append(TaskEvent(EventKind.ENDED_ABNORMALLY, task.task_id, task.room_id))
    return events


def _status_events(old: TrackedTask, new: TaskStatus) -> list[TaskEvent]:
    if old.status is not TaskStatus.PAUSED and new is TaskStatus.PAUSED:
        return [TaskEvent(EventKind.PAUSED, old.task_id, old.room_id)]
    if old.status is TaskStatus.PAUSED and new is TaskStatus.RECORDING:
        return [TaskEvent(EventKind.RESUMED, old.task_id, old.room_id)]
    return []


def diff(
    tracking: Tracking,
    snapshot: Snapshot,
    lookups: Mapping[str, Lookup],
    margin_ms: int,
    fresher: AbstractSet[str] = frozenset(),
    scope: frozenset[str] | None = None,
    max_lag_ms: int | None = None,
    learned_ms: int | None = None,
) -> DiffResult:
    """What one cycle's observation changes in `tracking`: the change set and pending look-ups.

    `fresher`: tasks whose tracked status a callback changed after the snapshot was taken; the
    snapshot's older status must not flip them back (it would be a false pause or resume).
    `scope`: the rooms this cycle watched (None: every room). A room the baseline does not
    cover yet (added to the config) gets a baseline of its own: its tasks are tracked, not
    counted. `max_lag_ms`: how far an inconsistent cycle may leave the ended-listing watermark
    behind (see docs/design.md). `learned_ms`: when the cycle's last answer came (default: the
    snapshot's time): no end it saw came later, and the tasks it finishes are remembered from it.
    """
    now = snapshot.taken_ms
    learned = now if learned_ms is None else max(now, learned_ms)
    live_rows, terminal_rows = _rows(snapshot)
    marks = tracking.marks

    if not tracking.has_baseline:
        # Callbacks may have finished tasks already (their ends counted): keep them finished.
        baseline = ChangeSet(
            Source.POLL, learned,
            tracked={t: TrackedTask(t, r.room_id, r.status, r.begin_ms)
                     for t, r in live_rows.items() if t not in tracking.finished},
            finished={t: learned for t in terminal_rows if t not in tracking.finished},
            marks=Marks(now - margin_ms, scope, now),
            observed_ms=now,
        )
        return DiffResult(baseline, [], tracking)

    events: list[TaskEvent] = []
    tracked: dict[str, TrackedTask] = {}
    finished: dict[str, int] = {}
    pending: list[str] = []

    awaited: dict[str, AwaitedUpload] = {}

    def finish(task: TrackedTask | RecordingTask, ended_by: int | None = None) -> None:
        finished[task.task_id] = learned if ended_by is None else max(learned, ended_by)

    def ended(task: TrackedTask | RecordingTask, status: TaskStatus, end_ms: int) -> None:
        """A counted end: its events, and its files are awaited (rule 7)."""
        events.extend(_ended_events(task, status, (end_ms - task.begin_ms) / 1000))
        finish(task)
        if task.task_id not in tracking.settled:
            awaited[task.task_id] = AwaitedUpload(task.room_id, learned)

    def keep(old: TrackedTask, status: TaskStatus, begin_ms: int | None = None) -> None:
        """The task stays live: record it if its status (or a callback's guessed begin) moved
        (most do not: no copy for them, the diff runs on the event loop)."""
        begin = old.begin_ms if begin_ms is None else begin_ms
        if status is not old.status or begin != old.begin_ms:
            tracked[old.task_id] = replace(old, status=status, begin_ms=begin)

    for tid, old in tracking.live.items():
        live_row = live_rows.get(tid)
        if (live_row is not None and live_row.status is old.status
                and live_row.begin_ms == old.begin_ms and live_row.room_id == old.room_id):
            continue  # listed live just as tracked (most tasks, every cycle): nothing changes
        ended_row, live_row = _row_of(old, terminal_rows), _row_of(old, live_rows)
        if ended_row is not None:
            ended(old, ended_row.status, now)
        elif live_row is not None:
            if tid in fresher:
                keep(old, old.status, live_row.begin_ms)
                continue
            events += _status_events(old, live_row.status)
            keep(old, live_row.status, live_row.begin_ms)
        elif old.begin_ms < horizon_start_ms(now, margin_ms):
            events.append(TaskEvent(EventKind.LOST, tid, old.room_id))
            finish(old)
        elif tid not in lookups and tid in fresher:
            continue  # a callback tracked or flipped it after the listings began: not in them
        else:
            outcome = lookups.get(tid, LookupFailed.FAILED)
            if isinstance(outcome, RecordStatus) and outcome.room_id not in ("", old.room_id):
                outcome = LookupFailed.FAILED  # an answer about another room: not this task's
            if isinstance(outcome, RecordStatus):
                if outcome.status.live and tid in fresher:
                    pass
                elif outcome.status.live:  # page drift: still recording
                    events += _status_events(old, outcome.status)
                    keep(old, outcome.status)
                else:
                    ended(old, outcome.status, outcome.end_ms or now)
            elif outcome == NOT_FOUND:
                events.append(TaskEvent(EventKind.LOST, tid, old.room_id))
                finish(old, old.begin_ms + MAX_RECORD_MS)  # when it ended, nobody says
            else:
                pending.append(tid)

    def known(task_id: str) -> bool:
        return task_id in tracking.live or task_id in tracking.finished or task_id in finished

    covered = marks.rooms.__contains__ if marks.rooms is not None else (lambda room: True)
    room_baselines = {room: ms for room, ms in marks.room_baselines_ms.items()
                      if scope is None or room in scope}
    baseline_ms = marks.baseline_ms
    if scope is not None and marks.rooms is not None:
        room_baselines.update(dict.fromkeys(scope - marks.rooms, now))
    elif scope is None and marks.rooms is not None:
        # From a room list to "*": every other room's baseline is now; the listed rooms keep
        # theirs (0: a schema-1 state without one, where every first sighting counts).
        room_baselines = {room: room_baselines.get(room, marks.baseline_ms or 0)
                          for room in marks.rooms}
        baseline_ms = now

    def began_counted(row: RecordingTask) -> bool:
        """Did this task begin after counting began in its room?"""
        since = room_baselines.get(row.room_id, baseline_ms)
        return since is None or row.begin_ms >= since

    for tid, row in live_rows.items():
        if not known(tid):
            if covered(row.room_id) and began_counted(row):
                events.append(TaskEvent(EventKind.STARTED, tid, row.room_id))
                if row.status is TaskStatus.PAUSED:  # ZEGO's tasks go 1 → 2 → 5: it paused
                    events.append(TaskEvent(EventKind.PAUSED, tid, row.room_id))
            tracked[tid] = TrackedTask(tid, row.room_id, row.status, row.begin_ms)
    for tid, row in terminal_rows.items():
        if not known(tid):
            if covered(row.room_id):
                if began_counted(row):
                    events.append(TaskEvent(EventKind.STARTED, tid, row.room_id))
                ended(row, row.status, now)
            else:
                finish(row)

    # Only a consistent listing proves nothing began unseen before this cycle (see docs/design.md).
    ended_since = now - margin_ms
    if not snapshot.consistent and marks.ended_since_ms is not None:
        ended_since = marks.ended_since_ms
    if max_lag_ms is not None:
        ended_since = max(ended_since, now - max_lag_ms)
    # Forget finished TaskIds that no listing can show again. A live listing may lag an end by
    # the grace; a Status=3 read shows tasks begun after its watermark (which only moves
    # forward), and the task began before it ended (ZEGO's clock may be a margin ahead).
    # `ended_since - margin` is at most `now - 2 margins`, so one cutoff covers both rules; ZEGO
    # lists nothing begun over 3 days ago, which frees ids after an outage too.
    cutoff = max(ended_since - margin_ms - LIVE_GRACE_MS, now - HORIZON_MS - margin_ms)
    forgotten = frozenset([t for t, at in tracking.finished.items() if at < cutoff]
                          + [t for t, at in tracking.settled.items() if at < cutoff])
    changes = ChangeSet(
        Source.POLL, learned, tuple(events), tracked,
        untracked=frozenset(finished.keys() & tracking.live.keys()),
        finished=finished,
        forgotten=forgotten,
        marks=Marks(ended_since, scope, baseline_ms, room_baselines),
        observed_ms=now,
        awaited=awaited,
    )
    return DiffResult(changes, pending, tracking)


def dedupe(rows: Iterable[RecordingTask]) -> dict[str, RecordingTask]:
    """De-duplicate listing rows by TaskId; a later row (newer read) wins."""
    return {row.task_id: row for row in rows}

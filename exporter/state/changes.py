"""What a poll cycle or a callback changes: the one currency between the event rules and state.

The rules (`exporter.poll.diff`, `exporter.callbacks.reconcile`) are pure functions that read a
`Tracking` and return a `ChangeSet`; `AppState.apply` is the only code that carries one out.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from exporter.zego.models import TaskStatus


class EventKind(enum.Enum):
    STARTED = "started"
    PAUSED = "paused"
    RESUMED = "resumed"
    ENDED = "ended"
    ENDED_ABNORMALLY = "ended_abnormally"
    LOST = "lost"
    # What became of an ended task's files (DescribeRecordStatus, or an upload callback).
    UPLOAD_UPLOADED = "upload_uploaded"  # every file uploaded
    UPLOAD_BACKUP = "upload_backup"  # a file kept in ZEGO's backup storage, none failed
    UPLOAD_FAILED = "upload_failed"  # a file failed to upload
    UPLOAD_NO_FILES = "upload_no_files"  # no file at all: nothing was recorded
    UPLOAD_UNKNOWN = "upload_unknown"  # not settled an hour after the end, or ZEGO forgot it

    @property
    def upload_outcome(self) -> str | None:
        """"uploaded", "failed", ...: the outcome label of an upload event, else None."""
        return self.value.removeprefix("upload_") if self.value.startswith("upload_") else None


UPLOAD_OUTCOMES = tuple(k for k in EventKind if k.upload_outcome is not None)


class Source(enum.Enum):
    """Which event source saw a transition first (the other recognises it)."""

    POLL = "poll"
    CALLBACK = "callback"


@dataclass(frozen=True, slots=True)
class TaskEvent:
    kind: EventKind
    task_id: str
    room_id: str
    source: Source = Source.POLL
    duration_s: float | None = None  # with ENDED: how long the recording lasted
    quit_reason: str | None = None  # with a callback's ENDED_ABNORMALLY: ZEGO's reason label
    at_ms: int | None = None  # when it was learned (AppState.apply stamps the change set's time)


@dataclass(frozen=True, slots=True)
class TrackedTask:
    task_id: str
    room_id: str
    status: TaskStatus
    begin_ms: int  # from a listing; a callback's untracked task: when the callback was sent


@dataclass(frozen=True, slots=True)
class AwaitedUpload:
    """An ended task whose files have not settled yet."""

    room_id: str
    ended_ms: int  # when its end was learned (the exporter's clock)
    checked_ms: int | None = None  # its last look-up


@dataclass(frozen=True, slots=True)
class UploadFailure:
    task_id: str
    room_id: str
    files: int


@dataclass(frozen=True)
class Marks:
    """Where counting stands for an app: the baseline and the ended listing's watermark."""

    ended_since_ms: int | None = None  # next Status=3 read starts here; None: no baseline yet
    rooms: frozenset[str] | None = None  # rooms the baseline covers; None: every room
    # When counting began: the baseline's time, and for rooms added to the config later, theirs.
    # A task first seen later that began before it was missed by the baseline's listing (page
    # drift): it is tracked, its end counts, its start does not.
    baseline_ms: int | None = None
    room_baselines_ms: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Tracking:
    """What the rules remember between observations of one app (a read-only view)."""

    live: Mapping[str, TrackedTask] = field(default_factory=dict)
    # TaskId -> when this exporter learned that the task ended (ms, its own clock): an upper
    # bound of the end, and so of the begin, which is all forgetting it needs.
    finished: Mapping[str, int] = field(default_factory=dict)
    marks: Marks = field(default_factory=Marks)
    awaited: Mapping[str, AwaitedUpload] = field(default_factory=dict)  # files not settled
    settled: Mapping[str, int] = field(default_factory=dict)  # TaskId -> when its files were

    @property
    def has_baseline(self) -> bool:
        return self.marks.ended_since_ms is not None

    def after(self, changes: ChangeSet) -> Tracking:
        """This tracking with `changes` carried out (a copy: for tests and the rules' callers;
        AppState carries them out in place)."""
        live, finished = dict(self.live), dict(self.finished)
        awaited, settled = dict(self.awaited), dict(self.settled)
        changes.carry_out(live, finished, awaited, settled)
        return Tracking(live, finished, changes.marks or self.marks, awaited, settled)


@dataclass(frozen=True)
class CycleOutcome:
    """How one poll cycle went, for `up` and the poll_* metrics."""

    ok: bool
    seconds: float
    error: str | None = None
    finished_s: float | None = None  # the exporter's clock when it finished (a success's time)


@dataclass(frozen=True)
class ChangeSet:
    """Everything one poll cycle or one callback changes, explicitly."""

    source: Source
    learned_ms: int  # when (the exporter's clock) it was learned
    events: tuple[TaskEvent, ...] = ()
    tracked: Mapping[str, TrackedTask] = field(default_factory=dict)  # added or changed
    untracked: frozenset[str] = frozenset()  # live tasks no longer live
    finished: Mapping[str, int] = field(default_factory=dict)  # newly finished ids
    forgotten: frozenset[str] = frozenset()  # finished ids no listing can show again
    marks: Marks | None = None  # a cycle's new baseline and watermark
    observed_ms: int | None = None  # a cycle's: when its listings began
    flipped: frozenset[str] = frozenset()  # a callback's: tasks whose status it changed
    upload_failures: tuple[UploadFailure, ...] = ()
    cycle: CycleOutcome | None = None  # a cycle's outcome (alone, if it failed)
    # Ended tasks whose files are awaited (added, or looked up again), and ones that settled.
    awaited: Mapping[str, AwaitedUpload] = field(default_factory=dict)
    settled: frozenset[str] = frozenset()
    uploads_skipped: int = 0  # upload look-ups due that the budget left for a later cycle

    def carry_out(self, live: dict[str, TrackedTask], finished: dict[str, int],
                  awaited: dict[str, AwaitedUpload], settled: dict[str, int]) -> None:
        """Apply the task changes to the tracking's parts, in place."""
        for task_id in self.untracked:
            live.pop(task_id, None)
        live.update(self.tracked)
        finished.update(self.finished)
        awaited.update(self.awaited)
        for task_id in self.settled:
            awaited.pop(task_id, None)
            settled[task_id] = self.learned_ms
        for task_id in self.forgotten:  # no listing shows it again: nothing more to learn
            finished.pop(task_id, None)
            awaited.pop(task_id, None)
            settled.pop(task_id, None)

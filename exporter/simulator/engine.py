"""The simulated ZEGO cloud's recording tasks: a seeded lifecycle engine and its true ledger."""

from __future__ import annotations

import base64
import bisect
import datetime as dt
import enum
import hashlib
import heapq
import itertools
import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from exporter.clock import Clock
from exporter.zego.errors import Code
from exporter.zego.models import LIVE_STATUSES, FileStatus, TaskStatus

log = logging.getLogger(__name__)

MAX_RECORD_SECONDS = 86_400.0  # StartRecord's MaxRecordTime ceiling: no task records longer
RETENTION_SECONDS = 3 * 86_400.0  # ZEGO answers for tasks that began within the last 3 days
_PRUNE_EVERY_SECONDS = 3_600.0

Op = Literal["start", "stop", "pause", "resume", "abort", "forget"]
OPS: tuple[Op, ...] = ("start", "stop", "pause", "resume", "abort", "forget")

_ALLOWED: dict[TaskStatus | None, frozenset[TaskStatus]] = {
    None: frozenset({TaskStatus.INITIALIZING}),
    TaskStatus.INITIALIZING: frozenset(
        {TaskStatus.RECORDING, TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY}
    ),
    TaskStatus.RECORDING: frozenset(
        {TaskStatus.PAUSED, TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY}
    ),
    TaskStatus.PAUSED: frozenset(
        {TaskStatus.RECORDING, TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY}
    ),
    TaskStatus.ENDED: frozenset(),
    TaskStatus.ENDED_ABNORMALLY: frozenset(),
}


def is_valid_transition(from_status: int | None, to_status: int) -> bool:
    """Whether ZEGO's lifecycle allows `from_status` (None: creation) -> `to_status`."""
    try:
        source = None if from_status is None else TaskStatus(from_status)
        return TaskStatus(to_status) in _ALLOWED[source]
    except ValueError:
        return False


def room_names(count: int) -> list[str]:
    """The rooms `--rooms N` creates: room-1 .. room-N."""
    return [f"room-{i}" for i in range(1, count + 1)]


class SimError(Exception):
    """A control operation ZEGO would refuse, with the return code it would answer."""

    def __init__(self, code: Code, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{int(code)}: {message}")


@dataclass(frozen=True, slots=True)
class LifecycleRates:
    """How busy each room is and how its recordings behave (all times in seconds)."""

    arrivals_per_hour: float = 6.0  # per room, Poisson
    mean_duration_s: float = 1_800.0  # recording time, log-normal
    min_duration_s: float = 10.0
    init_s: tuple[float, float] = (1.0, 5.0)  # time in status 1, uniform
    abnormal_probability: float = 0.05
    pause_probability: float = 0.2  # chance of a (further) pause, up to 3 per task
    mean_pause_s: float = 60.0
    no_stream_probability: float = 0.02  # ended without files (nobody published)
    max_streams: int = 3  # a single-stream task (RecordMode 1) records 1..max_streams streams
    # Per file: the upload to the customer's storage fails; then ZEGO's backup storage takes the
    # file (status 4) with backup_probability, or the upload failed for good (status 5).
    upload_failure_probability: float = 0.05
    backup_probability: float = 0.7
    upload_s: tuple[float, float] = (2.0, 30.0)  # status 2 (uploading) lasts this long, uniform
    slow_upload_probability: float = 0.0  # per file: its upload takes slow_upload_s instead
    slow_upload_s: tuple[float, float] = (120.0, 1_800.0)
    # For soak runs: every status after recording starts lasts at least this long (0: no floor),
    # and no recording lasts longer than max_duration_s (ZEGO's own cap is 24 h).
    min_segment_s: float = 0.0
    max_duration_s: float = 86_400.0

    def __post_init__(self) -> None:
        probabilities = (self.abnormal_probability, self.pause_probability,
                         self.no_stream_probability, self.upload_failure_probability,
                         self.backup_probability, self.slow_upload_probability)
        if any(not 0.0 <= p <= 1.0 for p in probabilities):
            raise ValueError("probabilities must lie in [0, 1]")
        if self.arrivals_per_hour < 0:
            raise ValueError("arrivals_per_hour must be >= 0")
        if self.mean_duration_s <= 0 or self.min_duration_s < 0 or self.mean_pause_s <= 0:
            raise ValueError("durations must be > 0")
        for low, high in (self.init_s, self.upload_s, self.slow_upload_s):
            if not 0 <= low <= high:
                raise ValueError("ranges must be (low, high) with 0 <= low <= high")
        if isinstance(self.max_streams, bool) or not isinstance(self.max_streams, int) \
                or self.max_streams < 1:
            raise ValueError("max_streams must be an integer >= 1")


@dataclass(frozen=True, slots=True)
class Transition:
    """One status change of one task; from_status is None when the task is created."""

    app_id: int
    room_id: str
    task_id: str
    from_status: int | None
    to_status: int
    at: float

    def to_json(self) -> dict[str, Any]:
        return {"app_id": self.app_id, "room_id": self.room_id, "task_id": self.task_id,
                "from_status": self.from_status, "to_status": self.to_status, "at": self.at}


class UploadOutcome(enum.StrEnum):
    """How an ended task's files settled."""

    UPLOADED = "uploaded"  # every file uploaded to the customer's storage (status 3)
    BACKUP = "backup"  # some file only in ZEGO's backup storage (4), none failed
    FAILED = "failed"  # some file failed to upload anywhere (5)
    NO_FILES = "no_files"  # no RecordFiles at all: nobody published (or it never recorded)


def upload_outcome(file_statuses: Iterable[int]) -> UploadOutcome:
    """The outcome of a task whose files settled with these statuses (3, 4 or 5 each)."""
    statuses = set(file_statuses)
    if not statuses:
        return UploadOutcome.NO_FILES
    if FileStatus.UPLOAD_FAILED in statuses:
        return UploadOutcome.FAILED
    if FileStatus.IN_BACKUP_STORAGE in statuses:
        return UploadOutcome.BACKUP
    return UploadOutcome.UPLOADED


@dataclass(frozen=True, slots=True)
class FilesSettled:
    """An ended task's files reached their final statuses (or it has none): its outcome.

    `file_statuses` are the final statuses of its RecordFiles, in their order (empty for
    no_files); `at` is when the last one settled (the end itself for no_files).
    """

    app_id: int
    room_id: str
    task_id: str
    outcome: UploadOutcome
    file_statuses: tuple[int, ...]
    at: float

    @property
    def files_not_uploaded(self) -> int:
        """Files not in the customer's storage (status 4 or 5)."""
        return sum(status != FileStatus.UPLOADED for status in self.file_statuses)

    def to_json(self) -> dict[str, Any]:
        return {"app_id": self.app_id, "room_id": self.room_id, "task_id": self.task_id,
                "outcome": self.outcome.value, "file_statuses": list(self.file_statuses),
                "files_not_uploaded": self.files_not_uploaded, "at": self.at}


@dataclass(slots=True)
class RoomCounts:
    """Ledger totals for one room: what the exporter's counters should add up to.

    uploaded/backup/failed/no_files count ended tasks by how their files settled (a task counts
    once its last file settles); files_not_uploaded counts their files with final status 4 or 5.
    """

    started: int = 0
    ended: int = 0
    ended_abnormally: int = 0
    paused: int = 0
    resumed: int = 0
    uploaded: int = 0
    backup: int = 0
    failed: int = 0
    no_files: int = 0
    files_not_uploaded: int = 0


def summarize(ledger: Iterable[Transition], outcomes: Iterable[FilesSettled] = (),
              ) -> dict[tuple[int, str], RoomCounts]:
    """Per (app_id, room_id): started, ended (3 or 4), ended abnormally (4), paused, resumed,
    and from `outcomes`, tasks per upload outcome and files not uploaded."""
    counts: dict[tuple[int, str], RoomCounts] = {}
    for t in ledger:
        room = counts.setdefault((t.app_id, t.room_id), RoomCounts())
        if t.from_status is None:
            room.started += 1
        elif t.to_status in (TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY):
            room.ended += 1
            room.ended_abnormally += t.to_status == TaskStatus.ENDED_ABNORMALLY
        elif (t.from_status, t.to_status) == (TaskStatus.RECORDING, TaskStatus.PAUSED):
            room.paused += 1
        elif (t.from_status, t.to_status) == (TaskStatus.PAUSED, TaskStatus.RECORDING):
            room.resumed += 1
    for settled in outcomes:
        room = counts.setdefault((settled.app_id, settled.room_id), RoomCounts())
        setattr(room, settled.outcome.value, getattr(room, settled.outcome.value) + 1)
        room.files_not_uploaded += settled.files_not_uploaded
    return counts


@dataclass(frozen=True, slots=True)
class SimFile:
    """One output file of a task; its status follows from the task's state and the time."""

    stream_id: str
    begin_after_s: float  # after the task starts recording
    upload_s: float  # in status 2 (uploading) this long after the task ends
    outcome: FileStatus  # UPLOADED, IN_BACKUP_STORAGE or UPLOAD_FAILED
    slow: bool = False  # a slow upload (upload_s drawn from slow_upload_s)


@dataclass(slots=True)
class SimTask:
    """One recording task and everything DescribeRecordStatus reports about it."""

    app_id: int
    room_id: str
    task_id: str
    begin: float
    record_mode: int
    files: tuple[SimFile, ...]
    status: TaskStatus = TaskStatus.INITIALIZING
    end: float | None = None
    scripted: bool = False  # touched by a control op: its own random pauses and end are off
    forgotten: bool = False
    recording_since: float | None = None
    first_recording: float | None = None
    recorded_s: float = 0.0
    number: int = 0  # creation order: its place in the app's and room's lists

    @property
    def begin_ms(self) -> int:
        return int(self.begin * 1000)

    @property
    def end_ms(self) -> int:
        return 0 if self.end is None else int(self.end * 1000)

    def recorded_seconds(self, now: float) -> float:
        live = 0.0 if self.recording_since is None else max(0.0, now - self.recording_since)
        return self.recorded_s + live

    @property
    def has_files(self) -> bool:
        """Whether DescribeRecordStatus lists RecordFiles for it: it recorded, someone published."""
        return self.first_recording is not None and bool(self.files)

    @property
    def settle_at(self) -> float | None:
        """When its last file settles (its end if it has no files); None while it is live."""
        if self.end is None:
            return None
        if not self.has_files:
            return self.end
        return self.end + max(f.upload_s for f in self.files)

    def outcome(self) -> UploadOutcome:
        """How its files settle (settled or not yet)."""
        return upload_outcome(f.outcome for f in self.files) if self.has_files \
            else UploadOutcome.NO_FILES

    def file_status(self, file: SimFile, now: float) -> FileStatus:
        """1 while the task records, 2 from its end for upload_s, then 3, 4 or 5."""
        if self.end is None:
            return FileStatus.RECORDING
        return FileStatus.UPLOADING if now < self.end + file.upload_s else file.outcome

    def describe(self, now: float) -> dict[str, Any]:
        """DescribeRecordStatus' Data for this task at `now`."""
        data: dict[str, Any] = {
            "RoomId": self.room_id, "RecordMode": self.record_mode, "StreamType": 3,
            "RecordBeginTimestamp": self.begin_ms, "RecordEndTimestamp": self.end_ms,
            "Status": int(self.status),
        }
        if self.has_files:
            data["RecordFiles"] = [self._file_json(f, now) for f in self.files]
        return data

    def _file_json(self, file: SimFile, now: float) -> dict[str, Any]:
        assert self.first_recording is not None
        stop = now if self.end is None else self.end
        begin = min(self.first_recording + file.begin_after_s, stop)
        duration_ms = int(max(0.0, self.recorded_seconds(stop) - file.begin_after_s) * 1000)
        stamp = _utc_stamp(begin)
        file_id = f"{self.task_id}_{self.room_id}_{file.stream_id}_VA_{stamp}.mp4"
        return {
            "UserId": file.stream_id, "UserName": file.stream_id, "StreamId": file.stream_id,
            "FileId": file_id, "FileUrl": f"https://sim.invalid/record/{file_id}",
            "OutputFileFormat": "mp4", "FileSize": duration_ms * 250, "Duration": duration_ms,
            "ResolutionWidth": 1280, "ResolutionHeight": 720, "MediaTrackType": 3,
            "BeginTimestamp": int(begin * 1000), "Status": int(self.file_status(file, now)),
        }


def _utc_stamp(at: float) -> str:
    moment = dt.datetime.fromtimestamp(at, tz=dt.UTC)
    return moment.strftime("%Y%m%d%H%M%S") + f"{moment.microsecond // 1000:03d}"


def task_id_for(key: str) -> str:
    """A ZEGO-looking task id (16 url-safe base64 chars) derived from `key`."""
    digest = hashlib.blake2b(key.encode(), digest_size=12).digest()
    return base64.urlsafe_b64encode(digest).decode()


EventKind = Literal["arrival", "natural", "cap", "script", "settle"]


@dataclass(slots=True)
class _Listing:
    """One listing's tasks, newest first, as of `version` (a length of the engine's `_touched`).

    `order` holds each task's negated creation number, ascending: a task's place in the list."""

    version: int
    order: list[int]
    tasks: list[SimTask]


_LISTINGS_KEPT = 8  # listings paged through at once: the live and ended ones of a few apps
_EDITS_IN_PLACE = 16  # a listing's edits made one by one; more: in one pass of slices


@dataclass(frozen=True, slots=True)
class _Event:
    at: float
    kind: EventKind
    app_id: int
    room_id: str
    task_id: str = ""
    to_status: int = 0
    op: str = ""
    quit_reason: int | None = None


class SimEngine:
    """Rooms whose recording tasks come and go on a seeded schedule, applied by `advance_to(now)`.

    Each room draws its arrivals (a Poisson process) from its own RNG seeded with
    (seed, app, room), and each task draws its whole life (initialisation, duration, pauses, end,
    files) from an RNG seeded with (seed, task id). Transitions fire in time order, so the ledger
    is the same for a seed whatever the pattern of calls to `advance_to`.
    Control ops (start/stop/pause/resume/abort/forget) at a past time apply at the engine's now.
    """

    def __init__(
        self,
        clock: Clock,
        apps: Mapping[int, str],
        seed: int = 0,
        rooms: Sequence[str] | Mapping[int, Sequence[str]] = (),
        rates: LifecycleRates | None = None,
        warmup_s: float = 0.0,
    ) -> None:
        if not apps:
            raise ValueError("at least one app is needed")
        self.clock = clock
        self.apps = dict(apps)
        self.seed = seed
        self.rates = rates or LifecycleRates()
        self.ledger: list[Transition] = []
        self.outcomes: list[FilesSettled] = []  # in time order, like the ledger
        self._outcome_of: dict[str, FilesSettled] = {}
        self.forgotten: set[str] = set()
        self._arrivals_stopped = False
        self.quit_reasons: dict[str, int] = {}  # task id -> quit_reason a scripted abort gave
        self.start_time = clock.time()
        self._now = self.start_time - warmup_s
        self._frozen_at: float | None = None
        self._heap: list[tuple[float, int, _Event]] = []  # (at, seq): tuples compare in C
        self._seq = itertools.count()
        self._tasks: dict[str, SimTask] = {}
        self._by_app: dict[int, list[SimTask]] = {app: [] for app in self.apps}
        self._by_room: dict[tuple[int, str], list[SimTask]] = {}
        self._room_counter: dict[tuple[int, str], int] = {}
        self._room_rng: dict[tuple[int, str], random.Random] = {}
        self._pending_ids: set[str] = set()
        self._scripted_counter = itertools.count(1)
        self._next_prune = self._now + _PRUNE_EVERY_SECONDS
        # list_tasks answers page after page of one listing: each listing is kept (a few at a
        # time) and brought up to date from the tasks touched since (created, moved, forgotten),
        # not filtered afresh per page. At 10,000 rooms a fresh filter took 13 ms of the loop
        # per page, and requests arriving meanwhile were all stamped when it ended: bunched.
        self._touched: list[SimTask] = []
        self._listings: dict[tuple[Any, ...], _Listing] = {}  # oldest used first
        self._numbers = itertools.count(1)
        per_app = rooms if isinstance(rooms, Mapping) else dict.fromkeys(self.apps, rooms)
        self.rooms: dict[int, list[str]] = {app: [] for app in self.apps}
        for app_id, names in per_app.items():
            if app_id not in self.apps:
                raise ValueError(f"rooms given for unknown app {app_id}")
            for room_id in names:
                self._add_room(app_id, room_id, arrivals=True)
        if warmup_s > 0:
            self.advance_to(self.start_time)

    @property
    def now(self) -> float:
        """The time up to which transitions have been applied."""
        return self._now

    # -- the schedule --------------------------------------------------------------------

    def advance_to(self, now: float) -> None:
        """Apply every scheduled transition with time <= now (<= the freeze), in time order."""
        if self._frozen_at is not None:
            now = min(now, self._frozen_at)
        while self._heap and self._heap[0][0] <= now:
            event = heapq.heappop(self._heap)[2]
            self._now = max(self._now, event.at)
            self._fire(event)
        self._now = max(self._now, now)
        if self._now >= self._next_prune:
            self._prune()

    def keep_up(self) -> None:
        """Apply what fell due and bring every kept listing up to date. A server calls this
        every few ms, as ZEGO's state moves without requests: a request then never meets a
        backlog. At 10,000 rooms a listing left a cycle behind took 100 ms to catch up, and
        requests arriving meanwhile were stamped together (a false 300000003)."""
        self.advance_to(self.clock.time())
        for key, listing in self._listings.items():
            self._catch_up(key, listing)

    def _push(self, at: float, kind: EventKind, app_id: int, room_id: str, **kw: Any) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), _Event(at, kind, app_id, room_id, **kw)))

    def _add_room(self, app_id: int, room_id: str, *, arrivals: bool) -> None:
        key = (app_id, room_id)
        if key in self._by_room:
            return
        self.rooms[app_id].append(room_id)
        self._by_room[key] = []
        self._room_counter[key] = 0
        if arrivals and self.rates.arrivals_per_hour > 0:
            rng = random.Random(f"{self.seed}:{app_id}:{room_id}")
            self._room_rng[key] = rng
            self._push(self._now + self._gap(rng), "arrival", app_id, room_id)

    def _gap(self, rng: random.Random) -> float:
        return rng.expovariate(self.rates.arrivals_per_hour / 3600.0)

    def freeze(self) -> None:
        """Apply nothing after the clock's present until `thaw()`, however far the clock moves:
        a harness can then compare what a client read (its backoff and pacing advance a manual
        clock) with the state it read."""
        self.advance_to(self.clock.time())
        self._frozen_at = self._now

    def thaw(self) -> None:
        """Undo `freeze()`: the next advance applies what fell due meanwhile, in time order."""
        self._frozen_at = None

    def stop_arrivals(self) -> None:
        """No new random tasks from now on (scripted starts still work): lets a soak drain."""
        self._arrivals_stopped = True

    def _fire(self, event: _Event) -> None:
        if event.kind == "arrival" and self._arrivals_stopped:
            return
        if event.kind == "arrival":
            rng = self._room_rng[(event.app_id, event.room_id)]
            self._push(event.at + self._gap(rng), "arrival", event.app_id, event.room_id)
            key = (event.app_id, event.room_id)
            self._room_counter[key] += 1
            task_id = self._unique_id(f"{self.seed}:{event.app_id}:{event.room_id}:"
                                      f"{self._room_counter[key]}")
            self._create(event.app_id, event.room_id, task_id, event.at, natural=True)
        elif event.kind == "script":
            self._fire_script(event)
        elif event.kind == "settle":
            self._settle(event)
        else:
            task = self._tasks.get(event.task_id)
            if task is None or task.forgotten:
                return
            if event.kind == "natural" and task.scripted and not (
                task.status == TaskStatus.INITIALIZING and event.to_status == TaskStatus.RECORDING
            ):
                return
            if is_valid_transition(task.status, event.to_status):
                self._apply(task, TaskStatus(event.to_status), event.at)

    def _fire_script(self, event: _Event) -> None:
        try:
            if event.op == "start":
                self._pending_ids.discard(event.task_id)
                self._add_room(event.app_id, event.room_id, arrivals=False)
                self._create(event.app_id, event.room_id, event.task_id, event.at, natural=False)
            else:
                self._control_now(event.op, event.app_id, event.room_id, event.task_id, event.at,
                                  event.quit_reason)
        except SimError as exc:
            log.info("scripted_op_skipped op=%s room_id=%s task_id=%s reason=%r",
                     event.op, event.room_id, event.task_id, exc.message)

    def _unique_id(self, key: str) -> str:
        task_id = task_id_for(key)
        while task_id in self._tasks or task_id in self._pending_ids:
            key += "+"
            task_id = task_id_for(key)
        return task_id

    def _create(self, app_id: int, room_id: str, task_id: str, at: float, *, natural: bool) -> None:
        rates = self.rates
        rng = random.Random(f"{self.seed}:{task_id}")
        init = rng.uniform(*rates.init_s)
        record_mode = 2 if rng.random() < 0.5 else 1
        streams = 1 if record_mode == 2 else rng.randint(1, rates.max_streams)
        files: list[SimFile] = []
        # Slow uploads draw from their own RNG: the task's other draws stay what they were.
        slow_rng = random.Random(f"{self.seed}:{task_id}:slow-uploads")
        if rng.random() >= rates.no_stream_probability:
            for n in range(1, streams + 1):
                outcome = FileStatus.UPLOADED
                if rng.random() < rates.upload_failure_probability:
                    outcome = (FileStatus.IN_BACKUP_STORAGE
                               if rng.random() < rates.backup_probability
                               else FileStatus.UPLOAD_FAILED)
                begin_after = rng.uniform(0.0, 2.0)
                upload = rng.uniform(*rates.upload_s)
                slow = slow_rng.random() < rates.slow_upload_probability
                slow_upload = slow_rng.uniform(*rates.slow_upload_s)
                files.append(SimFile(f"stream-{n}", begin_after,
                                     slow_upload if slow else upload, outcome, slow))
        task = SimTask(app_id, room_id, task_id, at, record_mode, tuple(files),
                       scripted=not natural, number=next(self._numbers))
        self._tasks[task_id] = task
        self._by_app[app_id].append(task)
        self._by_room[(app_id, room_id)].append(task)
        self._record(task, None, TaskStatus.INITIALIZING, at)
        cap = at + MAX_RECORD_SECONDS
        self._push(cap, "cap", app_id, room_id, task_id=task_id,
                   to_status=int(TaskStatus.ENDED_ABNORMALLY))
        if not natural:
            self._push(at + init, "natural", app_id, room_id, task_id=task_id,
                       to_status=int(TaskStatus.RECORDING))
            return
        for when, status in self._natural_plan(rng, at, init):
            self._push(min(when, cap), "natural", app_id, room_id, task_id=task_id,
                       to_status=int(status))

    def _natural_plan(self, rng: random.Random, at: float,
                      init: float) -> list[tuple[float, TaskStatus]]:
        rates = self.rates
        abnormal = rng.random() < rates.abnormal_probability
        end_status = TaskStatus.ENDED_ABNORMALLY if abnormal else TaskStatus.ENDED
        if abnormal and rng.random() < 0.1:  # the service or room login failed: never recorded
            return [(at + rng.uniform(0.0, init), end_status)]
        sigma = 1.0
        mu = math.log(rates.mean_duration_s) - sigma * sigma / 2
        duration = min(rates.max_duration_s,
                       max(rates.min_duration_s, rng.lognormvariate(mu, sigma)))
        recording = at + init
        end = min(recording + duration, at + MAX_RECORD_SECONDS)
        if end == at + MAX_RECORD_SECONDS:
            end_status = TaskStatus.ENDED_ABNORMALLY  # MaxRecordTime reached
        plan: list[tuple[float, TaskStatus]] = [(recording, TaskStatus.RECORDING)]
        pauses = 0
        while pauses < 3 and rng.random() < rates.pause_probability:
            pauses += 1
        points = sorted(rng.uniform(recording, end) for _ in range(pauses))
        for i, point in enumerate(points):
            limit = points[i + 1] if i + 1 < len(points) else end
            resume = point + rng.expovariate(1.0 / rates.mean_pause_s)
            plan.append((point, TaskStatus.PAUSED))
            if resume >= limit:
                break  # still paused when it ends
            plan.append((resume, TaskStatus.RECORDING))
        plan.append((end, end_status))
        if rates.min_segment_s > 0:  # push each change back until the one before it lasted long
            for i in range(1, len(plan)):
                earliest = plan[i - 1][0] + rates.min_segment_s
                plan[i] = (min(max(plan[i][0], earliest), at + MAX_RECORD_SECONDS), plan[i][1])
        return plan

    def _apply(self, task: SimTask, to_status: TaskStatus, at: float) -> None:
        if task.recording_since is not None:
            task.recorded_s += max(0.0, at - task.recording_since)
            task.recording_since = None
        if to_status == TaskStatus.RECORDING:
            task.recording_since = at
            if task.first_recording is None:
                task.first_recording = at
        if to_status not in LIVE_STATUSES:
            task.end = at
        self._record(task, task.status, to_status, at)
        task.status = to_status
        settle_at = task.settle_at
        if settle_at is not None:
            self._push(settle_at, "settle", task.app_id, task.room_id, task_id=task.task_id)

    def _settle(self, event: _Event) -> None:
        """Its files reached their final statuses: the task's outcome goes into `outcomes`."""
        task = self._tasks.get(event.task_id)
        if task is None or task.end is None or event.task_id in self._outcome_of:
            return
        statuses = tuple(int(task.file_status(f, event.at)) for f in task.files) \
            if task.has_files else ()
        settled = FilesSettled(task.app_id, task.room_id, task.task_id,
                               upload_outcome(statuses), statuses, event.at)
        self.outcomes.append(settled)
        self._outcome_of[task.task_id] = settled
        log.debug("files_settled app_id=%s room_id=%s task_id=%s outcome=%s at=%.3f",
                  task.app_id, task.room_id, task.task_id, settled.outcome.value, event.at)

    def _record(self, task: SimTask, from_status: TaskStatus | None, to_status: TaskStatus,
                at: float) -> None:
        self._touched.append(task)
        self.ledger.append(Transition(task.app_id, task.room_id, task.task_id,
                                      None if from_status is None else int(from_status),
                                      int(to_status), at))
        log.debug("transition app_id=%s room_id=%s task_id=%s from=%s to=%s at=%.3f",
                  task.app_id, task.room_id, task.task_id, from_status, int(to_status), at)

    def _prune(self) -> None:
        """Drop tasks ZEGO no longer answers for (begun more than 3 days and an hour ago)."""
        # Only the old head of each list is looked at: a pruning that walked every task stopped
        # a 10,000-room simulator for 80 ms. A task leaves the lists by its begin time; it has
        # ended by then (MAX_RECORD_SECONDS is far shorter than the 3 days kept).
        cutoff = self._now - RETENTION_SECONDS - 3_600.0
        for tasks in self._by_app.values():
            index = bisect.bisect_left(tasks, cutoff, key=lambda t: t.begin)
            for task in tasks[:index]:
                if task.end is not None or task.forgotten:
                    del self._tasks[task.task_id]
                    self.quit_reasons.pop(task.task_id, None)
                    self._outcome_of.pop(task.task_id, None)
            del tasks[:index]
        for tasks in self._by_room.values():
            if tasks and tasks[0].begin < cutoff:
                del tasks[:bisect.bisect_left(tasks, cutoff, key=lambda t: t.begin)]
        self._touched.clear()  # and the kept listings, which count from it
        self._listings.clear()
        self._next_prune = self._now + _PRUNE_EVERY_SECONDS

    # -- queries -------------------------------------------------------------------------

    def task(self, app_id: int, task_id: str, now: float) -> SimTask | None:
        """The task as DescribeRecordStatus sees it: None if unknown, forgotten or too old."""
        self.advance_to(self.clock.time())
        task = self._tasks.get(task_id)
        if task is None or task.app_id != app_id or task.forgotten:
            return None
        if task.begin < now - RETENTION_SECONDS:
            return None
        return task

    def list_tasks(self, app_id: int, room_id: str | None, begin_from_ms: int, begin_to_ms: int,
                   statuses: frozenset[TaskStatus]) -> list[SimTask]:
        """Tasks of an app (or one room) begun within [begin_from_ms, begin_to_ms], newest first."""
        return list(self._listing(app_id, room_id, begin_from_ms, begin_to_ms, statuses))

    def list_page(self, app_id: int, room_id: str | None, begin_from_ms: int, begin_to_ms: int,
                  statuses: frozenset[TaskStatus], offset: int, size: int
                  ) -> tuple[int, list[SimTask]]:
        """list_tasks' length and its tasks [offset, offset + size), without copying the rest."""
        tasks = self._listing(app_id, room_id, begin_from_ms, begin_to_ms, statuses)
        return len(tasks), tasks[offset:offset + size]

    def _listing(self, app_id: int, room_id: str | None, begin_from_ms: int, begin_to_ms: int,
                 statuses: frozenset[TaskStatus]) -> list[SimTask]:
        self.advance_to(self.clock.time())
        key = (app_id, room_id, begin_from_ms, begin_to_ms, statuses)
        listing = self._listings.pop(key, None)
        if listing is None:
            listing = self._derived(key)
        if listing is None:
            tasks = self.scan_tasks(app_id, room_id, begin_from_ms, begin_to_ms, statuses)
            listing = _Listing(len(self._touched), [-t.number for t in tasks], tasks)
        self._catch_up(key, listing)
        self._listings[key] = listing
        if len(self._listings) > _LISTINGS_KEPT:
            del self._listings[next(iter(self._listings))]
        return listing.tasks

    def _catch_up(self, key: tuple[Any, ...], listing: _Listing) -> None:
        """Bring a kept listing up to date: the tasks touched since, in or out."""
        app_id, room_id, begin_from_ms, begin_to_ms, statuses = key

        def wanted(task: SimTask) -> bool:
            return (task.app_id == app_id and room_id in (None, task.room_id)
                    and begin_from_ms <= task.begin_ms <= begin_to_ms
                    and task.status in statuses and not task.forgotten)

        touched = {t.number: t for t in self._touched[listing.version:]}.values()
        listing.version = len(self._touched)
        order, tasks = listing.order, listing.tasks
        edits: list[tuple[int, int, int, SimTask]] = []  # (place, 1 to drop the task there
        # or 0 to insert before it, the new task's place in `order`, the task)
        for task in touched:
            place = bisect.bisect_left(order, -task.number)
            there = place < len(order) and order[place] == -task.number
            if wanted(task) != there:
                edits.append((place, int(there), -task.number, task))
        edits.sort(key=lambda e: e[:3])
        if len(edits) <= _EDITS_IN_PLACE:  # from the last, so that each place still holds
            for place, drop, negated, task in reversed(edits):
                if drop:
                    del order[place], tasks[place]
                else:
                    order.insert(place, negated)
                    tasks.insert(place, task)
            return
        # Many: one pass of slices. Each edit in place moves the rest of the list, and sorting
        # the list again stopped a 10,000-room simulator for 60 ms.
        new_order: list[int] = []
        new_tasks: list[SimTask] = []
        done = 0
        for place, drop, negated, task in edits:
            new_order += order[done:place]
            new_tasks += tasks[done:place]
            done = place
            if drop:
                done = place + 1
            else:
                new_order.append(negated)
                new_tasks.append(task)
        new_order += order[done:]
        new_tasks += tasks[done:]
        listing.order, listing.tasks = new_order, new_tasks

    def _derived(self, key: tuple[Any, ...]) -> _Listing | None:
        """A new listing from a kept one of the same scope and statuses whose window holds the
        new one's start (the next cycle's listing): its tasks still in the window, and a scan of
        only the newer part. A fresh scan of a 10,000-room app stopped the loop for 60 ms."""
        app_id, room_id, begin_from_ms, begin_to_ms, statuses = key
        base_key = next((k for k in reversed(self._listings) if k[:2] == key[:2]
                         and k[4] == statuses and k[2] <= begin_from_ms <= k[3]), None)
        if base_key is None:
            return None
        base = self._listings[base_key]
        self._catch_up(base_key, base)
        newest_first = (lambda t: -t.begin_ms)  # noqa: E731
        low = bisect.bisect_left(base.tasks, -begin_to_ms, key=newest_first)
        high = bisect.bisect_right(base.tasks, -begin_from_ms, key=newest_first)
        newer = self.scan_tasks(app_id, room_id, base_key[3] + 1, begin_to_ms, statuses)
        return _Listing(len(self._touched), [-t.number for t in newer] + base.order[low:high],
                        newer + base.tasks[low:high])

    def scan_tasks(self, app_id: int, room_id: str | None, begin_from_ms: int, begin_to_ms: int,
                   statuses: frozenset[TaskStatus]) -> list[SimTask]:
        """list_tasks the slow way, from every task in the window (what a kept listing holds)."""
        pool = self._by_app.get(app_id, []) if room_id is None else self._by_room.get(
            (app_id, room_id), [])
        low = bisect.bisect_left(pool, begin_from_ms, key=lambda t: t.begin_ms)
        high = bisect.bisect_right(pool, begin_to_ms, key=lambda t: t.begin_ms)
        return [t for t in reversed(pool[low:high]) if t.status in statuses and not t.forgotten]

    def live_tasks(self) -> list[SimTask]:
        """Every task that is live now (status 1, 2 or 5), oldest first."""
        self.advance_to(self.clock.time())
        return [t for t in self._tasks.values() if t.status in LIVE_STATUSES and not t.forgotten]

    def find(self, task_id: str) -> SimTask | None:
        """The task with this id as the engine holds it (forgotten too), without advancing."""
        return self._tasks.get(task_id)

    def ledger_since(self, since: float | None = None) -> list[Transition]:
        self.advance_to(self.clock.time())
        if since is None:
            return list(self.ledger)
        return self.ledger[bisect.bisect_left(self.ledger, since, key=lambda t: t.at):]

    def outcomes_since(self, since: float | None = None) -> list[FilesSettled]:
        """Tasks whose files settled (at or after `since`), in time order."""
        self.advance_to(self.clock.time())
        if since is None:
            return list(self.outcomes)
        return self.outcomes[bisect.bisect_left(self.outcomes, since, key=lambda o: o.at):]

    def outcome(self, task_id: str) -> FilesSettled | None:
        """How the task's files settled; None while it is live or its files are uploading
        (or it is unknown, or pruned)."""
        self.advance_to(self.clock.time())
        return self._outcome_of.get(task_id)

    def summary(self) -> dict[tuple[int, str], RoomCounts]:
        """Per room: the ledger's transitions and the upload outcomes, counted."""
        self.advance_to(self.clock.time())
        return summarize(self.ledger, self.outcomes)

    # -- control -------------------------------------------------------------------------

    def start(self, app_id: int, room_id: str, at: float | None = None) -> str:
        """Start a task in a room (now or at `at`); it records until stopped or for 24 h."""
        return self.control("start", app_id=app_id, room_id=room_id, at=at)

    def stop(self, task_id: str, at: float | None = None) -> str:
        return self.control("stop", task_id=task_id, at=at)

    def pause(self, task_id: str, at: float | None = None) -> str:
        return self.control("pause", task_id=task_id, at=at)

    def resume(self, task_id: str, at: float | None = None) -> str:
        return self.control("resume", task_id=task_id, at=at)

    def abort(self, task_id: str, at: float | None = None, quit_reason: int | None = None) -> str:
        """End a task abnormally (status 4); `quit_reason` is what its callback will report."""
        return self.control("abort", task_id=task_id, at=at, quit_reason=quit_reason)

    def forget(self, task_id: str, at: float | None = None) -> str:
        """Make a task unreachable: no longer listed, DescribeRecordStatus answers 300001000."""
        return self.control("forget", task_id=task_id, at=at)

    def control(self, op: str, *, app_id: int | None = None, room_id: str | None = None,
                task_id: str | None = None, at: float | None = None,
                quit_reason: int | None = None) -> str:
        """Apply a control op now, or schedule it if `at` is later; returns the task id.

        Ops other than start name a task, or a room (app_id + room_id): then the newest live task
        there that the op applies to, chosen when the op fires. An abort may give the
        `quit_reason` its recording callback reports.
        """
        if op not in OPS:
            raise SimError(Code.INVALID_PARAMETER, f"unknown op {op!r}")
        if quit_reason is not None and (op != "abort" or quit_reason <= 0):
            raise SimError(Code.INVALID_PARAMETER, "quit_reason is a positive integer, abort only")
        self.advance_to(self.clock.time())
        when = self._now if at is None else max(at, self._now)
        if op == "start":
            if app_id not in self.apps or not room_id:
                raise SimError(Code.INVALID_PARAMETER, "start needs a known app_id and a room_id")
            task_id = self._unique_id(f"{self.seed}:{app_id}:{room_id}:scripted:"
                                      f"{next(self._scripted_counter)}")
            if when > self._now:
                self._pending_ids.add(task_id)
                self._push(when, "script", app_id, room_id, task_id=task_id, op=op)
            else:
                self._add_room(app_id, room_id, arrivals=False)
                self._create(app_id, room_id, task_id, when, natural=False)
            return task_id
        if task_id:
            task = self._tasks.get(task_id)
            if task is None and task_id not in self._pending_ids:
                raise SimError(Code.TASK_NOT_FOUND, f"task {task_id} does not exist")
            if task is not None:
                app_id, room_id = task.app_id, task.room_id
        elif app_id is None or not room_id:
            raise SimError(Code.INVALID_PARAMETER, f"{op} needs a task_id or an app_id and room_id")
        if when > self._now:
            self._push(when, "script", app_id or 0, room_id or "", task_id=task_id or "", op=op,
                       quit_reason=quit_reason)
            return task_id or ""
        return self._control_now(op, app_id or 0, room_id or "", task_id or "", when, quit_reason)

    def _control_now(self, op: str, app_id: int, room_id: str, task_id: str, at: float,
                     quit_reason: int | None = None) -> str:
        task = self._tasks.get(task_id) if task_id else self._newest(app_id, room_id, op)
        if task is None or task.forgotten:
            raise SimError(Code.TASK_NOT_FOUND, f"task {task_id or 'in ' + room_id} does not exist")
        if op == "forget":
            task.forgotten = True
            self._touched.append(task)
            self.forgotten.add(task.task_id)
            return task.task_id
        if task.status not in LIVE_STATUSES:
            raise SimError(Code.TASK_ALREADY_ENDED, f"task {task.task_id} already ended")
        target = {"stop": TaskStatus.ENDED, "abort": TaskStatus.ENDED_ABNORMALLY,
                  "pause": TaskStatus.PAUSED, "resume": TaskStatus.RECORDING}[op]
        if op == "pause" and task.status != TaskStatus.RECORDING:
            raise SimError(Code.INVALID_PARAMETER, f"task {task.task_id} is not recording")
        if op == "resume" and task.status != TaskStatus.PAUSED:
            raise SimError(Code.INVALID_PARAMETER, f"task {task.task_id} is not paused")
        task.scripted = True
        if quit_reason is not None:
            self.quit_reasons[task.task_id] = quit_reason
        self._apply(task, target, at)
        return task.task_id

    def _newest(self, app_id: int, room_id: str, op: str) -> SimTask | None:
        wanted = {"pause": {TaskStatus.RECORDING}, "resume": {TaskStatus.PAUSED}}.get(
            op, set(LIVE_STATUSES))
        for task in reversed(self._by_room.get((app_id, room_id), [])):
            if task.status in wanted and not task.forgotten:
                return task
        return None

"""Typed results of the ZEGO Cloud Recording API, parsed strictly from its JSON."""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass
from typing import Any

from exporter.text import text_problem
from exporter.zego.limits import MAX_ROOM_ID_BYTES, MAX_TASK_ID_BYTES


class TaskStatus(enum.IntEnum):
    INITIALIZING = 1
    RECORDING = 2
    ENDED = 3
    ENDED_ABNORMALLY = 4
    PAUSED = 5

    @property
    def live(self) -> bool:
        return self in LIVE_STATUSES

    @property
    def label(self) -> str:
        return self.name.lower()


LIVE_STATUSES = frozenset({TaskStatus.INITIALIZING, TaskStatus.RECORDING, TaskStatus.PAUSED})


class FileStatus(enum.IntEnum):
    RECORDING = 1
    UPLOADING = 2
    UPLOADED = 3
    IN_BACKUP_STORAGE = 4
    UPLOAD_FAILED = 5


@dataclass(frozen=True, slots=True)
class RecordingTask:
    """One row of DescribeTasks."""

    task_id: str
    room_id: str
    status: TaskStatus
    begin_ms: int


@dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of DescribeTasks."""

    page: int
    page_size: int
    total_count: int
    tasks: tuple[RecordingTask, ...]


@dataclass(frozen=True, slots=True)
class RecordFile:
    file_id: str
    stream_id: str
    status: int


@dataclass(frozen=True, slots=True)
class RecordStatus:
    """DescribeRecordStatus: the authoritative state of one task."""

    task_id: str
    room_id: str
    status: TaskStatus
    begin_ms: int
    end_ms: int | None
    files: tuple[RecordFile, ...]


class ShapeError(ValueError):
    """A JSON value that is not the shape ZEGO documents."""


# JSON's exact integer range. ZEGO's integers (codes, counts, ms timestamps) sit far inside it;
# a bigger one is garbage, and one past ~1e308 would overflow the float arithmetic downstream.
MAX_SAFE_INT = 2**53 - 1


def _int(obj: dict[str, Any], key: str, *, required: bool = True, default: int = 0) -> int:
    value = obj.get(key)
    if value is None:
        if required:
            raise ShapeError(f"missing {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{key} is {type(value).__name__}, not an integer")
    if abs(value) > MAX_SAFE_INT:
        raise ShapeError(f"{key} is out of range")
    return value


def _timestamp(obj: dict[str, Any], key: str, *, required: bool = True) -> int:
    value = _int(obj, key, required=required)
    if value < 0:
        raise ShapeError(f"negative {key}")
    return value


def _str(obj: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ShapeError(f"missing {key}")
        return ""
    if not isinstance(value, str):
        raise ShapeError(f"{key} is {type(value).__name__}, not a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: it would break /metrics and the logs
        raise ShapeError(f"{key} is not valid Unicode text") from None
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ShapeError(f"{what} is {type(value).__name__}, not an object")
    return value


def _status(obj: dict[str, Any], key: str = "Status") -> TaskStatus:
    raw = _int(obj, key)
    try:
        return TaskStatus(raw)
    except ValueError:
        raise ShapeError(f"unknown {key} {raw}") from None


def _id(obj: dict[str, Any], key: str, max_bytes: int) -> str:
    """An id that becomes a label, a log field or a stored key: clean, bounded text."""
    if key not in obj:
        raise ShapeError(f"missing {key}")
    problem = text_problem(obj[key], max_bytes)
    if problem is not None:
        raise ShapeError(f"{key} {problem}")
    return str(obj[key])


def parse_task(item: Any) -> RecordingTask:
    obj = _object(item, "task")
    return RecordingTask(
        task_id=_id(obj, "TaskId", MAX_TASK_ID_BYTES),
        room_id=sys.intern(_id(obj, "RoomId", MAX_ROOM_ID_BYTES)),  # one string per room
        status=_status(obj),
        begin_ms=_timestamp(obj, "RecordBeginTimestamp"),
    )


def parse_task_page(data: Any) -> TaskPage:
    """DescribeTasks' Data. The list is `TaskidList` or `TaskList` (ZEGO's docs use both)."""
    obj = _object(data, "Data")
    keys = [k for k in ("TaskidList", "TaskList") if obj.get(k) is not None]
    if len(keys) == 2 and obj["TaskidList"] != obj["TaskList"]:
        raise ShapeError("both TaskidList and TaskList, with different contents")
    items = obj[keys[0]] if keys else []
    if not isinstance(items, list):
        raise ShapeError(f"{keys[0]} is {type(items).__name__}, not a list")
    total = _int(obj, "TotalCount", required=False, default=len(items))
    if total < 0:
        raise ShapeError(f"negative TotalCount {total}")
    tasks = tuple(parse_task(item) for item in items)
    by_id: dict[str, RecordingTask] = {}
    for task in tasks:
        # Drift repeats a row across pages, never within one: two different rows for one TaskId
        # in a page (say recording and ended abnormally) are a contradiction, not an answer.
        if by_id.setdefault(task.task_id, task) != task:
            raise ShapeError(f"TaskId {task.task_id!r} twice in one page, differently")
    return TaskPage(
        page=_int(obj, "PageOffset", required=False, default=1),
        page_size=_int(obj, "PageSize", required=False, default=50),
        total_count=total,
        tasks=tasks,
    )


def parse_record_status(task_id: str, data: Any) -> RecordStatus:
    obj = _object(data, "Data")
    files_raw = obj.get("RecordFiles")
    files_raw = [] if files_raw is None else files_raw
    if not isinstance(files_raw, list):
        raise ShapeError("RecordFiles is not a list")
    files = []
    for raw in files_raw:
        f = _object(raw, "RecordFiles item")
        files.append(RecordFile(file_id=_str(f, "FileId", required=False),
                                stream_id=_str(f, "StreamId", required=False),
                                status=_int(f, "Status", required=False)))
    end = _timestamp(obj, "RecordEndTimestamp", required=False)
    return RecordStatus(
        task_id=task_id,
        room_id=_id(obj, "RoomId", MAX_ROOM_ID_BYTES) if obj.get("RoomId") else "",
        status=_status(obj),
        begin_ms=_timestamp(obj, "RecordBeginTimestamp", required=False),
        end_ms=end or None,
        files=tuple(files),
    )

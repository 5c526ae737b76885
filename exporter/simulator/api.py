"""The simulated Cloud Recording actions: request bodies checked and answered as ZEGO documents."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from exporter.simulator.engine import RETENTION_SECONDS, SimEngine, SimError
from exporter.zego.errors import Code
from exporter.zego.models import TaskStatus

ListKey = Literal["TaskidList", "TaskList"]
StatusSemantics = Literal["inclusive", "strict"]
LIST_KEYS: tuple[ListKey, ...] = ("TaskidList", "TaskList")
STATUS_SEMANTICS: tuple[StatusSemantics, ...] = ("inclusive", "strict")

# Which task statuses a DescribeTasks `Status` returns; ZEGO's docs do not say, so both readings.
STATUS_FILTER: dict[tuple[StatusSemantics, int], frozenset[TaskStatus]] = {
    ("inclusive", 2): frozenset(
        {TaskStatus.INITIALIZING, TaskStatus.RECORDING, TaskStatus.PAUSED}
    ),
    ("inclusive", 3): frozenset({TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY}),
    ("strict", 2): frozenset({TaskStatus.RECORDING}),
    ("strict", 3): frozenset({TaskStatus.ENDED}),
}
MAX_PAGE_SIZE = 50
WINDOW_MS = int(RETENTION_SECONDS * 1000)


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an action needs besides its body: the engine, the server's now, the doc variants."""

    engine: SimEngine
    now: float
    list_key: ListKey = "TaskidList"
    status_semantics: StatusSemantics = "inclusive"


Body = dict[str, Any]
Action = Callable[[ActionContext, int, Body], Body]


def _invalid(message: str) -> SimError:
    return SimError(Code.INVALID_PARAMETER, message)


def _optional_int(body: Body, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"{key} must be an integer")
    return value


def _required_int(body: Body, key: str) -> int:
    value = _optional_int(body, key)
    if value is None:
        raise _invalid(f"{key} is required")
    return value


def _required_str(body: Body, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise _invalid(f"{key} is required and must be a non-empty string")
    return value


def describe_tasks(ctx: ActionContext, app_id: int, body: Body) -> Body:
    """Tasks of the app (or one room) begun within [StartTime, EndTime], newest first, one page."""
    status = _required_int(body, "Status")
    if status not in (2, 3):
        raise _invalid("Status must be 2 (recording) or 3 (ended)")
    room_id = body.get("RoomId")
    if room_id is not None and not isinstance(room_id, str):
        raise _invalid("RoomId must be a string")
    page = _optional_int(body, "PageOffset") or 1
    if page < 1:
        raise _invalid("PageOffset must be >= 1 (0 or omitted means 1)")
    size = _optional_int(body, "PageSize")
    size = MAX_PAGE_SIZE if size is None else size
    if not 0 < size <= MAX_PAGE_SIZE:
        raise _invalid(f"PageSize must be > 0 and <= {MAX_PAGE_SIZE}")
    start = _required_int(body, "StartTime")
    end = _required_int(body, "EndTime")
    now_ms = int(ctx.now * 1000)
    if start < now_ms - WINDOW_MS:
        raise _invalid("StartTime must not be earlier than 3 days before now")
    if end <= start:
        raise _invalid("EndTime must be greater than StartTime")
    if end - start > WINDOW_MS:
        raise _invalid("EndTime - StartTime must not exceed 3 days")
    statuses = STATUS_FILTER[(ctx.status_semantics, status)]
    total, tasks = ctx.engine.list_page(app_id, room_id or None, start, end, statuses,
                                        (page - 1) * size, size)
    rows = [{"RecordBeginTimestamp": t.begin_ms, "TaskId": t.task_id, "RoomId": t.room_id,
             "Status": int(t.status)} for t in tasks]
    return {"PageOffset": page, "PageSize": size, "TotalCount": total, ctx.list_key: rows}


def describe_record_status(ctx: ActionContext, app_id: int, body: Body) -> Body:
    """The authoritative state of one task begun within the last 3 days."""
    task_id = _required_str(body, "TaskId")
    task = ctx.engine.task(app_id, task_id, ctx.now)
    if task is None:
        raise SimError(Code.TASK_NOT_FOUND, f"task {task_id} does not exist")
    return task.describe(ctx.engine.clock.time())


def start_record(ctx: ActionContext, app_id: int, body: Body) -> Body:
    room_id = _required_str(body, "RoomId")
    return {"TaskId": ctx.engine.start(app_id, room_id)}


def _task_op(op: str) -> Action:
    def act(ctx: ActionContext, app_id: int, body: Body) -> Body:
        task_id = _required_str(body, "TaskId")
        if ctx.engine.task(app_id, task_id, ctx.now) is None:
            raise SimError(Code.TASK_NOT_FOUND, f"task {task_id} does not exist")
        ctx.engine.control(op, task_id=task_id)
        return {}

    act.__doc__ = f"{op.capitalize()} one task of the app (body: TaskId)."
    return act


ACTIONS: dict[str, Action] = {
    "DescribeTasks": describe_tasks,
    "DescribeRecordStatus": describe_record_status,
    "StartRecord": start_record,
    "StopRecord": _task_op("stop"),
    "PauseRecord": _task_op("pause"),
    "ResumeRecord": _task_op("resume"),
}

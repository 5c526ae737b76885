"""DescribeTasks and DescribeRecordStatus bodies are parsed strictly, with both list keys."""

from __future__ import annotations

from typing import Any

import pytest

from exporter.zego.models import ShapeError, TaskStatus, parse_record_status, parse_task_page

ROW = {"RecordBeginTimestamp": 1628565227899, "TaskId": "YRHu6-E4IyvEAAAD", "RoomId": "1000",
       "Status": 2}


@pytest.mark.parametrize("key", ["TaskidList", "TaskList"])
def test_task_list_is_read_under_either_key(key: str) -> None:
    page = parse_task_page({"PageOffset": 1, "PageSize": 50, "TotalCount": 1, key: [ROW]})
    assert [t.task_id for t in page.tasks] == ["YRHu6-E4IyvEAAAD"]
    assert page.tasks[0].status is TaskStatus.RECORDING
    assert page.tasks[0].begin_ms == 1628565227899


def test_missing_task_list_is_an_empty_page() -> None:
    page = parse_task_page({"PageOffset": 1, "PageSize": 50, "TotalCount": 0})
    assert page.tasks == ()
    assert page.total_count == 0


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (None, "Data is NoneType"),
        ({"TaskidList": {"a": 1}}, "not a list"),
        ({"TaskidList": [{**ROW, "Status": "2"}]}, "Status is str"),
        ({"TaskidList": [{**ROW, "Status": 9}]}, "unknown Status 9"),
        ({"TaskidList": [{**ROW, "Status": True}]}, "Status is bool"),
        ({"TaskidList": [{k: v for k, v in ROW.items() if k != "TaskId"}]}, "missing TaskId"),
        ({"TaskidList": [{**ROW, "TaskId": ""}]}, "empty TaskId"),
        ({"TaskidList": [{**ROW, "RoomId": 1000}]}, "RoomId is int"),
        ({"TaskidList": [ROW], "TotalCount": -1}, "negative TotalCount"),
        ({"TaskidList": [ROW], "TaskList": []}, "both TaskidList and TaskList"),
        ({"TaskidList": ["x"]}, "task is str"),
    ],
)
def test_malformed_pages_are_refused_with_the_reason(data: Any, problem: str) -> None:
    with pytest.raises(ShapeError, match=problem):
        parse_task_page(data)


def test_record_status_reads_end_time_and_file_statuses() -> None:
    status = parse_record_status(
        "t1",
        {"RoomId": "r", "RecordBeginTimestamp": 1, "RecordEndTimestamp": 5, "Status": 4,
         "RecordFiles": [{"FileId": "f", "StreamId": "s", "Status": 5}]},
    )
    assert status.status is TaskStatus.ENDED_ABNORMALLY
    assert status.end_ms == 5
    assert [f.status for f in status.files] == [5]


def test_record_status_of_a_live_task_has_no_end_time() -> None:
    status = parse_record_status("t1", {"RoomId": "r", "RecordEndTimestamp": 0, "Status": 2})
    assert status.end_ms is None
    assert status.files == ()

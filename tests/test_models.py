"""DescribeTasks and DescribeRecordStatus bodies are parsed strictly, with both list keys."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.text import text_problem
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
        ({"TaskidList": [{**ROW, "TaskId": ""}]}, "TaskId is empty"),
        ({"TaskidList": [{**ROW, "RoomId": 1000}]}, "RoomId is int"),
        ({"TaskidList": [{**ROW, "RoomId": ""}]}, "RoomId is empty"),
        ({"TaskidList": [{**ROW, "RoomId": "a\nroom_id=forged"}]}, "RoomId contains control"),
        ({"TaskidList": [{**ROW, "TaskId": "\ud800"}]}, "TaskId contains control"),
        ({"TaskidList": [{**ROW, "RoomId": "r" * 129}]}, "RoomId is longer than 128"),
        ({"TaskidList": [{**ROW, "TaskId": "t" * 257}]}, "TaskId is longer than 256"),
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


scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(),
                    st.sampled_from(["\ud800", "a\x1b", "", "r" * 200]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=15)
rows = st.fixed_dictionaries({}, optional={
    "TaskId": st.one_of(st.sampled_from(["t1", "t2"]), json_values),
    "RoomId": st.one_of(st.sampled_from(["r1", "r2"]), json_values),
    "Status": st.one_of(st.integers(0, 6), json_values),
    "RecordBeginTimestamp": st.one_of(st.integers(-1, 2**60), json_values)})
pages = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "TaskidList": st.one_of(st.lists(rows, max_size=4), json_values),
    "TaskList": st.one_of(st.lists(rows, max_size=4), json_values),
    "TotalCount": st.one_of(st.integers(-1, 10**20), json_values),
    "PageOffset": json_values, "PageSize": json_values}))


@settings(max_examples=400, deadline=None)
@given(pages)
def test_any_page_is_a_clean_refusal_or_clean_rows(data: Any) -> None:
    try:
        page = parse_task_page(data)
    except ShapeError:
        return
    for task in page.tasks:
        assert text_problem(task.task_id, 256) is None
        assert text_problem(task.room_id, 128) is None
        assert task.status in set(TaskStatus)
        assert 0 <= task.begin_ms <= 2**53


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "RoomId": json_values, "Status": st.one_of(st.integers(0, 6), json_values),
    "RecordBeginTimestamp": json_values, "RecordEndTimestamp": json_values,
    "RecordFiles": st.one_of(st.lists(st.dictionaries(
        st.sampled_from(["FileId", "StreamId", "Status"]), json_values), max_size=3),
        json_values)})))
def test_any_record_status_is_a_clean_refusal_or_a_clean_status(data: Any) -> None:
    try:
        status = parse_record_status("t1", data)
    except ShapeError:
        return
    assert status.room_id == "" or text_problem(status.room_id, 128) is None
    assert status.status in set(TaskStatus)

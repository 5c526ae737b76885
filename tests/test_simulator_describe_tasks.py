"""DescribeTasks as the simulator plays it: input rules, window, order, pages, doc variants."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from exporter.clock import ManualClock
from exporter.simulator.caller import SimCaller
from exporter.simulator.engine import LifecycleRates, SimEngine
from exporter.simulator.server import ServerOptions, SimulatorServer
from exporter.zego.errors import Code
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START

DAY_MS = 86_400_000



@pytest.fixture
def engine(clock: ManualClock) -> SimEngine:
    return SimEngine(clock, {APP: SECRET, 42: "other"}, seed=1, rooms=["room-1", "room-2"],
                     rates=LifecycleRates(arrivals_per_hour=0))


@pytest.fixture
def tasks(engine: SimEngine, clock: ManualClock) -> dict[str, str]:
    """a ended (room-1), b ended abnormally (room-2), c recording (room-1), d paused (room-2),
    e initialising (room-1): begun a minute apart from START, in that order."""
    ids = {}
    for name, room in (("a", "room-1"), ("b", "room-2"), ("c", "room-1"), ("d", "room-2")):
        ids[name] = engine.start(APP, room)
        clock.advance(60)
    engine.stop(ids["a"])
    engine.abort(ids["b"])
    engine.pause(ids["d"])
    ids["e"] = engine.start(APP, "room-1")
    engine.start(42, "room-1")  # another app's task is never listed
    return ids


@contextlib.asynccontextmanager
async def serving(engine: SimEngine, clock: ManualClock,
                  **options: Any) -> AsyncIterator[SimCaller]:
    async with SimulatorServer(engine, ServerOptions(rate_limits={}, **options)) as sim, \
            aiohttp.ClientSession() as session:
        yield SimCaller(session, sim.url, APP, SECRET, clock)


@pytest.fixture
async def caller(engine: SimEngine, clock: ManualClock) -> AsyncIterator[SimCaller]:
    async with serving(engine, clock) as caller:
        yield caller


def window(clock: ManualClock, **body: Any) -> dict[str, Any]:
    now_ms = int(clock.time() * 1000)
    return {"Status": 2, "StartTime": now_ms - DAY_MS, "EndTime": now_ms, **body}


def ids_of(answer: dict[str, Any], key: str = "TaskidList") -> list[str]:
    assert answer["Code"] == 0, answer
    return [row["TaskId"] for row in answer["Data"][key]]


def inverse(tasks: dict[str, str]) -> dict[str, str]:
    return {task_id: name for name, task_id in tasks.items()}


@pytest.mark.parametrize(("change", "rule"), [
    ({"Status": None}, "Status"),
    ({"Status": 1}, "Status"),
    ({"Status": 4}, "Status"),
    ({"Status": "2"}, "Status"),
    ({"PageSize": 0}, "PageSize"),
    ({"PageSize": 51}, "PageSize"),
    ({"PageOffset": -1}, "PageOffset"),
    ({"StartTime": None}, "StartTime"),
    ({"EndTime": None}, "EndTime"),
    ({"StartTime": "yesterday"}, "StartTime"),
    ({"EndTime": 1.5}, "EndTime"),
    ({"RoomId": 7}, "RoomId"),
])
async def test_each_malformed_field_is_an_invalid_parameter_naming_it(
        caller: SimCaller, clock: ManualClock, change: dict[str, Any], rule: str) -> None:
    body = {k: v for k, v in {**window(clock), **change}.items() if v is not None}
    answer = await caller.call("DescribeTasks", body)
    assert answer["Code"] == Code.INVALID_PARAMETER
    assert rule in answer["Message"]


async def test_a_start_earlier_than_three_days_ago_is_refused(
        caller: SimCaller, clock: ManualClock) -> None:
    now_ms = int(clock.time() * 1000)
    answer = await caller.call("DescribeTasks", window(clock, StartTime=now_ms - 3 * DAY_MS - 1,
                                                       EndTime=now_ms))
    assert answer["Code"] == Code.INVALID_PARAMETER
    assert "3 days" in answer["Message"]


async def test_a_start_exactly_three_days_ago_is_accepted(
        caller: SimCaller, clock: ManualClock) -> None:
    now_ms = int(clock.time() * 1000)
    answer = await caller.call("DescribeTasks", window(clock, StartTime=now_ms - 3 * DAY_MS,
                                                       EndTime=now_ms))
    assert answer["Code"] == 0


@pytest.mark.parametrize("end_offset", [0, -1])
async def test_an_end_not_after_the_start_is_refused(
        caller: SimCaller, clock: ManualClock, end_offset: int) -> None:
    start = int(clock.time() * 1000) - 1000
    answer = await caller.call("DescribeTasks", window(clock, StartTime=start,
                                                       EndTime=start + end_offset))
    assert answer["Code"] == Code.INVALID_PARAMETER
    assert "EndTime must be greater" in answer["Message"]


async def test_a_span_over_three_days_is_refused(caller: SimCaller, clock: ManualClock) -> None:
    start = int(clock.time() * 1000) - 1000
    answer = await caller.call("DescribeTasks", window(clock, StartTime=start,
                                                       EndTime=start + 3 * DAY_MS + 1))
    assert answer["Code"] == Code.INVALID_PARAMETER
    assert "exceed 3 days" in answer["Message"]


async def test_a_span_of_exactly_three_days_is_accepted(
        caller: SimCaller, clock: ManualClock) -> None:
    start = int(clock.time() * 1000) - 1000
    answer = await caller.call("DescribeTasks", window(clock, StartTime=start,
                                                       EndTime=start + 3 * DAY_MS))
    assert answer["Code"] == 0


async def test_live_tasks_are_listed_newest_first(
        caller: SimCaller, clock: ManualClock, tasks: dict[str, str]) -> None:
    answer = await caller.call("DescribeTasks", window(clock, Status=2))
    assert [inverse(tasks)[t] for t in ids_of(answer)] == ["e", "d", "c"]
    begins = [row["RecordBeginTimestamp"] for row in answer["Data"]["TaskidList"]]
    assert begins == sorted(begins, reverse=True)


async def test_ended_tasks_include_abnormal_ends_by_default(
        caller: SimCaller, clock: ManualClock, tasks: dict[str, str]) -> None:
    answer = await caller.call("DescribeTasks", window(clock, Status=3))
    assert [inverse(tasks)[t] for t in ids_of(answer)] == ["b", "a"]
    assert [row["Status"] for row in answer["Data"]["TaskidList"]] == [4, 3]


async def test_strict_semantics_list_only_recording_or_only_ended(
        engine: SimEngine, clock: ManualClock, tasks: dict[str, str]) -> None:
    async with serving(engine, clock, status_semantics="strict") as caller:
        live = await caller.call("DescribeTasks", window(clock, Status=2))
        ended = await caller.call("DescribeTasks", window(clock, Status=3))
    assert [inverse(tasks)[t] for t in ids_of(live)] == ["c"]
    assert [inverse(tasks)[t] for t in ids_of(ended)] == ["a"]


async def test_rows_carry_room_status_and_begin_time(
        caller: SimCaller, clock: ManualClock, tasks: dict[str, str]) -> None:
    answer = await caller.call("DescribeTasks", window(clock, Status=2))
    assert answer["Data"]["TaskidList"][1] == {
        "RecordBeginTimestamp": int((START + 180) * 1000), "TaskId": tasks["d"],
        "RoomId": "room-2", "Status": 5}


async def test_only_tasks_begun_inside_the_window_are_listed(
        caller: SimCaller, clock: ManualClock, tasks: dict[str, str]) -> None:
    body = window(clock, StartTime=int((START + 60) * 1000), EndTime=int((START + 180) * 1000))
    live = await caller.call("DescribeTasks", {**body, "Status": 2})
    ended = await caller.call("DescribeTasks", {**body, "Status": 3})
    assert [inverse(tasks)[t] for t in ids_of(live)] == ["d", "c"]
    assert [inverse(tasks)[t] for t in ids_of(ended)] == ["b"]


async def test_room_id_narrows_the_list_to_one_room(
        caller: SimCaller, clock: ManualClock, tasks: dict[str, str]) -> None:
    answer = await caller.call("DescribeTasks", window(clock, Status=2, RoomId="room-1"))
    assert [inverse(tasks)[t] for t in ids_of(answer)] == ["e", "c"]


async def test_an_unknown_room_has_no_tasks(
        caller: SimCaller, clock: ManualClock, tasks: dict[str, str]) -> None:
    answer = await caller.call("DescribeTasks", window(clock, RoomId="nowhere"))
    assert ids_of(answer) == []
    assert answer["Data"]["TotalCount"] == 0


async def test_defaults_are_page_one_of_fifty(
        caller: SimCaller, clock: ManualClock, tasks: dict[str, str]) -> None:
    answer = await caller.call("DescribeTasks", window(clock))
    assert (answer["Data"]["PageOffset"], answer["Data"]["PageSize"]) == (1, 50)


async def test_pages_split_the_list_and_report_the_total(
        engine: SimEngine, caller: SimCaller, clock: ManualClock) -> None:
    started = []
    for _ in range(7):
        started.append(engine.start(APP, "room-1"))
        clock.advance(10)
    pages = [await caller.call("DescribeTasks", window(clock, PageSize=3, PageOffset=page))
             for page in (1, 2, 3, 4)]
    assert [len(ids_of(p)) for p in pages] == [3, 3, 1, 0]
    assert {p["Data"]["TotalCount"] for p in pages} == {7}
    assert [p["Data"]["PageOffset"] for p in pages] == [1, 2, 3, 4]
    assert [t for p in pages for t in ids_of(p)] == started[::-1]


async def test_page_offset_zero_means_the_first_page(
        caller: SimCaller, clock: ManualClock, tasks: dict[str, str]) -> None:
    zero = await caller.call("DescribeTasks", window(clock, PageSize=2, PageOffset=0))
    one = await caller.call("DescribeTasks", window(clock, PageSize=2, PageOffset=1))
    assert ids_of(zero) == ids_of(one)
    assert zero["Data"]["PageOffset"] == 1


async def test_the_task_list_key_can_be_tasklist(
        engine: SimEngine, clock: ManualClock, tasks: dict[str, str]) -> None:
    async with serving(engine, clock, list_key="TaskList") as caller:
        answer = await caller.call("DescribeTasks", window(clock))
    assert "TaskidList" not in answer["Data"]
    assert len(ids_of(answer, "TaskList")) == 3


async def test_a_task_started_after_the_query_time_shows_up_in_the_next_query(
        engine: SimEngine, caller: SimCaller, clock: ManualClock) -> None:
    task_id = engine.start(APP, "room-2", at=START + 30)
    assert ids_of(await caller.call("DescribeTasks", window(clock))) == []
    clock.advance(31)
    assert ids_of(await caller.call("DescribeTasks", window(clock))) == [task_id]

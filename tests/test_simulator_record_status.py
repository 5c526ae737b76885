"""DescribeRecordStatus and the Start/Stop/Pause/ResumeRecord actions of the simulated API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from exporter.clock import ManualClock
from exporter.simulator.caller import SimCaller
from exporter.simulator.engine import LifecycleRates, SimEngine
from exporter.simulator.server import ServerOptions, SimulatorServer
from exporter.zego.errors import Code
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START


@pytest.fixture
def engine(clock: ManualClock) -> SimEngine:
    rates = LifecycleRates(arrivals_per_hour=0, no_stream_probability=0.0)
    return SimEngine(clock, {APP: SECRET, 42: "other"}, seed=1, rooms=["room-1"], rates=rates)


@pytest.fixture
async def caller(engine: SimEngine, clock: ManualClock) -> AsyncIterator[SimCaller]:
    async with SimulatorServer(engine, ServerOptions(rate_limits={})) as sim, \
            aiohttp.ClientSession() as session:
        yield SimCaller(session, sim.url, APP, SECRET, clock)


async def test_a_live_task_reports_its_room_status_and_no_end(
        engine: SimEngine, caller: SimCaller, clock: ManualClock) -> None:
    task_id = engine.start(APP, "room-1")
    clock.advance(120)
    answer = await caller.call("DescribeRecordStatus", {"TaskId": task_id})
    data = answer["Data"]
    assert answer["Code"] == 0
    assert (data["RoomId"], data["Status"], data["RecordEndTimestamp"]) == ("room-1", 2, 0)
    assert data["RecordBeginTimestamp"] == int(START * 1000)
    assert data["RecordMode"] in (1, 2)
    assert data["StreamType"] == 3
    assert data["RecordFiles"]
    assert {f["Status"] for f in data["RecordFiles"]} == {1}


async def test_an_ended_task_reports_its_end_time_and_final_status(
        engine: SimEngine, caller: SimCaller, clock: ManualClock) -> None:
    task_id = engine.start(APP, "room-1")
    clock.advance(120)
    engine.abort(task_id)
    data = (await caller.call("DescribeRecordStatus", {"TaskId": task_id}))["Data"]
    assert (data["Status"], data["RecordEndTimestamp"]) == (4, int((START + 120) * 1000))


async def test_an_unknown_task_does_not_exist(caller: SimCaller) -> None:
    answer = await caller.call("DescribeRecordStatus", {"TaskId": "AAAAAAAAAAAAAAAA"})
    assert answer["Code"] == Code.TASK_NOT_FOUND


async def test_another_apps_task_does_not_exist_for_this_app(
        engine: SimEngine, caller: SimCaller) -> None:
    task_id = engine.start(42, "room-1")
    answer = await caller.call("DescribeRecordStatus", {"TaskId": task_id})
    assert answer["Code"] == Code.TASK_NOT_FOUND


async def test_a_forgotten_task_does_not_exist(engine: SimEngine, caller: SimCaller) -> None:
    task_id = engine.start(APP, "room-1")
    engine.forget(task_id)
    answer = await caller.call("DescribeRecordStatus", {"TaskId": task_id})
    assert answer["Code"] == Code.TASK_NOT_FOUND


async def test_a_task_begun_over_three_days_ago_does_not_exist(
        engine: SimEngine, caller: SimCaller, clock: ManualClock) -> None:
    task_id = engine.start(APP, "room-1")
    engine.stop(task_id)
    clock.advance(3 * 86_400 + 1)
    answer = await caller.call("DescribeRecordStatus", {"TaskId": task_id})
    assert answer["Code"] == Code.TASK_NOT_FOUND


async def test_a_missing_task_id_is_an_invalid_parameter(caller: SimCaller) -> None:
    answer = await caller.call("DescribeRecordStatus", {})
    assert answer["Code"] == Code.INVALID_PARAMETER
    assert "TaskId" in answer["Message"]


async def test_start_record_returns_a_new_task_id_that_is_then_listed(
        engine: SimEngine, caller: SimCaller, clock: ManualClock) -> None:
    answer = await caller.call("StartRecord", {"RoomId": "new-room"})
    task_id = answer["Data"]["TaskId"]
    assert answer["Code"] == 0
    assert len(task_id) == 16
    now_ms = int(clock.time() * 1000)
    listed = await caller.call("DescribeTasks", {"Status": 2, "StartTime": now_ms - 1000,
                                                 "EndTime": now_ms + 1000})
    assert [row["TaskId"] for row in listed["Data"]["TaskidList"]] == [task_id]
    assert engine.ledger[-1].room_id == "new-room"


async def test_start_record_needs_a_room(caller: SimCaller) -> None:
    assert (await caller.call("StartRecord", {}))["Code"] == Code.INVALID_PARAMETER


async def test_pause_resume_and_stop_drive_the_task_over_http(
        engine: SimEngine, caller: SimCaller, clock: ManualClock) -> None:
    task_id = (await caller.call("StartRecord", {"RoomId": "room-1"}))["Data"]["TaskId"]
    clock.advance(30)
    for action in ("PauseRecord", "ResumeRecord", "StopRecord"):
        assert (await caller.call(action, {"TaskId": task_id}))["Code"] == 0
        clock.advance(10)
    assert [(t.from_status, t.to_status) for t in engine.ledger] == [
        (None, 1), (1, 2), (2, 5), (5, 2), (2, 3)]


async def test_stopping_an_ended_task_answers_already_ended(
        engine: SimEngine, caller: SimCaller) -> None:
    task_id = engine.start(APP, "room-1")
    engine.stop(task_id)
    answer = await caller.call("StopRecord", {"TaskId": task_id})
    assert answer["Code"] == Code.TASK_ALREADY_ENDED


@pytest.mark.parametrize("action", ["StopRecord", "PauseRecord", "ResumeRecord"])
async def test_task_actions_on_an_unknown_task_answer_not_found(
        caller: SimCaller, action: str) -> None:
    answer = await caller.call(action, {"TaskId": "AAAAAAAAAAAAAAAA"})
    assert answer["Code"] == Code.TASK_NOT_FOUND


async def test_stopping_another_apps_task_answers_not_found(
        engine: SimEngine, caller: SimCaller) -> None:
    task_id = engine.start(42, "room-1")
    answer = await caller.call("StopRecord", {"TaskId": task_id})
    assert answer["Code"] == Code.TASK_NOT_FOUND
    assert engine.ledger[-1].to_status == 1

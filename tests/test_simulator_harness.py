"""The simulator's test-harness endpoints: scripted control, the ledger, its summary, health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from exporter.clock import ManualClock
from exporter.simulator.caller import SimCaller
from exporter.simulator.engine import LifecycleRates, SimEngine, room_names
from exporter.simulator.server import ServerOptions, SimulatorServer
from exporter.zego.errors import Code
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START


@pytest.fixture
def engine(clock: ManualClock) -> SimEngine:
    return SimEngine(clock, {APP: SECRET}, seed=1, rooms=room_names(2),
                     rates=LifecycleRates(arrivals_per_hour=0))


@pytest.fixture
async def sim(engine: SimEngine) -> AsyncIterator[SimulatorServer]:
    async with SimulatorServer(engine, ServerOptions(rate_limits={})) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def control(session: aiohttp.ClientSession, sim: SimulatorServer,
                  **body: Any) -> tuple[int, dict[str, Any]]:
    async with session.post(sim.url + "_sim/control", json=body) as response:
        return response.status, await response.json()


async def get(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as response:
        assert response.status == 200
        return await response.json()


async def test_control_drives_a_task_through_its_whole_life(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine,
        clock: ManualClock) -> None:
    status, started = await control(session, sim, op="start", app_id=APP, room_id="room-1")
    task_id = started["task_id"]
    assert status == 200
    clock.advance(30)
    for op in ("pause", "resume", "abort"):
        assert await control(session, sim, op=op, task_id=task_id) == (200, {"task_id": task_id})
        clock.advance(5)
    assert [(t.task_id, t.to_status) for t in engine.ledger] == [
        (task_id, 1), (task_id, 2), (task_id, 5), (task_id, 2), (task_id, 4)]


async def test_control_stop_ends_a_task_normally(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine) -> None:
    task_id = engine.start(APP, "room-2")
    assert (await control(session, sim, op="stop", task_id=task_id))[0] == 200
    assert engine.ledger[-1].to_status == 3


async def test_control_at_a_later_time_is_scheduled(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine,
        clock: ManualClock) -> None:
    _, started = await control(session, sim, op="start", app_id=APP, room_id="room-1",
                               at=START + 100)
    assert engine.ledger == []
    clock.advance(100)
    ledger = await get(session, sim.url + "_sim/ledger")
    assert ledger[0]["task_id"] == started["task_id"]
    assert ledger[0]["at"] == START + 100


async def test_control_forget_makes_the_task_unreachable(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine,
        clock: ManualClock) -> None:
    task_id = engine.start(APP, "room-1")
    assert (await control(session, sim, op="forget", task_id=task_id))[0] == 200
    caller = SimCaller(session, sim.url, APP, SECRET, clock)
    answer = await caller.call("DescribeRecordStatus", {"TaskId": task_id})
    assert answer["Code"] == Code.TASK_NOT_FOUND


async def test_control_on_an_unknown_task_is_not_found(
        sim: SimulatorServer, session: aiohttp.ClientSession) -> None:
    status, body = await control(session, sim, op="stop", task_id="AAAAAAAAAAAAAAAA")
    assert (status, body["code"]) == (404, Code.TASK_NOT_FOUND)


async def test_control_on_an_ended_task_is_a_conflict(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine) -> None:
    task_id = engine.start(APP, "room-1")
    engine.stop(task_id)
    status, body = await control(session, sim, op="abort", task_id=task_id)
    assert (status, body["code"]) == (409, Code.TASK_ALREADY_ENDED)


@pytest.mark.parametrize("body", [
    {"op": "explode", "task_id": "x"}, {"app_id": APP}, {"op": "start", "app_id": "abc"},
    {"op": "start", "app_id": APP}, {"op": "stop", "task_id": 7}])
async def test_malformed_control_requests_are_bad_requests(
        sim: SimulatorServer, session: aiohttp.ClientSession, body: dict[str, Any]) -> None:
    async with session.post(sim.url + "_sim/control", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]


async def test_the_ledger_endpoint_lists_every_transition_in_order(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine,
        clock: ManualClock) -> None:
    task_id = engine.start(APP, "room-1")
    clock.advance(60)
    engine.stop(task_id)
    ledger = await get(session, sim.url + "_sim/ledger")
    assert ledger == [t.to_json() for t in engine.ledger]
    assert ledger[0] == {"app_id": APP, "room_id": "room-1", "task_id": task_id,
                         "from_status": None, "to_status": 1, "at": START}


async def test_the_ledger_endpoint_can_start_from_a_time(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine,
        clock: ManualClock) -> None:
    task_id = engine.start(APP, "room-1")
    clock.advance(60)
    engine.stop(task_id)
    ledger = await get(session, sim.url + f"_sim/ledger?since={START + 30}")
    assert [t["to_status"] for t in ledger] == [3]


async def test_a_malformed_since_is_a_bad_request(
        sim: SimulatorServer, session: aiohttp.ClientSession) -> None:
    async with session.get(sim.url + "_sim/ledger?since=yesterday") as response:
        assert response.status == 400


async def test_the_ledger_endpoint_applies_transitions_due_by_now(
        sim: SimulatorServer, session: aiohttp.ClientSession, clock: ManualClock) -> None:
    busy = SimEngine(clock, {APP: SECRET}, seed=4, rooms=room_names(3),
                     rates=LifecycleRates(arrivals_per_hour=60, mean_duration_s=300))
    async with SimulatorServer(busy) as other:
        clock.advance(2 * 3600)
        ledger = await get(session, other.url + "_sim/ledger")
    assert len(ledger) > 100
    assert ledger[-1]["at"] <= clock.time()


async def test_the_summary_endpoint_counts_per_room(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine,
        clock: ManualClock) -> None:
    first = engine.start(APP, "room-1")
    second = engine.start(APP, "room-1")
    clock.advance(60)
    engine.pause(first)
    engine.abort(second)
    summary = await get(session, sim.url + "_sim/summary")
    counts = {"app_id": APP, "room_id": "room-1", "started": 2, "ended": 1,
              "ended_abnormally": 1, "paused": 1, "resumed": 0, "uploaded": 0, "backup": 0,
              "failed": 0, "no_files": 0, "files_not_uploaded": 0}
    assert summary == [counts]  # the aborted task's files are still uploading
    clock.advance(3600)
    settled = engine.outcome(second)
    assert settled is not None
    summary = await get(session, sim.url + "_sim/summary")
    assert summary == [{**counts, settled.outcome.value: 1,
                        "files_not_uploaded": settled.files_not_uploaded}]


async def test_the_outcomes_endpoint_lists_settled_tasks_in_order(
        sim: SimulatorServer, session: aiohttp.ClientSession, engine: SimEngine,
        clock: ManualClock) -> None:
    never_recorded = engine.start(APP, "room-1")
    engine.stop(never_recorded)  # still initialising: no files
    recorded = engine.start(APP, "room-2")
    clock.advance(60)
    engine.stop(recorded)
    live = engine.start(APP, "room-2")
    clock.advance(3600)
    outcomes = await get(session, sim.url + "_sim/outcomes")
    assert [(o["task_id"], o["room_id"]) for o in outcomes] == [
        (never_recorded, "room-1"), (recorded, "room-2")]
    assert outcomes[0] == {"app_id": APP, "room_id": "room-1", "task_id": never_recorded,
                           "outcome": "no_files", "file_statuses": [],
                           "files_not_uploaded": 0, "at": START}
    task = engine.find(recorded)
    assert task is not None and task.end is not None
    assert outcomes[1]["at"] == task.end + max(f.upload_s for f in task.files)
    assert outcomes[1]["file_statuses"] == [int(f.outcome) for f in task.files]
    assert live not in {o["task_id"] for o in outcomes}
    later = await get(session, sim.url + f"_sim/outcomes?since={START + 1}")
    assert [o["task_id"] for o in later] == [recorded]
    async with session.get(sim.url + "_sim/outcomes?since=soon") as response:
        assert response.status == 400


async def test_health_reports_the_simulator_clock(
        sim: SimulatorServer, session: aiohttp.ClientSession) -> None:
    assert await get(session, sim.url + "_sim/health") == {"status": "ok", "time": START}


async def test_the_server_applies_what_fell_due_without_a_request(clock: ManualClock) -> None:
    """ZEGO's state moves whether or not anyone asks: the server keeps its engine up, so that
    a request never meets an hour of transitions (or a listing's backlog) to apply first."""
    engine = SimEngine(clock, {APP: SECRET}, seed=1, rooms=room_names(4),
                       rates=LifecycleRates(arrivals_per_hour=30))
    async with SimulatorServer(engine, ServerOptions(rate_limits={})):
        clock.advance(3600)
        for _ in range(200):  # a few of the server's real-time ticks
            if engine.now >= clock.time():
                break
            await asyncio.sleep(0.01)
        assert engine.now == clock.time()
        assert len(engine.ledger) > 20

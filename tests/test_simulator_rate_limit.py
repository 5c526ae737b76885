"""The simulator's strict sliding-second rate limit per (AppId, Action), and its request stats."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.clock import ManualClock
from exporter.simulator.caller import SimCaller
from exporter.simulator.engine import LifecycleRates, SimEngine
from exporter.simulator.server import (
    STATE,
    ServerOptions,
    SimulatorServer,
    _stamped,
    create_app,
    rate_limits,
)
from exporter.simulator.traffic import Traffic
from exporter.zego.errors import Code
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET

OTHER_APP, OTHER_SECRET = 42, "other-secret"
STATUS_BODY = {"TaskId": "AAAAAAAAAAAAAAAA"}



@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[SimulatorServer]:
    engine = SimEngine(clock, {APP: SECRET, OTHER_APP: OTHER_SECRET}, seed=1,
                       rooms=["room-1"], rates=LifecycleRates(arrivals_per_hour=0))
    async with SimulatorServer(engine, ServerOptions(rate_limits=rate_limits(10))) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def caller(sim: SimulatorServer, session: aiohttp.ClientSession,
           clock: ManualClock) -> SimCaller:
    return SimCaller(session, sim.url, APP, SECRET, clock)


async def codes(caller: SimCaller, count: int, action: str = "DescribeRecordStatus") -> list[int]:
    return [(await caller.call(action, STATUS_BODY))["Code"] for _ in range(count)]


async def test_eleven_requests_in_one_second_get_one_rate_limited_answer(
        caller: SimCaller) -> None:
    answers = await codes(caller, 11)
    assert answers.count(Code.RATE_LIMITED) == 1
    assert answers[-1] == Code.RATE_LIMITED


async def test_the_window_slides_rather_than_resetting_on_the_second(
        caller: SimCaller, clock: ManualClock) -> None:
    clock.advance(0.5)
    assert Code.RATE_LIMITED not in await codes(caller, 10)
    clock.advance(0.7)  # a new calendar second, but the ten are less than a second old
    assert await codes(caller, 1) == [Code.RATE_LIMITED]
    clock.advance(0.31)
    assert await codes(caller, 1) == [Code.TASK_NOT_FOUND]


async def test_a_second_later_requests_pass_again(caller: SimCaller, clock: ManualClock) -> None:
    await codes(caller, 12)
    clock.advance(1.0)
    assert Code.RATE_LIMITED not in await codes(caller, 10)


async def test_each_action_has_its_own_budget(caller: SimCaller) -> None:
    await codes(caller, 10)
    answer = await caller.call("DescribeTasks", {})
    assert answer["Code"] == Code.INVALID_PARAMETER  # limited separately: reaches validation


async def test_each_app_has_its_own_budget(
        caller: SimCaller, sim: SimulatorServer, session: aiohttp.ClientSession,
        clock: ManualClock) -> None:
    await codes(caller, 10)
    other = SimCaller(session, sim.url, OTHER_APP, OTHER_SECRET, clock)
    assert Code.RATE_LIMITED not in await codes(other, 10)


async def test_start_and_stop_record_allow_fifty_a_second(caller: SimCaller) -> None:
    answers = await codes(caller, 51, action="StopRecord")
    assert answers.count(Code.RATE_LIMITED) == 1


async def test_stats_count_requests_and_rate_limited_answers_per_app_and_action(
        caller: SimCaller, sim: SimulatorServer, session: aiohttp.ClientSession) -> None:
    await codes(caller, 13)
    await caller.call("DescribeTasks", {})
    async with session.get(sim.url + "_sim/stats") as response:
        stats = await response.json()
    assert stats["total_requests"] == 14
    assert stats["rate_limited"] == 3
    assert stats["by_action"]["DescribeRecordStatus"] == {
        "requests": 13, "rate_limited": 3, "max_per_second": 13}
    assert stats["by_action"]["DescribeTasks"]["requests"] == 1
    assert {"app_id": APP, "action": "DescribeTasks", "requests": 1, "rate_limited": 0,
            "max_per_second": 1} in stats["by_app_action"]


async def test_deleting_stats_resets_them(
        caller: SimCaller, sim: SimulatorServer, session: aiohttp.ClientSession) -> None:
    await codes(caller, 3)
    async with session.delete(sim.url + "_sim/stats") as response:
        assert (await response.json())["total_requests"] == 0


def test_max_per_second_is_the_busiest_sliding_second() -> None:
    traffic = Traffic({"DescribeTasks": 0})
    for at in (0.0, 0.4, 0.9, 1.3, 1.35, 1.38, 3.0):
        traffic.admit(APP, "DescribeTasks", at)
    assert traffic.by_key[(APP, "DescribeTasks")].max_per_second == 5  # 0.4, 0.9, 1.3, 1.35, 1.38


def test_a_zero_limit_is_unlimited() -> None:
    traffic = Traffic({"DescribeTasks": 0})
    assert all(traffic.admit(APP, "DescribeTasks", 0.0) for _ in range(100))


def test_stamps_out_of_order_are_each_counted_in_their_own_second() -> None:
    # Stamped on arrival, handled in another order: 0.95 comes after 1.5 and 1.9.
    traffic = Traffic({"DescribeTasks": 2})
    verdicts = [traffic.admit(APP, "DescribeTasks", at) for at in (0.0, 0.5, 1.5, 1.9, 0.95)]
    # 1.5: (0.5, 1.5] holds none admitted before it; 1.9 joins it; 0.95's second (-0.05, 0.95]
    # already holds 0.0 and 0.5: refused, though 1.5 and 1.9 were handled before it.
    assert verdicts == [True, True, True, True, False]
    busiest = Traffic({"DescribeTasks": 0})
    for at in (0.0, 1.5, 1.9, 0.95):
        busiest.admit(APP, "DescribeTasks", at)
    # (0.9, 1.9] holds 0.95, 1.5 and 1.9: the late arrival counts in the later second too.
    assert busiest.by_key[(APP, "DescribeTasks")].max_per_second == 3


@pytest.mark.parametrize("honoured", [True, False])
async def test_an_arrival_stamp_from_the_front_counts_when_the_options_name_its_header(
        clock: ManualClock, session: aiohttp.ClientSession, honoured: bool) -> None:
    engine = SimEngine(clock, {APP: SECRET}, seed=1, rooms=["room-1"],
                       rates=LifecycleRates(arrivals_per_hour=0))
    options = ServerOptions(rate_limits=rate_limits(10),
                            arrival_header="X-Arrived" if honoured else None)
    async with SimulatorServer(engine, options) as sim:
        caller = SimCaller(session, sim.url, APP, SECRET, clock)
        now = clock.monotonic()

        async def code(stamp: str) -> int:
            async with session.post(sim.url, params=caller.params("DescribeRecordStatus"),
                                    json=STATUS_BODY, headers={"X-Arrived": stamp}) as answer:
                return int((await answer.json(content_type=None))["Code"])

        # Ten stamped within the last half second: the limit, however they are stamped.
        assert Code.RATE_LIMITED not in [await code(repr(now - 0.5 + i / 50)) for i in range(10)]
        # One stamped a second later: in a second of its own, if the stamp counts.
        assert await code(repr(now + 1)) == (
            Code.TASK_NOT_FOUND if honoured else Code.RATE_LIMITED)
        # A stamp that is not a finite number is not one: the handler's own time stands.
        assert await code("nan") == Code.RATE_LIMITED


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.floats().map(repr), st.integers().map(str)))
def test_any_arrival_header_is_a_finite_stamp_or_none(raw: str) -> None:
    engine = SimEngine(ManualClock(), {APP: SECRET}, seed=1, rooms=["room-1"],
                       rates=LifecycleRates(arrivals_per_hour=0))
    app = create_app(engine, ServerOptions(arrival_header="X-Arrived"))
    request = make_mocked_request("POST", "/", headers={"X-Arrived": raw}, app=app)
    stamp = _stamped(app[STATE], request)
    assert stamp is None or math.isfinite(stamp)

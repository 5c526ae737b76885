"""Fault injection in the simulated API: every kind, windows, action filters, reproducibility."""

from __future__ import annotations

import json
import logging
import time

import aiohttp
import pytest

from exporter.clock import ManualClock
from exporter.simulator.caller import SimCaller
from exporter.simulator.engine import LifecycleRates, SimEngine
from exporter.simulator.faults import (
    FaultConfig,
    FaultInjector,
    FaultKind,
    FaultRule,
    parse_fault_option,
)
from exporter.simulator.server import ServerOptions, SimulatorServer
from exporter.zego.errors import Code
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START

BODY = {"TaskId": "AAAAAAAAAAAAAAAA"}
ACTION = "DescribeRecordStatus"



def always(kind: FaultKind, **config: float) -> FaultConfig:
    return FaultConfig(rules=(FaultRule(kind, 1.0),), **config)


async def test_latency_delays_an_otherwise_normal_answer(
        sim: SimulatorServer, caller: SimCaller) -> None:
    sim.state.set_faults(always(FaultKind.LATENCY, latency_ms=150))
    began = time.monotonic()
    answer = await caller.call(ACTION, BODY)
    assert time.monotonic() - began >= 0.14
    assert answer["Code"] == Code.TASK_NOT_FOUND


def test_latency_jitters_around_its_mean() -> None:
    injector = FaultInjector(always(FaultKind.LATENCY, latency_ms=100, jitter_ms=50), seed=3)
    delays = [injector.decide(ACTION, START).delay_s for _ in range(200)]
    assert all(0.05 <= d <= 0.15 for d in delays)
    assert max(delays) - min(delays) > 0.08


@pytest.mark.parametrize(("kind", "status"), [
    (FaultKind.HTTP_500, 500), (FaultKind.HTTP_502, 502), (FaultKind.HTTP_503, 503)])
async def test_http_error_faults_answer_that_status(
        sim: SimulatorServer, caller: SimCaller, kind: FaultKind, status: int) -> None:
    sim.state.set_faults(always(kind))
    async with caller.session.post(caller.url, params=caller.params(ACTION),
                                   json=BODY) as response:
        assert response.status == status


async def test_reset_closes_the_connection_without_an_answer(
        sim: SimulatorServer, caller: SimCaller) -> None:
    sim.state.set_faults(always(FaultKind.RESET))
    with pytest.raises((aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)):
        await caller.call(ACTION, BODY)


async def test_hang_outlasts_the_client_timeout_and_does_not_hold_up_shutdown(
        clock: ManualClock) -> None:
    engine = SimEngine(clock, {APP: SECRET}, rates=LifecycleRates(arrivals_per_hour=0))
    options = ServerOptions(rate_limits={}, faults=always(FaultKind.HANG, hang_seconds=30))
    began = time.monotonic()
    async with SimulatorServer(engine, options) as sim, aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        with pytest.raises(TimeoutError):
            await SimCaller(session, sim.url, APP, SECRET, clock).call(ACTION, BODY)
    assert time.monotonic() - began < 5


async def test_malformed_json_is_not_json(sim: SimulatorServer, caller: SimCaller) -> None:
    sim.state.set_faults(always(FaultKind.MALFORMED_JSON))
    async with caller.session.post(caller.url, params=caller.params(ACTION),
                                   json=BODY) as response:
        assert response.status == 200
        with pytest.raises(ValueError):
            json.loads(await response.text())


async def test_truncated_body_stops_short_of_its_content_length(
        sim: SimulatorServer, caller: SimCaller) -> None:
    sim.state.set_faults(always(FaultKind.TRUNCATED))
    with pytest.raises(aiohttp.ClientPayloadError):
        await caller.call(ACTION, BODY)


@pytest.mark.parametrize(("kind", "code"), [
    (FaultKind.SYSTEM_ERROR, Code.SYSTEM_ERROR),
    (FaultKind.GATEWAY_ERROR, Code.GATEWAY_INTERNAL),
    (FaultKind.RATE_LIMITED, Code.RATE_LIMITED),
])
async def test_code_faults_answer_that_code_whatever_the_request(
        sim: SimulatorServer, caller: SimCaller, kind: FaultKind, code: Code) -> None:
    sim.state.set_faults(always(kind))
    assert (await caller.call(ACTION, BODY))["Code"] == code


async def test_clock_skew_shifts_the_three_day_rule(
        sim: SimulatorServer, caller: SimCaller, clock: ManualClock) -> None:
    now_ms = int(clock.time() * 1000)
    body = {"Status": 2, "StartTime": now_ms - 3 * 86_400_000 + 60_000, "EndTime": now_ms}
    assert (await caller.call("DescribeTasks", body))["Code"] == 0
    sim.state.set_faults(FaultConfig(clock_skew_s=120))
    answer = await caller.call("DescribeTasks", body, Timestamp=None)
    assert answer["Code"] == Code.TIMESTAMP_EMPTY  # still authenticates first
    assert (await caller.call("DescribeTasks", body))["Code"] == Code.INVALID_PARAMETER


async def test_a_fault_window_limits_when_it_strikes(
        sim: SimulatorServer, caller: SimCaller, clock: ManualClock) -> None:
    rule = FaultRule(FaultKind.SYSTEM_ERROR, 1.0, windows=((START + 10, START + 20),))
    sim.state.set_faults(FaultConfig(rules=(rule,)))
    assert (await caller.call(ACTION, BODY))["Code"] == Code.TASK_NOT_FOUND
    clock.advance(15)
    assert (await caller.call(ACTION, BODY))["Code"] == Code.SYSTEM_ERROR
    clock.advance(10)
    assert (await caller.call(ACTION, BODY))["Code"] == Code.TASK_NOT_FOUND


async def test_a_fault_can_target_one_action(sim: SimulatorServer, caller: SimCaller) -> None:
    rule = FaultRule(FaultKind.SYSTEM_ERROR, 1.0, actions=frozenset({"DescribeTasks"}))
    sim.state.set_faults(FaultConfig(rules=(rule,)))
    assert (await caller.call(ACTION, BODY))["Code"] == Code.TASK_NOT_FOUND
    assert (await caller.call("DescribeTasks", {}))["Code"] == Code.SYSTEM_ERROR


def test_faults_strike_at_their_probability_and_replay_with_the_seed() -> None:
    config = FaultConfig(rules=(FaultRule(FaultKind.HTTP_503, 0.3),
                                FaultRule(FaultKind.LATENCY, 0.5)))
    injectors = [FaultInjector(config, seed) for seed in (5, 5, 6)]
    runs = [[injector.decide(ACTION, START) for _ in range(1000)] for injector in injectors]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    share = sum(d.fault == FaultKind.HTTP_503 for d in runs[0]) / 1000
    assert 0.25 < share < 0.35


async def test_faults_can_be_set_at_runtime_over_http(
        sim: SimulatorServer, caller: SimCaller) -> None:
    config = {"rules": [{"kind": "gateway_error", "probability": 1.0}], "clock_skew_s": 0}
    async with caller.session.post(sim.url + "_sim/faults", json=config) as response:
        assert response.status == 200
        assert (await response.json())["rules"][0]["kind"] == "gateway_error"
    assert (await caller.call(ACTION, BODY))["Code"] == Code.GATEWAY_INTERNAL
    async with caller.session.post(sim.url + "_sim/faults", json={"rules": []}):
        pass
    assert (await caller.call(ACTION, BODY))["Code"] == Code.TASK_NOT_FOUND


async def test_an_unknown_fault_setting_is_refused_over_http(
        sim: SimulatorServer, caller: SimCaller) -> None:
    async with caller.session.post(sim.url + "_sim/faults", json={"skew": 5}) as response:
        assert response.status == 400
        assert "skew" in (await response.json())["error"]


async def test_an_unknown_fault_kind_is_refused_over_http(
        sim: SimulatorServer, caller: SimCaller) -> None:
    config = {"rules": [{"kind": "meteor", "probability": 1.0}]}
    async with caller.session.post(sim.url + "_sim/faults", json=config) as response:
        assert response.status == 400
        assert "fault kind" in (await response.json())["error"]


async def test_injected_error_codes_still_count_as_requests_of_their_action(
        sim: SimulatorServer, caller: SimCaller) -> None:
    sim.state.set_faults(always(FaultKind.SYSTEM_ERROR))
    await caller.call(ACTION, BODY)
    async with caller.session.get(sim.url + "_sim/stats") as response:
        stats = await response.json()
    assert stats["by_action"][ACTION]["requests"] == 1
    assert stats["faults"] == {"system_error": 1}


async def test_injected_faults_are_counted_in_the_stats(
        sim: SimulatorServer, caller: SimCaller) -> None:
    sim.state.set_faults(always(FaultKind.HTTP_502))
    for _ in range(3):
        async with caller.session.post(caller.url, params=caller.params(ACTION), json=BODY):
            pass
    async with caller.session.get(sim.url + "_sim/stats") as response:
        stats = await response.json()
    assert stats["faults"] == {"http_502": 3}
    assert stats["total_requests"] == 3


def test_the_fault_option_reads_kind_and_probability() -> None:
    assert parse_fault_option("http_503=0.25") == FaultRule(FaultKind.HTTP_503, 0.25)
    assert parse_fault_option("reset") == FaultRule(FaultKind.RESET, 1.0)
    with pytest.raises(ValueError):
        parse_fault_option("http_503=2")


async def test_every_request_logs_one_debug_line_faulted_or_not(
        sim: SimulatorServer, caller: SimCaller, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="exporter.simulator.server")
    await caller.call(ACTION, BODY)
    sim.state.set_faults(always(FaultKind.HTTP_503))
    async with caller.session.post(caller.url, params=caller.params(ACTION), json=BODY):
        pass
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert len(lines) == 2
    assert f"code={int(Code.TASK_NOT_FOUND)} fault=None" in lines[0]
    assert "fault=http_503" in lines[1]

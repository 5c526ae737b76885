"""Simulator scenarios (YAML) and the `zego-cloudrecord-simulator` command line."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exporter.clock import ManualClock, SystemClock
from exporter.demo import free_port
from exporter.simulator.caller import SimCaller
from exporter.simulator.cli import build_parser, parse_listen_address, scenario_from_args
from exporter.simulator.faults import FaultKind
from exporter.simulator.scenario import DEMO_SCENARIO, ScenarioError, parse_scenario
from exporter.zego.errors import Code
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START

REPO = Path(__file__).resolve().parent.parent


def scenario_doc(**extra: Any) -> dict[str, Any]:
    return {"seed": 3, "apps": [{"app_id": APP, "server_secret": SECRET, "rooms": ["a", "b"]}],
            "lifecycle": {"arrivals_per_hour": 0}, **extra}


def test_the_demo_scenario_is_lively() -> None:
    clock = ManualClock(START)
    engine, _ = parse_scenario(yaml.safe_load(DEMO_SCENARIO.read_text())).build(clock)
    clock.advance(1800)
    engine.advance_to(clock.time())
    recent = [t for t in engine.ledger if t.at >= START]
    times = [START] + [t.at for t in recent]
    assert len(recent) / 1800 > 0.5  # a transition every two seconds on average
    assert max(b - a for a, b in itertools.pairwise(times)) < 30
    assert sum(t.to_status == 4 for t in recent) >= 5
    assert {(2, 5), (5, 2), (2, 3)} <= {(t.from_status, t.to_status) for t in recent}


def test_the_demo_scenario_starts_with_recordings_under_way() -> None:
    clock = ManualClock(START)
    engine, options = parse_scenario(yaml.safe_load(DEMO_SCENARIO.read_text())).build(clock)
    assert engine.live_tasks()
    assert len(engine.apps) == 2
    assert options.rate_limits["DescribeTasks"] == 10


def test_scripted_events_follow_named_tasks() -> None:
    doc = scenario_doc(events=[
        {"at": 5, "op": "start", "room": "a", "name": "show"},
        {"at": 30, "op": "pause", "task": "show"},
        {"at": 40, "op": "resume", "task": "show"},
        {"at": 90, "op": "abort", "task": "show"},
    ])
    clock = ManualClock(START)
    engine, _ = parse_scenario(doc).build(clock)
    clock.advance(100)
    engine.advance_to(clock.time())
    assert [(t.to_status, t.at - START) for t in engine.ledger if t.to_status != 2 or
            t.from_status == 5] == [(1, 5), (5, 30), (2, 40), (4, 90)]


def test_a_room_event_acts_on_the_newest_live_task_there() -> None:
    doc = scenario_doc(events=[{"at": 1, "op": "start", "room": "b"},
                               {"at": 20, "op": "stop", "room": "b"}])
    clock = ManualClock(START)
    engine, _ = parse_scenario(doc).build(clock)
    clock.advance(30)
    engine.advance_to(clock.time())
    assert [(t.room_id, t.to_status) for t in engine.ledger] == [("b", 1), ("b", 2), ("b", 3)]


def test_scenario_settings_reach_the_engine_and_server() -> None:
    doc = scenario_doc(
        rooms=4,
        apps=[{"app_id": APP, "server_secret": SECRET}, {"app_id": 7, "server_secret": "x",
                                                         "rooms": 2}],
        api={"list_key": "TaskList", "status_semantics": "strict", "rate_limit": 4},
        faults={"clock_skew_seconds": 30, "rules": [
            {"kind": "http_502", "probability": 0.5, "windows": [[60, 120]]}]})
    engine, options = parse_scenario(doc).build(ManualClock(START))
    assert engine.rooms == {APP: ["room-1", "room-2", "room-3", "room-4"],
                            7: ["room-1", "room-2"]}
    assert (options.list_key, options.status_semantics) == ("TaskList", "strict")
    assert options.rate_limits["DescribeRecordStatus"] == 4
    assert options.faults.clock_skew_s == 30
    rule = options.faults.rules[0]
    assert (rule.kind, rule.windows) == (FaultKind.HTTP_502, ((START + 60, START + 120),))


@pytest.mark.parametrize(("change", "field"), [
    ({"apps": [{"app_id": "x"}]}, "apps[0]"),
    ({"lifecycle": {"arrivals_per_minute": 3}}, "lifecycle"),
    ({"lifecycle": {"abnormal_probability": 3}}, "lifecycle"),
    ({"api": {"list_key": "Tasks"}}, "api.list_key"),
    ({"api": {"status_semantics": "loose"}}, "api.status_semantics"),
    ({"faults": {"rules": [{"kind": "meteor"}]}}, "faults"),
    ({"events": [{"at": 1, "op": "explode", "room": "a"}]}, "events[0].op"),
    ({"events": [{"op": "start", "room": "a"}]}, "events[0]"),
    ({"events": [{"at": 1, "op": "stop"}]}, "events[0]"),
    ({"speed": 0}, "speed"),
    ({"api": {"rate_limit": "lots"}}, "api.rate_limit"),
    ({"faults": {"clock_skew": 5}}, "faults"),
])
def test_scenario_errors_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ScenarioError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_scenario(scenario_doc(**change))


def test_an_event_naming_an_unknown_task_is_an_error() -> None:
    doc = scenario_doc(events=[{"at": 1, "op": "stop", "task": "nobody"}])
    with pytest.raises(ScenarioError, match="nobody"):
        parse_scenario(doc).build(ManualClock(START))


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_help_documents_every_option() -> None:
    text = build_parser().format_help()
    for option in ("--listen-address", "--app", "--rooms", "--scenario", "--seed", "--speed",
                   "--fault", "--latency", "--jitter", "--hang-seconds", "--clock-skew",
                   "--list-key", "--status-semantics", "--rate-limit", "--callback-url",
                   "--log-level", "--warmup"):
        assert option in text
    assert all(kind.value in text for kind in FaultKind)


def test_the_default_listen_address_is_loopback() -> None:
    assert parse("--app", "1:s").listen_address == ("127.0.0.1", 18080)


@pytest.mark.parametrize(("text", "address"), [
    ("0.0.0.0:9000", ("0.0.0.0", 9000)), ("[::1]:9000", ("::1", 9000)),
    (":9000", ("127.0.0.1", 9000))])
def test_listen_addresses_are_host_and_port(text: str, address: tuple[str, int]) -> None:
    assert parse_listen_address(text) == address


@pytest.mark.parametrize("argv", [["--app", "abc:secret"], ["--app", "12"],
                                  ["--listen-address", "localhost"],
                                  ["--fault", "meteor=0.1"], ["--list-key", "Tasks"],
                                  ["--rooms", "2", "--scenario", "x.yml"]])
def test_malformed_options_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(*argv)
    assert exited.value.code == 2


def test_an_app_is_required_without_a_scenario() -> None:
    with pytest.raises(ScenarioError, match="--app"):
        scenario_from_args(parse("--rooms", "2"))


def test_options_build_the_scenario() -> None:
    scenario = scenario_from_args(parse(
        "--app", f"{APP}:{SECRET}", "--app", "7:x", "--rooms", "5", "--seed", "9",
        "--speed", "60", "--list-key", "TaskList", "--status-semantics", "strict",
        "--rate-limit", "20", "--fault", "http_503=0.1", "--fault", "reset",
        "--latency", "250", "--clock-skew", "-30"))
    assert scenario.apps == {APP: SECRET, 7: "x"}
    assert (scenario.default_rooms, scenario.seed, scenario.speed) == (5, 9, 60.0)
    assert (scenario.list_key, scenario.status_semantics, scenario.rate_limit) == (
        "TaskList", "strict", 20)
    _, options = scenario.build(ManualClock(START))
    assert [(r.kind, r.probability) for r in options.faults.rules] == [
        (FaultKind.HTTP_503, 0.1), (FaultKind.RESET, 1.0), (FaultKind.LATENCY, 1.0)]
    assert (options.faults.latency_ms, options.faults.clock_skew_s) == (250, -30)


def test_options_override_the_scenario_file() -> None:
    scenario = scenario_from_args(parse("--scenario", str(DEMO_SCENARIO), "--seed", "99",
                                        "--app", "5:five"))
    assert scenario.seed == 99
    assert 5 in scenario.apps and 1000001 in scenario.apps
    assert scenario.rates.arrivals_per_hour == 120



async def test_the_command_serves_the_api() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "exporter.simulator", "--listen-address", f"127.0.0.1:{port}",
        "--app", f"{APP}:{SECRET}", "--rooms", "2", "--callback-url", "http://cb.invalid/",
        cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            deadline = time.monotonic() + 10
            while True:
                try:
                    async with session.get(url + "_sim/health") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "the simulator did not come up"
                    await asyncio.sleep(0.1)
            caller = SimCaller(session, url, APP, SECRET, SystemClock())
            answer = await caller.call("DescribeRecordStatus", {"TaskId": "AAAAAAAAAAAAAAAA"})
            assert answer["Code"] == Code.TASK_NOT_FOUND
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 10) is not None

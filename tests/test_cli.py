"""The command line and the running daemon over real HTTP: flags, exit codes, endpoints, demo."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.cli import build_parser, listen_address, main
from exporter.clock import SystemClock
from exporter.daemon import Exporter, ListenAddress
from exporter.demo import EPHEMERAL_RANGE, free_port
from exporter.simulator.engine import LifecycleRates, SimEngine
from exporter.simulator.server import ServerOptions, SimulatorServer
from tests.conftest import APP_ID, SECRET, make_config

CONFIGS = Path(__file__).parent / "configs"



def test_config_check_accepts_a_good_file(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    good = tmp_path / "config.yml"
    good.write_text('apps: [{app_id: 7, rooms: ["1"], server_secret: "abc"}]\n')
    assert main(["--config.check", f"--config.file={good}"]) == 0
    assert "OK" in capsys.readouterr().out


def test_config_check_names_the_field_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    bad = sorted(CONFIGS.glob("*.bad.yml"))[0]
    expected = bad.read_text().splitlines()[0].removeprefix("# expect:").strip()
    assert main(["--config.check", f"--config.file={bad}"]) == 1
    assert expected in capsys.readouterr().err


def test_missing_config_file_flag_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 1
    assert "--config.file is required" in capsys.readouterr().err


def test_bad_listen_address_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--web.listen-address=nowhere", "--demo"]) == 1
    assert "--web.listen-address" in capsys.readouterr().err


def test_help_documents_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "exporter", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--config.file", "--web.listen-address", "--web.telemetry-path", "--log.level",
                 "--log.format", "--config.check", "--demo", "--version"):
        assert flag in out


def test_listen_address_forms() -> None:
    assert ListenAddress.parse(":9867") == ListenAddress(None, 9867)
    assert ListenAddress.parse("127.0.0.1:80") == ListenAddress("127.0.0.1", 80)
    assert ListenAddress.parse("[::1]:80") == ListenAddress("::1", 80)
    with pytest.raises(ValueError):
        ListenAddress.parse("9867")


async def test_daemon_serves_metrics_landing_page_and_probes() -> None:
    clock = SystemClock()
    engine = SimEngine(clock, {APP_ID: SECRET}, seed=2, rooms=["a", "b"],
                       rates=LifecycleRates(arrivals_per_hour=0))
    engine.start(APP_ID, "a")
    async with SimulatorServer(engine, ServerOptions()) as sim, aiohttp.ClientSession() as http:
        exporter = Exporter(make_config(sim.url, ("a", "b"), poll_interval=1.0), clock=clock)
        await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False)
        base = f"http://127.0.0.1:{exporter.bound_port}"
        try:
            async with http.get(f"{base}/-/ready") as response:
                assert response.status == 503
            await exporter.pollers[APP_ID].run_cycle()
            engine.start(APP_ID, "b")
            await exporter.pollers[APP_ID].run_cycle()
            await exporter.exposition.settled()  # scrapes meanwhile get the previous render
            async with http.get(f"{base}/-/ready") as response:
                assert response.status == 200
            async with http.get(f"{base}/-/healthy") as response:
                assert response.status == 200
            async with http.get(f"{base}/metrics") as response:
                assert response.headers["Content-Type"].startswith("text/plain")
                text = await response.text()
            async with http.get(f"{base}/metrics", headers={
                "Accept": "application/openmetrics-text; version=1.0.0"}) as response:
                assert response.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await response.text()).endswith("# EOF\n")
            async with http.get(f"{base}/") as response:
                landing = await response.text()
        finally:
            await exporter.stop()
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    room_b = (("app_id", str(APP_ID)), ("room_id", "b"))
    assert values[("zego_cloudrecord_tasks_started_total", room_b)] == 1
    assert values[("zego_cloudrecord_up", (("app_id", str(APP_ID)),))] == 1
    assert str(APP_ID) in landing and 'href="/metrics"' in landing


async def test_scheduled_job_polls_every_interval() -> None:
    clock = SystemClock()
    engine = SimEngine(clock, {APP_ID: SECRET}, seed=2, rooms=["a"],
                       rates=LifecycleRates(arrivals_per_hour=0))
    async with SimulatorServer(engine, ServerOptions()) as sim:
        exporter = Exporter(make_config(sim.url, ("a",), poll_interval=1.0), clock=clock)
        await exporter.start(listen=None)
        try:
            await asyncio.sleep(2.5)
        finally:
            await exporter.stop()
    assert exporter.state.apps[APP_ID].cycles_attempted == 3  # at 0 s, 1 s and 2 s


def test_demo_serves_live_metrics_and_stops_cleanly_on_sigterm() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "exporter", "--demo", f"--web.listen-address=127.0.0.1:{port}",
         "--log.format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )
    try:
        text = ""
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                text = ""
            if 'zego_cloudrecord_up{app_id="1000001"} 1.0' in text:
                break
            time.sleep(0.1)
        assert 'zego_cloudrecord_up{app_id="1000001"} 1.0' in text
        assert 'zego_cloudrecord_tasks{app_id="1000002",room_id="room-1"' in text
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert '"msg": "poll_cycle_done"' in err


def test_free_ports_are_outside_the_ephemeral_range_and_bindable() -> None:
    # Until its listener binds it, a port in the ephemeral range can go to a socket the kernel
    # numbers itself (the simulator's listener on port 0 took the soak's callback port once).
    low = int(EPHEMERAL_RANGE.read_text().split()[0])
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports), ports
    assert len(ports) > 1  # random, so concurrent test runs rarely pick the same one
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize(("argv", "address"), [
    (["--demo"], "127.0.0.1:9867"),
    (["--demo", "--web.listen-address=:9999"], ":9999"),
    (["--config.file=c.yml"], ":9867"),
])
def test_the_demo_listens_on_loopback_unless_told_otherwise(argv: list[str],
                                                            address: str) -> None:
    assert listen_address(build_parser().parse_args(argv)) == address

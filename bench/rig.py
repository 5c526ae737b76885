"""The benchmark's two child processes (simulator, exporter) on one accelerated, shared clock.

Each side runs in its own process so that the exporter's CPU time and peak RSS are its own; the
driver (bench/__main__.py) scrapes /metrics and asks the simulator for the ground truth.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import itertools
import math
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from exporter.clock import ScaledClock
from exporter.serve.serving import ServingThread
from exporter.zego.models import TaskStatus

APP_ID = 1234567890
SECRET = "0123456789abcdef0123456789abcdef"
CALLBACK_SECRET = "bench-callback-secret"
PAGE_SIZE = 50
THREE_DAYS_MS = 3 * 86_400 * 1000
LIVE = frozenset({TaskStatus.INITIALIZING, TaskStatus.RECORDING, TaskStatus.PAUSED})
ENDED = frozenset({TaskStatus.ENDED, TaskStatus.ENDED_ABNORMALLY})
ARRIVAL_HEADER = "X-Bench-Arrived"  # the simulator's rate-limit stamp, from the front (_front)


@dataclass(frozen=True)
class Workload:
    rooms: int
    tasks: int  # live tasks in steady state, all rooms together
    seed: int
    speed: float
    rate_limit: int
    pacing: float
    poll_interval: float  # simulated seconds
    cycles: int
    all_rooms: bool  # rooms "*" in the config (app-wide); else the rooms are listed
    mean_duration_s: float
    abnormal_probability: float
    origin_real: float
    origin_wall: float
    callback_port: int | None = None  # the exporter's callback listener; None: no callbacks

    def clock(self) -> ScaledClock:
        return ScaledClock(self.speed, start=self.origin_wall, origin_real=self.origin_real)

    @property
    def arrivals_per_hour(self) -> float:
        # Little's law: live = arrival rate × mean time alive (init ~3 s + recording).
        per_room = self.tasks / self.rooms
        return per_room * 3600.0 / (self.mean_duration_s + 3.0)


def _pages(count: int) -> int:
    return max(1, math.ceil(count / PAGE_SIZE))


async def wait_for(stop: Any) -> None:
    """Wait for the driver's multiprocessing Event without blocking the loop."""
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)


# -- the simulator process ---------------------------------------------------------------------

def simulator_main(workload: Workload, port_out: Any, stop: Any) -> None:
    asyncio.run(_simulator(workload, port_out, stop))


async def _simulator(workload: Workload, port_out: Any, stop: Any) -> None:
    from exporter.simulator import LifecycleRates, ServerOptions, SimEngine, room_names
    from exporter.simulator.server import create_app, rate_limits

    # ZEGO's side must not stall: at 10,000 rooms the simulator holds over a million objects,
    # and one full collection of them stops it for half a second (×10 on the shared clock),
    # bunching the requests that queued meanwhile into one "second" of false 300000003. Its
    # garbage is freed by reference counting; the exporter keeps Python's defaults.
    gc.disable()
    # For the same reason it goes first on the CPU (the front's thread too, which inherits it):
    # at ×5 a sliding second is 200 ms of real time, 50 ms from what the exporter's pacing
    # keeps (1 / 0.8 s), and a front the driver's or exporter's work pushes back would stamp
    # late and bunch arrivals the exporter had spaced. Needs root (CI is); the report says
    # whether it was raised, and how late the simulator's loop woke.
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        priority = "raised"
    except OSError:
        priority = "not raised (needs root)"
    # The front's thread (which inherits the priority) waits at most this long for the GIL
    # while the simulator's loop runs a long handler.
    sys.setswitchinterval(0.0005)
    lags: list[float] = []
    lag_probe = asyncio.create_task(_probe_loop_lag(lags))

    clock = workload.clock()
    rates = LifecycleRates(arrivals_per_hour=workload.arrivals_per_hour,
                           mean_duration_s=workload.mean_duration_s,
                           abnormal_probability=workload.abnormal_probability)
    rooms = room_names(workload.rooms)
    # Three mean lifetimes of warm-up: the live population is near its steady state at t0.
    engine = SimEngine(clock, {APP_ID: SECRET}, seed=workload.seed, rooms=rooms, rates=rates,
                       warmup_s=3 * workload.mean_duration_s)
    options = ServerOptions(rate_limits=rate_limits(workload.rate_limit),
                            arrival_header=ARRIVAL_HEADER)
    if workload.callback_port is not None:
        options.callback_url = f"http://127.0.0.1:{workload.callback_port}/callback"
        options.callback_secrets = {APP_ID: CALLBACK_SECRET}
    app = create_app(engine, options)

    async def abnormal(request: web.Request) -> web.Response:
        """Abnormal ends (task id, ledger time, begin time) since `since` (simulated Unix s)."""
        since = float(request.query["since"])
        ends = [(t.task_id, t.at, _begin(t.task_id)) for t in engine.ledger_since(since)
                if t.to_status == TaskStatus.ENDED_ABNORMALLY]
        return web.json_response(ends)

    def _begin(task_id: str) -> float | None:
        task = engine.task(APP_ID, task_id, clock.time())
        return None if task is None else task.begin

    async def minimum(request: web.Request) -> web.Response:
        """DescribeTasks pages the current workload needs: per room, and app-wide."""
        now_ms = int(clock.time() * 1000)
        ended_from = int(request.query["ended_from_ms"])
        oldest = now_ms - THREE_DAYS_MS + 600_000
        live_total = ended_total = per_room = 0
        for room in rooms:
            live = len(engine.list_tasks(APP_ID, room, oldest, now_ms, LIVE))
            ended = len(engine.list_tasks(APP_ID, room, ended_from, now_ms, ENDED))
            per_room += _pages(live) + _pages(ended)
            live_total += live
            ended_total += ended
        return web.json_response({"per_room": per_room,
                                  "app_wide": _pages(live_total) + _pages(ended_total),
                                  "live": live_total, "ended": ended_total})

    async def lag(request: web.Request) -> web.Response:
        """How late the simulator's loop woke (real s), and whether it went first on the CPU."""
        return web.json_response({"p99": percentile(lags, 0.99), "max": max(lags, default=None),
                                  "priority": priority})

    app.router.add_get("/_bench/abnormal", abnormal)
    app.router.add_get("/_bench/minimum", minimum)
    app.router.add_get("/_bench/lag", lag)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    front = ServingThread("bench-front")
    port_out.put(await front.start(_front(f"http://127.0.0.1:{runner.addresses[0][1]}", clock),
                                   "127.0.0.1", 0, None))
    await wait_for(stop)
    lag_probe.cancel()
    await front.stop()
    await runner.cleanup()


def _front(inner: str, clock: ScaledClock) -> web.Application:
    """What the exporter and the driver talk to: every request stamped as it arrives and
    passed to the simulator with the stamp (`ARRIVAL_HEADER`), from a thread of its own.

    The simulator stamps a request for its rate limit when its handler runs; a request that
    arrives while another's handler scans 50,000 tasks (35 ms at 10,000 rooms) waits, and at
    ×5 its stamp is 175 ms late on the shared clock: next to requests stamped on time, one
    sliding second can then hold 11 the exporter sent 1.25 s apart (false 300000003). This
    thread waits for the GIL at most the switch interval, not for a handler to end."""
    key = web.AppKey("session", aiohttp.ClientSession)

    async def session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None)) as opened:
            app[key] = opened
            yield

    async def forward(request: web.Request) -> web.Response:
        stamp = clock.monotonic()
        body = await request.read()
        headers = {name: value for name, value in request.headers.items()
                   if name.lower() not in ("host", "content-length", "transfer-encoding")}
        headers[ARRIVAL_HEADER] = repr(stamp)
        async with request.app[key].request(request.method, inner + request.path_qs,
                                            data=body, headers=headers) as answer:
            return web.Response(body=await answer.read(), status=answer.status, headers={
                "Content-Type": answer.headers.get("Content-Type", "application/octet-stream")})

    app = web.Application(client_max_size=2**24)
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


# -- the exporter process ----------------------------------------------------------------------

def exporter_main(workload: Workload, sim_url: str, events: Any, stop: Any) -> None:
    asyncio.run(_exporter(workload, sim_url, events, stop))


async def _exporter(workload: Workload, sim_url: str, events: Any, stop: Any) -> None:
    from exporter.config import AppConfig, Config, Secret, ZegoConfig
    from exporter.daemon import Exporter, ListenAddress
    from exporter.logs import configure_logging
    from exporter.simulator import room_names

    configure_logging("warn", "logfmt")  # on stderr: why a cycle failed, say
    clock = workload.clock()
    rooms = None if workload.all_rooms else tuple(room_names(workload.rooms))
    port = workload.callback_port
    callbacks = port is not None
    app = AppConfig(app_id=APP_ID, server_secret=Secret(SECRET), rooms=rooms,
                    rate_limit=workload.rate_limit, max_rooms=max(workload.rooms, 1),
                    callback_secret=Secret(CALLBACK_SECRET) if callbacks else None)
    config = Config(zego=ZegoConfig(endpoint=sim_url, timeout=30.0, pacing=workload.pacing),
                    poll_interval=workload.poll_interval, apps=(app,))
    # A state file, as the exporter keeps by default: its writes are part of the cost.
    state_dir = tempfile.TemporaryDirectory(prefix="bench-state-")
    exporter = Exporter(config, clock=clock, storage_path=f"{state_dir.name}/state.db")
    await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False, callback_listen=(
        None if port is None else ListenAddress("127.0.0.1", port)))
    poller = exporter.pollers[APP_ID]
    abnormal, callback_waiting = _record_abnormal_ends(exporter.state.apps[APP_ID],
                                                       exporter.exposition)
    by_callback: list[tuple[str, float]] = []
    watcher = asyncio.create_task(_watch_callback_ends(exporter.exposition, callback_waiting,
                                                       by_callback, clock))
    pauses = _watch_gc()
    departures = _watch_departures()
    lags: list[float] = []
    lag_probe = asyncio.create_task(_probe_loop_lag(lags))
    events.put(("ready", {"port": exporter.bound_port, "pid": os.getpid()}))
    exposition = exporter.exposition

    async def visible(index: int) -> None:
        """When the cycle's events are on /metrics: its render (started as it ended) is done."""
        await exporter.exposition.settled()
        events.put(("visible", {"cycle": index, "at": clock.time()}))

    shown: set[asyncio.Task[None]] = set()
    numbers = itertools.count()

    async def cycle() -> None:
        """The poller's cycle, reported to the driver."""
        index = next(numbers)
        started_at = clock.time()
        report = await poller.run_cycle()
        # The cycle's end detection; the upload look-ups after it use what is left of the interval.
        events.put(("cycle", {"started": started_at, "ended": report.applied_s, "ok": report.ok,
                              "real": time.perf_counter(), "renders": exposition.renders,
                              "render_cpu": exposition.render_cpu_seconds,
                              "requests": report.requests, "cpu": time.process_time(),
                              "extended_pages": report.extended_pages,
                              "lookups": report.lookups, "lookups_needed": report.lookups_needed,
                              "abnormal": list(abnormal), "by_callback": list(by_callback),
                              "plan": _plan(poller)}))
        abnormal.clear()
        by_callback.clear()
        task = asyncio.create_task(visible(index))
        shown.add(task)
        task.add_done_callback(shown.discard)

    # The exporter's own scheduling loop, on the shared clock, for a set number of cycles.
    await exporter.scheduler.run(APP_ID, cycle, cycles=workload.cycles)
    await asyncio.gather(*shown)  # the last cycle's render too, before the driver's last scrape
    for _ in range(250):  # and the callbacks' render (due within a second or so)
        if not callback_waiting:
            break
        await asyncio.sleep(0.02)
    watcher.cancel()
    lag_probe.cancel()
    rusage = resource.getrusage(resource.RUSAGE_SELF)
    events.put(("done", {"cpu": time.process_time(), "peak_rss_bytes": rusage.ru_maxrss * 1024,
                         "by_callback": by_callback, "gc_pauses": pauses[2],
                         "gc_pause_max": max(max(p, default=0.0) for p in pauses.values()),
                         "loop_lags": lags,
                         "departed_max_in_a_second": max(
                             (_busiest_second([d.at for d in sent if d.at is not None])
                              for sent in departures.values()), default=0)}))
    await wait_for(stop)  # keep serving /metrics for the driver's last scrapes
    await exporter.stop()
    state_dir.cleanup()


def _watch_departures() -> dict[int, list[Any]]:
    """Every request each of the exporter's rate limiters (one per app and Action) let go, with
    when it really left (`Departure.at`, on the clock the simulator shares)."""
    from exporter.zego.ratelimit import Departure, RateLimiter

    departures: dict[int, list[Departure]] = {}
    acquire = RateLimiter.acquire

    async def recorded(limiter: RateLimiter) -> Departure:
        departure = await acquire(limiter)
        departures.setdefault(id(limiter), []).append(departure)
        return departure

    RateLimiter.acquire = recorded  # type: ignore[method-assign,assignment]
    return departures


def _busiest_second(times: list[float]) -> int:
    """The most of `times` in any sliding second (t - 1, t], counted as the simulator counts."""
    from exporter.simulator.traffic import Traffic

    traffic = Traffic({})
    for at in sorted(times):
        traffic.admit(0, "sent", at)
    return max((t.max_per_second for t in traffic.by_key.values()), default=0)


def _watch_gc() -> dict[int, list[float]]:
    """Seconds each cyclic garbage collection took, by generation (they stop the loop)."""
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    gc.callbacks.append(timed)
    return pauses


async def _probe_loop_lag(lags: list[float], period: float = 0.05) -> None:
    """How late the event loop wakes a timer (real seconds): what a scrape or a request waits."""
    while True:
        asked = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - asked - period)


def _plan(poller: Any) -> str:
    """The plan the poller used: its planner's choice, else what its scopes say."""
    planner = getattr(poller, "planner", None)
    if planner is not None:
        return str(planner.plan)
    return "app-wide" if poller.scopes == [None] else "per-room"


def _record_abnormal_ends(state: Any, exposition: Any
                          ) -> tuple[list[str], dict[str, int]]:
    """Wrap the app state's `apply` to note the TaskIds it counts as ended abnormally: by a
    poll cycle (shown once that cycle's render is ready), and by a callback, with the version
    of the exposition that will show it (the callback's answer bumps the version)."""
    from exporter.state.changes import ChangeSet, EventKind, Source

    by_cycle: list[str] = []
    by_callback: dict[str, int] = {}
    apply = state.apply

    def recording_apply(changes: ChangeSet) -> None:
        ended = [e.task_id for e in changes.events if e.kind is EventKind.ENDED_ABNORMALLY]
        if changes.source is Source.POLL:
            by_cycle.extend(ended)
        else:
            by_callback.update(dict.fromkeys(ended, exposition.version + 1))
        apply(changes)

    state.apply = recording_apply
    return by_cycle, by_callback


async def _watch_callback_ends(exposition: Any, waiting: dict[str, int],
                               shown: list[tuple[str, float]], clock: ScaledClock) -> None:
    """Move callback-counted ends from `waiting` to `shown` (with the time) once a render
    that holds them is ready."""
    while True:
        version = exposition.shown_version
        for task_id in [t for t, v in waiting.items() if v <= version]:
            del waiting[task_id]
            shown.append((task_id, clock.time()))
        await asyncio.sleep(0.02)


def spawn(target: Any, *args: Any) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def detection_latencies(ends: list[tuple[str, float]], counted_at: dict[str, float],
                        scrapes: list[float], window: tuple[float, float]
                        ) -> tuple[list[float], list[str]]:
    """Seconds from each abnormal end to the first scrape begun after the cycle that counted it.

    `ends`: (task id, ledger time); `counted_at`: task id -> when the cycle that counted it
    ended; `scrapes`: when each scrape began. Only ends inside `window` (after the baseline cycle,
    before the last cycle began) are judged; returns the latencies and the tasks never shown.
    """
    latencies: list[float] = []
    missed: list[str] = []
    for task_id, at in ends:
        if not window[0] <= at < window[1]:
            continue
        done = counted_at.get(task_id)
        index = len(scrapes) if done is None else bisect.bisect_left(scrapes, done)
        if index == len(scrapes):
            missed.append(task_id)
        else:
            latencies.append(scrapes[index] - at)
    return latencies, missed

"""Wires the exporter together: ZEGO client, one scheduled poller per app, state, /metrics."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.registry import CollectorRegistry

from exporter.callbacks import CallbackReceiver
from exporter.clock import Clock, SystemClock
from exporter.config import AppConfig, Config
from exporter.logs import ContainedErrors
from exporter.poll.poller import AppPoller
from exporter.poll.schedule import PollScheduler
from exporter.serve.collector import ExporterCollector
from exporter.serve.exposition import (
    EXPOSITION,
    PROMETHEUS_ACCEPT,
    ExpositionCache,
    split_registry,
)
from exporter.serve.serving import ServingThread, call_on
from exporter.serve.web import Edge, ServerLimits, make_app
from exporter.serve.webconfig import WebConfig
from exporter.state.model import AppState, ExporterState
from exporter.state.store import Rows, Store, StoreError
from exporter.zego.client import DESCRIBE_RECORD_STATUS, DESCRIBE_TASKS, ZegoApp, ZegoClient
from exporter.zego.ratelimit import RateLimiter, departure_trace

SWITCH_INTERVAL_S = 0.0005  # see Exporter.start
# Callbacks' changes reach the state file within this: one write for a burst of callbacks,
# not a transaction per callback (about 90 a second at 10,000 busy rooms in the bench).
CALLBACK_SAVE_DELAY_S = 1.0

log = structlog.get_logger("exporter.daemon")


@dataclass(frozen=True)
class ListenAddress:
    host: str | None  # None: every interface
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"listen address {text!r} is not HOST:PORT or :PORT")
        return cls(host.strip("[]") or None, int(port))


class Exporter:
    """The running daemon. `start()` begins polling and serving; `stop()` undoes it."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        telemetry_path: str = "/metrics",
        storage_path: str | None = None,
        callback_path: str = "/callback",
        on_cycle_done: Callable[[AppState], None] | None = None,
        web_config: WebConfig | None = None,
        callback_web_config: WebConfig | None = None,
        limiter_factory: Callable[[AppConfig, str], RateLimiter] | None = None,
        web_limits: ServerLimits | None = None,
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.telemetry_path = telemetry_path
        self.web_config = web_config  # TLS, basic auth and headers for /metrics (--web.config.file)
        self.callback_web_config = callback_web_config  # the same for the callback listener
        self.web_limits = web_limits or ServerLimits()
        secrets = {a.app_id: a.callback_secret for a in config.apps if a.callback_secret}
        self.state = ExporterState.for_apps(
            [(app.app_id, app.rooms, app.max_rooms) for app in config.apps],
            callbacks=frozenset(secrets), persistent=storage_path is not None)
        self.errors = ContainedErrors(self.state.internal_errors)
        for listener, listener_config in (("metrics", web_config),
                                          ("callbacks", callback_web_config)):
            if listener_config is not None:
                listener_config.on_reload = partial(self._count_reload, listener)
        make_limiter = limiter_factory or (  # e.g. Redis-shared (--ratelimit.redis-url)
            lambda app, action: RateLimiter(app.rate_limit, self.clock, config.zego.pacing))
        self.limiters = {
            (app.app_id, action): make_limiter(app, action)
            for app in config.apps
            for action in (DESCRIBE_TASKS, DESCRIBE_RECORD_STATUS)
        }
        self.registry = CollectorRegistry(auto_describe=False)
        # Created here, started by start(): its overrun counts are on /metrics from the first.
        self.scheduler = PollScheduler(self.clock, config.poll_interval,
                                       [app.app_id for app in config.apps], self.errors,
                                       on_overrun=self._overran)
        collector = ExporterCollector(self.state, self.limiters, config.poll_interval,
                                      overruns=self.scheduler.overruns)
        self.registry.register(collector)
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)
        # Prometheus' format from the start; plain text (curl) once asked for, and kept from
        # then on: each format kept ready costs its render and memory.
        self.exposition = ExpositionCache(*split_registry(
            collector, (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)),
            accepts=(PROMETHEUS_ACCEPT,))
        self._on_cycle_done = on_cycle_done
        self.store = Store(storage_path) if storage_path else None  # raises StoreError
        if self.store is not None:
            for app_state in self.state.apps.values():
                if self.store.load(app_state):
                    log.info("state_restored", app_id=app_state.app_id, path=storage_path,
                             live=len(app_state.tracking.live),
                             remembered=len(app_state.tracking.finished))
        self.callbacks = CallbackReceiver(self.state, secrets, self.clock, self._save_soon)
        self._unsaved: set[int] = set()  # apps a callback changed since their last save
        # State-file writes run in one worker thread, one at a time (see _save).
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="state-writer")
        self._writing: asyncio.Future[None] | None = None
        self._again: set[int] = set()  # apps whose save waits for the write under way
        self._stopping = False
        self._save_timer: asyncio.TimerHandle | None = None
        self.callback_path = callback_path
        self.callback_port: int | None = None
        self.pollers: dict[int, AppPoller] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the state's, once started
        self._serving: ServingThread | None = None  # /metrics' listener
        self._callback_runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    def _count_reload(self, listener: str, result: str) -> None:
        # A reload happens in the request that finds the file changed: maybe /metrics' thread.
        call_on(self._loop, self._count_reload_here, listener, result)

    def _count_reload_here(self, listener: str, result: str) -> None:
        self.state.web_config_reloads[(listener, result)] += 1

    def ready(self) -> bool:
        return all(app.cycles_attempted > 0 for app in self.state.apps.values())

    def build_pollers(self, session: aiohttp.ClientSession) -> None:
        zego = self.config.zego
        client = ZegoClient(session, zego.endpoint, self.clock, timeout=zego.timeout,
                            observe=self.state.api.observe)
        for app in self.config.apps:
            limiters = {a: self.limiters[(app.app_id, a)]
                        for a in (DESCRIBE_TASKS, DESCRIBE_RECORD_STATUS)}
            zego_app = ZegoApp(app.app_id, app.server_secret, limiters)
            budget, lookups = (limiters[action].limit * zego.pacing * self.config.poll_interval
                               for action in (DESCRIBE_TASKS, DESCRIBE_RECORD_STATUS))
            self.pollers[app.app_id] = AppPoller(
                client, zego_app, self.state.apps[app.app_id], self.clock,
                zego.clock_skew_margin, self._cycle_done, budget_per_cycle=budget,
                poll_interval=self.config.poll_interval, errors=self.errors,
                lookup_budget=lookups, callbacks=app.callback_secret is not None,
                on_change=self._changed)

    async def _callback_answered(self, request: web.Request,
                                 response: web.StreamResponse) -> None:
        # Callback counters moved, and maybe events: on /metrics after four times the last
        # render's cost (no fixed floor), one render for the callbacks meanwhile.
        self.exposition.invalidate(soon=True)

    def _overran(self, app_id: int) -> None:
        # Counted after the cycle's own render began: shown with a render soon after.
        self.exposition.invalidate(soon=True)

    def _cycle_done(self, app: AppState) -> None:
        self.exposition.invalidate()
        self.exposition.prerender()  # ready before the next scrape, off the event loop
        self._save(app)
        if self._on_cycle_done is not None:
            self._on_cycle_done(app)

    def _changed(self, app: AppState) -> None:
        """Upload outcomes counted after a cycle's render: shown and saved soon."""
        self.exposition.invalidate(soon=True)
        self._save_soon(app)

    def _save_soon(self, app: AppState) -> None:
        """A callback changed `app`: save it within CALLBACK_SAVE_DELAY_S, with any others."""
        if self.store is None:
            return
        self._unsaved.add(app.app_id)
        if self._save_timer is None:
            self._save_timer = asyncio.get_running_loop().call_later(
                CALLBACK_SAVE_DELAY_S, self._save_unsaved)

    def _save_unsaved(self) -> None:
        self._save_timer = None
        for app_id in sorted(self._unsaved):
            self._save(self.state.apps[app_id])

    def _save(self, app: AppState) -> None:
        """Save `app`: its rows are taken now, on the event loop, and written in the writer
        thread (a busy cycle's write holds SQLite for a third of a second at 10,000 rooms),
        one write at a time; a save asked for meanwhile follows it. After stop() began, or
        with no loop running, the write is done here."""
        if self.store is None:
            self._unsaved.discard(app.app_id)
            return
        if self._writing is not None:
            self._again.add(app.app_id)
            return
        try:
            rows = self.store.rows(app)
        except Exception as exc:
            self._save_failed(app, None, exc)
            return
        # Marked saved now: what changes from now on is pending again, and a callback's
        # change made during the write asks for a save of its own (_save_soon).
        app.mark_saved(rows.pending)
        self._unsaved.discard(app.app_id)
        try:
            loop = None if self._stopping else asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            try:
                self.store.write(rows)
            except Exception as exc:
                self._save_failed(app, rows, exc)
            return
        self._writing = loop.run_in_executor(self._writer, self.store.write, rows)
        self._writing.add_done_callback(partial(self._written, app, rows))

    def _written(self, app: AppState, rows: Rows, done: asyncio.Future[None]) -> None:
        self._writing = None
        failure = asyncio.CancelledError() if done.cancelled() else done.exception()
        if failure is not None:
            self._save_failed(app, rows, failure)
        again, self._again = self._again, set()
        for app_id in sorted(again):
            self._save(self.state.apps[app_id])

    def _save_failed(self, app: AppState, rows: Rows | None, exc: BaseException) -> None:
        # Keep polling from memory; the next save (a cycle's, or stop()'s) tries again.
        if rows is not None:
            app.mark_unsaved(rows.pending)
            self._unsaved.add(app.app_id)
        self.state.storage_errors += 1
        if not isinstance(exc, sqlite3.Error | StoreError):
            self.errors.record("state_save", exc)  # a bug: its traceback, once
        log.error("state_save_failed", app_id=app.app_id,
                  path=str(self.store.path if self.store else ""), error=str(exc))

    async def saves_settled(self) -> None:
        """Wait until no state-file write is under way or queued (stop(), and tests)."""
        while self._writing is not None:
            await asyncio.wait({self._writing})
            await asyncio.sleep(0)  # its done callback, and the save it may start

    async def start(self, listen: ListenAddress | None, schedule: bool = True,
                    callback_listen: ListenAddress | None = None) -> None:
        # The /metrics render runs in a worker thread and holds the GIL for most of its time
        # (0.4 s at 10,000 rooms); at Python's default 5 ms switch interval, the event loop,
        # which paces ZEGO requests, and /metrics' thread would wait up to 5 ms per step behind
        # it. 0.5 ms keeps scrapes during a render at a few ms (bench: p99 45 → 9 ms at 1,000
        # rooms).
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._loop = asyncio.get_running_loop()
        # Marks when each ZEGO request really leaves, for the rate limiters' hard rule.
        self._session = aiohttp.ClientSession(trace_configs=[departure_trace()])
        self.build_pollers(self._session)
        if callback_listen is not None:
            # Its own listener: it faces ZEGO (the internet), /metrics does not.
            tls = self.callback_web_config
            callback_app = self.callbacks.make_app(
                Edge(self.state, "callbacks", self.errors), self.callback_path,
                tls.middlewares(open_paths=()) if tls else ())
            callback_app.on_response_prepare.append(self._callback_answered)
            runner = web.AppRunner(callback_app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, callback_listen.host, callback_listen.port,
                              ssl_context=tls.ssl_context() if tls else None).start()
            self._callback_runner = runner
            self.callback_port = int(runner.addresses[0][1])
            log.info("callbacks_listening",
                     address=f"{callback_listen.host or ''}:{self.callback_port}",
                     path=self.callback_path, apps=sorted(self.callbacks.app_ids))
        if listen is not None:
            # Served by a thread of its own: a scrape waits for none of this loop's work.
            web_config = self.web_config
            app = make_app(self.registry, self.state, self.telemetry_path, self.ready,
                           web_config.middlewares() if web_config else (), self.web_limits,
                           Edge(self.state, "metrics", self.errors, self._loop), self._loop)
            app[EXPOSITION] = self.exposition
            self._serving = ServingThread("metrics-http")
            self.bound_port = await self._serving.start(
                app, listen.host, listen.port,
                web_config.ssl_context() if web_config else None)
            log.info("listening", address=f"{listen.host or ''}:{self.bound_port}",
                     telemetry_path=self.telemetry_path,
                     tls=bool(web_config and web_config.tls_enabled),
                     basic_auth=bool(web_config and web_config.settings.users))
        self.exposition.prerender()  # the first scrape finds the starting state rendered
        # What is alive at the first start (modules, config, the restored state) lives as long
        # as the process: moved out of the cyclic collector's sight, a full collection, which
        # stops the loop, walks only what came after (bench --rooms 1000 --callbacks: the
        # longest full collection 22.4 -> 5-9 ms).
        if not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
        if schedule:
            self.scheduler.start({app_id: poller.run_cycle
                                  for app_id, poller in self.pollers.items()})

    async def stop(self) -> None:
        await self.scheduler.stop()  # cancels a cycle in flight, before its session closes
        try:
            if self._serving is not None:
                await self._serving.stop()
            if self._callback_runner is not None:
                await self._callback_runner.cleanup()
        finally:
            await self._stop_state()

    async def _stop_state(self) -> None:
        """What stop() does whatever the listeners did: the last render and the last save."""
        if self._session is not None:
            await self._session.close()
        await self.exposition.settled()  # no render left running when the loop closes
        if self._save_timer is not None:
            self._save_timer.cancel()
        await self.saves_settled()
        self._stopping = True  # from here on, saves write at once
        self._save_unsaved()
        self._writer.shutdown(wait=True)
        if self.store is not None:
            self.store.close()

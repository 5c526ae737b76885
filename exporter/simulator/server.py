"""The simulator's HTTP side: ZEGO's API at `POST /?Action=...`, the test harness at `/_sim/*`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from exporter.simulator.api import ACTIONS, ActionContext, ListKey, StatusSemantics
from exporter.simulator.callbacks import (
    DEFAULT_ATTEMPTS,
    DEFAULT_LATE_S,
    DEFAULT_RETRY_DELAY_S,
    DEFAULT_TIMEOUT_S,
    CallbackSender,
)
from exporter.simulator.engine import OPS, SimEngine, SimError
from exporter.simulator.faults import (
    FAULT_CODES,
    HTTP_STATUS,
    FaultConfig,
    FaultInjector,
    FaultKind,
)
from exporter.simulator.traffic import DEFAULT_RATE_LIMITS, Traffic
from exporter.zego.errors import Code
from exporter.zego.signing import SIGNATURE_VERSION, signature

log = logging.getLogger(__name__)

SIGNATURE_TTL_SECONDS = 600.0  # ZEGO: a signature is valid for 10 minutes, clock error included
_MAX_APP_ID = 2**32 - 1
# How often the engine applies what fell due and updates its kept listings, real seconds: at
# 10,000 rooms ×5 a request then meets at most ~1 ms of that work, not 100 ms of it.
KEEP_UP_SECONDS = 0.02


def rate_limits(describe_limit: int = 10) -> dict[str, int]:
    """ZEGO's documented limits, with DescribeTasks' and DescribeRecordStatus' set to one value."""
    return {**DEFAULT_RATE_LIMITS, "DescribeTasks": describe_limit,
            "DescribeRecordStatus": describe_limit}


@dataclass(slots=True)
class ServerOptions:
    """How the simulated API behaves where ZEGO's docs leave a choice, plus limits, faults and
    recording callbacks (sent to `callback_url` for the apps in `callback_secrets`)."""

    list_key: ListKey = "TaskidList"
    status_semantics: StatusSemantics = "inclusive"
    rate_limits: dict[str, int] = field(default_factory=rate_limits)
    faults: FaultConfig = field(default_factory=FaultConfig)
    callback_url: str | None = None
    callback_secrets: dict[int, str] = field(default_factory=dict, repr=False)  # app id -> secret
    callback_loss: float = 0.0  # probability that a callback is never sent
    callback_duplicate: float = 0.0  # probability that it is sent twice
    callback_retry_delay_s: float = DEFAULT_RETRY_DELAY_S  # on the engine's clock
    callback_attempts: int = DEFAULT_ATTEMPTS
    callback_timeout_s: float = DEFAULT_TIMEOUT_S  # real seconds per attempt
    callback_interval_s: float = 0.1  # real seconds between background deliveries; 0: none
    callback_late: float = 0.0  # probability that a callback arrives late_s after its sending
    callback_late_s: tuple[float, float] = DEFAULT_LATE_S  # on the engine's clock
    # A header carrying when a request arrived (the engine clock's monotonic seconds), stamped
    # by a front that the simulator's own work cannot hold up (bench/rig.py's). None: stamped
    # when the handler runs, late by whatever else the simulator's loop was doing.
    arrival_header: str | None = None

    def callback_sender(self, engine: SimEngine) -> CallbackSender | None:
        """The sender these options describe, or None without a URL and a secret."""
        secrets = {app: s for app, s in self.callback_secrets.items() if app in engine.apps}
        if not self.callback_url or not secrets:
            return None
        return CallbackSender(engine, self.callback_url, secrets, loss=self.callback_loss,
                              duplicate=self.callback_duplicate,
                              retry_delay_s=self.callback_retry_delay_s,
                              attempts=self.callback_attempts, timeout_s=self.callback_timeout_s,
                              late=self.callback_late, late_s=self.callback_late_s)


class _Reject(Exception):
    def __init__(self, code: Code, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(message)


class SimulatorState:
    """Everything the handlers share: engine, options, traffic counters, fault injector,
    callback sender."""

    def __init__(self, engine: SimEngine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.callbacks = options.callback_sender(engine)
        self.traffic = Traffic(dict(options.rate_limits))
        self.faults = FaultInjector(options.faults, engine.seed)
        self.closing = asyncio.Event()
        self._request_ids = itertools.count(1)

    def server_now(self) -> float:
        """The time ZEGO's side believes it is: the clock plus any injected skew."""
        return self.engine.clock.time() + self.faults.config.clock_skew_s

    def set_faults(self, config: FaultConfig) -> None:
        self.faults.config = config
        self.options.faults = config

    def request_id(self) -> str:
        return f"sim-{next(self._request_ids):010d}"


STATE = web.AppKey("state", SimulatorState)


def _envelope(state: SimulatorState, code: int, message: str,
              data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"Code": code, "Message": message, "RequestId": state.request_id(),
            "Data": {} if data is None else data}


def _authenticate(state: SimulatorState, query: Any) -> tuple[str, int]:
    """The common query parameters checked as ZEGO's gateway does; returns (action, app_id)."""
    action = query.get("Action", "")
    if not action:
        raise _Reject(Code.ACTION_EMPTY, "Action is empty")
    if action not in ACTIONS:
        raise _Reject(Code.ACTION_UNSUPPORTED, f"Action {action} is not supported")
    raw_app = query.get("AppId", "")
    if not raw_app.isdigit() or not 0 < int(raw_app) <= _MAX_APP_ID:
        raise _Reject(Code.APP_ID_FORMAT, "AppId format error")
    app_id = int(raw_app)
    secret = state.engine.apps.get(app_id)
    if secret is None:
        raise _Reject(Code.SECRET_LOOKUP_FAILED, "failed to get ServerSecret, check the AppId")
    nonce = query.get("SignatureNonce", "")
    if not nonce:
        raise _Reject(Code.NONCE_EMPTY, "SignatureNonce is empty")
    raw_ts = query.get("Timestamp", "")
    if not raw_ts:
        raise _Reject(Code.TIMESTAMP_EMPTY, "Timestamp is empty")
    try:
        timestamp = int(raw_ts)
    except ValueError:
        raise _Reject(Code.TIMESTAMP_FORMAT, "Timestamp format error") from None
    version = query.get("SignatureVersion", "")
    if not version:
        raise _Reject(Code.SIGNATURE_VERSION_EMPTY, "SignatureVersion is empty")
    if version != SIGNATURE_VERSION:
        raise _Reject(Code.SIGNATURE_VERSION_UNSUPPORTED, "SignatureVersion must be 2.0")
    given = query.get("Signature", "")
    if not given:
        raise _Reject(Code.SIGNATURE_EMPTY, "Signature is empty")
    if abs(timestamp - state.server_now()) > SIGNATURE_TTL_SECONDS:
        raise _Reject(Code.SIGNATURE_EXPIRED, "signature expired")
    if given.lower() != signature(app_id, nonce, secret, timestamp):
        raise _Reject(Code.SIGNATURE_ERROR, "signature error")
    return action, app_id


def _answer(state: SimulatorState, query: Any, raw_body: bytes,
            forced: FaultKind | None, arrived: float) -> dict[str, Any]:
    """The envelope a well-behaved ZEGO would send (or the forced error code)."""
    try:
        action, app_id = _authenticate(state, query)
    except _Reject as exc:
        return _envelope(state, exc.code, exc.message)
    if not state.traffic.admit(app_id, action, arrived):
        return _envelope(state, Code.RATE_LIMITED, "request frequency exceeds the limit")
    if forced in FAULT_CODES:
        return _envelope(state, FAULT_CODES[forced], f"injected fault {forced}")
    try:
        body = json.loads(raw_body or b"{}")
    except ValueError:
        return _envelope(state, Code.INVALID_PARAMETER, "request body is not valid JSON")
    if not isinstance(body, dict):
        return _envelope(state, Code.INVALID_PARAMETER, "request body must be a JSON object")
    ctx = ActionContext(state.engine, state.server_now(), state.options.list_key,
                        state.options.status_semantics)
    try:
        data = ACTIONS[action](ctx, app_id, body)
    except SimError as exc:
        return _envelope(state, exc.code, exc.message)
    return _envelope(state, Code.SUCCESS, "succeed", data)


def _reset(request: web.Request) -> None:
    """Drop the connection with a TCP reset, answering nothing."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _truncated(request: web.Request, payload: bytes) -> web.StreamResponse:
    """Promise the whole payload in Content-Length, send half, then cut the connection."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(payload)
    await response.prepare(request)
    await response.write(payload[: len(payload) // 2])
    _reset(request)
    return response


def _stamped(state: SimulatorState, request: web.Request) -> float | None:
    """The arrival stamp the front put in `arrival_header`, if the options name one."""
    name = state.options.arrival_header
    try:
        stamp = None if name is None else float(request.headers[name])
    except (KeyError, ValueError):
        return None
    return stamp if stamp is not None and math.isfinite(stamp) else None


async def handle_api(request: web.Request) -> web.StreamResponse:
    """`POST /?Action=...`: faults first (as the network would), then ZEGO's answer."""
    state = request.app[STATE]
    clock = state.engine.clock
    state.traffic.arrive()
    stamped = _stamped(state, request)
    raw_body = await request.read()
    action = request.query.get("Action", "")
    decision = state.faults.decide(action, clock.time())
    code: int | None = None
    delayed = 0.0
    try:
        if decision.delay_s:
            sent = clock.monotonic()
            await asyncio.sleep(decision.delay_s)
            delayed = clock.monotonic() - sent
        fault = decision.fault
        if fault == FaultKind.RESET:
            _reset(request)
            return web.Response(status=500)
        if fault == FaultKind.HANG:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.closing.wait(), state.faults.config.hang_seconds)
        if fault in HTTP_STATUS:
            status = HTTP_STATUS[fault]
            return web.Response(status=status, text=f"<html><body>{status}</body></html>",
                                content_type="text/html")
        arrived = clock.monotonic() if stamped is None else stamped + delayed
        envelope = _answer(state, request.query, raw_body, fault, arrived)
        code = envelope["Code"]
        if fault == FaultKind.MALFORMED_JSON:
            return web.Response(text="{Code: 0, 'Message': succeed, Data: {TaskidList: [}",
                                content_type="application/json")
        if fault == FaultKind.TRUNCATED:
            return await _truncated(request, json.dumps(envelope).encode())
        return web.json_response(envelope)
    finally:
        log.debug("request action=%s app_id=%s code=%s fault=%s delay_ms=%.0f", action,
                  request.query.get("AppId", ""), code, decision.fault and decision.fault.value,
                  decision.delay_s * 1000)


def _harness_error(status: int, message: str, code: int | None = None) -> web.Response:
    return web.json_response({"error": message, "code": code}, status=status)


def _since(request: web.Request) -> float | web.Response | None:
    """The `since` query parameter (Unix seconds), or the 400 that refuses it."""
    raw = request.query.get("since")
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return _harness_error(400, "since must be Unix seconds")


async def handle_ledger(request: web.Request) -> web.Response:
    """`GET /_sim/ledger[?since=UNIX_SECONDS]`: every transition so far, in order."""
    since = _since(request)
    if isinstance(since, web.Response):
        return since
    return web.json_response([t.to_json() for t in request.app[STATE].engine.ledger_since(since)])


async def handle_outcomes(request: web.Request) -> web.Response:
    """`GET /_sim/outcomes[?since=UNIX_SECONDS]`: every task whose files settled, in order, with
    its outcome (uploaded, backup, failed, no_files) and its files' final statuses."""
    since = _since(request)
    if isinstance(since, web.Response):
        return since
    return web.json_response([o.to_json()
                              for o in request.app[STATE].engine.outcomes_since(since)])


async def handle_summary(request: web.Request) -> web.Response:
    """`GET /_sim/summary`: the ledger's counts per room, upload outcomes included."""
    summary = request.app[STATE].engine.summary()
    return web.json_response([{"app_id": app_id, "room_id": room_id, **dataclasses.asdict(c)}
                              for (app_id, room_id), c in sorted(summary.items())])


async def handle_stats(request: web.Request) -> web.Response:
    """`GET /_sim/stats` (requests, rate-limited answers, busiest second), `DELETE` resets."""
    state = request.app[STATE]
    if request.method == "DELETE":
        state.traffic.reset()
        state.faults.injected.clear()
    return web.json_response({**state.traffic.to_json(), "faults": dict(state.faults.injected)})


async def handle_control(request: web.Request) -> web.Response:
    """`POST /_sim/control` {"op", "app_id", "room_id", "task_id", "at", "quit_reason"} ->
    {"task_id"}; quit_reason (abort only) is what the abort's callback reports."""
    state = request.app[STATE]
    try:
        body = await request.json()
        op = body["op"]
        app_id = None if body.get("app_id") is None else int(body["app_id"])
        at = None if body.get("at") is None else float(body["at"])
        quit_reason = None if body.get("quit_reason") is None else int(body["quit_reason"])
        room_id, task_id = body.get("room_id"), body.get("task_id")
        if op not in OPS or not isinstance(room_id, str | None) or not isinstance(
                task_id, str | None):
            raise ValueError(f"op must be one of {list(OPS)}; room_id, task_id strings")
    except (ValueError, KeyError, TypeError) as exc:
        return _harness_error(400, f"bad control request: {exc}")
    try:
        task_id = state.engine.control(op, app_id=app_id, room_id=room_id, task_id=task_id, at=at,
                                       quit_reason=quit_reason)
    except SimError as exc:
        status = {Code.TASK_NOT_FOUND: 404, Code.TASK_ALREADY_ENDED: 409}.get(exc.code, 400)
        return _harness_error(status, exc.message, int(exc.code))
    return web.json_response({"task_id": task_id})


async def handle_faults(request: web.Request) -> web.Response:
    """`GET /_sim/faults`; `POST` replaces the fault config (windows in clock Unix seconds)."""
    state = request.app[STATE]
    if request.method == "POST":
        try:
            state.set_faults(FaultConfig.from_json(await request.json()))
        except (ValueError, TypeError, AttributeError) as exc:
            return _harness_error(400, f"bad fault config: {exc}")
    return web.json_response(state.faults.config.to_json())


async def handle_callbacks(request: web.Request) -> web.Response:
    """`GET /_sim/callbacks[?task_id=]`: settings and every delivery attempt; `DELETE` clears."""
    sender = request.app[STATE].callbacks
    if sender is None:
        return web.json_response({"enabled": False, "deliveries": []})
    if request.method == "DELETE":
        sender.clear()
    return web.json_response(sender.to_json(request.query.get("task_id")))


async def handle_health(request: web.Request) -> web.Response:
    """`GET /_sim/health`: up, and the simulator clock's time."""
    return web.json_response({"status": "ok", "time": request.app[STATE].engine.clock.time()})


def create_app(engine: SimEngine, options: ServerOptions | None = None) -> web.Application:
    """The aiohttp application playing ZEGO Cloud Recording (and its `/_sim/*` harness)."""
    app = web.Application()
    app[STATE] = SimulatorState(engine, options or ServerOptions())
    app.router.add_post("/", handle_api)
    app.router.add_get("/_sim/health", handle_health)
    app.router.add_get("/_sim/ledger", handle_ledger)
    app.router.add_get("/_sim/summary", handle_summary)
    app.router.add_get("/_sim/outcomes", handle_outcomes)
    app.router.add_route("GET", "/_sim/stats", handle_stats)
    app.router.add_route("DELETE", "/_sim/stats", handle_stats)
    app.router.add_post("/_sim/control", handle_control)
    app.router.add_route("GET", "/_sim/faults", handle_faults)
    app.router.add_route("POST", "/_sim/faults", handle_faults)
    app.router.add_route("GET", "/_sim/callbacks", handle_callbacks)
    app.router.add_route("DELETE", "/_sim/callbacks", handle_callbacks)

    async def release_hangs(app: web.Application) -> None:
        app[STATE].closing.set()

    async def deliver_callbacks(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE]
        sender, interval = state.callbacks, state.options.callback_interval_s
        delivery = None
        if sender is not None and interval > 0:
            delivery = asyncio.create_task(sender.run(interval))
        yield
        if delivery is not None:
            delivery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await delivery
        if sender is not None:
            await sender.close()

    async def keep_up(app: web.Application) -> AsyncIterator[None]:
        engine = app[STATE].engine

        async def run() -> None:
            while True:
                engine.keep_up()
                await asyncio.sleep(KEEP_UP_SECONDS)  # real time, whatever the engine's clock

        task = asyncio.create_task(run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.on_shutdown.append(release_hangs)
    app.cleanup_ctx.append(deliver_callbacks)
    app.cleanup_ctx.append(keep_up)
    return app


class SimulatorServer:
    """`async with SimulatorServer(engine) as sim:` serves the simulator at `sim.url`."""

    def __init__(self, engine: SimEngine, options: ServerOptions | None = None,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine = engine
        self.app = create_app(engine, options)
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def state(self) -> SimulatorState:
        return self.app[STATE]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

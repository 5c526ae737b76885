"""The ZEGO client end to end against the simulator: every error code, retries, ZEGO's shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openapi_core.testing import MockRequest

from exporter.clock import ManualClock
from exporter.config import Secret
from exporter.simulator.engine import LifecycleRates, SimEngine
from exporter.simulator.faults import FaultConfig, FaultKind, FaultRule
from exporter.simulator.server import ServerOptions, SimulatorServer
from exporter.zego.client import (
    DESCRIBE_RECORD_STATUS,
    DESCRIBE_TASKS,
    RetryPolicy,
    ZegoApp,
    ZegoClient,
)
from exporter.zego.errors import (
    Code,
    Kind,
    ZegoApiError,
    ZegoError,
    ZegoResponseError,
    ZegoTransportError,
)
from exporter.zego.models import TaskStatus
from exporter.zego.ratelimit import Departure, RateLimiter, departure_trace
from tests.test_simulator_openapi import load_spec

APP_ID = 1234567890
SECRET = "0123456789abcdef0123456789abcdef"


@dataclass
class Harness:
    clock: ManualClock
    engine: SimEngine
    sim: SimulatorServer
    client: ZegoClient
    seen: list[tuple[str, str]] = field(default_factory=list)  # (action, label) per attempt

    def app(self, app_id: int = APP_ID, secret: str = SECRET) -> ZegoApp:
        actions = (DESCRIBE_TASKS, DESCRIBE_RECORD_STATUS)
        limiters = {a: RateLimiter(10, self.clock) for a in actions}
        return ZegoApp(app_id, Secret(secret), limiters)

    def faults(self, *rules: FaultRule, **settings: Any) -> None:
        self.sim.state.set_faults(FaultConfig(rules=rules, **settings))

    async def tasks(self, app: ZegoApp | None = None, status: int = 2, **kw: Any) -> Any:
        now_ms = int(self.clock.time() * 1000)
        args: dict[str, Any] = {"room_id": None, "start_ms": now_ms - 3_600_000,
                                "end_ms": now_ms, "page": 1, "page_size": 50, **kw}
        return await self.client.describe_tasks(app or self.app(), status, **args)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    clock = ManualClock(1_750_000_000.0)
    engine = SimEngine(clock, {APP_ID: SECRET}, seed=3, rooms=["r1", "r2"],
                       rates=LifecycleRates(arrivals_per_hour=0))
    async with SimulatorServer(engine, ServerOptions()) as sim, \
            aiohttp.ClientSession() as session:
        h = Harness(clock, engine, sim, None)  # type: ignore[arg-type]
        h.client = ZegoClient(session, sim.url, clock, timeout=0.5,
                              observe=lambda app, action, label, s: h.seen.append((action, label)))
        yield h


@pytest.mark.parametrize("list_key", ["TaskidList", "TaskList"])
async def test_lists_tasks_under_either_key(harness: Harness, list_key: str) -> None:
    harness.sim.state.options.list_key = list_key  # type: ignore[assignment]
    task = harness.engine.start(APP_ID, "r1")
    harness.clock.advance(10)
    page = await harness.tasks()
    assert [(t.task_id, t.room_id, t.status) for t in page.tasks] == [
        (task, "r1", TaskStatus.RECORDING)
    ]
    assert page.total_count == 1


async def test_record_status_of_an_aborted_task(harness: Harness) -> None:
    task = harness.engine.start(APP_ID, "r2")
    harness.clock.advance(30)
    harness.engine.abort(task)
    status = await harness.client.describe_record_status(harness.app(), task)
    assert status.status is TaskStatus.ENDED_ABNORMALLY
    assert status.end_ms is not None and status.end_ms > status.begin_ms


@pytest.mark.parametrize(
    ("app_id", "secret", "code"),
    [
        (APP_ID, "f" * 32, Code.SIGNATURE_ERROR),
        (987654321, SECRET, Code.SECRET_LOOKUP_FAILED),
    ],
)
async def test_credential_errors_are_not_retried(harness: Harness, app_id: int, secret: str,
                                                 code: Code) -> None:
    with pytest.raises(ZegoApiError) as caught:
        await harness.tasks(harness.app(app_id, secret))
    assert caught.value.code == code
    assert caught.value.kind is Kind.CREDENTIALS
    assert harness.seen == [(DESCRIBE_TASKS, str(int(code)))]


async def test_expired_signature_is_retried_once_then_a_credentials_error(
    harness: Harness,
) -> None:
    harness.faults(clock_skew_s=900)
    with pytest.raises(ZegoApiError) as caught:
        await harness.tasks()
    assert caught.value.code == Code.SIGNATURE_EXPIRED
    assert caught.value.kind is Kind.CREDENTIALS
    assert harness.seen == [(DESCRIBE_TASKS, "100000004")] * 2


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [({}, 4), ({"page_size": 51}, 2), ({"start_ms": 0}, 2)],
)
async def test_invalid_parameters_are_request_bugs_not_retried(
    harness: Harness, kwargs: dict[str, Any], status: int
) -> None:
    with pytest.raises(ZegoApiError) as caught:
        await harness.tasks(status=status, **kwargs)
    assert caught.value.code == Code.INVALID_PARAMETER
    assert caught.value.kind is Kind.REQUEST
    assert len(harness.seen) == 1


async def test_unknown_task_is_not_found(harness: Harness) -> None:
    with pytest.raises(ZegoApiError) as caught:
        await harness.client.describe_record_status(harness.app(), "nope")
    assert caught.value.code == Code.TASK_NOT_FOUND
    assert caught.value.kind is Kind.NOT_FOUND


@pytest.mark.parametrize(
    ("kind", "label", "error"),
    [
        (FaultKind.RATE_LIMITED, "300000003", ZegoApiError),
        (FaultKind.SYSTEM_ERROR, "300010000", ZegoApiError),
        (FaultKind.GATEWAY_ERROR, "100000015", ZegoApiError),
        (FaultKind.HTTP_500, "http_5xx", ZegoTransportError),
        (FaultKind.HTTP_503, "http_5xx", ZegoTransportError),
        (FaultKind.RESET, "connection_error", ZegoTransportError),
        (FaultKind.HANG, "timeout", ZegoTransportError),
        (FaultKind.MALFORMED_JSON, "invalid_response", ZegoResponseError),
        (FaultKind.TRUNCATED, "invalid_response", ZegoResponseError),
    ],
)
async def test_transient_faults_are_retried_a_bounded_number_of_times(
    harness: Harness, kind: FaultKind, label: str, error: type[ZegoError]
) -> None:
    harness.faults(FaultRule(kind, 1.0), hang_seconds=2.0)
    started = harness.clock.time()
    with pytest.raises(error) as caught:
        await harness.tasks()
    assert caught.value.kind is Kind.RETRYABLE
    assert caught.value.label == label
    assert harness.seen == [(DESCRIBE_TASKS, label)] * RetryPolicy().attempts
    # Three backoffs of at least base/2 · 2^n seconds separate the four attempts.
    assert harness.clock.time() - started >= 0.25 + 0.5 + 1.0


async def test_a_transient_fault_then_success_returns_the_page(harness: Harness) -> None:
    harness.engine.start(APP_ID, "r1")
    harness.faults(FaultRule(FaultKind.HTTP_502, 1.0,
                             windows=((0, harness.clock.time() + 0.5),)))
    page = await harness.tasks()
    assert len(page.tasks) == 1
    assert harness.seen[0] == (DESCRIBE_TASKS, "http_5xx")
    assert harness.seen[-1] == (DESCRIBE_TASKS, "0")


async def test_rate_limited_answers_wait_at_least_a_second_before_retrying(
    harness: Harness,
) -> None:
    now = harness.clock.time()
    harness.faults(FaultRule(FaultKind.RATE_LIMITED, 1.0, windows=((0, now + 0.01),)))
    await harness.tasks()
    assert harness.seen == [(DESCRIBE_TASKS, "300000003"), (DESCRIBE_TASKS, "0")]
    assert harness.clock.time() - now >= 1.0


class RecordingLimiter(RateLimiter):
    """Keeps each grant: (clock at the grant, the Departure handed out)."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(10, clock)
        self.grants: list[tuple[float, Departure]] = []

    async def acquire(self) -> Departure:
        departure = await super().acquire()
        self.grants.append((self._clock.monotonic(), departure))
        return departure


async def test_a_request_stalled_on_its_way_out_is_counted_from_when_it_left(
    harness: Harness,
) -> None:
    """The injected fault: 5 s pass between the grant and the write (a busy loop). The limiter
    must count the request from the write, where the server sees it, not from the grant."""
    async def stall(*_: Any) -> None:
        harness.clock.advance(5.0)

    async def answered(*_: Any) -> None:
        harness.clock.advance(1.0)

    stalling = aiohttp.TraceConfig()
    stalling.on_request_start.append(stall)  # after the grant, before the connection and write
    stalling.on_request_end.append(answered)  # the answer comes a second after the write
    limiter = RecordingLimiter(harness.clock)
    app = ZegoApp(APP_ID, Secret(SECRET), {DESCRIBE_TASKS: limiter})
    async with aiohttp.ClientSession(trace_configs=[stalling, departure_trace()]) as session:
        client = ZegoClient(session, harness.sim.url, harness.clock)
        now_ms = int(harness.clock.time() * 1000)
        await client.describe_tasks(app, 2, None, now_ms - 60_000, now_ms)
    [(granted, departure)] = limiter.grants
    [arrived] = harness.sim.state.traffic.by_key[(APP_ID, DESCRIBE_TASKS)].arrivals
    assert departure.at == granted + 5.0 == arrived


async def test_without_the_trace_a_request_counts_from_when_its_call_ended(
    harness: Harness,
) -> None:
    """A session without departure_trace() (or a call that fails before writing) never leaves
    a grant unsent, which would hold its place in the window for good."""
    limiter = RecordingLimiter(harness.clock)
    app = ZegoApp(APP_ID, Secret(SECRET), {DESCRIBE_TASKS: limiter})
    harness.faults(FaultRule(FaultKind.HTTP_500, 1.0))
    with pytest.raises(ZegoTransportError):
        await harness.client.describe_tasks(app, 2, None, 0, 1)
    assert len(limiter.grants) == RetryPolicy().attempts
    assert all(departure.at is not None for _, departure in limiter.grants)


def test_errors_and_apps_never_show_the_secret() -> None:
    app = ZegoApp(APP_ID, Secret("s3cr3t-DO-NOT-LEAK"), {})
    error = ZegoApiError(DESCRIBE_TASKS, 100000005, "signature error")
    for text in (repr(app), str(app), repr(error), str(error), repr(app.secret)):
        assert "s3cr3t" not in text


class Capture:
    """A loopback server that records what the client sends and answers from a script."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes, str]] = []
        self.answers: list[Answer] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.query), await request.read(),
                              request.headers.get("Content-Type", "")))
        return self.answers.pop(0)()


Answer = Callable[[], web.Response]


def ok(data: Any) -> Answer:
    return lambda: web.json_response({"Code": 0, "Message": "succeed", "RequestId": "r",
                                      "Data": data})


def raw(body: bytes, status: int = 200) -> Answer:
    return lambda: web.Response(body=body, status=status, content_type="application/json")


@pytest.fixture
async def capture_client() -> AsyncIterator[tuple[Capture, ZegoClient, ZegoApp]]:
    capture = Capture()
    app = web.Application()
    app.router.add_post("/", capture.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    clock = ManualClock(1_750_000_000.0)
    limiters = {a: RateLimiter(10, clock) for a in (DESCRIBE_TASKS, DESCRIBE_RECORD_STATUS)}
    async with aiohttp.ClientSession() as session:
        yield (capture, ZegoClient(session, f"http://127.0.0.1:{port}/", clock),
               ZegoApp(APP_ID, Secret(SECRET), limiters))
    await runner.cleanup()


async def test_requests_match_zegos_openapi_description(
    capture_client: tuple[Capture, ZegoClient, ZegoApp],
) -> None:
    capture, client, app = capture_client
    capture.answers += [ok({"TotalCount": 0}), ok({"RoomId": "r", "Status": 3})]
    await client.describe_tasks(app, 2, "1230", 1628474401000, 1628475402000, 2, 50)
    await client.describe_record_status(app, "X3CgNeE4I1qAAABN")
    specs = {"DescribeTasks": load_spec("describe-tasks.yaml"),
             "DescribeRecordStatus": load_spec("describe-record-status.yaml")}
    for query, body, content_type in capture.requests:
        request = MockRequest("https://cloudrecord-api.zego.im", "post", "/", args=query,
                              data=body.decode(), content_type=content_type.split(";")[0])
        specs[query["Action"]].validate_request(request)  # raises on any mismatch
    assert json.loads(capture.requests[0][1]) == {
        "Status": 2, "RoomId": "1230", "StartTime": 1628474401000, "EndTime": 1628475402000,
        "PageOffset": 2, "PageSize": 50,
    }


async def test_each_retry_is_signed_afresh(
    capture_client: tuple[Capture, ZegoClient, ZegoApp],
) -> None:
    capture, client, app = capture_client
    capture.answers += [raw(b"", status=503), ok({"TotalCount": 0})]
    await client.describe_tasks(app, 2, None, 1, 2)
    nonces = [query["SignatureNonce"] for query, _, _ in capture.requests]
    assert len(nonces) == 2 and nonces[0] != nonces[1]


@pytest.mark.parametrize(
    "answer",
    [
        raw(b'{"Message": "no code"}'),
        raw(b'{"Code": "0"}'),
        raw(b"\xff\xfe not utf-8"),
        raw(b"[1, 2]"),
        ok({"TaskidList": [{"TaskId": 5}]}),
        raw(b"x" * (4 * 1024 * 1024 + 10)),
    ],
    ids=["missing-code", "string-code", "not-utf8", "not-an-object", "wrong-types", "huge"],
)
async def test_malformed_answers_are_invalid_responses(
    capture_client: tuple[Capture, ZegoClient, ZegoApp], answer: Answer
) -> None:
    capture, client, app = capture_client
    capture.answers += [answer] * RetryPolicy().attempts
    with pytest.raises(ZegoResponseError):
        await client.describe_tasks(app, 2, None, 1, 2)
    assert len(capture.requests) == RetryPolicy().attempts

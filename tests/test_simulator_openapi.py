"""Simulator requests and responses validate against ZEGO's own OpenAPI files."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from exporter.clock import ManualClock
from exporter.simulator.caller import SimCaller
from exporter.simulator.engine import LifecycleRates, SimEngine, room_names
from exporter.simulator.server import ServerOptions, SimulatorServer
from exporter.zego.models import TaskStatus
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET

SPECS = Path(__file__).resolve().parent.parent.parent / "shared" / "zego-openapi"
HOST = "https://cloudrecord-api.zego.im"
# ZEGO's own files use the deprecated allowEmptyValue; that is theirs to fix, not ours.
pytestmark = pytest.mark.filterwarnings("ignore:Use of allowEmptyValue:DeprecationWarning")
RATES = LifecycleRates(arrivals_per_hour=40, mean_duration_s=600, pause_probability=0.4,
                       abnormal_probability=0.2, no_stream_probability=0.1,
                       upload_failure_probability=0.3, upload_s=(60, 120))


def load_spec(name: str) -> OpenAPI:
    """One of ZEGO's files, its `servers` $ref resolved (it points at a list, which the
    OpenAPI schema does not allow in place); the other $refs resolve from the file's location."""
    path = SPECS / name
    spec = yaml.safe_load(path.read_text())
    shared = yaml.safe_load((SPECS / "shared-components.yaml").read_text())
    spec["servers"] = shared["servers"]
    return OpenAPI.from_dict(spec, base_uri=path.as_uri())


@pytest.fixture(scope="module")
def describe_tasks_spec() -> OpenAPI:
    return load_spec("describe-tasks.yaml")


@pytest.fixture(scope="module")
def record_status_spec() -> OpenAPI:
    return load_spec("describe-record-status.yaml")



@pytest.fixture
def engine(clock: ManualClock) -> SimEngine:
    engine = SimEngine(clock, {APP: SECRET}, seed=11, rooms=room_names(5), rates=RATES)
    clock.advance(6 * 3600)
    engine.advance_to(clock.time())
    return engine


class Exchanger:
    """Real requests to a simulator, returned as openapi-core request/response objects."""

    def __init__(self, sim: SimulatorServer, session: aiohttp.ClientSession,
                 clock: ManualClock) -> None:
        self.sim = sim
        self.caller = SimCaller(session, sim.url, APP, SECRET, clock)

    async def __call__(self, action: str, body: dict[str, Any]
                       ) -> tuple[MockRequest, MockResponse, dict[str, Any]]:
        params = self.caller.params(action)
        async with self.caller.session.post(self.sim.url, params=params, json=body) as response:
            raw = await response.read()
            status = response.status
        request = MockRequest(HOST, "post", "/", args=params, data=json.dumps(body).encode(),
                              content_type="application/json")
        return request, MockResponse(raw, status_code=status,
                                     content_type="application/json"), json.loads(raw)


@contextlib.asynccontextmanager
async def serving(engine: SimEngine, clock: ManualClock,
                  **options: Any) -> AsyncIterator[Exchanger]:
    async with SimulatorServer(engine, ServerOptions(rate_limits={}, **options)) as sim, \
            aiohttp.ClientSession() as session:
        yield Exchanger(sim, session, clock)


def window(clock: ManualClock, status: int, hours: float = 5) -> dict[str, Any]:
    now_ms = int(clock.time() * 1000)
    return {"Status": status, "StartTime": now_ms - int(hours * 3_600_000), "EndTime": now_ms,
            "PageSize": 50}


@pytest.mark.parametrize("semantics", ["inclusive", "strict"])
@pytest.mark.parametrize("status", [2, 3])
async def test_describe_tasks_answers_match_zegos_schema(
        describe_tasks_spec: OpenAPI, engine: SimEngine, clock: ManualClock,
        status: int, semantics: str) -> None:
    async with serving(engine, clock, status_semantics=semantics) as exchange:
        request, response, answer = await exchange("DescribeTasks", window(clock, status))
    describe_tasks_spec.validate_request(request)
    describe_tasks_spec.validate_response(request, response)
    assert answer["Data"]["TaskidList"]


async def test_the_tasklist_variant_carries_the_same_item_schema(
        describe_tasks_spec: OpenAPI, engine: SimEngine, clock: ManualClock) -> None:
    async with serving(engine, clock, list_key="TaskList") as exchange:
        request, _, answer = await exchange("DescribeTasks", window(clock, 3))
    data = answer["Data"]
    assert data["TaskList"]
    renamed = {**answer, "Data": {**{k: v for k, v in data.items() if k != "TaskList"},
                                  "TaskidList": data["TaskList"]}}
    describe_tasks_spec.validate_response(request, MockResponse(
        json.dumps(renamed).encode(), status_code=200, content_type="application/json"))


async def test_describe_tasks_errors_match_zegos_schema(
        describe_tasks_spec: OpenAPI, engine: SimEngine, clock: ManualClock) -> None:
    body = {**window(clock, 2), "EndTime": 0}
    async with serving(engine, clock) as exchange:
        request, response, answer = await exchange("DescribeTasks", body)
    assert answer["Code"] == 300000004
    describe_tasks_spec.validate_response(request, response)


async def test_record_status_answers_match_zegos_schema_in_every_state(
        record_status_spec: OpenAPI, engine: SimEngine, clock: ManualClock) -> None:
    now_ms = int(clock.time() * 1000)
    tasks = engine.list_tasks(APP, None, now_ms - 6 * 3_600_000, now_ms, frozenset(TaskStatus))
    fresh = engine.start(APP, "room-1")  # initialising: no files yet
    task_ids = [t.task_id for t in tasks[:60]] + [fresh]
    file_statuses: set[int] = set()
    task_statuses: set[int] = set()
    async with serving(engine, clock) as exchange:
        for task_id in task_ids:
            request, response, answer = await exchange("DescribeRecordStatus",
                                                       {"TaskId": task_id})
            record_status_spec.validate_request(request)
            record_status_spec.validate_response(request, response)
            task_statuses.add(answer["Data"]["Status"])
            file_statuses |= {f["Status"] for f in answer["Data"].get("RecordFiles", [])}
    assert task_statuses == {1, 2, 3, 4, 5}
    assert file_statuses == {1, 2, 3, 4, 5}


async def test_record_status_errors_match_zegos_schema(
        record_status_spec: OpenAPI, engine: SimEngine, clock: ManualClock) -> None:
    async with serving(engine, clock) as exchange:
        request, response, answer = await exchange("DescribeRecordStatus",
                                                   {"TaskId": "AAAAAAAAAAAAAAAA"})
    assert answer["Code"] == 300001000
    record_status_spec.validate_response(request, response)


def test_the_schema_check_rejects_an_undocumented_status(
        describe_tasks_spec: OpenAPI) -> None:
    body = {"Status": 2, "StartTime": 1, "EndTime": 2}
    request = MockRequest(HOST, "post", "/", args={"Action": "DescribeTasks"},
                          data=json.dumps(body).encode(), content_type="application/json")
    wrong = {"Code": 0, "Message": "succeed", "RequestId": "r", "Data": {"TaskidList": [
        {"RecordBeginTimestamp": 1, "TaskId": "AAAAAAAAAAAAAAAA", "RoomId": "r", "Status": 7}]}}
    with pytest.raises(Exception, match="Invalid"):
        describe_tasks_spec.validate_response(request, MockResponse(
            json.dumps(wrong).encode(), status_code=200, content_type="application/json"))


def record_file_schema() -> dict[str, Any]:
    spec = yaml.safe_load((SPECS / "describe-record-status.yaml").read_text())
    return spec["components"]["schemas"]["RecordFile"]


@pytest.mark.parametrize(("failure", "backup", "no_stream", "final"), [
    (0.0, 0.0, 0.0, {3}), (1.0, 1.0, 0.0, {4}), (1.0, 0.0, 0.0, {5}), (0.0, 0.0, 1.0, set())])
async def test_record_status_answers_match_zegos_schema_through_the_upload_progression(
        record_status_spec: OpenAPI, clock: ManualClock, failure: float, backup: float,
        no_stream: float, final: set[int]) -> None:
    rates = LifecycleRates(arrivals_per_hour=0, no_stream_probability=no_stream, max_streams=4,
                           upload_failure_probability=failure, backup_probability=backup,
                           upload_s=(20, 40), slow_upload_probability=0.5,
                           slow_upload_s=(100, 200))
    engine = SimEngine(clock, {APP: SECRET}, seed=4, rooms=["room-1"], rates=rates)
    task_ids = [engine.start(APP, "room-1") for _ in range(8)]
    seen: list[tuple[int, frozenset[int]]] = []
    schema = record_file_schema()
    types = {name: {"string": str, "integer": int}[prop["type"]]
             for name, prop in schema["properties"].items()}

    async def check(exchange: Exchanger) -> None:
        for task_id in task_ids:
            request, response, answer = await exchange("DescribeRecordStatus",
                                                       {"TaskId": task_id})
            record_status_spec.validate_response(request, response)
            data = answer["Data"]
            files = data.get("RecordFiles", [])
            assert "RecordFiles" not in data or files  # absent, never empty
            for f in files:  # every field of the schema but VideoId (VOD storage only)
                assert set(f) == set(types) - {"VideoId"}
                assert all(type(f[name]) is types[name] for name in f)
            seen.append((data["Status"], frozenset(f["Status"] for f in files)))

    async with serving(engine, clock) as exchange:
        await check(exchange)  # initialising
        clock.advance(60)
        await check(exchange)  # recording
        engine.pause(task_ids[0])
        await check(exchange)
        for task_id in task_ids:
            engine.stop(task_id)
        await check(exchange)  # uploading
        clock.advance(45)
        await check(exchange)  # settled, but for slow uploads
        clock.advance(300)
        await check(exchange)  # settled
    phases = {status for status, _ in seen}
    assert phases == {1, 2, 3, 5}
    files_seen: set[int] = set().union(*(statuses for _, statuses in seen))
    if final:
        assert files_seen == {1, 2} | final
        assert seen[-1][1] == frozenset(final)
        assert any(statuses == frozenset({2, *final}) for _, statuses in seen)
    else:
        assert files_seen == set()
    settled = {o.task_id: o.outcome.value for o in engine.outcomes}
    assert set(settled) == set(task_ids)

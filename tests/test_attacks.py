"""The running daemon under attack over loopback: both listeners, a state file, the simulator.

Each finding of the attack review is a case here. Throughout, /metrics answers 200 and parses,
cycles keep succeeding, the state file keeps being written, no line is logged at error level or
with a traceback, and every room's counters equal the simulator's ledger. (The web config,
basic auth, config file and state file attacks have their own files: test_web_security.py,
test_webconfig_fuzz.py, test_config.py, test_config_fuzz.py, test_store.py, test_store_fuzz.py.)
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import AppConfig, Secret
from exporter.daemon import Exporter, ListenAddress
from exporter.logs import configure_logging
from exporter.state.changes import EventKind
from exporter.zego.callback_signing import callback_signature
from tests.conftest import APP_ID, Rig

CALLBACK_SECRET = "cb-secret-0123456789"
ROOMS = ("r1", "r2", "r3")
Factory = Callable[..., Any]


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """Every log line of the test, as JSON."""
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    yield stream
    configure_logging()


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


class Target:
    """The rig's exporter serving /metrics and callbacks, with a state file."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.sequence = 0
        self.nonce = 0

    @property
    def exporter(self) -> Exporter:
        return self.rig.exporter

    def signed(self, task_id: str, room_id: str, event_type: int, **fields: Any
               ) -> dict[str, Any]:
        """A callback as ZEGO signs it: a fresh nonce, the current time."""
        self.nonce += 1
        self.sequence += 1
        timestamp, nonce = str(int(self.rig.clock.time())), f"n{self.nonce}"
        body = {"app_id": APP_ID, "task_id": task_id, "room_id": room_id,
                "event_type": event_type, "message": "", "nonce": nonce,
                "timestamp": timestamp, "signature": callback_signature(CALLBACK_SECRET,
                                                                        timestamp, nonce),
                "sequence": self.sequence, "detail": {}}
        body.update(fields)
        return body

    async def post(self, body: dict[str, Any] | bytes) -> tuple[int, str]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        url = f"http://127.0.0.1:{self.exporter.callback_port}/callback"
        async with aiohttp.ClientSession() as http, http.post(url, data=data) as response:
            return response.status, await response.text()

    async def scrape(self) -> dict[tuple[str, str], float]:
        """/metrics, which must answer 200 and parse: the counters by (name, room)."""
        url = f"http://127.0.0.1:{self.exporter.bound_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 200
            text = await response.text()
        return {(s.name, s.labels.get("room_id", "")): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    async def restart(self) -> None:
        """A new exporter on the same state file, config and listeners' kind."""
        old = self.exporter
        await old.stop()
        self.rig.exporter = Exporter(old.config, clock=self.rig.clock,
                                     storage_path=old.store.path if old.store else None)
        await self.rig.exporter.start(ListenAddress("127.0.0.1", 0), schedule=False,
                                      callback_listen=ListenAddress("127.0.0.1", 0))

    async def cycle(self) -> None:
        await self.rig.cycle()
        assert self.exporter.state.apps[APP_ID].up

    async def check(self) -> None:
        """A cycle, then everything that must hold whatever was sent."""
        await self.cycle()
        exposition = self.exporter.exposition
        exposition.invalidate()
        exposition.prerender()
        await exposition.settled()  # a scrape during a render gets the render before it
        metrics = await self.scrape()
        self.rig.assert_counters_match_ledger(ROOMS)
        for room in ROOMS:
            counted = self.rig.counters(room)[EventKind.ENDED_ABNORMALLY]
            assert metrics[("zego_cloudrecord_tasks_ended_abnormally_total", room)] == counted
        assert self.exporter.state.storage_errors == 0
        assert self.exporter.state.internal_errors == {}


@pytest.fixture
async def target(rig_factory: Factory, tmp_path: Path, logs: io.StringIO
                 ) -> AsyncIterator[Target]:
    rig: Rig = await rig_factory(rooms=ROOMS)
    await rig.exporter.stop()
    config = rig.exporter.config
    app = replace(config.apps[0], callback_secret=Secret(CALLBACK_SECRET))
    assert isinstance(app, AppConfig)
    rig.exporter = Exporter(replace(config, apps=(app,)), clock=rig.clock,
                            storage_path=tmp_path / "state.db")
    await rig.exporter.start(ListenAddress("127.0.0.1", 0), schedule=False,
                             callback_listen=ListenAddress("127.0.0.1", 0))
    target = Target(rig)
    await target.cycle()
    yield target
    # asyncio's note on a stopped server's request task, collected now, is not this daemon's
    # (some aiohttp 3.14 releases leave one behind after a refused Expect).
    errors = [line for line in log_lines(logs)
              if (line.get("level") == "ERROR" or "exception" in line)
              and not line["msg"].startswith("Task was destroyed but it is pending")]
    assert errors == []


async def live_task(target: Target, room: str = "r1") -> str:
    task = target.rig.engine.start(APP_ID, room)
    await target.cycle()
    return task


# 1. Values that would become labels.

@pytest.mark.parametrize("quit_reason", ["\ud800", {"a": 1}, "x" * 100_000, 7, -1, 2**70, None],
                         ids=["lone-surrogate", "object", "100KB", "undocumented", "negative",
                              "huge", "missing"])
async def test_a_quit_reason_is_a_documented_code_or_one_bucket(target: Target,
                                                                quit_reason: object) -> None:
    task = await live_task(target)
    target.rig.engine.abort(task)
    detail = {} if quit_reason is None else {"quit_reason": quit_reason}
    status, _ = await target.post(target.signed(task, "r1", 2, detail=detail))
    assert status == 200
    reasons = target.exporter.state.apps[APP_ID].ended_by_reason
    bucket = "unknown" if quit_reason is None else "other"
    assert reasons[bucket] == 1
    assert sum(reasons.values()) == 1
    await target.check()
    await target.restart()  # what was stored renders too
    await target.check()


# 2. Ids that would become stored keys.

@pytest.mark.parametrize("task_id", ["\ud800", "a\x00b", "line\nbreak", "", "t" * 257, 5],
                         ids=["lone-surrogate", "nul", "newline", "empty", "too-long", "number"])
async def test_an_unusable_task_id_is_refused_and_saves_go_on(target: Target,
                                                             task_id: object) -> None:
    await live_task(target)
    status, _ = await target.post(target.signed(task_id, "r1", 2))  # type: ignore[arg-type]
    assert status == 400
    await target.check()
    assert target.exporter.state.apps[APP_ID].up


async def test_an_unusable_room_id_is_refused(target: Target) -> None:
    status, _ = await target.post(target.signed("t-x", "r\u202e1\x1b[31m", 2))
    assert status == 400
    await target.check()


# 3. A signature is good for one body.

async def test_a_captured_signature_cannot_carry_another_body(target: Target) -> None:
    task = await live_task(target)
    target.rig.engine.pause(task)
    pause = target.signed(task, "r1", 201)
    assert (await target.post(pause))[0] == 200
    forged = {**pause, "event_type": 2, "sequence": pause["sequence"] + 1,
              "detail": {"quit_reason": 6}}
    assert (await target.post(forged))[0] == 401
    assert (await target.post(pause))[0] == 200  # ZEGO's retry, byte for byte: a duplicate
    results = {r: n for (_, _, r), n in target.exporter.state.callbacks.items()}
    assert results == {"applied": 1, "replayed": 1, "duplicate": 1}
    await target.check()
    assert target.rig.counters("r1")[EventKind.ENDED_ABNORMALLY] == 0


async def test_the_nonce_of_a_retry_refused_as_a_duplicate_cannot_carry_another_body(
        target: Target) -> None:
    """ZEGO may sign a retry afresh: same task, event and sequence, a new nonce."""
    task = await live_task(target)
    target.rig.engine.pause(task)
    pause = target.signed(task, "r1", 201)
    assert (await target.post(pause))[0] == 200
    retry = target.signed(task, "r1", 201, sequence=pause["sequence"])
    assert (await target.post(retry))[0] == 200  # a duplicate
    forged = {**retry, "event_type": 2, "sequence": retry["sequence"] + 1}
    assert (await target.post(forged))[0] == 401
    await target.check()
    assert target.rig.counters("r1")[EventKind.ENDED_ABNORMALLY] == 0


async def test_a_replay_is_refused_even_when_its_first_use_was(target: Target) -> None:
    task = await live_task(target)
    first = {**target.signed(task, "r1", 2), "task_id": 5}  # refused as malformed, nonce spent
    assert (await target.post(first))[0] == 400
    assert (await target.post({**first, "task_id": task}))[0] == 401
    await target.check()


# 4. Bodies that used to raise.

def nested(depth: int) -> bytes:
    return b'{"detail": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("body", [
    lambda t, task: {**t.signed(task, "r1", 2), "signature": "é" * 40},
    lambda t, task: {**t.signed(task, "r1", 2), "signature": "\ud800"},
    lambda t, task: nested(50_000),
    lambda t, task: nested(500),
    lambda t, task: t.signed(task, "r1", 1, detail={"file_info": 5}),
    lambda t, task: t.signed(task, "r1", 1, detail={"file_info": [5, "x"]}),
    lambda t, task: t.signed(task, "r1", 1, detail=[1]),
    lambda t, task: {**t.signed(task, "r1", 2), "timestamp": "1e9"},
    lambda t, task: {**t.signed(task, "r1", 2), "sequence": 2**80},
    lambda t, task: {**t.signed(task, "r1", 2), "app_id": 2**80},
    lambda t, task: {**t.signed(task, "r1", 2), "event_type": 1.5},
    lambda t, task: b'{"app_id": 1' + b"1" * 5000 + b"}",
    lambda t, task: b"\xff\xfe\x00",
    lambda t, task: b"[]",
], ids=["non-ascii-signature", "surrogate-signature", "nested-50000", "nested-500",
        "file-info-number", "file-info-not-objects", "detail-list", "timestamp-float",
        "sequence-huge", "app-id-huge", "event-type-float", "integer-5000-digits",
        "not-utf8", "not-an-object"])
async def test_a_hostile_body_gets_a_4xx_and_changes_nothing(
        target: Target, body: Callable[[Target, str], dict[str, Any] | bytes]) -> None:
    task = await live_task(target)
    status, _ = await target.post(body(target, task))
    assert 400 <= status < 500
    assert task in target.exporter.state.apps[APP_ID].tracking.live
    await target.check()


# 6. Requests the HTTP parser refuses.

async def raw_exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("listener", ["metrics", "callbacks"])
async def test_a_malformed_request_line_is_a_counted_400_without_a_traceback(
        target: Target, listener: str, logs: io.StringIO) -> None:
    port = target.exporter.bound_port if listener == "metrics" else target.exporter.callback_port
    assert port is not None
    for _ in range(50):
        answer = await raw_exchange(port, b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
    refused = {reason: n for (where, reason), n in target.exporter.state.refused.items()
               if where == listener}
    assert sum(refused.values()) == 50
    warnings = [line for line in log_lines(logs) if line["msg"] == "request_refused"]
    assert 1 <= len(warnings) <= 2  # at a bounded rate
    await target.check()


async def test_a_body_over_the_limit_gets_413_before_100_continue(target: Target) -> None:
    port = target.exporter.callback_port
    assert port is not None
    answer = await raw_exchange(port, b"POST /callback HTTP/1.1\r\nHost: x\r\n"
                                      b"Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"100 Continue" not in answer


async def test_a_body_within_the_limit_gets_100_continue(target: Target) -> None:
    port = target.exporter.callback_port
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /callback HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"HTTP/1.1 100 Continue\r\n"
        writer.write(b"{}")  # then the body, and the callback's answer
        answer = await asyncio.wait_for(reader.read(), 5)
        assert b"HTTP/1.1 400" in answer
    finally:
        writer.close()


async def test_an_unknown_expectation_gets_417(target: Target) -> None:
    assert target.exporter.bound_port is not None
    answer = await raw_exchange(target.exporter.bound_port,
                                b"GET /metrics HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 417")


@pytest.mark.parametrize(("accept_encoding", "gzipped"), [
    ("*;q=0, gzip", True), ("gzip;q=0.5", True), ("*", True), ("x-gzip", True),
    ("gzip;q=0", False), ("*;q=0", False), ("identity", False), ("gzip;q=2", False),
])
async def test_gzip_is_used_exactly_when_the_client_gives_it_weight(
        target: Target, accept_encoding: str, gzipped: bool) -> None:
    url = f"http://127.0.0.1:{target.exporter.bound_port}/metrics"
    async with aiohttp.ClientSession(auto_decompress=False) as http, http.get(
            url, headers={"Accept-Encoding": accept_encoding}) as response:
        assert (response.headers.get("Content-Encoding") == "gzip") is gzipped


@pytest.mark.parametrize("request_line", [b"GET /metrics HTTP/1.1", b"GET /a b HTTP/1.1",
                                          b"FOO /metrics HTTP/1.1"])
async def test_no_answer_names_the_python_or_aiohttp_version(target: Target,
                                                             request_line: bytes) -> None:
    assert target.exporter.bound_port is not None
    answer = await raw_exchange(target.exporter.bound_port,
                                request_line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = answer.split(b"\r\n\r\n")[0].lower()
    assert b"server: zego-cloudrecord-exporter" in head
    assert b"python" not in head and b"aiohttp" not in head


@pytest.mark.parametrize(("method", "status"), [("PUT", 405), ("DELETE", 405), ("FOO", 400)])
async def test_other_methods_are_refused_and_counted(target: Target, method: str,
                                                     status: int) -> None:
    """Methods the HTTP parser knows get 405 from the router; one it has never heard of is
    refused by the parser itself, before any route is matched (documented in the README)."""
    assert target.exporter.bound_port is not None
    answer = await raw_exchange(target.exporter.bound_port,
                                method.encode() + b" /metrics HTTP/1.1\r\nHost: x\r\n"
                                b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert answer.split(b" ")[1] == str(status).encode()
    assert sum(target.exporter.state.refused.values()) == 1


async def test_a_bug_in_a_handler_is_contained_counted_and_logged_once(
        target: Target, logs: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault injected into the callback path: 500s, one traceback, then the daemon goes on."""
    task = await live_task(target)

    def broken(body: bytes) -> tuple[str, str, str]:
        raise KeyError("injected")

    monkeypatch.setattr(target.exporter.callbacks, "handle", broken)
    for _ in range(20):
        assert (await target.post(target.signed(task, "r1", 201)))[0] == 500
    assert target.exporter.state.internal_errors == {"callbacks_handler": 20}
    lines = [line for line in log_lines(logs) if line["msg"] == "internal_error"]
    assert sum("exception" in line for line in lines) == 1
    assert len(lines) <= 2
    monkeypatch.undo()
    target.exporter.state.internal_errors.clear()
    logs.truncate(0)
    logs.seek(0)
    await target.check()


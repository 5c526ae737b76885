"""GET /api/v1/events: the last counted events, newest first, filtered; kept across restarts;
behind the same auth as /metrics; a bad query is a 400 naming the parameter, never a 500."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.daemon import Exporter, ListenAddress
from exporter.serve.webconfig import WebConfig
from exporter.state.changes import ChangeSet, EventKind, Source, TaskEvent
from exporter.state.model import RECENT_EVENTS, AppState
from exporter.state.store import Store
from tests.conftest import APP_ID, StartExporter, make_config

T0 = 1_750_000_000_000


def events_of(app: AppState, count: int, start: int = 0) -> None:
    """`count` counted events: starts in rooms a and b, and one abnormal end in b."""
    for i in range(start, start + count):
        room = "a" if i % 2 == 0 else "b"
        app.apply(ChangeSet(Source.POLL, T0 + i * 1000,
                            (TaskEvent(EventKind.STARTED, f"t{i}", room),), observed_ms=T0))
    app.apply(ChangeSet(Source.CALLBACK, T0 + 10**7, (
        TaskEvent(EventKind.ENDED, "t1", "b", Source.CALLBACK, 12.5),
        TaskEvent(EventKind.ENDED_ABNORMALLY, "t1", "b", Source.CALLBACK, quit_reason="6"))))


async def get(exporter: Exporter, query: str = "", auth: str | None = None
              ) -> tuple[int, Any]:
    headers = {"Authorization": auth} if auth else {}
    url = f"http://127.0.0.1:{exporter.bound_port}/api/v1/events{query}"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        body = await response.json() if response.content_type == "application/json" \
            else await response.text()
        return response.status, body


async def test_events_come_newest_first_with_their_task_source_and_reason(
        serve: StartExporter) -> None:
    exporter = await serve()
    events_of(exporter.state.apps[APP_ID], 4)
    status, body = await get(exporter)
    assert status == 200
    events = body["events"]
    assert [e["event"] for e in events] == ["ended_abnormally", "ended", "started", "started",
                                            "started", "started"]
    assert events[0] == {"time": "2025-06-15T17:53:20.000Z", "app_id": APP_ID, "room_id": "b",
                         "task_id": "t1", "event": "ended_abnormally", "source": "callback",
                         "quit_reason": 6, "duration_s": None}
    assert events[1]["duration_s"] == 12.5 and events[1]["quit_reason"] is None
    assert events[2]["source"] == "poll" and events[2]["task_id"] == "t3"


@pytest.mark.parametrize(("query", "tasks"), [
    ("?room_id=a", ["t2", "t0"]),
    ("?event=ended_abnormally", ["t1"]),
    ("?room_id=b&event=started", ["t3", "t1"]),
    (f"?app_id={APP_ID}&limit=2", ["t1", "t1"]),
    ("?app_id=1", []),
    ("?room_id=nowhere", []),
])
async def test_filters_and_limit(serve: StartExporter, query: str, tasks: list[str]) -> None:
    exporter = await serve()
    events_of(exporter.state.apps[APP_ID], 4)
    status, body = await get(exporter, query)
    assert status == 200
    assert [e["task_id"] for e in body["events"]] == tasks


@pytest.mark.parametrize(("query", "says"), [
    ("?limit=0", "limit"), ("?limit=1001", "limit"), ("?limit=x", "limit"),
    ("?limit=99999999999999999999", "limit"), ("?app_id=-1", "app_id"),
    ("?app_id=12345678901", "app_id"), ("?event=exploded", "event"),
    ("?room_id=%00", "room_id"), ("?room_id=", "room_id"), ("?color=red", "unknown parameter"),
    ("?limit=1&limit=2", "twice"),
])
async def test_a_bad_query_is_a_400_naming_the_parameter(serve: StartExporter, query: str,
                                                        says: str) -> None:
    exporter = await serve()
    status, body = await get(exporter, query)
    assert status == 400 and says in body
    assert exporter.state.refused[("metrics", "bad_request")] == 1
    assert exporter.state.internal_errors == {}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=st.dictionaries(st.sampled_from(["app_id", "room_id", "event", "limit", "x"]),
                              st.text(max_size=30)))
async def test_any_query_gets_events_or_a_400(serve: StartExporter,
                                               params: dict[str, str]) -> None:
    exporter = await serve()
    events_of(exporter.state.apps[APP_ID], 2)
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{exporter.bound_port}/api/v1/events", params=params) as response:
        assert response.status in (200, 400)
        if response.status == 200:
            assert isinstance((await response.json())["events"], list)
    assert exporter.state.internal_errors == {}


async def test_it_keeps_the_last_thousand_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    app = AppState(APP_ID, ("a", "b"))
    events_of(app, 700)
    store = Store(path)
    store.save(app)
    events_of(app, 600, start=700)  # a second save: only the new events are written
    store.save(app)
    store.close()
    with sqlite3.connect(path) as db:  # the file keeps no more than it serves
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == RECENT_EVENTS
    db.close()
    exporter = Exporter(make_config("http://127.0.0.1:9/", ("a", "b")), storage_path=str(path))
    await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False)
    try:
        status, body = await get(exporter, f"?limit={RECENT_EVENTS}")
    finally:
        await exporter.stop()
    assert status == 200
    events = body["events"]
    assert len(events) == RECENT_EVENTS
    assert events[0]["event"] == "ended_abnormally"
    assert [e["task_id"] for e in events[2:4]] == ["t1299", "t1298"]
    assert events[-1]["task_id"] == f"t{1304 - RECENT_EVENTS}"  # 1,304 counted: the oldest 304 gone


async def test_it_asks_for_the_same_password_as_metrics(tmp_path: Path,
                                                        serve: StartExporter) -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: {hashed}\n")
    exporter = await serve(WebConfig(config))
    assert (await get(exporter))[0] == 401
    good = "Basic " + base64.b64encode(b"prometheus:pw").decode()
    assert (await get(exporter, auth=good))[0] == 200


async def test_the_landing_page_shows_the_latest_events(serve: StartExporter) -> None:
    exporter = await serve()
    events_of(exporter.state.apps[APP_ID], 60)
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{exporter.bound_port}/") as response:
        page = await response.text()
    assert page.count("<td>started</td>") == 48  # 50 rows: the abnormal end's two, 48 starts
    assert "<td>t59</td>" in page and "<td>t10</td>" not in page
    assert "<td>ended_abnormally</td><td>callback</td><td>6</td>" in page

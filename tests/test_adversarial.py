"""Adversarial upstream answers over real HTTP: the client refuses them, the poller invents nothing.

A scripted "ZEGO" on loopback answers DescribeTasks and DescribeRecordStatus from payloads
hypothesis generates: wrong types, missing fields, lying or absurd TotalCounts, duplicate TaskIds,
unknown statuses, rows of other rooms, non-UTF-8 bytes, lone surrogates, huge, deeply nested,
empty and HTML bodies, odd Codes and Data. A small reference validator written here from
../shared/zego-api.md (not from exporter/zego/models.py) says what each answer is; the tests
check the client and the poller against it:

* the client raises only ZegoError subclasses, and counts every attempt with the label the
  answer deserves (`invalid_response`, `http_5xx`, ZEGO's code, or `0`);
* `run_cycle` never raises, and a failed listing makes the cycle fail with no event;
* no tracked task is counted ended, ended abnormally or lost unless a well-formed answer said so
  (its own row with status 3/4 in its own room, DescribeRecordStatus 3/4, or 300001000);
* /metrics and / keep answering 200 throughout.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from exporter.clock import ManualClock
from exporter.config import Secret
from exporter.daemon import Exporter, ListenAddress
from exporter.state.changes import ChangeSet, EventKind, TaskEvent
from exporter.zego.client import (
    DESCRIBE_RECORD_STATUS,
    DESCRIBE_TASKS,
    MAX_BODY_BYTES,
    RetryPolicy,
    ZegoApp,
    ZegoClient,
)
from exporter.zego.errors import ZegoError
from exporter.zego.models import RecordStatus, TaskPage
from exporter.zego.ratelimit import RateLimiter
from tests.conftest import APP_ID, SECRET, make_config

NOW_S = 1_750_000_000.0
NOW_MS = int(NOW_S * 1000)
ROOMS = ("r1", "r2")
TRACKED = {"T1": ("r1", 2), "T2": ("r1", 5), "T3": ("r2", 2)}  # TaskId -> (room, status)
NEW_IDS = ("N1", "N2")
TASK_IDS = (*TRACKED, *NEW_IDS)
NOT_FOUND = 300001000
SAFE_INT = 2**53 - 1  # JSON's exact integer range; ZEGO's ints (ms timestamps) sit well inside
ADVERSARIAL = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


# The scripted upstream.


@dataclass(frozen=True)
class Reply:
    body: bytes
    status: int = 200
    content_type: str = "application/json"
    reset: bool = False  # drop the connection instead of answering


def envelope(code: Any = 0, data: Any = None, **extra: Any) -> bytes:
    return json.dumps({"Code": code, "Message": "succeed", "RequestId": "rid", "Data": data,
                       **extra}).encode()


def page(rows: list[dict[str, Any]], total: int | None = None) -> Reply:
    return Reply(envelope(0, {"PageOffset": 1, "PageSize": 50,
                              "TotalCount": len(rows) if total is None else total,
                              "TaskidList": rows}))


def row(task_id: str, room: str, status: int, begin_ms: int = NOW_MS - 3_600_000
        ) -> dict[str, Any]:
    return {"TaskId": task_id, "RoomId": room, "Status": status,
            "RecordBeginTimestamp": begin_ms}


def record_status(status: int) -> Reply:
    return Reply(envelope(0, {"RoomId": "r1", "Status": status,
                              "RecordBeginTimestamp": NOW_MS - 3_600_000}))


Key = tuple[Any, ...]


def request_key(action: str, body: Mapping[str, Any]) -> Key:
    if action == DESCRIBE_TASKS:
        return (action, body.get("Status"), body.get("RoomId"), body.get("PageOffset"),
                body.get("PageSize"))
    return (action, body.get("TaskId"))


@dataclass
class Served:
    action: str
    key: Key
    reply: Reply


@dataclass
class ScriptedZego:
    """Answers each request key from its script (attempt n gets reply n, the last repeats)."""

    script: dict[Key, list[Reply]] = field(default_factory=dict)
    default: Callable[[Key], Reply] = lambda key: Reply(b"")
    served: list[Served] = field(default_factory=list)
    in_flight: int = 0
    _attempts: Counter[Key] = field(default_factory=Counter)

    def reset(self, script: dict[Key, list[Reply]], default: Callable[[Key], Reply]) -> None:
        self.script, self.default = script, default
        self.served, self._attempts = [], Counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            action = request.query["Action"]
            key = request_key(action, json.loads(await request.read()))
            replies = self.script.get(key) or [self.default(key)]
            reply = replies[min(self._attempts[key], len(replies) - 1)]
            self._attempts[key] += 1
            self.served.append(Served(action, key, reply))
            if reply.reset:
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            return web.Response(body=reply.body, status=reply.status,
                                content_type=reply.content_type)
        finally:
            self.in_flight -= 1


async def serve(zego: ScriptedZego) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/", zego.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/"


# The reference: what each answer is, from the API description alone.


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= SAFE_INT


def _text(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
        return False
    return True


def _id(max_bytes: int) -> Callable[[Any], bool]:
    """An id ZEGO could send: non-empty text, no control character, at most `max_bytes`."""
    def check(value: Any) -> bool:
        return (_text(value) and 0 < len(value.encode("utf-8")) <= max_bytes
                and not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f for c in value))
    return check


def _optional(obj: dict[str, Any], key: str, check: Callable[[Any], bool]) -> bool:
    return obj.get(key) is None or check(obj[key])


def _timestamp(value: Any) -> bool:
    return _int(value) and value >= 0


def reference_rows(data: Any) -> list[dict[str, Any]] | None:
    """DescribeTasks' Data if ZEGO could have sent it (its rows), else None."""
    if not isinstance(data, dict):
        return None
    lists = [data[k] for k in ("TaskidList", "TaskList") if data.get(k) is not None]
    if len(lists) == 2 and lists[0] != lists[1]:
        return None
    items = lists[0] if lists else []
    if not isinstance(items, list):
        return None
    if not (_optional(data, "TotalCount", lambda v: _int(v) and v >= 0)
            and _optional(data, "PageOffset", _int) and _optional(data, "PageSize", _int)):
        return None
    by_id: dict[str, dict[str, Any]] = {}
    for item in items:
        if not (isinstance(item, dict) and _id(256)(item.get("TaskId"))
                and _id(128)(item.get("RoomId")) and item.get("Status") in (1, 2, 3, 4, 5)
                and _int(item["Status"]) and _timestamp(item.get("RecordBeginTimestamp"))):
            return None
        if by_id.setdefault(item["TaskId"], item) != item:
            return None  # one page naming a task twice, differently: no answer at all
    return items


def reference_status(data: Any) -> int | None:
    """DescribeRecordStatus' Data status if ZEGO could have sent it, else None."""
    if not isinstance(data, dict):
        return None
    files = data.get("RecordFiles")
    if files is not None and not (isinstance(files, list) and all(
            isinstance(f, dict) and _optional(f, "FileId", _text)
            and _optional(f, "StreamId", _text) and _optional(f, "Status", _int)
            for f in files)):
        return None
    if not ((not data.get("RoomId") or _id(128)(data["RoomId"]))
            and _optional(data, "RecordBeginTimestamp", _timestamp)
            and _optional(data, "RecordEndTimestamp", _timestamp)):
        return None
    status = data.get("Status")
    return status if _int(status) and status in (1, 2, 3, 4, 5) else None


def decode(reply: Reply) -> Any:
    try:
        return json.loads(reply.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def expected_label(action: str, reply: Reply) -> str:
    """How `zego_cloudrecord_api_requests_total` must count one attempt answered with `reply`."""
    if reply.reset:
        return "connection_error"
    if reply.status >= 500:
        return "http_5xx"
    if len(reply.body) > MAX_BODY_BYTES:
        return "invalid_response"
    answer = decode(reply)
    if not isinstance(answer, dict) or not _int(answer.get("Code")):
        return "invalid_response"
    if answer["Code"] != 0:
        return str(answer["Code"])
    if reply.status >= 400:
        return "invalid_response"
    data = answer.get("Data")
    valid = (reference_rows(data) is not None if action == DESCRIBE_TASKS
             else reference_status(data) is not None)
    return "0" if valid else "invalid_response"


RETRIED = {"invalid_response", "http_5xx", "connection_error", "timeout", "300000003",
           "300010000", "100000015"}


def expected_attempts(action: str, replies: list[Reply]) -> list[str]:
    """The labels of the attempts the client makes against `replies` (the last one repeating)."""
    labels: list[str] = []
    expired_once = False
    while len(labels) < 10:
        label = expected_label(action, replies[min(len(labels), len(replies) - 1)])
        labels.append(label)
        if label == "100000004" and not expired_once:
            expired_once = True
            continue
        if label not in RETRIED or len(labels) >= RetryPolicy().attempts:
            return labels
    raise AssertionError("the client should have stopped")


# Strategies: adversarial answers.

DEEP = b"[" * 100_000 + b"]" * 100_000
GARBAGE_BODIES = [
    b"",
    b"<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>",
    b"\xff\xfe\x00\x01 not utf-8",
    b'{"Code": 0, "Data": {"TaskidList": [{"TaskId": "\xff\xfe", "RoomId": "r1"}]}}',
    DEEP,
    b'{"Code": 0, "Data": ' + DEEP + b"}",
    b'{"Code": 0, "Data": {"TaskidList": [' + b"[" * 5000 + b"]" * 5000 + b"]}}",
    b"null",
    b'"Code"',
    b"[0]",
    b'{"Code": NaN}',
    b'{"Code": 0, "Data": {"TotalCount": Infinity}}',
    b'{"Code": 1e400}',
    b'{"Code": 0, "Data": {"TotalCount": ' + b"9" * 5000 + b"}}",
    b'\xef\xbb\xbf{"Code": 0, "Data": {}}',
    b'{"Code": 0, "Data": {"TaskidList": [',
    b'{"Code": 0, "Data": {"TaskidList": [{"TaskId": "\\ud800", "RoomId": "r1", "Status": 3, '
    b'"RecordBeginTimestamp": 1}]}}',
]
HUGE_BODY = b'{"Code": 0, "Data": {"TaskidList": [' + b"{}," * (MAX_BODY_BYTES // 3) + b"{}]}}"

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats()
                | st.text(max_size=6) | st.sampled_from(
                    ["\ud800", "0", "2", "4", 2**53, 2**63, 10**400, -(10**400), -1, 0.0, 4.0]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)
room_ids = st.sampled_from([*ROOMS, "r3", "", "\ud800", "r1 "])
task_ids = st.sampled_from([*TASK_IDS, "", "\ud800"])
statuses = st.sampled_from([1, 2, 3, 4, 5]) | st.sampled_from([0, 6, 99, -4, "4", 4.0, True])
# Well-formed begins stay inside the window the poller asks for; one outside it is pinned by
# test_a_row_from_outside_the_window_is_not_later_counted_lost below.
begins = (st.integers(NOW_MS - 2 * 86_400_000, NOW_MS)
          | st.sampled_from([-1, 2**53, 2**63, 10**400, "1", 1.5e12]))


@st.composite
def corrupted(draw: st.DrawFn, value: dict[str, Any]) -> dict[str, Any]:
    """`value` itself, or with one key removed or given a value of any type."""
    how = draw(st.sampled_from(["keep", "keep", "drop", "retype"]))
    if how == "keep" or not value:
        return value
    key = draw(st.sampled_from(sorted(value)))
    changed = {k: v for k, v in value.items() if k != key}
    if how == "retype":
        changed[key] = draw(json_values)
    return changed


@st.composite
def task_rows(draw: st.DrawFn, room: str | None) -> dict[str, Any]:
    task_id = draw(task_ids)
    # A tracked task's row under another room is pinned by its own test below.
    room_id = TRACKED[task_id][0] if task_id in TRACKED else draw(st.just(room or "r1") | room_ids)
    return draw(corrupted({
        "TaskId": task_id,
        "RoomId": room_id,
        "Status": draw(statuses),
        "RecordBeginTimestamp": draw(begins),
    }))


@st.composite
def page_data(draw: st.DrawFn, room: str | None) -> Any:
    rows: list[dict[str, Any]] = draw(st.lists(task_rows(room), max_size=5))
    duplicate: bool = draw(st.booleans())
    if rows and duplicate:  # a duplicate in the page: the same row, or another one
        rows.append(draw(st.sampled_from(rows) | task_rows(room)))
    if draw(st.integers(0, 9)) == 0:  # a full page, so the poller asks for the next one
        rows += [row(f"F{i}", room or "r1", 2) for i in range(50 - len(rows))]
    total = draw(st.just(len(rows)) | st.integers(0, 120)
                 | st.sampled_from([-1, 10**9, 10**400, "3", 3.0, None, True]))
    data: dict[str, Any] = {"PageOffset": 1, "PageSize": 50, "TotalCount": total}
    placement = draw(st.sampled_from(["TaskidList", "TaskList", "both", "differ", "none"]))
    if placement in ("TaskidList", "both", "differ"):
        data["TaskidList"] = rows
    if placement in ("TaskList", "both"):
        data["TaskList"] = rows
    if placement == "differ":
        data["TaskList"] = rows[:-1] if rows else [row("N1", "r1", 4)]
    return draw(corrupted(data) | st.sampled_from([None, [], [data], "Data", 0]))


@st.composite
def status_data(draw: st.DrawFn) -> Any:
    data = {"RoomId": draw(room_ids), "Status": draw(statuses),
            "RecordBeginTimestamp": draw(begins),
            "RecordEndTimestamp": draw(st.none() | begins),
            "RecordFiles": draw(st.sampled_from([[], None, 0, {}, "", [{"FileId": "f"}], [1]]))}
    return draw(corrupted(data) | st.sampled_from([None, [], "Data"]))


codes = (st.just(0) | st.just(0) | st.sampled_from(
    [NOT_FOUND, 300010000, 300000003, 100000005, 100000004, 300000004, 99, -1, 10**30])
    | st.sampled_from(["0", str(NOT_FOUND), True, False, 0.0, float(NOT_FOUND), None, [0],
                       {"Code": 0}]))


@st.composite
def plausible(draw: st.DrawFn, action: str, room: str | None) -> Reply:
    """A well-formed answer that may say anything: tasks ended, paused, unknown to ZEGO."""
    if action == DESCRIBE_RECORD_STATUS:
        return draw(st.sampled_from([1, 2, 3, 4, 5]).map(record_status)
                    | st.sampled_from([NOT_FOUND, 300010000]).map(
                        lambda code: Reply(envelope(code, None))))
    by_id: dict[str, dict[str, Any]] = {}
    for _ in range(draw(st.integers(0, 4))):
        task_id = draw(st.sampled_from(TASK_IDS))
        by_id[task_id] = row(task_id, TRACKED.get(task_id, (room or "r1", 0))[0],
                             draw(st.sampled_from([1, 2, 3, 4, 5])),
                             draw(st.integers(NOW_MS - 2 * 86_400_000, NOW_MS)))
    rows = list(by_id.values())
    return page(rows, draw(st.just(len(rows)) | st.integers(0, 60)))


@st.composite
def replies(draw: st.DrawFn, action: str, room: str | None = None) -> Reply:
    kind = draw(st.sampled_from(["plausible"] * 4 + ["envelope"] * 4
                                + ["garbage", "huge", "reset"]))
    if kind == "plausible":
        return draw(plausible(action, room))
    if kind == "garbage":
        body = draw(st.sampled_from(GARBAGE_BODIES) | st.binary(max_size=40))
        return Reply(body, draw(st.sampled_from([200, 200, 404, 502])),
                     draw(st.sampled_from(["application/json", "text/html"])))
    if kind == "huge":
        return Reply(HUGE_BODY)
    if kind == "reset":
        return Reply(b"", reset=True)
    data = draw(page_data(room) if action == DESCRIBE_TASKS else status_data())
    answer: dict[str, Any] = {"Code": draw(codes), "Message": draw(json_values),
                              "RequestId": draw(json_values), "Data": data}
    answer = draw(corrupted(answer))
    body = json.dumps(answer).encode()
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]  # truncated
    return Reply(body, draw(st.sampled_from([200] * 6 + [302, 400, 404, 429, 500, 503])))


# The client alone.


async def run_client(action: str, script: list[Reply]) -> tuple[object, list[str], list[str]]:
    zego = ScriptedZego()
    zego.reset({}, lambda key: Reply(b""))
    zego.script = {(DESCRIBE_TASKS, 2, "r1", 1, 50): script, (DESCRIBE_RECORD_STATUS, "T1"): script}
    runner, url = await serve(zego)
    clock = ManualClock(NOW_S)
    seen: list[str] = []
    limiters = {a: RateLimiter(10, clock) for a in (DESCRIBE_TASKS, DESCRIBE_RECORD_STATUS)}
    app = ZegoApp(APP_ID, Secret(SECRET), limiters)
    try:
        async with aiohttp.ClientSession() as session:
            client = ZegoClient(session, url, clock, timeout=5.0,
                                observe=lambda _app, _action, label, _s: seen.append(label))
            outcome: object
            try:
                if action == DESCRIBE_TASKS:
                    outcome = await client.describe_tasks(app, 2, "r1", NOW_MS - 1000, NOW_MS)
                else:
                    outcome = await client.describe_record_status(app, "T1")
            except Exception as exc:  # the property: only ZegoError may come out
                outcome = exc
    finally:
        await runner.cleanup()
    served = [expected_label(s.action, s.reply) for s in zego.served]
    return outcome, seen, served


@ADVERSARIAL
@given(data=st.data(), action=st.sampled_from([DESCRIBE_TASKS, DESCRIBE_RECORD_STATUS]))
def test_client_raises_only_zego_errors_and_counts_each_attempt_by_what_it_got(
    data: st.DataObject, action: str
) -> None:
    script = data.draw(st.lists(replies(action, "r1"), min_size=1, max_size=4))
    outcome, seen, served = asyncio.run(run_client(action, script))
    assert not isinstance(outcome, Exception) or isinstance(outcome, ZegoError), repr(outcome)
    assert seen == served == expected_attempts(action, script)
    if seen[-1] == "0":
        assert isinstance(outcome, TaskPage if action == DESCRIBE_TASKS else RecordStatus)
    else:
        assert isinstance(outcome, ZegoError) and outcome.label == seen[-1]


def test_a_deeply_nested_body_is_an_invalid_response() -> None:
    outcome, seen, _ = asyncio.run(run_client(DESCRIBE_TASKS, [Reply(DEEP)]))
    assert isinstance(outcome, ZegoError), repr(outcome)
    assert seen == ["invalid_response"] * RetryPolicy().attempts


def test_absurd_integers_and_lone_surrogates_are_invalid_responses() -> None:
    for bad in ({"TotalCount": 10**400}, {"TaskidList": [row("T1", "r1", 2, 10**400)]},
                {"TaskidList": [row("T1", "\ud800", 2)]},
                {"TaskidList": [row("T1", "r1", 2), row("T1", "r1", 4)]}):
        outcome, seen, _ = asyncio.run(run_client(DESCRIBE_TASKS, [Reply(envelope(0, bad))]))
        assert isinstance(outcome, ZegoError), (bad, outcome)
        assert seen == ["invalid_response"] * RetryPolicy().attempts


# The poller and the daemon.


def scopes_of(rooms: tuple[str, ...] | None) -> list[str | None]:
    """What the poller may query: each room, or (its planner's choice, or "*") the whole app."""
    return [*(rooms or ()), None]


def baseline_script(rooms: tuple[str, ...] | None) -> dict[Key, list[Reply]]:
    return {
        (DESCRIBE_TASKS, 2, scope, 1, 50): [page([row(t, room, status)
                                                  for t, (room, status) in TRACKED.items()
                                                  if scope in (None, room)])]
        for scope in scopes_of(rooms)
    }


def benign(key: Key) -> Reply:
    """What an unscripted key gets: an empty page, or "still recording"."""
    if key[0] == DESCRIBE_TASKS:
        return page([])
    return record_status(TRACKED.get(key[1], ("", 2))[1])


@st.composite
def adversarial_scripts(draw: st.DrawFn, rooms: tuple[str, ...] | None
                        ) -> dict[Key, list[Reply]]:
    """Replies for some of a cycle's request keys (the rest get `benign`)."""
    script: dict[Key, list[Reply]] = {}
    for status in (2, 3):
        keys = [(scope, page_no, 50) for scope in scopes_of(rooms) for page_no in (1, 2)]
        for scope, page_no, size in [*keys, (None, 1, 1)]:  # (None, 1, 1): the planner's probe
            if draw(st.integers(0, 2)) > 0:
                script[(DESCRIBE_TASKS, status, scope, page_no, size)] = draw(
                    st.lists(replies(DESCRIBE_TASKS, scope), min_size=1, max_size=2))
    for task_id in TASK_IDS:
        if draw(st.booleans()):
            script[(DESCRIBE_RECORD_STATUS, task_id)] = draw(
                st.lists(replies(DESCRIBE_RECORD_STATUS), min_size=1, max_size=2))
    return script


@dataclass
class Evidence:
    """What well-formed answers said about each task during one cycle."""

    ended: dict[str, set[int]] = field(default_factory=dict)  # TaskId -> terminal statuses
    not_found: set[str] = field(default_factory=set)
    failed_listing: bool = False

    @classmethod
    def of(cls, served: list[Served]) -> Evidence:
        evidence = cls()
        last_label: dict[Key, str] = {}
        for s in served:
            label = expected_label(s.action, s.reply)
            last_label[s.key] = label
            answer = decode(s.reply) if label in ("0", str(NOT_FOUND)) else None
            if not isinstance(answer, dict):
                continue
            if s.action == DESCRIBE_RECORD_STATUS:
                task_id = s.key[1]
                if label == str(NOT_FOUND):
                    evidence.not_found.add(task_id)
                else:
                    status = reference_status(answer.get("Data"))
                    if status in (3, 4):
                        evidence.ended.setdefault(task_id, set()).add(status)
                continue
            if label != "0":
                continue
            for item in reference_rows(answer.get("Data")) or []:
                # A tracked task's own row, in its own room (a row claiming another room is
                # not about the task we track); a new task's row in any room.
                own_room = TRACKED.get(item["TaskId"], (item["RoomId"], 0))[0]
                if item["Status"] in (3, 4) and item["RoomId"] == own_room:
                    evidence.ended.setdefault(item["TaskId"], set()).add(item["Status"])
        evidence.failed_listing = any(
            label != "0" for key, label in last_label.items() if key[0] == DESCRIBE_TASKS)
        return evidence


def leftover_poller_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Poller coroutines still running that were not running before (there must be none)."""
    return {t for t in asyncio.all_tasks() - before
            if not t.done() and getattr(t.get_coro(), "__qualname__", "").startswith("AppPoller.")}


def assert_counted_as_served(counted: dict[tuple[str, str], int],
                             served: Counter[tuple[str, str]]) -> None:
    """Every served request is counted, under the label its reply deserves — or as
    `cancelled` when a failed sibling listing made the cycle give up on it mid-flight (it may
    or may not have reached the server first)."""
    cancelled = sum(n for (_, label), n in counted.items() if label == "cancelled")
    for key, n in counted.items():
        if key[1] != "cancelled":
            assert n <= served[key], (key, counted, dict(served))
    answered = sum(n for key, n in counted.items() if key[1] != "cancelled")
    assert answered <= sum(served.values()) <= answered + cancelled, (counted, dict(served))


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[tuple[str, str], float]:
    """/metrics and / must answer; returns api_requests_total by (action, code)."""
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    async with http.get(f"{base}/") as response:
        assert response.status == 200
        await response.read()
    return {(s.labels["action"], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "zego_cloudrecord_api_requests_total"}


async def run_poller(rooms: tuple[str, ...] | None, scripts: list[dict[Key, list[Reply]]]
                     ) -> list[tuple[int, TaskEvent]]:
    """Baseline, the `scripts` cycles, a well-formed cycle; checks each; returns (cycle, event)."""
    zego = ScriptedZego()
    runner, url = await serve(zego)
    clock = ManualClock(NOW_S)
    exporter = Exporter(make_config(url, rooms, timeout=5.0), clock=clock)
    events: list[tuple[int, TaskEvent]] = []
    app_state = exporter.state.apps[APP_ID]
    apply = app_state.apply

    cycle = 0

    def recording_apply(changes: ChangeSet) -> None:
        events.extend((cycle, e) for e in changes.events)
        apply(changes)

    app_state.apply = recording_apply  # type: ignore[method-assign,assignment]
    await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False)
    base = f"http://127.0.0.1:{exporter.bound_port}"
    poller = exporter.pollers[APP_ID]
    served_labels: Counter[tuple[str, str]] = Counter()
    evidence: list[Evidence] = []
    try:
        async with aiohttp.ClientSession() as http:
            all_scripts = [baseline_script(rooms), *scripts, baseline_script(rooms)]
            for cycle, script in enumerate(all_scripts):
                zego.reset(script, benign)
                before = asyncio.all_tasks()
                report = await poller.run_cycle()  # the property: it never raises
                leftover = leftover_poller_tasks(before)
                if leftover:  # a failed listing's sibling still paging: let it finish
                    await asyncio.wait(leftover, timeout=30)
                served_labels.update((s.action, expected_label(s.action, s.reply))
                                     for s in zego.served)
                evidence.append(Evidence.of(zego.served))
                cycle_events = [e for c, e in events if c == cycle]
                if evidence[-1].failed_listing:
                    assert not report.ok and cycle_events == [], "a failed listing inferred"
                counted = {(a, label): n for (app, a, label), n
                           in exporter.state.api.requests.items() if app == APP_ID}
                assert_counted_as_served(counted, served_labels)
                metrics = await scrape(http, base)
                assert metrics == counted
                clock.advance(15)
            assert report.ok, "the well-formed cycle after the adversarial ones failed"
    finally:
        await exporter.stop()
        await runner.cleanup()
    check_no_false_events(events, evidence)
    return events


def check_no_false_events(events: list[tuple[int, TaskEvent]], evidence: list[Evidence]) -> None:
    terminal: Counter[str] = Counter()
    started: Counter[str] = Counter()
    for cycle, counted in events:
        said = evidence[cycle]
        tid = counted.task_id
        if counted.kind is EventKind.ENDED:
            assert said.ended.get(tid), f"cycle {cycle}: {tid} counted ended without an answer"
            terminal[tid] += 1
        elif counted.kind is EventKind.ENDED_ABNORMALLY:
            assert 4 in said.ended.get(tid, set()), f"cycle {cycle}: {tid} false abnormal end"
        elif counted.kind is EventKind.LOST:
            assert tid in said.not_found, f"cycle {cycle}: {tid} counted lost without 300001000"
            terminal[tid] += 1
        elif counted.kind is EventKind.STARTED:
            assert tid not in TRACKED, f"cycle {cycle}: tracked {tid} counted as a new start"
            started[tid] += 1
        if tid in TRACKED:
            assert counted.room_id == TRACKED[tid][0], f"{tid}'s event moved to {counted.room_id}"
    assert all(n == 1 for n in terminal.values()), f"a task ended twice: {terminal}"
    assert all(n == 1 for n in started.values()), f"a task started twice: {started}"


@ADVERSARIAL
@given(data=st.data(), rooms=st.sampled_from([ROOMS, None]), cycles=st.integers(1, 2))
def test_adversarial_cycles_never_raise_never_invent_events_and_metrics_stay_up(
    data: st.DataObject, rooms: tuple[str, ...] | None, cycles: int
) -> None:
    scripts = [data.draw(adversarial_scripts(rooms)) for _ in range(cycles)]
    events = asyncio.run(run_poller(rooms, scripts))
    for kind in {e.kind for _, e in events if e.kind is not EventKind.STARTED}:
        event(f"counted {kind.value}")  # --hypothesis-show-statistics: the oracle is exercised


def test_a_tracked_task_reported_ended_in_its_own_listing_counts_once() -> None:
    """The oracle is not vacuous: a well-formed end is counted, and only once. (ZEGO lists a
    task under Status=3 only for a window holding its begin time; T1 began before the window,
    so the authoritative answer is its DescribeRecordStatus.)"""
    ended = {**still_live(ROOMS),
             (DESCRIBE_TASKS, 2, "r1", 1, 50): [page([row("T2", "r1", 5)])],
             (DESCRIBE_TASKS, 2, None, 1, 50): [page([row("T2", "r1", 5), row("T3", "r2", 2)])],
             (DESCRIBE_RECORD_STATUS, "T1"): [record_status(4)]}
    events = asyncio.run(run_poller(ROOMS, [ended, ended]))
    assert [(c, e.kind, e.task_id) for c, e in events] == [
        (1, EventKind.ENDED, "T1"), (1, EventKind.ENDED_ABNORMALLY, "T1")]


def test_a_lookup_answering_not_found_counts_lost() -> None:
    gone = {**still_live(ROOMS), (DESCRIBE_TASKS, 2, "r2", 1, 50): [page([])],
            (DESCRIBE_TASKS, 2, None, 1, 50): [page([row("T1", "r1", 2), row("T2", "r1", 5)])],
            (DESCRIBE_RECORD_STATUS, "T3"): [Reply(envelope(NOT_FOUND, None))]}
    events = asyncio.run(run_poller(ROOMS, [gone]))
    assert [(c, e.kind, e.task_id) for c, e in events] == [(1, EventKind.LOST, "T3")]


def test_a_failed_listing_leaves_no_request_running_after_the_cycle() -> None:
    async def scenario() -> set[asyncio.Task[Any]]:
        zego = ScriptedZego()
        runner, url = await serve(zego)
        exporter = Exporter(make_config(url, None, timeout=5.0), clock=ManualClock(NOW_S))
        await exporter.start(None, schedule=False)
        try:
            full = page([row(f"E{i}", "r1", 3) for i in range(50)], total=150)
            zego.reset({(DESCRIBE_TASKS, 2, None, 1, 50): [Reply(envelope(100000005))],
                        **{(DESCRIBE_TASKS, 3, None, n, 50): [full] for n in (1, 2, 3)}},
                       benign)
            before = asyncio.all_tasks()
            await exporter.pollers[APP_ID].run_cycle()
            leftover = leftover_poller_tasks(before)
            await asyncio.wait(leftover or {asyncio.create_task(asyncio.sleep(0))}, timeout=30)
            return leftover
        finally:
            await exporter.stop()
            await runner.cleanup()

    assert asyncio.run(scenario()) == set()


def still_live(rooms: tuple[str, ...] | None, *extra: dict[str, Any]) -> dict[Key, list[Reply]]:
    """The baseline's live listing, plus `extra` rows, for every scope."""
    return {(DESCRIBE_TASKS, 2, scope, 1, 50): [page([
        *(row(t, room, status) for t, (room, status) in TRACKED.items()
          if scope in (None, room)),
        *(r for r in extra if scope in (None, r["RoomId"]))])] for scope in scopes_of(rooms)}


@pytest.mark.parametrize("rooms", [ROOMS, None], ids=["per-room", "all-rooms"])
def test_a_tracked_task_is_not_ended_by_a_row_claiming_another_room(
    rooms: tuple[str, ...] | None,
) -> None:
    other = {(DESCRIBE_TASKS, 3, scope, 1, 50): [page([row("T1", "r2", 4)])]
             for scope in ("r2", None)}
    asyncio.run(run_poller(rooms, [other]))


def test_a_row_from_outside_the_window_is_not_later_counted_lost() -> None:
    asyncio.run(run_poller(ROOMS, [still_live(ROOMS, row("N1", "r1", 2, 0))]))

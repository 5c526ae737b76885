"""The simulator's recording status callbacks: ZEGO's shape, signature, events and delivery."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from exporter.clock import ManualClock, SystemClock
from exporter.simulator.callbacks import (
    QUIT_REASONS,
    CallbackSender,
    DeliveryOutcome,
)
from exporter.simulator.caller import SimCaller
from exporter.simulator.cli import build_parser, scenario_from_args
from exporter.simulator.engine import MAX_RECORD_SECONDS, LifecycleRates, SimEngine
from exporter.simulator.scenario import ScenarioError, parse_scenario
from exporter.simulator.server import ServerOptions, SimulatorServer
from exporter.zego.callback_signing import callback_signature, verify_callback_signature
from tests.conftest import APP_ID as APP
from tests.conftest import SECRET, START

CALLBACK_SECRET = "callback-secret-1"
QUIET = LifecycleRates(arrivals_per_hour=0.0, no_stream_probability=0.0)
FIELDS = {"app_id", "task_id", "room_id", "event_type", "message", "nonce", "timestamp",
          "signature", "sequence", "detail"}


@dataclass
class Receiver:
    """A callback endpoint on loopback: records each body, answers `statuses` in turn, then 200."""

    url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    delay_s: float = 0.0

    def events(self, task_id: str | None = None) -> list[int]:
        return [b["event_type"] for b in self.bodies if task_id in (None, b["task_id"])]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    received = Receiver()

    async def handle(request: web.Request) -> web.Response:
        received.bodies.append(await request.json())
        if received.delay_s:
            await asyncio.sleep(received.delay_s)
        status = received.statuses.pop(0) if received.statuses else 200
        return web.Response(status=status, text="ok")

    app = web.Application()
    app.router.add_post("/callback", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    received.url = f"http://127.0.0.1:{runner.addresses[0][1]}/callback"
    yield received
    await runner.cleanup()



SimFactory = Callable[..., Awaitable[SimulatorServer]]


@pytest.fixture
async def make_sim(clock: ManualClock, receiver: Receiver) -> AsyncIterator[SimFactory]:
    """A simulator calling back to `receiver`, delivering only when a test says so."""
    opened: list[SimulatorServer] = []

    async def make(seed: int = 1, rates: LifecycleRates = QUIET, **options: Any) -> SimulatorServer:
        engine = SimEngine(clock, {APP: SECRET}, seed=seed, rooms=["room-1", "room-2"],
                           rates=rates)
        settings: dict[str, Any] = {"callback_url": receiver.url,
                                    "callback_secrets": {APP: CALLBACK_SECRET},
                                    "callback_interval_s": 0.0, "rate_limits": {}, **options}
        sim = SimulatorServer(engine, ServerOptions(**settings))
        await sim.start()
        opened.append(sim)
        return sim

    yield make
    for sim in opened:
        await sim.stop()


def sender_of(sim: SimulatorServer) -> CallbackSender:
    assert sim.state.callbacks is not None
    return sim.state.callbacks


def assert_signed(body: dict[str, Any]) -> None:
    assert set(body) == FIELDS
    assert isinstance(body["app_id"], int) and isinstance(body["sequence"], int)
    assert isinstance(body["nonce"], str) and isinstance(body["timestamp"], str)
    assert body["timestamp"].isdigit()
    assert verify_callback_signature(CALLBACK_SECRET, body["timestamp"], body["nonce"],
                                     body["signature"])


def test_callback_signature_matches_zegos_test_vector() -> None:
    assert callback_signature("secret", "1470820198", "123412") == (
        "5bd59fd62953a8059fb7eaba95720f66d19e4517")
    assert verify_callback_signature("secret", "1470820198", "123412",
                                     "5BD59FD62953A8059FB7EABA95720F66D19E4517")
    assert not verify_callback_signature("other", "1470820198", "123412",
                                         "5bd59fd62953a8059fb7eaba95720f66d19e4517")


async def test_pause_resume_and_abort_are_called_back_as_201_202_and_2(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim()
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(10)
    await sender_of(sim).deliver_due(clock.time())
    assert receiver.bodies == []  # ZEGO has no "started" callback
    sim.engine.pause(task_id)
    clock.advance(10)
    sim.engine.resume(task_id)
    clock.advance(10)
    sim.engine.abort(task_id, quit_reason=1003)
    await sender_of(sim).deliver_due(clock.time())
    assert receiver.events() == [201, 202, 2]
    for body in receiver.bodies:
        assert_signed(body)
        assert (body["app_id"], body["room_id"], body["task_id"]) == (APP, "room-1", task_id)
    assert [b["sequence"] for b in receiver.bodies] == [0, 1, 2]
    assert [b["timestamp"] for b in receiver.bodies] == [
        str(int(START + 10)), str(int(START + 20)), str(int(START + 30))]
    assert receiver.bodies[2]["detail"] == {"quit_reason": 1003}


async def test_a_stopped_task_is_called_back_as_7_and_5_then_1_when_its_files_are_uploaded(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim()
    task_id = sim.engine.start(APP, "room-2")
    clock.advance(60)
    sim.engine.stop(task_id)
    sender = sender_of(sim)
    await sender.deliver_due(clock.time())
    assert receiver.events() == [7, 5]
    task = sim.engine.find(task_id)
    assert task is not None and task.end is not None
    uploaded_at = task.end + max(f.upload_s for f in task.files)
    await sender.deliver_due(uploaded_at - 0.01)
    assert receiver.events() == [7, 5]
    await sender.deliver_due(uploaded_at)
    assert receiver.events() == [7, 5, 1]
    upload = receiver.bodies[2]
    assert_signed(upload)
    assert upload["sequence"] == 2
    truth = task.describe(uploaded_at)["RecordFiles"]
    assert [(f["stream_id"], f["file_id"], f["file_url"], f["file_size"], f["duration"],
             f["status"]) for f in upload["detail"]["file_info"]] == [
        (f["StreamId"], f["FileId"], f["FileUrl"], f["FileSize"], f["Duration"], f["Status"])
        for f in truth]
    all_uploaded = all(f["Status"] == 3 for f in truth)
    assert upload["detail"]["upload_status"] == (1 if all_uploaded else 2)
    assert all(f["duration"] > 50_000 for f in upload["detail"]["file_info"])


async def test_sequence_numbers_count_from_zero_per_task(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim()
    first = sim.engine.start(APP, "room-1")
    second = sim.engine.start(APP, "room-2")
    clock.advance(10)
    for op in ("pause", "resume", "pause"):
        sim.engine.control(op, task_id=first)
        clock.advance(1)
    sim.engine.pause(second)
    clock.advance(1)
    sim.engine.abort(second)
    await sender_of(sim).deliver_due(clock.time())
    for task_id, events in ((first, [201, 202, 201]), (second, [201, 2])):
        bodies = [b for b in receiver.bodies if b["task_id"] == task_id]
        assert [b["sequence"] for b in bodies] == list(range(len(bodies)))
        # 6 (a stream that does not exist) now and then, for realism: here for the second task
        assert [b["event_type"] for b in bodies if b["event_type"] != 6] == events
    assert len(receiver.bodies) == 6


async def test_a_task_without_streams_is_called_back_as_4_every_30_seconds_until_it_ends(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    rates = LifecycleRates(arrivals_per_hour=0.0, no_stream_probability=1.0)
    sim = await make_sim(rates=rates)
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(100)
    sim.engine.stop(task_id)
    clock.advance(300)
    await sender_of(sim).deliver_due(clock.time())
    assert receiver.events() == [4, 4, 4, 7, 5]  # no 1: there are no files
    task = sim.engine.find(task_id)
    assert task is not None and task.first_recording is not None
    assert [int(b["timestamp"]) for b in receiver.bodies[:3]] == [
        int(task.first_recording + 30 * n) for n in (1, 2, 3)]


async def test_natural_abnormal_ends_report_quit_reasons_from_zegos_list(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    rates = LifecycleRates(arrivals_per_hour=120.0, mean_duration_s=60.0,
                           abnormal_probability=1.0)
    sim = await make_sim(rates=rates)
    clock.advance(1800)
    await sender_of(sim).deliver_due(clock.time())
    reasons = [b["detail"]["quit_reason"] for b in receiver.bodies if b["event_type"] == 2]
    assert len(reasons) >= 20
    assert set(reasons) <= set(QUIT_REASONS)
    assert len(set(reasons)) >= 4


async def test_a_task_ended_by_max_record_time_reports_quit_reason_4(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim()
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(MAX_RECORD_SECONDS)
    await sender_of(sim).deliver_due(clock.time())
    ends = [b for b in receiver.bodies if b["event_type"] == 2]
    assert [(b["task_id"], b["detail"]) for b in ends] == [(task_id, {"quit_reason": 4})]


async def test_a_failing_receiver_gets_two_retries_five_seconds_apart(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim()
    sender = sender_of(sim)
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(10)
    receiver.statuses = [500, 503]
    sim.engine.pause(task_id)
    paused_at = clock.time()
    await sender.deliver_due(paused_at)
    await sender.deliver_due(paused_at + 4.9)
    assert len(receiver.bodies) == 1
    await sender.deliver_due(paused_at + 5)
    await sender.deliver_due(paused_at + 9.9)
    assert len(receiver.bodies) == 2
    await sender.deliver_due(paused_at + 10)
    assert len(receiver.bodies) == 3 and receiver.bodies[0] == receiver.bodies[2]
    assert [(d.at - paused_at, d.attempt, d.outcome, d.status) for d in sender.deliveries] == [
        (0, 1, DeliveryOutcome.REJECTED, 500), (5, 2, DeliveryOutcome.REJECTED, 503),
        (10, 3, DeliveryOutcome.DELIVERED, 200)]
    assert sender.pending == 0


async def test_three_attempts_are_all_a_failing_receiver_gets(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim()
    sender = sender_of(sim)
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(10)
    receiver.statuses = [500] * 10
    sim.engine.pause(task_id)
    for step in range(0, 60, 5):
        await sender.deliver_due(clock.time() + step)
    assert len(receiver.bodies) == 3
    assert [d.attempt for d in sender.deliveries] == [1, 2, 3]
    assert sender.pending == 0


async def test_timeouts_and_refused_connections_are_failed_attempts_that_are_retried(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim(callback_timeout_s=0.2)
    sender = sender_of(sim)
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(10)
    sim.engine.pause(task_id)
    receiver.delay_s = 1.0
    await sender.deliver_due(clock.time())
    receiver.delay_s = 0.0
    sender.url = "http://127.0.0.1:9/refused"  # the discard port: nobody listens on loopback
    await sender.deliver_due(clock.time() + 5)
    sender.url = receiver.url
    await sender.deliver_due(clock.time() + 10)
    assert [d.outcome for d in sender.deliveries] == [
        DeliveryOutcome.TIMEOUT, DeliveryOutcome.CONNECTION_ERROR, DeliveryOutcome.DELIVERED]


async def test_with_loss_probability_one_nothing_is_sent_and_each_loss_is_recorded(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim(callback_loss=1.0, callback_duplicate=1.0)
    sender = sender_of(sim)
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(10)
    sim.engine.pause(task_id)
    sim.engine.abort(task_id)
    await sender.deliver_due(clock.time() + 60)
    assert receiver.bodies == []
    assert [(d.event_type, d.sequence, d.attempt, d.outcome) for d in sender.deliveries][:2] == [
        (201, 0, 0, DeliveryOutcome.LOST), (2, 1, 0, DeliveryOutcome.LOST)]
    assert all(d.outcome == DeliveryOutcome.LOST for d in sender.deliveries)


async def test_with_duplicate_probability_one_every_callback_arrives_twice(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim(callback_duplicate=1.0)
    sender = sender_of(sim)
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(10)
    sim.engine.pause(task_id)
    sim.engine.resume(task_id)
    await sender.deliver_due(clock.time())
    assert receiver.events() == [201, 201, 202, 202]
    assert receiver.bodies[0] == receiver.bodies[1] and receiver.bodies[2] == receiver.bodies[3]
    assert [d.duplicate for d in sender.deliveries] == [False, True, False, True]


async def run_busy_hour(clock: ManualClock, receiver: Receiver, seed: int,
                        every_s: float = 60.0) -> list[Any]:
    rates = LifecycleRates(arrivals_per_hour=60.0, mean_duration_s=300.0,
                           abnormal_probability=0.3, pause_probability=0.5,
                           no_stream_probability=0.1)
    engine = SimEngine(clock, {APP: SECRET}, seed=seed, rooms=["a", "b", "c"], rates=rates)
    sender = CallbackSender(engine, receiver.url, {APP: CALLBACK_SECRET}, loss=0.2,
                            duplicate=0.2)
    try:
        while clock.time() < START + 3600:
            clock.advance(every_s)
            await sender.deliver_due(clock.time())
    finally:
        await sender.close()
    return sorted(((d.body, d.attempt, d.outcome, d.duplicate) for d in sender.deliveries),
                  key=lambda d: (d[0]["task_id"], d[0]["sequence"], d[3], d[1]))


async def test_a_seed_replays_the_same_callbacks(receiver: Receiver) -> None:
    first = await run_busy_hour(ManualClock(START), receiver, seed=5)
    again = await run_busy_hour(ManualClock(START), receiver, seed=5, every_s=45.0)
    other = await run_busy_hour(ManualClock(START), receiver, seed=6)
    assert len(first) > 100
    assert first == again
    assert first != other
    outcomes = {(outcome, duplicate) for _, _, outcome, duplicate in first}
    assert (DeliveryOutcome.LOST, False) in outcomes
    assert (DeliveryOutcome.DELIVERED, True) in outcomes
    assert {body["event_type"] for body, *_ in first} >= {1, 2, 4, 5, 7, 201, 202}


async def test_history_from_before_the_start_is_not_called_back(
        clock: ManualClock, receiver: Receiver) -> None:
    rates = LifecycleRates(arrivals_per_hour=120.0, mean_duration_s=60.0)
    engine = SimEngine(clock, {APP: SECRET}, rooms=["a", "b"], rates=rates, warmup_s=600)
    assert any(t.to_status in (3, 4) for t in engine.ledger)
    sender = CallbackSender(engine, receiver.url, {APP: CALLBACK_SECRET})
    try:
        await sender.deliver_due(START)
        clock.advance(120)
        await sender.deliver_due(clock.time())
    finally:
        await sender.close()
    assert receiver.bodies
    assert min(int(b["timestamp"]) for b in receiver.bodies) >= START


async def test_the_harness_lists_deliveries_at_sim_callbacks(
        make_sim: SimFactory, clock: ManualClock) -> None:
    sim = await make_sim()
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(10)
    sim.engine.abort(task_id, quit_reason=6)
    await sender_of(sim).deliver_due(clock.time())
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.url + "_sim/callbacks") as response:
            listing = await response.json()
        assert listing["enabled"] is True and listing["apps"] == [APP]
        assert CALLBACK_SECRET not in str(listing)
        assert listing["pending"] == 1  # the files-uploaded callback, due later
        [delivery] = listing["deliveries"]
        assert delivery["outcome"] == "delivered" and delivery["status"] == 200
        assert delivery["body"]["detail"] == {"quit_reason": 6}
        async with session.get(sim.url + "_sim/callbacks", params={"task_id": "x"}) as response:
            assert (await response.json())["deliveries"] == []
        async with session.delete(sim.url + "_sim/callbacks") as response:
            assert (await response.json())["deliveries"] == []


async def test_the_harness_reports_callbacks_off_without_a_secret(clock: ManualClock) -> None:
    engine = SimEngine(clock, {APP: SECRET}, rates=QUIET)
    async with SimulatorServer(engine, ServerOptions(callback_url="http://x.invalid/")) as sim:
        assert sim.state.callbacks is None
        async with aiohttp.ClientSession() as session, session.get(
                sim.url + "_sim/callbacks") as response:
            assert await response.json() == {"enabled": False, "deliveries": []}


async def test_a_scripted_abort_over_the_harness_carries_its_quit_reason(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    sim = await make_sim()
    task_id = sim.engine.start(APP, "room-1")
    async with aiohttp.ClientSession() as session:
        body = {"op": "abort", "task_id": task_id, "quit_reason": 1007}
        async with session.post(sim.url + "_sim/control", json=body) as response:
            assert response.status == 200
        body = {"op": "pause", "task_id": task_id, "quit_reason": 3}
        async with session.post(sim.url + "_sim/control", json=body) as response:
            assert response.status == 400
    await sender_of(sim).deliver_due(clock.time())
    assert [b["detail"] for b in receiver.bodies] == [{"quit_reason": 1007}]


async def test_delivery_runs_in_the_background_and_does_not_hold_up_the_api(
        receiver: Receiver) -> None:
    clock = SystemClock()
    engine = SimEngine(clock, {APP: SECRET}, rooms=["room-1"], rates=QUIET)
    options = ServerOptions(callback_url=receiver.url, callback_secrets={APP: CALLBACK_SECRET},
                            callback_interval_s=0.02, rate_limits={})
    receiver.delay_s = 1.0  # a slow receiver
    async with SimulatorServer(engine, options) as sim, aiohttp.ClientSession() as session:
        task_id = engine.start(APP, "room-1")
        engine.abort(task_id)
        deadline = time.monotonic() + 5
        while not receiver.bodies:
            assert time.monotonic() < deadline, "no callback arrived"
            await asyncio.sleep(0.02)
        started = time.monotonic()
        answer = await SimCaller(session, sim.url, APP, SECRET, clock).call(
            "DescribeRecordStatus", {"TaskId": task_id})
        assert answer["Code"] == 0 and time.monotonic() - started < 0.5
    assert receiver.events() == [2]


def test_the_command_line_configures_callbacks() -> None:
    args = build_parser().parse_args([
        "--app", f"{APP}:{SECRET}", "--app", f"7:{SECRET}", "--callback-url",
        "http://127.0.0.1:9464/zego/callback", "--callback-secret", f"{APP}:{CALLBACK_SECRET}",
        "--callback-secret", "7:s:with:colons", "--callback-loss", "0.1",
        "--callback-duplicate", "0.25"])
    _, options = scenario_from_args(args).build(ManualClock(START))
    assert options.callback_url == "http://127.0.0.1:9464/zego/callback"
    assert options.callback_secrets == {APP: CALLBACK_SECRET, 7: "s:with:colons"}
    assert (options.callback_loss, options.callback_duplicate) == (0.1, 0.25)
    assert (options.callback_retry_delay_s, options.callback_attempts) == (5.0, 3)
    assert CALLBACK_SECRET not in repr(options)
    help_text = build_parser().format_help()
    assert "--callback-secret" in help_text and "--callback-duplicate" in help_text


@pytest.mark.parametrize("argv", [["--callback-loss", "1.5"], ["--callback-duplicate", "x"],
                                  ["--callback-secret", "app:secret"]])
def test_the_command_line_rejects_bad_callback_options(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--app", f"{APP}:{SECRET}", *argv])


def test_a_callback_secret_for_an_unknown_app_is_an_error() -> None:
    args = build_parser().parse_args(["--app", f"{APP}:{SECRET}", "--callback-url", "http://x/",
                                      "--callback-secret", "99:s"])
    with pytest.raises(ScenarioError, match=re.escape("callbacks.secrets")):
        scenario_from_args(args).build(ManualClock(START))


def test_a_scenario_configures_callbacks_and_scripted_quit_reasons() -> None:
    doc = yaml.safe_load(f"""
        apps:
          - {{app_id: {APP}, server_secret: {SECRET}, callback_secret: per-app}}
          - {{app_id: 7, server_secret: {SECRET}}}
        lifecycle: {{arrivals_per_hour: 0}}
        callbacks:
          url: http://127.0.0.1:9464/cb
          secrets: {{7: seven}}
          loss: 0.05
          duplicate: 0.1
          retry_delay_seconds: 2
          attempts: 2
        events:
          - {{at: 0, op: start, room: a, name: show}}
          - {{at: 30, op: abort, task: show, quit_reason: 1004}}
        """)
    clock = ManualClock(START)
    engine, options = parse_scenario(doc).build(clock)
    assert options.callback_url == "http://127.0.0.1:9464/cb"
    assert options.callback_secrets == {APP: "per-app", 7: "seven"}
    assert (options.callback_loss, options.callback_duplicate) == (0.05, 0.1)
    assert (options.callback_retry_delay_s, options.callback_attempts) == (2.0, 2)
    clock.advance(30)
    engine.advance_to(clock.time())
    assert list(engine.quit_reasons.values()) == [1004]


@pytest.mark.parametrize(("callbacks", "events", "message"), [
    ({"secrets": {APP: "s"}}, [], "callbacks.url"),
    ({"url": "http://x/", "secrets": {APP: "s"}, "loss": 2}, [], "callbacks.loss"),
    ({"url": "http://x/", "color": "red"}, [], "unknown keys"),
    ({}, [{"at": 0, "op": "pause", "room": "a", "quit_reason": 3}], "quit_reason"),
])
def test_a_bad_callbacks_section_is_an_error_naming_the_field(
        callbacks: dict[str, Any], events: list[dict[str, Any]], message: str) -> None:
    doc = {"apps": [{"app_id": APP, "server_secret": SECRET}], "callbacks": callbacks,
           "events": events}
    with pytest.raises(ScenarioError, match=re.escape(message)):
        parse_scenario(doc).build(ManualClock(START))


# -- upload callbacks (event 1) and the ledger's upload outcomes ------------------------------

@pytest.mark.parametrize(("failure", "backup", "upload_status", "file_status", "outcome"), [
    (0.0, 0.0, 1, 3, "uploaded"), (1.0, 1.0, 2, 4, "backup"), (1.0, 0.0, 2, 5, "failed")])
async def test_the_upload_callback_is_sent_when_the_files_settle_and_matches_the_outcome(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver, failure: float,
        backup: float, upload_status: int, file_status: int, outcome: str) -> None:
    rates = LifecycleRates(arrivals_per_hour=0.0, no_stream_probability=0.0, max_streams=3,
                           upload_failure_probability=failure, backup_probability=backup,
                           slow_upload_probability=1.0, slow_upload_s=(200, 400))
    sim = await make_sim(rates=rates)
    sender = sender_of(sim)
    task_id = next(t for t in (sim.engine.start(APP, "room-1") for _ in range(10))
                   if len(sim.engine.find(t).files) > 1)  # type: ignore[union-attr]
    clock.advance(90)
    sim.engine.stop(task_id)
    await sender.deliver_due(clock.time())
    task = sim.engine.find(task_id)
    assert task is not None and task.settle_at is not None
    await sender.deliver_due(task.settle_at - 0.01)
    assert receiver.events(task_id) == [7, 5]
    assert sim.engine.outcome(task_id) is None
    await sender.deliver_due(task.settle_at)
    assert receiver.events(task_id) == [7, 5, 1]
    settled = sim.engine.outcome(task_id)
    assert settled is not None and settled.outcome == outcome
    upload = [b for b in receiver.bodies if b["task_id"] == task_id][-1]
    assert_signed(upload)
    assert upload["timestamp"] == str(int(settled.at))
    detail = upload["detail"]
    assert detail["upload_status"] == upload_status
    assert [f["status"] for f in detail["file_info"]] == list(settled.file_statuses) == [
        file_status] * len(task.files)
    truth = task.describe(settled.at)["RecordFiles"]
    assert [(f["stream_id"], f["file_id"], f["file_url"], f["file_size"], f["duration"])
            for f in detail["file_info"]] == [
        (f["StreamId"], f["FileId"], f["FileUrl"], f["FileSize"], f["Duration"]) for f in truth]


async def test_a_recording_without_streams_gets_no_upload_callback(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    rates = LifecycleRates(arrivals_per_hour=0.0, no_stream_probability=1.0)
    sim = await make_sim(rates=rates)
    task_id = sim.engine.start(APP, "room-1")
    clock.advance(45)
    sim.engine.stop(task_id)
    await sender_of(sim).deliver_due(clock.time() + 3600)
    assert receiver.events(task_id) == [4, 7, 5]
    settled = sim.engine.outcome(task_id)
    assert settled is not None and settled.outcome == "no_files"


async def test_a_held_upload_callback_is_overtaken_and_keeps_its_sending_time(
        make_sim: SimFactory, clock: ManualClock, receiver: Receiver) -> None:
    rates = LifecycleRates(arrivals_per_hour=0.0, no_stream_probability=0.0, upload_s=(5, 5))
    sim = await make_sim(rates=rates)
    sender = sender_of(sim)
    first = sim.engine.start(APP, "room-1")
    clock.advance(30)
    sim.engine.stop(first)
    sender.hold(first, 1, 60)
    await sender.deliver_due(clock.time() + 30)
    assert receiver.events(first) == [7, 5]
    await sender.deliver_due(clock.time() + 65)
    assert receiver.events(first) == [7, 5, 1]
    upload = receiver.bodies[-1]
    assert upload["timestamp"] == str(int(clock.time() + 5))
    delivery = sender.deliveries[-1]
    assert delivery.event_type == 1 and delivery.late_s == pytest.approx(60)


async def test_upload_callbacks_over_a_busy_run_match_the_ledgers_outcomes(
        clock: ManualClock, receiver: Receiver) -> None:
    """One event 1 per settled task with files (lost ones included), sent when it settled,
    whatever is lost, repeated or late; files not uploaded add up to the ledger's count."""
    rates = LifecycleRates(arrivals_per_hour=60.0, mean_duration_s=240.0, abnormal_probability=0.3,
                           no_stream_probability=0.15, upload_failure_probability=0.4,
                           backup_probability=0.5, slow_upload_probability=0.2,
                           slow_upload_s=(60, 600))
    engine = SimEngine(clock, {APP: SECRET}, seed=9, rooms=["a", "b"], rates=rates)
    sender = CallbackSender(engine, receiver.url, {APP: CALLBACK_SECRET}, loss=0.2,
                            duplicate=0.3, late=0.3)
    try:
        while clock.time() < START + 2 * 3600:
            clock.advance(20)
            await sender.deliver_due(clock.time())
    finally:
        await sender.close()
    uploads: dict[str, Any] = {}
    for d in sender.deliveries:
        if d.event_type == 1:
            assert uploads.setdefault(d.task_id, d.body) == d.body  # one callback per task
    settled = {o.task_id: o for o in engine.outcomes}
    with_files = {t for t, o in settled.items() if o.outcome != "no_files"}
    assert len(with_files) > 50 and with_files == set(uploads)
    assert {o.outcome for o in settled.values()} == {"uploaded", "backup", "failed", "no_files"}
    for task_id, body in uploads.items():
        outcome = settled[task_id]
        assert body["timestamp"] == str(int(outcome.at))
        assert [f["status"] for f in body["detail"]["file_info"]] == list(outcome.file_statuses)
        assert body["detail"]["upload_status"] == (1 if outcome.outcome == "uploaded" else 2)
    not_uploaded = sum(c.files_not_uploaded for c in engine.summary().values())
    assert not_uploaded == sum(f["status"] != 3 for body in uploads.values()
                               for f in body["detail"]["file_info"]) > 0
    assert {d.outcome for d in sender.deliveries if d.event_type == 1} >= {
        DeliveryOutcome.LOST, DeliveryOutcome.DELIVERED}

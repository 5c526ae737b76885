"""The chaos soak, short and seeded: every fault, a 25 s API outage with tasks starting, pausing,
resuming and ending inside it, callbacks lost, repeated and late (a resume before its pause), a
killed exporter, both task-list keys — and the counters, the live gauges and the log lines equal
the simulator's ledger exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bench.soak import (
    APP_ID,
    LOGGED,
    SECRET,
    START,
    TASK_FIELDS,
    SoakReport,
    SoakSettings,
    audit_logs,
    run_soak,
)
from exporter.clock import ManualClock
from exporter.simulator.callbacks import CallbackEvent, CallbackSender
from exporter.simulator.engine import LifecycleRates, SimEngine

_RUNS: dict[SoakSettings, SoakReport] = {}


async def soak(settings: SoakSettings, workdir: Path) -> SoakReport:
    """One run per settings, shared by the tests that check different things about it."""
    if settings not in _RUNS:
        _RUNS[settings] = await run_soak(settings, workdir)
        print("\n" + _RUNS[settings].table())
    return _RUNS[settings]


def assert_harness_sound(report: SoakReport) -> None:
    """The simulator did what the soak scripted, and its callbacks match its ledger: a failure
    below is the exporter's."""
    assert report.harness_problems == []
    assert report.outage_cycles > 0
    assert report.outage_failed_cycles == report.outage_cycles


@pytest.mark.parametrize("list_key", ["TaskidList", "TaskList"])
async def test_counters_equal_the_ledger_under_chaos(tmp_path: Path, list_key: str) -> None:
    report = await soak(SoakSettings(rooms=16, hours=0.5, seed=5, list_key=list_key),
                            tmp_path)
    assert_harness_sound(report)
    assert report.mismatches == []
    assert report.lost == 0
    expected = report.totals(report.expected)
    assert all(expected[name] >= 10 for name in TASK_FIELDS), expected  # a busy half hour
    assert expected["upload_uploaded"] >= 10 and expected["upload_unknown"] == 0, expected
    # Every fault kind happened, and the clock-skew outage and the restart were survived.
    assert {"hang", "reset", "truncated", "malformed_json", "http_503", "rate_limited",
            "system_error", "gateway_error"} <= set(report.faults_injected)
    assert report.requests.get("100000004", 0) > 0
    assert report.failed_cycles > 0
    assert {"applied", "duplicate"} <= set(report.callbacks)
    assert report.callbacks_in_outage > 0
    assert report.late_deliveries > 0
    assert report.resume_before_pause > 0
    # With callbacks, most abnormal ends count within the driver's 0.5 s step (the late and
    # the lost ones wait for their callback or a poll).
    on_time = [s for s in report.abnormal_latency_s if s <= 1.0]
    assert len(on_time) >= 0.8 * len(report.abnormal_latency_s)


@pytest.mark.parametrize("list_key", ["TaskidList", "TaskList"])
async def test_live_gauges_equal_the_simulator_under_chaos(tmp_path: Path, list_key: str
                                                           ) -> None:
    report = await soak(SoakSettings(rooms=16, hours=0.5, seed=5, list_key=list_key),
                            tmp_path)
    assert_harness_sound(report)
    assert report.live_checked[0][1] > 5  # tasks were live when the gauges were compared
    assert report.live_mismatches == []


async def test_polling_alone_is_exact_too(tmp_path: Path) -> None:
    report = await soak(SoakSettings(rooms=12, hours=0.5, seed=8, callbacks=False,
                                         restart_at=0.6), tmp_path)
    assert_harness_sound(report)
    assert report.mismatches == []
    assert report.live_mismatches == []
    assert report.lost == 0
    assert max(report.abnormal_latency_s) <= 2 * 15 + 60  # a poll, or the restart's downtime


@pytest.mark.parametrize("callbacks", [True, False], ids=["callbacks", "polling"])
async def test_every_counted_event_has_one_log_line(tmp_path: Path, callbacks: bool) -> None:
    report = await soak(SoakSettings(rooms=12, hours=0.5, seed=11, callbacks=callbacks,
                                         restart_at=None), tmp_path)
    assert_harness_sound(report)
    assert report.logged is not None
    assert sum(sum(kinds.values()) for kinds in report.logged.values()) > 50
    assert report.log_mismatches == []
    assert report.log_problems == []


# -- the harness's own abilities ----------------------------------------------------------------

async def test_a_held_pause_callback_arrives_after_the_resume_with_its_own_sequence() -> None:
    bodies: list[dict[str, Any]] = []

    async def receive(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/callback", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    clock = ManualClock(START)
    engine = SimEngine(clock, {APP_ID: SECRET}, rooms=["a"],
                       rates=LifecycleRates(arrivals_per_hour=0.0, no_stream_probability=0.0))
    sender = CallbackSender(engine, f"http://127.0.0.1:{runner.addresses[0][1]}/callback",
                            {APP_ID: "cb"}, late=1.0, late_s=(2.0, 2.0))
    try:
        task_id = engine.start(APP_ID, "a", at=START + 1)
        engine.pause(task_id, at=START + 20)
        engine.resume(task_id, at=START + 30)
        sender.hold(task_id, CallbackEvent.PAUSED, 15.0)
        records = []
        while clock.time() < START + 60:
            clock.advance(0.5)
            records += await sender.deliver_due(clock.time())
    finally:
        await sender.close()
        await runner.cleanup()
    events = [(b["event_type"], b["sequence"], int(b["timestamp"])) for b in bodies
              if b["event_type"] in (CallbackEvent.PAUSED, CallbackEvent.RESUMED)]
    resumed, paused = events
    assert resumed[0] == CallbackEvent.RESUMED and paused[0] == CallbackEvent.PAUSED
    assert paused[1] < resumed[1] and paused[2] < resumed[2]  # sent first, delivered last
    assert sorted(round(r.late_s, 3) for r in records if r.event_type >= 201) == [2.0, 17.0]


def test_the_log_audit_finds_lines_without_fields_and_repeated_starts() -> None:
    line = {"event": "task_started", "app_id": APP_ID, "room_id": "a", "task_id": "t1",
            "via": "poll"}
    logged, problems = audit_logs([line, {**line, "via": None},
                                   {**line, "event": "task_paused", "via": "ui"},
                                   {"event": "poll_cycle_done", "room_id": "a"}])
    assert logged == {"a": {**dict.fromkeys(LOGGED, 0), "started": 2, "paused": 1}}
    assert problems == ["task_paused lines via 'ui': 1",
                        "task_started lines without via: 1",
                        "task_started logged more than once for 1 tasks"]

"""The chaos soak, short and seeded: every fault, a 25 s API outage with tasks starting, pausing,
resuming and ending inside it, callbacks lost, repeated and late (a resume before its pause), a
killed exporter, both task-list keys — and the counters, the live gauges and the log lines equal
the simulator's ledger exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import FIELDS, SoakReport, SoakSettings, run_soak

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
    assert all(expected[name] >= 10 for name in FIELDS), expected  # a busy half hour
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
    assert len(on_time) >= 0.75 * len(report.abnormal_latency_s)


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

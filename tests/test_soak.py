"""The chaos soak, short and seeded: every fault, callbacks lost and repeated, a killed
exporter, both task-list keys — and the counters equal the simulator's ledger exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import FIELDS, SoakSettings, run_soak


@pytest.mark.parametrize("list_key", ["TaskidList", "TaskList"])
async def test_counters_equal_the_ledger_under_chaos(tmp_path: Path, list_key: str) -> None:
    report = await run_soak(SoakSettings(rooms=16, hours=0.5, seed=5, list_key=list_key),
                            tmp_path)
    print("\n" + report.table())
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
    # With callbacks, most abnormal ends count within the driver's 0.5 s step.
    on_time = [s for s in report.abnormal_latency_s if s <= 1.0]
    assert len(on_time) >= 0.8 * len(report.abnormal_latency_s)


async def test_polling_alone_is_exact_too(tmp_path: Path) -> None:
    report = await run_soak(SoakSettings(rooms=12, hours=0.5, seed=8, callbacks=False,
                                         restart_at=0.6), tmp_path)
    print("\n" + report.table())
    assert report.mismatches == []
    assert report.lost == 0
    assert max(report.abnormal_latency_s) <= 2 * 15 + 60  # a poll, or the restart's downtime

"""Chaos soak: a busy simulated ZEGO with every fault, callbacks and a killed exporter, checked
against the simulator's ledger. `python -m bench.soak --hours 6` prints the table; the test suite
runs a short seeded version (tests/test_soak.py).

The exporter and the simulator share one manual clock, stepped by the driver: hours of
recordings run in seconds, and the run is the same for a seed. Every status of a recording lasts
at least `min_segment` (longer than any gap between two successful polls here: a failed cycle,
the clock-skew outage, the restart), which is what polling needs to see every pause and resume;
callbacks, some of them lost or repeated, make ends visible sooner.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.clock import ManualClock
from exporter.config import AppConfig, Config, Secret, ZegoConfig
from exporter.daemon import Exporter, ListenAddress
from exporter.demo import free_port
from exporter.simulator.engine import LifecycleRates, RoomCounts, SimEngine, room_names
from exporter.simulator.faults import FaultConfig, FaultKind, FaultRule
from exporter.simulator.server import ServerOptions, SimulatorServer, rate_limits
from exporter.state.changes import EventKind

APP_ID = 1234567890
SECRET = "0123456789abcdef0123456789abcdef"
CALLBACK_SECRET = "soak-callback-secret"
START = 1_760_000_000.0
STEP_S = 0.5  # the driver's clock step: callbacks are delivered and checked at this grain
FIELDS = ("started", "ended", "ended_abnormally", "paused", "resumed")
KIND_OF = {"started": EventKind.STARTED, "ended": EventKind.ENDED,
           "ended_abnormally": EventKind.ENDED_ABNORMALLY, "paused": EventKind.PAUSED,
           "resumed": EventKind.RESUMED}


@dataclass(frozen=True)
class SoakSettings:
    rooms: int = 40
    hours: float = 2.0
    seed: int = 1
    list_key: str = "TaskidList"
    poll_interval: float = 15.0
    callbacks: bool = True
    callback_loss: float = 0.05
    callback_duplicate: float = 0.1
    fault_probability: float = 0.01  # per fault kind, per request
    restart_at: float | None = 0.5  # fraction of the run at which the exporter is killed
    downtime_s: float = 60.0
    skew_outage_s: float = 45.0  # the simulator's clock jumps 15 min ahead for this long


@dataclass
class SoakReport:
    settings: SoakSettings
    expected: dict[str, dict[str, int]] = field(default_factory=dict)  # room -> field -> n
    counted: dict[str, dict[str, int]] = field(default_factory=dict)
    lost: int = 0
    abnormal_latency_s: list[float] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # result code -> count
    callbacks: dict[str, int] = field(default_factory=dict)
    faults_injected: dict[str, int] = field(default_factory=dict)
    cycles: int = 0
    failed_cycles: int = 0

    @property
    def mismatches(self) -> list[str]:
        return [f"{room}.{name}: ledger {self.expected[room][name]}, "
                f"exporter {self.counted[room][name]}"
                for room in self.expected for name in FIELDS
                if self.expected[room][name] != self.counted[room][name]]

    def totals(self, which: dict[str, dict[str, int]]) -> dict[str, int]:
        return {name: sum(room[name] for room in which.values()) for name in FIELDS}

    def table(self) -> str:
        lines = [f"{'room':<10}" + "".join(f"{n:>18}" for n in FIELDS)]
        for room in sorted(self.expected):
            cells = [f"{self.counted[room][n]}/{self.expected[room][n]}" for n in FIELDS]
            lines.append(f"{room:<10}" + "".join(f"{c:>18}" for c in cells))
        want, got = self.totals(self.expected), self.totals(self.counted)
        cells = [f"{got[n]}/{want[n]}" for n in FIELDS]
        lines.append(f"{'total':<10}" + "".join(f"{c:>18}" for c in cells))
        latency = self.abnormal_latency_s or [0.0]
        lines += [
            "(exporter/ledger)",
            f"false: {sum(max(0, got[n] - want[n]) for n in FIELDS)}  "
            f"missed: {sum(max(0, want[n] - got[n]) for n in FIELDS)}  lost: {self.lost}",
            f"abnormal end visible after (simulated s): p50 {statistics.median(latency):.2f}"
            f"  p99 {_quantile(latency, 0.99):.2f}  max {max(latency):.2f}"
            f"  ({len(self.abnormal_latency_s)} ends)",
            f"cycles: {self.cycles} ({self.failed_cycles} failed)",
            f"requests by code: {dict(sorted(self.requests.items()))}",
            f"faults injected: {dict(sorted(self.faults_injected.items()))}",
            f"callbacks: {dict(sorted(self.callbacks.items()))}",
        ]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"expected": self.totals(self.expected), "counted": self.totals(self.counted),
                "mismatches": self.mismatches, "lost": self.lost,
                "abnormal_latency_s": self.abnormal_latency_s, "cycles": self.cycles,
                "failed_cycles": self.failed_cycles, "requests": self.requests,
                "callbacks": self.callbacks, "faults_injected": self.faults_injected}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]



def _faults(settings: SoakSettings, skew: float = 0.0) -> FaultConfig:
    kinds = [k for k in FaultKind if k is not FaultKind.LATENCY]
    rules = tuple(FaultRule(kind, settings.fault_probability) for kind in kinds)
    return FaultConfig(rules=(*rules, FaultRule(FaultKind.LATENCY, 0.05)), latency_ms=20,
                       jitter_ms=10, hang_seconds=1.0, clock_skew_s=skew)


async def run_soak(settings: SoakSettings, workdir: Path) -> SoakReport:
    clock = ManualClock(START)
    poll = settings.poll_interval
    longest_gap = max(2 * poll, settings.skew_outage_s + poll, settings.downtime_s + poll)
    rates = LifecycleRates(
        arrivals_per_hour=10, mean_duration_s=1200, min_duration_s=30, init_s=(1, 4),
        abnormal_probability=0.25, pause_probability=0.5, mean_pause_s=120,
        min_segment_s=longest_gap + poll, max_duration_s=3600,
    )
    rooms = room_names(settings.rooms)
    engine = SimEngine(clock, {APP_ID: SECRET}, seed=settings.seed, rooms=rooms, rates=rates)
    callback_port = free_port()
    options = ServerOptions(
        list_key=settings.list_key,  # type: ignore[arg-type]
        # The manual clock jumps while concurrent requests wait for their slots, so the
        # simulator would see them bunched: the limit on the wire is tested on a real clock.
        rate_limits=rate_limits(0),
        faults=_faults(settings),
        callback_url=f"http://127.0.0.1:{callback_port}/callback" if settings.callbacks else None,
        callback_secrets={APP_ID: CALLBACK_SECRET},
        callback_loss=settings.callback_loss,
        callback_duplicate=settings.callback_duplicate,
        callback_interval_s=0,  # the driver delivers them on the shared clock
        callback_timeout_s=1.0,
    )
    report = SoakReport(settings)
    async with SimulatorServer(engine, options) as sim:
        config = Config(
            zego=ZegoConfig(endpoint=sim.url, timeout=0.3),
            poll_interval=poll,
            apps=(AppConfig(APP_ID, Secret(SECRET), tuple(rooms),
                            callback_secret=Secret(CALLBACK_SECRET)),),
        )
        storage = str(workdir / "soak-state.db")
        callback_listen = ListenAddress("127.0.0.1", callback_port)

        async def start_exporter() -> Exporter:
            exporter = Exporter(config, clock=clock, storage_path=storage)
            await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False,
                                 callback_listen=callback_listen if settings.callbacks else None)
            return exporter

        exporter = await start_exporter()
        end = START + settings.hours * 3600
        restart = None if settings.restart_at is None else START + settings.restart_at * (
            end - START)
        skew_from = START + 0.3 * (end - START)
        watch = _AbnormalEndWatch(engine)
        next_cycle = clock.time()
        draining = False
        while True:
            now = clock.time()
            sim.state.set_faults(_faults(
                settings, 900.0 if skew_from <= now < skew_from + settings.skew_outage_s else 0))
            if restart is not None and now >= restart:
                restart = None
                _add_process_figures(exporter, report)
                await exporter.stop()  # kill -9: nothing is written at stop
                down_until = now + settings.downtime_s
                while clock.time() < down_until:
                    await _step(sim, clock)
                exporter = await start_exporter()
                next_cycle = clock.time()
                continue
            if now >= next_cycle:
                result = await exporter.pollers[APP_ID].run_cycle()
                report.cycles += 1
                report.failed_cycles += not result.ok
                next_cycle = now + poll
            watch.check(exporter, clock.time())
            if not draining and now >= end:
                engine.stop_arrivals()
                draining = True
            if draining and not engine.live_tasks() and not _pending_callbacks(sim):
                break
            await _step(sim, clock)
        sim.state.set_faults(FaultConfig())
        for _ in range(2):  # settle: two clean cycles after everything ended
            await exporter.pollers[APP_ID].run_cycle()
            clock.advance(poll)
        report.faults_injected = {str(k): v for k, v in sim.state.faults.injected.items()}
        report.abnormal_latency_s = watch.latencies
        _add_process_figures(exporter, report)
        await exporter.stop()

    summary = engine.summary()
    app = exporter.state.apps[APP_ID]
    for room in rooms:
        want = summary.get((APP_ID, room), RoomCounts())
        report.expected[room] = {name: getattr(want, name) for name in FIELDS}
        report.counted[room] = {name: app.counters[room][KIND_OF[name]] for name in FIELDS}
        report.lost += app.counters[room][EventKind.LOST]
    return report


def _add_process_figures(exporter: Exporter, report: SoakReport) -> None:
    """API and callback figures live per process (not persisted): add one process's up."""
    for (_, _, code), count in exporter.state.api.requests.items():
        report.requests[code] = report.requests.get(code, 0) + count
    for (_, _, outcome), count in exporter.state.callbacks.items():
        report.callbacks[outcome] = report.callbacks.get(outcome, 0) + count


async def _step(sim: SimulatorServer, clock: ManualClock) -> None:
    clock.advance(STEP_S)
    if sim.state.callbacks is not None:
        await sim.state.callbacks.deliver_due(clock.time())
    else:
        sim.engine.advance_to(clock.time())


def _pending_callbacks(sim: SimulatorServer) -> bool:
    return sim.state.callbacks is not None and bool(sim.state.callbacks.pending)


class _AbnormalEndWatch:
    """Time from each abnormal end in the ledger until the exporter has counted the task."""

    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine
        self._read = 0
        self._waiting: dict[str, float] = {}
        self.latencies: list[float] = []

    def check(self, exporter: Exporter, now: float) -> None:
        ledger = self._engine.ledger
        for transition in ledger[self._read:]:
            if transition.to_status == 4:
                self._waiting[transition.task_id] = transition.at
        self._read = len(ledger)
        finished = exporter.state.apps[APP_ID].tracking.finished
        for task_id in [t for t in self._waiting if t in finished]:
            self.latencies.append(max(0.0, now - self._waiting.pop(task_id)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=40)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--list-key", choices=["TaskidList", "TaskList"], default="TaskidList")
    parser.add_argument("--no-callbacks", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = SoakSettings(rooms=args.rooms, hours=args.hours, seed=args.seed,
                            list_key=args.list_key, callbacks=not args.no_callbacks)
    with tempfile.TemporaryDirectory() as tmp:
        report = asyncio.run(run_soak(settings, Path(tmp)))
    print(json.dumps(report.to_json()) if args.json else report.table())
    raise SystemExit(1 if report.mismatches or report.lost else 0)


if __name__ == "__main__":
    main()

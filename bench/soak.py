"""Chaos soak: a busy simulated ZEGO with every fault, an API outage, callbacks and a killed
exporter, checked against the simulator's ledger. `python -m bench.soak --hours 6` prints the
table; the test suite runs short seeded versions (tests/test_soak.py).

The exporter and the simulator share one manual clock, stepped by the driver: hours of
recordings run in seconds, and the run is the same for a seed. Every status of a random
recording lasts at least `min_segment` (longer than any gap between two successful polls here: a
failed cycle, the clock-skew outage, the API outage, the restart), which is what polling needs
to see every pause and resume; callbacks, some of them lost, repeated or late, make ends visible
sooner.

Around the API outage (every request fails for `outage_s`), scripted tasks start, pause, resume
and end while ZEGO cannot be asked (`outage_cases`): each status they pass through lasts long
enough for polling to see it, except one task's first recording, which starts and pauses inside
the outage: polling first sees it paused, and must count its start and its pause (ZEGO's tasks go
1 → 2 → 5). One pause callback is held back until after its task's resume callback.

What is checked, per room: the five event counters and the live-task gauges on /metrics against
the simulator (the gauges once with tasks live, at the end of arrivals, and once drained); in a
run without a restart, that every counted event has exactly one log line with its fields; and,
first, the harness itself: the scripted tasks did what they were told, and the simulator's
callbacks (sequences increasing per task) tell the same story as its ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from prometheus_client.parser import text_string_to_metric_families

from exporter.clock import ManualClock
from exporter.config import AppConfig, Config, Secret, ZegoConfig
from exporter.daemon import Exporter, ListenAddress
from exporter.demo import free_port
from exporter.simulator.callbacks import DEFAULT_LATE_S, CallbackDelivery, CallbackEvent
from exporter.simulator.engine import (
    LifecycleRates,
    RoomCounts,
    SimEngine,
    Transition,
    room_names,
    summarize,
)
from exporter.simulator.faults import FaultConfig, FaultKind, FaultRule
from exporter.simulator.server import ServerOptions, SimulatorServer, rate_limits
from exporter.zego.models import TaskStatus

APP_ID = 1234567890
SECRET = "0123456789abcdef0123456789abcdef"
CALLBACK_SECRET = "soak-callback-secret"
START = 1_760_000_000.0
STEP_S = 0.5  # the driver's clock step: callbacks are delivered and checked at this grain
TASK_FIELDS = ("started", "ended", "ended_abnormally", "paused", "resumed")
# What became of each ended task's files (the ledger's outcomes; "unknown" must stay 0).
UPLOAD_FIELDS = ("upload_uploaded", "upload_backup", "upload_failed", "upload_no_files",
                 "upload_unknown")
FIELDS = (*TASK_FIELDS, *UPLOAD_FIELDS)
LOGGED = (*FIELDS, "lost")  # the counted events, each logged as `task_<kind>`
LOG_FIELDS = ("app_id", "room_id", "task_id", "via")  # via: the source, poll or callback
SOURCES = ("poll", "callback")
ONCE_PER_TASK = ("started", "ended", "ended_abnormally", "lost")
LIVE = (TaskStatus.INITIALIZING, TaskStatus.RECORDING, TaskStatus.PAUSED)
PREFIX = "zego_cloudrecord"
OP_STATUS = {"start": TaskStatus.INITIALIZING, "pause": TaskStatus.PAUSED,
             "resume": TaskStatus.RECORDING, "stop": TaskStatus.ENDED,
             "abort": TaskStatus.ENDED_ABNORMALLY}


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
    callback_late: float = 0.1  # arrives DEFAULT_LATE_S after its sending
    fault_probability: float = 0.01  # per fault kind, per request
    restart_at: float | None = 0.5  # fraction of the run at which the exporter is killed
    downtime_s: float = 60.0
    skew_outage_s: float = 45.0  # the simulator's clock jumps 15 min ahead for this long
    outage_at: float | None = 0.8  # fraction of the run at which every API request fails
    outage_s: float = 25.0


@dataclass(frozen=True)
class OutageCase:
    """A task scripted around the API outage: ops at offsets (s) from the outage's start."""

    name: str
    steps: tuple[tuple[str, float], ...]
    hold_pause_s: float = 0.0  # deliver its pause callback this long after it is sent
    room: str = ""
    task_id: str = ""

    @property
    def statuses(self) -> list[int]:
        """The statuses the ledger must show for it: 1, 2 (recording after init), then one
        per op."""
        ops = [OP_STATUS[op] for op, _ in self.steps[1:]]
        return [TaskStatus.INITIALIZING, TaskStatus.RECORDING, *ops]


def outage_cases(outage_s: float, segment_s: float) -> list[OutageCase]:
    """The scripted tasks. Every status lasts a segment (longer than any gap between two
    successful polls, the outage's included), except inside the outage, which no poll sees."""
    d, seg = outage_s, segment_s
    late_max = DEFAULT_LATE_S[1]
    return [
        OutageCase("started_and_paused_in_outage",
                   (("start", 2), ("pause", 10), ("resume", d + seg), ("stop", d + 2 * seg))),
        OutageCase("resumed_in_outage", (("start", -3 * seg), ("pause", -1.5 * seg),
                                         ("resume", 8), ("stop", d + seg))),
        # The pause callback (sent a segment before the outage) arrives after the resume's,
        # even a late one: both during the outage.
        OutageCase("resume_overtakes_pause", (("start", -3 * seg), ("pause", -seg),
                                              ("resume", 4), ("stop", d + seg)),
                   hold_pause_s=seg + 4 + late_max + 2),
        OutageCase("paused_in_outage", (("start", -2 * seg), ("pause", 6),
                                        ("resume", d + seg), ("stop", d + 2 * seg))),
        OutageCase("ended_in_outage", (("start", -2 * seg), ("stop", 5))),
        OutageCase("aborted_in_outage", (("start", -2 * seg), ("abort", 15))),
        OutageCase("aborted_while_paused_in_outage", (("start", -3 * seg),
                                                      ("pause", -1.5 * seg), ("abort", 12))),
        OutageCase("started_and_ended_in_outage", (("start", 3), ("stop", d - 3))),
        OutageCase("started_in_outage", (("start", 4), ("stop", d + seg))),
    ]


@dataclass
class SoakReport:
    settings: SoakSettings
    expected: dict[str, dict[str, int]] = field(default_factory=dict)  # room -> field -> n
    counted: dict[str, dict[str, int]] = field(default_factory=dict)  # from /metrics
    lost: int = 0
    abnormal_latency_s: list[float] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)  # result code -> count
    callbacks: dict[str, int] = field(default_factory=dict)
    faults_injected: dict[str, int] = field(default_factory=dict)
    cycles: int = 0
    failed_cycles: int = 0
    outage: tuple[float, float] | None = None  # seconds from the start
    outage_cycles: int = 0
    outage_failed_cycles: int = 0
    cases: list[OutageCase] = field(default_factory=list)
    live_mismatches: list[str] = field(default_factory=list)
    live_checked: list[tuple[str, int, int]] = field(default_factory=list)  # when, sim, exporter
    logged: dict[str, dict[str, int]] | None = None  # room -> kind -> lines; None: not audited
    log_problems: list[str] = field(default_factory=list)  # lines without a field, repeated
    harness_problems: list[str] = field(default_factory=list)
    deliveries: dict[str, int] = field(default_factory=dict)  # the simulator's, by outcome
    callbacks_in_outage: int = 0  # delivered while the API was down
    late_deliveries: int = 0  # first attempts made > 1 s after the sending
    resume_before_pause: int = 0  # a task's resume callback delivered before its pause's

    @property
    def mismatches(self) -> list[str]:
        return [f"{room}.{name}: ledger {self.expected[room][name]}, "
                f"exporter {self.counted[room][name]}"
                for room in self.expected for name in FIELDS
                if self.expected[room][name] != self.counted[room][name]]

    @property
    def log_mismatches(self) -> list[str]:
        """Counted events without exactly one log line, by room and kind."""
        if self.logged is None:
            return []
        return [f"{room}.{kind}: counted {self.counted[room][kind]}, "
                f"log lines {self.logged.get(room, {}).get(kind, 0)}"
                for room in self.counted for kind in LOGGED
                if self.counted[room][kind] != self.logged.get(room, {}).get(kind, 0)] + [
            f"{room}.{kind}: log lines {n}, no such room on /metrics"
            for room, kinds in self.logged.items() if room not in self.counted
            for kind, n in kinds.items() if n]

    @property
    def problems(self) -> list[str]:
        return [*self.harness_problems, *self.mismatches, *self.live_mismatches,
                *self.log_mismatches, *self.log_problems]

    def totals(self, which: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
        return {name: sum(room.get(name, 0) for room in which.values()) for name in FIELDS}

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
        ]
        if self.outage is not None:
            lines.append(f"API outage {self.outage[0]:.0f}-{self.outage[1]:.0f} s: "
                         f"{self.outage_cycles} cycles ({self.outage_failed_cycles} failed), "
                         f"{self.callbacks_in_outage} callbacks delivered during it")
            lines.append("outage cases: " + ", ".join(f"{c.name} ({c.room})"
                                                      for c in self.cases))
        lines += [f"live tasks {when}: simulator {sim}, exporter {got_live}"
                  for when, sim, got_live in self.live_checked]
        if self.logged is None:
            lines.append("log audit: not run (the exporter was killed)")
        else:
            lines.append(f"log audit: {sum(sum(k.values()) for k in self.logged.values())} "
                         f"event lines, {len(self.log_mismatches)} rooms/kinds off, "
                         f"{len(self.log_problems)} other problems")
        lines += [
            f"requests by code: {dict(sorted(self.requests.items()))}",
            f"faults injected: {dict(sorted(self.faults_injected.items()))}",
            f"callbacks received: {dict(sorted(self.callbacks.items()))}",
        ]
        if self.settings.callbacks:
            lines.append(f"callbacks sent: {dict(sorted(self.deliveries.items()))}, "
                         f"{self.late_deliveries} late, {self.resume_before_pause} resumes "
                         f"before their pause")
        problems = self.problems
        if problems:
            lines += [f"PROBLEMS ({len(problems)}):", *(f"  {p}" for p in problems)]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"expected": self.totals(self.expected), "counted": self.totals(self.counted),
                "mismatches": self.mismatches, "live_mismatches": self.live_mismatches,
                "log_mismatches": self.log_mismatches, "log_problems": self.log_problems,
                "harness_problems": self.harness_problems, "lost": self.lost,
                "abnormal_latency_s": self.abnormal_latency_s, "cycles": self.cycles,
                "failed_cycles": self.failed_cycles, "outage_cycles": self.outage_cycles,
                "outage_failed_cycles": self.outage_failed_cycles,
                "live_checked": self.live_checked, "requests": self.requests,
                "callbacks": self.callbacks, "faults_injected": self.faults_injected,
                "deliveries": self.deliveries, "callbacks_in_outage": self.callbacks_in_outage,
                "late_deliveries": self.late_deliveries,
                "resume_before_pause": self.resume_before_pause}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _faults(settings: SoakSettings, skew: float = 0.0,
            outage: tuple[float, float] | None = None) -> FaultConfig:
    kinds = [k for k in FaultKind if k is not FaultKind.LATENCY]
    rules = tuple(FaultRule(kind, settings.fault_probability) for kind in kinds)
    down: tuple[FaultRule, ...] = ()
    if outage is not None:  # first, so they win: 503s, then connections closed unanswered
        middle = (outage[0] + outage[1]) / 2
        down = (FaultRule(FaultKind.HTTP_503, 1.0, ((outage[0], middle),)),
                FaultRule(FaultKind.RESET, 1.0, ((middle, outage[1]),)))
    return FaultConfig(rules=(*down, *rules, FaultRule(FaultKind.LATENCY, 0.05)),
                       latency_ms=20, jitter_ms=10, hang_seconds=1.0, clock_skew_s=skew)


def _check_windows(settings: SoakSettings, segment: float) -> None:
    """The disturbances must not overlap: the segments around the outage are long enough for
    the gaps the outage makes, not for a restart or the skew outage on top."""
    span = settings.hours * 3600
    poll = settings.poll_interval
    windows = {"clock-skew outage": (0.3 * span, 0.3 * span + settings.skew_outage_s + poll)}
    if settings.restart_at is not None:
        at = settings.restart_at * span
        windows["restart"] = (at, at + settings.downtime_s + poll)
    if settings.outage_at is not None:
        if not 20.0 <= settings.outage_s <= 30.0:
            raise ValueError("outage_s: the outage cases are laid out for 20-30 s")
        at = settings.outage_at * span
        windows["API outage cases"] = (at - 3 * segment - poll,
                                       at + settings.outage_s + 2 * segment + poll)
    named = sorted(windows.items(), key=lambda kv: kv[1])
    for (name, (_, end)), (other, (begin, _)) in itertools.pairwise(named):
        if begin < end:
            raise ValueError(f"the {name} and the {other} overlap: move restart_at or outage_at")
    if named[0][1][0] < 2 * poll or named[-1][1][1] > span:
        raise ValueError("the disturbances must lie inside the run, after its first cycles")


def _schedule_cases(engine: SimEngine, rooms: Sequence[str], outage_start: float,
                    settings: SoakSettings, segment: float) -> list[OutageCase]:
    cases = []
    for i, case in enumerate(outage_cases(settings.outage_s, segment)):
        room = rooms[i % len(rooms)]
        (first, at), *rest = case.steps
        assert first == "start"
        task_id = engine.start(APP_ID, room, at=outage_start + at)
        for op, offset in rest:
            engine.control(op, task_id=task_id, at=outage_start + offset,
                           quit_reason=6 if op == "abort" else None)
        cases.append(OutageCase(case.name, case.steps, case.hold_pause_s, room, task_id))
    return cases


async def run_soak(settings: SoakSettings, workdir: Path) -> SoakReport:
    with structlog.testing.capture_logs() as logs:
        report = await _run(settings, workdir)
    if settings.restart_at is None:
        report.logged, report.log_problems = audit_logs(logs)
    return report


async def _run(settings: SoakSettings, workdir: Path) -> SoakReport:
    clock = ManualClock(START)
    poll = settings.poll_interval
    longest_gap = max(2 * poll, settings.skew_outage_s + poll, settings.downtime_s + poll,
                      settings.outage_s + poll)
    segment = longest_gap + poll
    _check_windows(settings, segment)
    rates = LifecycleRates(
        arrivals_per_hour=10, mean_duration_s=1200, min_duration_s=30, init_s=(1, 4),
        abnormal_probability=0.25, pause_probability=0.5, mean_pause_s=120,
        min_segment_s=segment, max_duration_s=3600,
    )
    rooms = room_names(settings.rooms)
    engine = SimEngine(clock, {APP_ID: SECRET}, seed=settings.seed, rooms=rooms, rates=rates)
    end = START + settings.hours * 3600
    report = SoakReport(settings)
    outage: tuple[float, float] | None = None
    if settings.outage_at is not None:
        begin = START + settings.outage_at * (end - START)
        outage = (begin, begin + settings.outage_s)
        report.outage = (outage[0] - START, outage[1] - START)
        report.cases = _schedule_cases(engine, rooms, begin, settings, segment)
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
        callback_late=settings.callback_late,
        callback_interval_s=0,  # the driver delivers them on the shared clock
        callback_timeout_s=1.0,
    )
    stream: list[CallbackDelivery] = []
    async with SimulatorServer(engine, options) as sim:
        sender = sim.state.callbacks
        for case in report.cases:
            if sender is not None and case.hold_pause_s:
                sender.hold(case.task_id, CallbackEvent.PAUSED, case.hold_pause_s)
        config = Config(
            zego=ZegoConfig(endpoint=sim.url, timeout=0.3),
            poll_interval=poll,
            apps=(AppConfig(APP_ID, Secret(SECRET), tuple(rooms),
                            callback_secret=Secret(CALLBACK_SECRET)),),
        )
        storage = workdir / "soak-state.db"
        callback_listen = ListenAddress("127.0.0.1", callback_port)

        async def start_exporter() -> Exporter:
            exporter = Exporter(config, clock=clock, storage_path=str(storage))
            await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False,
                                 callback_listen=callback_listen if settings.callbacks else None)
            return exporter

        exporter = await start_exporter()
        restart = None if settings.restart_at is None else START + settings.restart_at * (
            end - START)
        skew_from = START + 0.3 * (end - START)
        watch = _AbnormalEndWatch(engine)
        next_cycle = clock.time()
        draining = False
        while True:
            now = clock.time()
            skew = 900.0 if skew_from <= now < skew_from + settings.skew_outage_s else 0.0
            sim.state.set_faults(_faults(settings, skew, outage))
            if restart is not None and now >= restart:
                restart = None
                _add_process_figures(exporter, report)
                # kill -9: the state file as it is now (between two writes of the writer
                # thread, so that the three files are copied at one point); what stop()
                # would write is undone.
                await exporter.saves_settled()
                image = _disk_image(storage)
                await exporter.stop()
                _restore(storage, image)
                down_until = now + settings.downtime_s
                while clock.time() < down_until:
                    await _step(sim, clock, stream)
                exporter = await start_exporter()
                next_cycle = clock.time()
                continue
            if now >= next_cycle:
                result = await exporter.pollers[APP_ID].run_cycle()
                report.cycles += 1
                report.failed_cycles += not result.ok
                if outage is not None and outage[0] <= now < outage[1]:
                    report.outage_cycles += 1
                    report.outage_failed_cycles += not result.ok
                next_cycle = now + poll
            watch.check(exporter, clock.time())
            if not draining and now >= end:
                # Tasks are live: a clean cycle on a frozen simulator, and the gauges must
                # show exactly what it read.
                sim.state.set_faults(FaultConfig())
                engine.freeze()
                await _clean_cycle(exporter, report)
                await _check_live(report, "at the end of arrivals", exporter, engine, rooms)
                engine.thaw()
                engine.stop_arrivals()
                draining = True
            if draining and not engine.live_tasks() and not _pending_callbacks(sim):
                break
            await _step(sim, clock, stream)
        sim.state.set_faults(FaultConfig())
        for _ in range(2):  # settle: two clean cycles after everything ended
            await _clean_cycle(exporter, report)
            clock.advance(poll)
        # Every ended task's files settle (uploads take seconds), and the exporter counts each
        # once: its look-ups come a minute apart (5 minutes after the end with callbacks on).
        for _ in range(60):
            if not exporter.state.apps[APP_ID].tracking.awaited:
                break
            while clock.time() < next_cycle:
                await _step(sim, clock, stream)
            await _clean_cycle(exporter, report)
            next_cycle = clock.time() + poll
        report.faults_injected = {str(k): v for k, v in sim.state.faults.injected.items()}
        report.abnormal_latency_s = watch.latencies
        await _check_live(report, "drained", exporter, engine, rooms)
        metrics = await scrape(exporter)
        _add_process_figures(exporter, report)
        await exporter.stop()

    summary = engine.summary()
    for room in rooms:
        want = summary.get((APP_ID, room), RoomCounts())
        report.expected[room] = {name: getattr(want, name.removeprefix("upload_"), 0)
                                 for name in FIELDS}
    report.counted = _counters(metrics, rooms)
    report.lost = sum(room["lost"] for room in report.counted.values())
    report.harness_problems = _check_cases(report.cases, engine.ledger)
    if settings.callbacks:
        report.harness_problems += _check_stream(stream, engine.ledger)
        _stream_figures(report, stream, outage)
    return report


# -- reading the exporter ----------------------------------------------------------------------

Metrics = dict[tuple[str, str, str], float]  # (name, room_id, status or outcome) -> value


async def scrape(exporter: Exporter) -> Metrics:
    """/metrics, rendered afresh, as the exporter serves it: this app's samples."""
    # A scrape while a render is under way gets the one before (by design): wait for a render
    # of the state as it is now. Nothing changes it meanwhile (the driver is here, not stepping).
    exporter.exposition.invalidate()
    exporter.exposition.prerender()
    await exporter.exposition.settled()
    url = f"http://127.0.0.1:{exporter.bound_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        response.raise_for_status()
        text = await response.text()
    return {(s.name, s.labels.get("room_id", ""),
             s.labels.get("status", s.labels.get("outcome", ""))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.labels.get("app_id") == str(APP_ID)}


def _counters(metrics: Metrics, rooms: Iterable[str]) -> dict[str, dict[str, int]]:
    """room -> counted event kind -> value (rooms on /metrics besides the configured ones too)."""
    names = {f"{PREFIX}_tasks_{kind}_total": kind for kind in LOGGED}
    counted = {room: dict.fromkeys(LOGGED, 0) for room in rooms}
    for (name, room, label), value in metrics.items():
        kind = names.get(name)
        if name == f"{PREFIX}_upload_outcomes_total":
            kind = f"upload_{label}"
        if kind is not None:
            counted.setdefault(room, dict.fromkeys(LOGGED, 0))[kind] = int(value)
    return counted


async def _clean_cycle(exporter: Exporter, report: SoakReport, tries: int = 3) -> None:
    """A cycle without injected faults; a real-time timeout (a slow machine) is tried again."""
    for _ in range(tries):
        result = await exporter.pollers[APP_ID].run_cycle()
        if result.ok:
            return
    report.harness_problems.append(f"harness: {tries} clean cycles in a row failed")


async def _check_live(report: SoakReport, when: str, exporter: Exporter, engine: SimEngine,
                      rooms: Sequence[str]) -> None:
    """The live gauges, per room and status, against the simulator's live tasks now."""
    metrics = await scrape(exporter)
    shown = {(room, status): int(value) for (name, room, status), value in metrics.items()
             if name == f"{PREFIX}_tasks"}
    live = Counter((t.room_id, TaskStatus(t.status).label) for t in engine.live_tasks()
                   if t.app_id == APP_ID)
    keys = {(room, s.label) for room in rooms for s in LIVE} | set(shown) | set(live)
    for room, status in sorted(keys):
        want, got = live.get((room, status), 0), shown.get((room, status))
        if got != want:
            report.live_mismatches.append(f"live {when}: {room}.{status}: simulator {want}, "
                                          f"exporter {'no series' if got is None else got}")
    report.live_checked.append((when, sum(live.values()), sum(shown.values())))


def audit_logs(entries: Iterable[MutableMapping[str, Any]]
               ) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Counted-event lines (`task_<kind>`) per room and kind, and what is wrong with them:
    a field missing, a source that is neither, a task's start or end logged twice."""
    events = {f"task_{kind}": kind for kind in LOGGED}
    logged: dict[str, dict[str, int]] = {}
    missing: Counter[str] = Counter()
    per_task: Counter[tuple[str, str]] = Counter()
    for entry in entries:
        kind = events.get(entry.get("event", ""))
        if kind is None:
            continue
        room = str(entry.get("room_id", "?"))
        by_kind = logged.setdefault(room, dict.fromkeys(LOGGED, 0))
        by_kind[kind] += 1
        for name in LOG_FIELDS:
            if entry.get(name) is None:
                missing[f"task_{kind} lines without {name}"] += 1
        via = entry.get("via")
        if via is not None and via not in SOURCES:
            missing[f"task_{kind} lines via {via!r}"] += 1
        if entry.get("app_id") not in (None, APP_ID, str(APP_ID)):
            missing[f"task_{kind} lines with app_id {entry.get('app_id')!r}"] += 1
        if kind in ONCE_PER_TASK:
            per_task[(str(entry.get("task_id")), kind)] += 1
    problems = [f"{what}: {n}" for what, n in sorted(missing.items())]
    repeated = Counter(kind for (_, kind), n in per_task.items() if n > 1)
    problems += [f"task_{kind} logged more than once for {n} tasks"
                 for kind, n in sorted(repeated.items())]
    return logged, problems


def _add_process_figures(exporter: Exporter, report: SoakReport) -> None:
    """API and callback figures live per process (not persisted): add one process's up."""
    for (_, _, code), count in exporter.state.api.requests.items():
        report.requests[code] = report.requests.get(code, 0) + count
    for (_, _, outcome), count in exporter.state.callbacks.items():
        report.callbacks[outcome] = report.callbacks.get(outcome, 0) + count


def _disk_image(storage: Path) -> dict[Path, bytes]:
    """The state file and its WAL as they are on disk (what a kill -9 leaves)."""
    files = (storage, Path(f"{storage}-wal"), Path(f"{storage}-shm"))
    return {path: path.read_bytes() for path in files if path.exists()}


def _restore(storage: Path, image: Mapping[Path, bytes]) -> None:
    for path in (storage, Path(f"{storage}-wal"), Path(f"{storage}-shm")):
        if path in image:
            path.write_bytes(image[path])
        else:
            path.unlink(missing_ok=True)


# -- driving the simulator ---------------------------------------------------------------------

async def _step(sim: SimulatorServer, clock: ManualClock,
                stream: list[CallbackDelivery]) -> None:
    clock.advance(STEP_S)
    if sim.state.callbacks is not None:
        stream += await sim.state.callbacks.deliver_due(clock.time())
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


# -- checking the harness ----------------------------------------------------------------------

def _check_cases(cases: Sequence[OutageCase], ledger: Sequence[Transition]) -> list[str]:
    """Every scripted task went through exactly the statuses it was given."""
    seen: dict[str, list[int]] = {c.task_id: [] for c in cases}
    for t in ledger:
        if t.task_id in seen:
            seen[t.task_id].append(t.to_status)
    return [f"harness: case {c.name} went {seen[c.task_id]}, not {c.statuses}"
            for c in cases if seen[c.task_id] != c.statuses]


_CALLED_BACK = {int(CallbackEvent.PAUSED): "paused", int(CallbackEvent.RESUMED): "resumed",
                int(CallbackEvent.EXITED_NORMALLY): "ended normally",
                int(CallbackEvent.ENDED_ABNORMALLY): "ended_abnormally"}


def _check_stream(stream: Sequence[CallbackDelivery], ledger: Sequence[Transition]
                  ) -> list[str]:
    """The simulator's callbacks (lost ones included) against its ledger: one pause, resume or
    end callback per transition, per room; per task, sequences 0, 1, 2... in sending order."""
    sent: dict[tuple[str, int], tuple[float, int, str]] = {}  # -> (sent at, event, room)
    problems = []
    for record in stream:
        at = record.at if record.sent_at is None else record.sent_at
        first = sent.setdefault((record.task_id, record.sequence),
                                (at, record.event_type, record.room_id))
        if first[1:] != (record.event_type, record.room_id):
            problems.append(f"harness: task {record.task_id} sequence {record.sequence} was "
                            f"sent for two events")
    by_task: dict[str, list[tuple[int, float]]] = {}
    for (task_id, sequence), (at, _, _) in sent.items():
        by_task.setdefault(task_id, []).append((sequence, at))
    for task_id, sequences in by_task.items():
        sequences.sort()
        if [s for s, _ in sequences] != list(range(len(sequences))):
            problems.append(f"harness: task {task_id} callback sequences "
                            f"{[s for s, _ in sequences]}, not 0, 1, 2...")
        times = [at for _, at in sequences]
        if times != sorted(times):
            problems.append(f"harness: task {task_id}: a later sequence was sent earlier")
    called: Counter[tuple[str, str]] = Counter(
        (room, _CALLED_BACK[event]) for _, event, room in sent.values() if event in _CALLED_BACK)
    for (app_id, room), counts in sorted(summarize(ledger).items()):
        want = {"paused": counts.paused, "resumed": counts.resumed,
                "ended normally": counts.ended - counts.ended_abnormally,
                "ended_abnormally": counts.ended_abnormally}
        for kind, n in want.items():
            if app_id == APP_ID and called[(room, kind)] != n:
                problems.append(f"harness: {room}.{kind}: ledger {n}, callbacks sent "
                                f"{called[(room, kind)]}")
    return problems


def _stream_figures(report: SoakReport, stream: Sequence[CallbackDelivery],
                    outage: tuple[float, float] | None) -> None:
    report.deliveries = dict(Counter(str(r.outcome) for r in stream))
    delivered: dict[tuple[str, int], float] = {}
    for r in stream:
        if r.outcome == "delivered":
            delivered.setdefault((r.task_id, r.sequence), r.at)
            if outage is not None and outage[0] <= r.at < outage[1]:
                report.callbacks_in_outage += 1
        if r.attempt == 1 and r.late_s > 1.0:
            report.late_deliveries += 1
    pauses: dict[str, list[int]] = {}
    resumes: dict[str, list[int]] = {}
    for r in stream:
        if r.event_type == CallbackEvent.PAUSED:
            pauses.setdefault(r.task_id, []).append(r.sequence)
        elif r.event_type == CallbackEvent.RESUMED:
            resumes.setdefault(r.task_id, []).append(r.sequence)
    for task_id, paused in pauses.items():
        for pause in set(paused):
            after = [s for s in resumes.get(task_id, []) if s > pause]
            if not after:
                continue
            at_pause, at_resume = delivered.get((task_id, pause)), delivered.get(
                (task_id, min(after)))
            if at_pause is not None and at_resume is not None and at_resume < at_pause:
                report.resume_before_pause += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=40)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--list-key", choices=["TaskidList", "TaskList"], default="TaskidList")
    parser.add_argument("--no-callbacks", action="store_true")
    parser.add_argument("--no-restart", action="store_true",
                        help="keep the exporter up: the log audit needs one process")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = SoakSettings(rooms=args.rooms, hours=args.hours, seed=args.seed,
                            list_key=args.list_key, callbacks=not args.no_callbacks,
                            restart_at=None if args.no_restart else 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        report = asyncio.run(run_soak(settings, Path(tmp)))
    print(json.dumps(report.to_json()) if args.json else report.table())
    raise SystemExit(1 if report.problems or report.lost else 0)


if __name__ == "__main__":
    main()

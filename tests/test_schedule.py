"""The poll scheduler: each app's cycle every interval on the injected clock, never overlapping;
an overrun is followed at once by the next cycle, counted, and logged when it starts and ends."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest
import structlog
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from exporter.clock import ManualClock
from exporter.daemon import Exporter
from exporter.logs import ContainedErrors
from exporter.poll.poller import AppPoller
from exporter.poll.schedule import PollScheduler
from exporter.serve.collector import ExporterCollector
from exporter.state.model import ExporterState
from tests.conftest import APP_ID, make_config

INTERVAL = 15.0


class TimedCycle:
    """A cycle that notes when it started and takes the given seconds of the manual clock."""

    def __init__(self, clock: ManualClock, seconds: Sequence[float] = ()) -> None:
        self.clock = clock
        self.seconds = list(seconds)
        self.started: list[float] = []

    async def __call__(self) -> None:
        self.started.append(self.clock.monotonic())
        took = self.seconds[len(self.started) - 1] if len(self.started) <= len(self.seconds) \
            else 1.0
        self.clock.advance(took)
        await asyncio.sleep(0)


class EndlessCycle:
    """A cycle that never ends by itself: it notes when it began and when it was cancelled."""

    def __init__(self) -> None:
        self.entered, self.cancelled = asyncio.Event(), asyncio.Event()

    async def __call__(self) -> None:
        self.entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def scheduler(clock: ManualClock, errors: ContainedErrors | None = None) -> PollScheduler:
    return PollScheduler(clock, INTERVAL, [APP_ID], errors)


async def test_cycles_run_at_once_then_every_interval() -> None:
    clock = ManualClock()
    cycle = TimedCycle(clock, [4.0, 0.0, 14.0])
    await scheduler(clock).run(APP_ID, cycle, cycles=4)
    assert cycle.started == [0.0, 15.0, 30.0, 45.0]


async def test_an_overrun_is_followed_at_once_by_the_next_cycle_and_counted() -> None:
    clock = ManualClock()
    schedule = scheduler(clock)
    cycle = TimedCycle(clock, [20.0, 1.0, 1.0])
    await schedule.run(APP_ID, cycle, cycles=3)
    assert cycle.started == [0.0, 20.0, 35.0]  # due times start again from the late one
    assert schedule.overruns == {APP_ID: 1}


async def test_a_long_overrun_is_not_followed_by_a_burst_of_catch_up_cycles() -> None:
    clock = ManualClock()
    schedule = scheduler(clock)
    cycle = TimedCycle(clock, [100.0, 1.0, 1.0])
    await schedule.run(APP_ID, cycle, cycles=3)
    assert cycle.started == [0.0, 100.0, 115.0]
    assert schedule.overruns == {APP_ID: 1}


async def test_a_cycle_ending_exactly_when_the_next_is_due_is_not_an_overrun() -> None:
    clock = ManualClock()
    schedule = scheduler(clock)
    cycle = TimedCycle(clock, [INTERVAL, 1.0])
    await schedule.run(APP_ID, cycle, cycles=2)
    assert cycle.started == [0.0, 15.0]
    assert schedule.overruns == {APP_ID: 0}


async def test_falling_behind_and_catching_up_are_one_line_each() -> None:
    clock = ManualClock()
    schedule = scheduler(clock)
    cycle = TimedCycle(clock, [20.0, 20.0, 20.0, 1.0, 1.0])
    with structlog.testing.capture_logs() as logs:
        await schedule.run(APP_ID, cycle, cycles=5)
    lines = [(line["event"], line["log_level"]) for line in logs]
    assert lines == [("poll_falling_behind", "warning"), ("poll_caught_up", "info")]
    behind, caught_up = logs
    assert (behind["app_id"], behind["cycle_seconds"], behind["interval_seconds"]) == \
        (APP_ID, 20.0, INTERVAL)
    assert caught_up["overruns"] == 3
    assert schedule.overruns == {APP_ID: 3}
    assert cycle.started == [0.0, 20.0, 40.0, 60.0, 75.0]


async def test_a_cycle_that_raises_is_contained_and_the_loop_goes_on() -> None:
    clock = ManualClock()
    counts: Counter[str] = Counter()
    calls: list[float] = []

    async def broken_once() -> None:
        calls.append(clock.monotonic())
        if len(calls) == 1:
            raise RuntimeError("a bug")

    with structlog.testing.capture_logs():  # the traceback, once
        await scheduler(clock, ContainedErrors(counts)).run(APP_ID, broken_once, cycles=3)
    assert calls == [0.0, 15.0, 30.0]
    assert counts == {"poll_cycle": 1}


async def test_stop_cancels_the_cycle_in_flight_and_ends_every_loop() -> None:
    clock = ManualClock()
    schedule = scheduler(clock)
    endless = EndlessCycle()
    schedule.start({APP_ID: endless})
    await endless.entered.wait()
    with structlog.testing.capture_logs() as logs:
        await schedule.stop()
    assert endless.cancelled.is_set()
    assert logs == []
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("poll-")]


async def test_an_app_cannot_be_scheduled_twice() -> None:
    clock = ManualClock()
    schedule = scheduler(clock)
    gate = asyncio.Event()
    schedule.start({APP_ID: gate.wait})
    with pytest.raises(RuntimeError, match="already scheduled"):
        schedule.start({APP_ID: gate.wait})
    await schedule.stop()


def overruns_on_metrics(registry: CollectorRegistry) -> dict[str, float]:
    return {s.labels["app_id"]: s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples if s.name == "zego_cloudrecord_poll_overruns_total"}


async def test_overruns_are_on_metrics_per_app_from_zero() -> None:
    clock = ManualClock()
    schedule = PollScheduler(clock, INTERVAL, [7, 8])
    registry = CollectorRegistry(auto_describe=False)
    state = ExporterState.for_apps([(7, ("a",), 1000), (8, ("b",), 1000)])
    registry.register(ExporterCollector(state, {}, INTERVAL, overruns=schedule.overruns))
    assert overruns_on_metrics(registry) == {"7": 0.0, "8": 0.0}
    with structlog.testing.capture_logs():
        await schedule.run(7, TimedCycle(clock, [16.0, 1.0]), cycles=2)
    assert overruns_on_metrics(registry) == {"7": 1.0, "8": 0.0}


async def test_exporter_stop_cancels_a_cycle_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    endless = EndlessCycle()
    monkeypatch.setattr(AppPoller, "run_cycle", lambda self: endless())
    exporter = Exporter(make_config("http://127.0.0.1:9", ("a",)), clock=ManualClock())
    assert overruns_on_metrics(exporter.registry) == {str(APP_ID): 0.0}
    await exporter.start(listen=None)
    await endless.entered.wait()
    with structlog.testing.capture_logs() as logs:
        await exporter.stop()
    assert endless.cancelled.is_set()
    assert [line for line in logs if line["log_level"] in ("warning", "error")] == []
    assert exporter.state.internal_errors == {}
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("poll-")]

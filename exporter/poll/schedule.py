"""Runs each app's poll cycle every poll_interval on the injected clock, never overlapping itself.

A short asyncio loop rather than APScheduler 3: APScheduler 3 cannot take an injected clock (it
reads datetime.now() and waits on the event loop's timer), and the tests and the benchmark run
the scheduler on ManualClock and ScaledClock.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping

import structlog

from exporter.clock import Clock
from exporter.logs import ContainedErrors

Cycle = Callable[[], Awaitable[object]]

log = structlog.get_logger("exporter.poll.schedule")


class PollScheduler:
    """One loop per app: run the cycle, then wait on the clock until the next is due.

    Cycles are due every `interval` from the first. A cycle that ends after the next was due (an
    overrun) is followed at once by the next, and due times start again from then: no burst of
    catch-up runs. Overruns are counted per app in `overruns` (every app from 0); the log says
    when an app starts falling behind and when it has caught up, not once per overrun.
    """

    def __init__(self, clock: Clock, interval: float, app_ids: Iterable[int],
                 errors: ContainedErrors | None = None,
                 on_overrun: Callable[[int], None] | None = None) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self._clock = clock
        self._interval = interval
        self._errors = errors or ContainedErrors(Counter())
        self._on_overrun = on_overrun
        # Read by the collector in the render thread: every app is a key from here on.
        self.overruns: dict[int, int] = dict.fromkeys(app_ids, 0)
        self._behind: dict[int, int] = {}  # app -> overruns in a row, while it is behind
        self._loops: dict[int, asyncio.Task[None]] = {}

    def start(self, cycles: Mapping[int, Cycle]) -> None:
        """Begin each app's loop; its first cycle runs at once."""
        for app_id, cycle in cycles.items():
            if app_id in self._loops:
                raise RuntimeError(f"app {app_id} is already scheduled")
            self._loops[app_id] = asyncio.create_task(self.run(app_id, cycle),
                                                      name=f"poll-{app_id}")

    async def stop(self) -> None:
        """Cancel every loop, and the cycle each may be in, and wait until they have ended."""
        loops = list(self._loops.values())
        self._loops.clear()
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    async def run(self, app_id: int, cycle: Cycle, cycles: int | None = None) -> None:
        """The loop of one app: `cycles` cycles (the benchmark's), or until cancelled."""
        self.overruns.setdefault(app_id, 0)
        clock = self._clock
        due = clock.monotonic()
        done = 0
        while True:
            started = clock.monotonic()
            try:
                await cycle()
            except Exception as exc:  # the poller contains its own; a bug here must not end polling
                self._errors.record("poll_cycle", exc)
            done += 1
            ended = clock.monotonic()
            due += self._interval
            late = ended > due
            self._note(app_id, late, ended - started)
            if cycles is not None and done >= cycles:
                return
            if late:
                due = ended
            else:
                await clock.sleep(due - ended)

    def _note(self, app_id: int, late: bool, seconds: float) -> None:
        fields = {"app_id": app_id, "cycle_seconds": round(seconds, 3),
                  "interval_seconds": self._interval}
        if late:
            self.overruns[app_id] += 1
            if app_id not in self._behind:
                log.warning("poll_falling_behind", **fields,
                            hint="each cycle starts as the last ends, until one ends in time")
            self._behind[app_id] = self._behind.get(app_id, 0) + 1
            if self._on_overrun is not None:
                self._on_overrun(app_id)
        elif app_id in self._behind:
            log.info("poll_caught_up", **fields, overruns=self._behind.pop(app_id))

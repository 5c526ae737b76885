"""One small clock interface, so tests and the simulator can run hours of recordings in seconds."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock Unix time in seconds."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin; never goes backwards."""

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` of this clock's time."""


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class ScaledClock:
    """A clock that runs `speed` times faster than the real one, from `start` (Unix seconds).

    Processes given the same `origin_real` (a time.monotonic() reading: CLOCK_MONOTONIC is
    system-wide on Linux) and `start` share one time line.
    """

    def __init__(self, speed: float = 1.0, start: float | None = None,
                 origin_real: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.speed = speed
        self._origin_real = time.monotonic() if origin_real is None else origin_real
        self._origin_wall = time.time() if start is None else start

    def time(self) -> float:
        return self._origin_wall + (time.monotonic() - self._origin_real) * self.speed

    def monotonic(self) -> float:
        return (time.monotonic() - self._origin_real) * self.speed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds) / self.speed)


class ManualClock:
    """A clock that moves only when told to: `advance()`, or `sleep()` (which advances it at once).

    Sleeping advances the clock instead of waiting, so code under test that sleeps (backoff,
    rate-limit pacing) runs instantly while its sense of time stays exact.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._start = start

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)

    async def sleep(self, seconds: float) -> None:
        self.advance(seconds)
        await asyncio.sleep(0)

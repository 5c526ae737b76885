"""Async rate limiter: at most `limit` requests in any sliding second, paced smoothly below it.

One limiter exists per (AppId, Action) and is shared by every room of that app. Two rules decide
when a request may leave:

* pacing: requests leave at least 1 / (limit × pacing) seconds apart (a token bucket holding one
  token), so a burst does not land in one server-side window and network jitter has room;
* the hard rule: a request leaves no sooner than 1 s after the request `n` places before it,
  where `n` is `limit × pacing` rounded up (never above `limit`), so no sliding 1-second window
  ever holds more than `n` departures: requests that wake late (a busy event loop, a GC pause)
  leave no faster than the pacing allows, and keep its margin for the network's jitter.

Slots are reserved synchronously, in call order, so concurrency cannot break either rule. A
caller woken late (a busy event loop) is checked once more against the hard rule on the times
requests really left, and waits again if it would make `n + 1` in one second.
"""

from __future__ import annotations

import collections
import math

from exporter.clock import Clock

DEFAULT_PACING = 0.95


def window_size(limit: float, pacing: float) -> int:
    """Departures allowed in one sliding second: `limit × pacing` rounded up, at most `limit`."""
    return max(1, min(math.floor(limit), math.ceil(limit * pacing - 1e-9)))


class RateLimiter:
    def __init__(self, limit: float, clock: Clock, pacing: float = DEFAULT_PACING) -> None:
        if limit <= 0:
            raise ValueError("limit must be > 0")
        if not 0 < pacing <= 1:
            raise ValueError("pacing must be in (0, 1]")
        self.limit = limit
        self._clock = clock
        self._interval = 1.0 / (limit * pacing)
        self._window = window_size(limit, pacing)
        self._recent: collections.deque[float] = collections.deque(maxlen=self._window)
        self._left: collections.deque[float] = collections.deque(maxlen=self._window)
        self._next_free = -math.inf
        self.waited_seconds = 0.0
        self.granted = 0

    def reserve(self, now: float) -> float:
        """Book the next free slot for a request asked for at `now`; return when it may leave."""
        at = max(now, self._next_free)
        if len(self._recent) == self._window:
            at = max(at, self._recent[0] + 1.0)
        self._recent.append(at)
        self._next_free = at + self._interval
        self.granted += 1
        return at

    async def acquire(self) -> float:
        """Wait for a slot; return the seconds waited."""
        asked = now = self._clock.monotonic()
        wait = self.reserve(asked) - asked
        while True:
            if wait > 0:
                await self._clock.sleep(wait)
                now = self._clock.monotonic()
            if len(self._left) < self._window or now >= self._left[0] + 1.0:
                break
            wait = self._left[0] + 1.0 - now
        self._left.append(now)
        self.waited_seconds += now - asked
        return now - asked

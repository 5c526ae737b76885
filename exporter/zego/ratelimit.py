"""Async rate limiter: at most `limit` requests in any sliding second, paced smoothly below it.

One limiter exists per (AppId, Action) and is shared by every room of that app. Two rules decide
when a request may leave:

* pacing: requests leave at least 1 / (limit × pacing) seconds apart (a token bucket holding one
  token), so a burst does not land in one server-side window and network jitter has room;
* the hard rule: a request leaves no sooner than 1 / pacing seconds after the request `limit`
  places before it, so no sliding window of 1 / pacing seconds ever holds more than `limit`
  departures, however late callers wake (a busy event loop, a GC pause) and bunch up. The
  server counts arrivals in its own sliding second; an arrival lags its departure by the
  network's latency, and as long as that varies by less than 1 / pacing − 1 seconds (53 ms at
  the default 0.95), no server second can hold `limit + 1`. In steady state the two rules agree.

Slots are reserved synchronously, in call order, so concurrency cannot break either rule. A
caller woken late is checked once more against the hard rule on the times requests really
left, and waits again if it would make `limit + 1` in one window.
"""

from __future__ import annotations

import collections
import math

from exporter.clock import Clock

DEFAULT_PACING = 0.95


class RateLimiter:
    def __init__(self, limit: float, clock: Clock, pacing: float = DEFAULT_PACING) -> None:
        if limit <= 0:
            raise ValueError("limit must be > 0")
        if not 0 < pacing <= 1:
            raise ValueError("pacing must be in (0, 1]")
        self.limit = limit
        self._clock = clock
        self._interval = 1.0 / (limit * pacing)
        self._window = max(1, math.floor(limit))  # departures per `span` seconds
        self.span = 1.0 / pacing
        self._recent: collections.deque[float] = collections.deque(maxlen=self._window)
        self._left: collections.deque[float] = collections.deque(maxlen=self._window)
        self._next_free = -math.inf
        self.waited_seconds = 0.0
        self.granted = 0

    def reserve(self, now: float) -> float:
        """Book the next free slot for a request asked for at `now`; return when it may leave."""
        at = max(now, self._next_free)
        if len(self._recent) == self._window:
            at = max(at, self._recent[0] + self.span)
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
            if len(self._left) < self._window or now >= self._left[0] + self.span:
                break
            wait = self._left[0] + self.span - now
        self._left.append(now)
        self.waited_seconds += now - asked
        return now - asked

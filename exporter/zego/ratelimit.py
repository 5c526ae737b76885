"""Async rate limiter: at most `limit` requests in any sliding second, paced smoothly below it.

One limiter exists per (AppId, Action) and is shared by every room of that app. Two rules decide
when a request may leave:

* pacing: requests leave at least 1 / (limit × pacing) seconds apart (a token bucket holding one
  token), so a burst does not land in one server-side window and network jitter has room;
* the hard rule: no sliding window of 1 / pacing seconds ever holds more than `limit` requests
  counted from when they really left, however late callers wake or their bytes are written (a
  busy event loop, a GC pause; on Python 3.11 aiohttp writes a request in a task of its own,
  after whatever else the loop runs first). A granted request holds its place until it is
  marked sent (`Departure.left`, from the HTTP session's trace, or when the call ends), so a
  request stalled on its way out is never counted in an earlier window than the one it lands
  in. The server counts arrivals in its own sliding second; an arrival lags its departure by the
  network's latency, and as long as that varies by less than 1 / pacing − 1 seconds (53 ms at
  the default 0.95), no server second can hold `limit + 1`. In steady state the two rules agree.

Slots are reserved synchronously, in call order, so concurrency cannot break either rule. A
caller woken late is checked once more against the hard rule on the times requests really
left, and waits again if it would make `limit + 1` in one window.
"""

from __future__ import annotations

import collections
import math
from types import SimpleNamespace
from typing import Any

import aiohttp

from exporter.clock import Clock

DEFAULT_PACING = 0.95


class Departure:
    """One granted request: `at` is when it left (None while it has not), `waited` its wait."""

    __slots__ = ("_clock", "at", "waited")

    def __init__(self, clock: Clock, waited: float) -> None:
        self._clock = clock
        self.at: float | None = None
        self.waited = waited

    def left(self) -> None:
        """Mark the request sent, now; later calls keep the first time."""
        if self.at is None:
            self.at = self._clock.monotonic()


async def _chunk_sent(session: Any, context: SimpleNamespace, params: Any) -> None:
    departure = context.trace_request_ctx
    if isinstance(departure, Departure):
        departure.left()


def departure_trace() -> aiohttp.TraceConfig:
    """For the ZEGO session: marks a request's Departure when its bytes are written."""
    trace = aiohttp.TraceConfig()
    trace.on_request_chunk_sent.append(_chunk_sent)
    return trace


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
        self._granted: collections.deque[Departure] = collections.deque()  # in grant order
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

    def _hard_wait(self, now: float) -> float:
        """Seconds until one more departure keeps every window of `span` within `limit`.

        Counts the granted requests not yet sent (they will leave at `now` or later) and those
        that left within the last `span`.
        """
        horizon = now - self.span
        granted = self._granted
        while granted and granted[0].at is not None and granted[0].at <= horizon:
            granted.popleft()
        sent = sorted(d.at for d in granted if d.at is not None and d.at > horizon)
        unsent = sum(d.at is None for d in granted)
        excess = len(sent) + unsent - self._window + 1
        if excess <= 0:
            return 0.0
        if excess > len(sent):  # unsent requests fill the window: they keep it at least a span
            return self.span
        return sent[excess - 1] + self.span - now

    async def acquire(self) -> Departure:
        """Wait for a slot; the caller marks the returned Departure when the request leaves."""
        asked = now = self._clock.monotonic()
        wait = self.reserve(asked) - asked
        while True:
            if wait > 0:
                await self._clock.sleep(wait)
                now = self._clock.monotonic()
            wait = self._hard_wait(now)
            if wait <= 0:
                break
        departure = Departure(self._clock, now - asked)
        self._granted.append(departure)
        self.waited_seconds += now - asked
        return departure

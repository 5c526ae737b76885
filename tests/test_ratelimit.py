"""The rate limiter never lets more than `limit` requests leave in any sliding second."""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.zego.ratelimit import RateLimiter


class VirtualClock:
    """Time moves only when every coroutine waits on it; then it jumps to the next wake-up."""

    def __init__(self) -> None:
        self.now = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), future))
        await future

    async def run(self, tasks: list[asyncio.Task[None]]) -> None:
        while not all(t.done() for t in tasks):
            for _ in range(5):
                await asyncio.sleep(0)
            if self._sleepers:
                at, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, at)
                future.set_result(None)


def max_in_any_window(times: list[float], width: float = 1.0) -> int:
    ordered = sorted(times)
    return max(
        (bisect.bisect_left(ordered, t + width) - i for i, t in enumerate(ordered)), default=0
    )


# Arrivals come in bursts (many callers at once) scattered over 20 s.
bursts = st.lists(
    st.tuples(st.floats(min_value=0, max_value=20, allow_nan=False), st.integers(1, 40)),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    bursts,
    st.sampled_from([1, 2, 3, 5, 10, 10, 10, 20, 50]),
    st.sampled_from([0.5, 0.9, 0.95, 1.0]),
)
def test_no_sliding_second_holds_more_than_limit(
    burst_list: list[tuple[float, int]], limit: int, pacing: float
) -> None:
    limiter = RateLimiter(limit, clock=VirtualClock(), pacing=pacing)
    times = sorted(at for at, count in burst_list for _ in range(count))
    departures = [limiter.reserve(now) for now in times]
    assert max_in_any_window(departures, width=1 / pacing) <= limit


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=20, max_value=400), st.sampled_from([1, 5, 10, 50]))
def test_queued_work_uses_at_least_90_percent_of_the_budget(queued: int, limit: int) -> None:
    limiter = RateLimiter(limit, clock=VirtualClock())
    departures = [limiter.reserve(0.0) for _ in range(queued)]
    span = departures[-1] - departures[0]
    # `queued` requests in `span` seconds: the achieved rate, judged over whole windows.
    achieved = (queued - 1) / span
    assert achieved >= 0.9 * limit


async def test_concurrent_callers_are_paced_and_waiting_is_measured() -> None:
    clock = VirtualClock()
    limiter = RateLimiter(10, clock=clock)
    sent: list[float] = []

    async def call(start: float) -> None:
        await clock.sleep(start)
        (await limiter.acquire()).left()
        sent.append(clock.now)

    tasks = [asyncio.create_task(call(start=(i % 7) * 0.05)) for i in range(60)]
    await clock.run(tasks)

    assert len(sent) == 60
    assert max_in_any_window(sent) <= 10
    assert limiter.granted == 60
    # 60 requests at ~9.5/s need about 6.2 s; most callers waited for their slot.
    assert sent[-1] == pytest.approx(59 / 9.5, rel=0.01)
    assert limiter.waited_seconds > 60 * 2.5


class LateClock(VirtualClock):
    """A busy event loop: every sleeper wakes up to 300 ms late, so wake order can change."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    async def sleep(self, seconds: float) -> None:
        await super().sleep(seconds + self._rng.uniform(0, 0.3))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("pacing", [1.0, 0.95, 0.8])
async def test_callers_woken_late_still_leave_at_most_limit_per_paced_window(
    seed: int, pacing: float
) -> None:
    """After a stall, the backlog leaves at most `limit` per 1 / pacing seconds (10 per 1.25 s
    at 0.8): late wakers do not eat the margin kept for the network's jitter."""
    clock = LateClock(seed)
    limiter = RateLimiter(10, clock=clock, pacing=pacing)
    sent: list[float] = []

    async def call() -> None:
        (await limiter.acquire()).left()
        sent.append(clock.now)

    tasks = [asyncio.create_task(call()) for _ in range(80)]
    await clock.run(tasks)
    assert len(sent) == 80
    assert max_in_any_window(sent, width=1 / pacing) <= 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3, allow_nan=False),
                          st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.2, 0.7, 1.5])),
                min_size=1, max_size=60),
       st.sampled_from([1, 3, 10]), st.sampled_from([0.8, 0.95, 1.0]))
async def test_a_request_stalled_after_its_grant_is_counted_when_it_really_leaves(
    calls: list[tuple[float, float]], limit: int, pacing: float
) -> None:
    """Between the grant and the write the loop may run anything else first (a render, a
    diff, a GC): a request that leaves late still counts in the window it lands in."""
    clock = VirtualClock()
    limiter = RateLimiter(limit, clock=clock, pacing=pacing)
    sent: list[float] = []

    async def call(start: float, stall: float) -> None:
        await clock.sleep(start)
        departure = await limiter.acquire()
        await clock.sleep(stall)
        departure.left()
        sent.append(clock.now)

    tasks = [asyncio.create_task(call(start, stall)) for start, stall in calls]
    await clock.run(tasks)
    assert len(sent) == len(calls)
    assert max_in_any_window(sent, width=1 / pacing) <= limit


def test_rejects_a_non_positive_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        RateLimiter(0, clock=VirtualClock())

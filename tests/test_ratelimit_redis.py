"""The Redis-shared rate limiter against a real redis-server: replicas together keep the limit."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from exporter.clock import SystemClock
from exporter.demo import free_port
from exporter.zego.ratelimit_redis import RedisRateLimiter
from tests.conftest import require_binary

LIMIT = 20
REPLICAS = 4
SECONDS = 3.0



@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require_binary("redis-server", "redis-server")
    port = free_port()
    directory: Path = tmp_path_factory.mktemp("redis")
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert server.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:
    opened = [aioredis.Redis.from_url(redis_url) for _ in range(REPLICAS)]
    await opened[0].flushdb()
    yield opened
    for client in opened:
        await client.aclose()


async def full_demand(limiter: RedisRateLimiter, until: float, departures: list[float]) -> None:
    """One replica's requests, each sent as soon as the limiter allows, three at a time."""
    limiter.booked = departures

    async def sender() -> None:
        while time.monotonic() < until:
            await limiter.acquire()

    await asyncio.gather(*(sender() for _ in range(3)))


async def test_replicas_at_full_demand_stay_within_the_limit_and_use_it(
        clients: list[aioredis.Redis]) -> None:
    limiters = [RedisRateLimiter(c, 42, "DescribeTasks", LIMIT, SystemClock(), pacing=0.95,
                                 fallback_limit=LIMIT / REPLICAS) for c in clients]
    departures: list[float] = []
    until = time.monotonic() + SECONDS
    await asyncio.gather(*(full_demand(lim, until, departures) for lim in limiters))
    departures.sort()
    start, end = departures[0], departures[-1]
    # Every sliding window of 1 / pacing seconds (so every second, with room for jitter) that
    # starts at a departure.
    for i, at in enumerate(departures):
        j = i
        while j < len(departures) and departures[j] < at + 1 / 0.95:
            j += 1
        assert j - i <= LIMIT, f"{j - i} requests in the window from {at - start:.3f}s"
    rate = (len(departures) - 1) / (end - start)
    assert rate >= 0.9 * LIMIT, f"only {rate:.1f}/s of {LIMIT}/s used"
    assert all(lim.granted > 0 for lim in limiters), "a replica was starved"


async def test_an_unreachable_redis_falls_back_to_the_local_share() -> None:
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0",
                                     socket_connect_timeout=0.2)
    limiter = RedisRateLimiter(client, 42, "DescribeTasks", LIMIT, SystemClock(),
                               fallback_limit=LIMIT / REPLICAS)
    try:
        waits = [(await limiter.acquire()).waited for _ in range(3)]
    finally:
        await client.aclose()
    assert waits[0] == 0
    assert waits[2] > 0  # paced at the local share: 5/s × 0.95
    assert limiter.limit == LIMIT


async def test_the_factory_shares_the_whole_limit_and_falls_back_to_the_replicas_share(
        redis_url: str) -> None:
    from exporter.config import AppConfig, Secret
    from exporter.zego.ratelimit_redis import redis_limiter_factory

    client, make = redis_limiter_factory(redis_url, {42: 20.0}, 0.95)
    try:
        limiter = make(AppConfig(42, Secret("s" * 32), ("a",), rate_limit=5.0), "DescribeTasks")
        assert isinstance(limiter, RedisRateLimiter)
        assert (limiter.limit, limiter.fallback_limit) == (20.0, 5.0)
        assert (await limiter.acquire()).waited == 0
    finally:
        await client.aclose()

"""A rate limiter shared by several replicas through Redis (--ratelimit.redis-url).

Same rules as exporter/zego/ratelimit.py, but the slots are booked in Redis by one Lua script per
(AppId, Action), atomically, on Redis' own clock: requests leave at least
1 / (limit × pacing) apart, and no sooner than 1 / pacing seconds after the request `limit`
places before them, whichever replica sends them. So replicas polling one app together
never exceed its limit in any sliding second. If Redis cannot be reached, the limiter falls back
to a local one at this replica's share of the budget (`fallback_limit`, e.g. rate_limit /
replicas), which keeps the total within the limit too, and logs it; it tries Redis again on the
next request.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import structlog

from exporter.clock import Clock, SystemClock
from exporter.config import AppConfig
from exporter.zego.ratelimit import DEFAULT_PACING, Departure, RateLimiter

log = structlog.get_logger("exporter.zego.ratelimit_redis")

KEY_PREFIX = "zego-cloudrecord-exporter:ratelimit"

# KEYS[1]: sorted set of booked departure times (µs); KEYS[2]: next free time (µs).
# ARGV[1]: window (requests per span); ARGV[2]: pacing interval (µs); ARGV[3]: span (µs).
# Returns {wait µs, departure µs}, both on Redis' clock. Times are written with %.0f: Lua's
# tostring() would round µs timestamps to 14 digits.
BOOK_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local span = tonumber(ARGV[3])
local at = now
local next_free = tonumber(redis.call('GET', KEYS[2]) or '0')
if next_free > at then at = next_free end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - span - 1000000)
local n = redis.call('ZCARD', KEYS[1])
if n >= window then
  local e = redis.call('ZRANGE', KEYS[1], n - window, n - window, 'WITHSCORES')
  local bound = tonumber(e[2]) + span
  if bound > at then at = bound end
end
redis.call('ZADD', KEYS[1], at, string.format('%.0f', at))
local keep = math.max(10000, math.ceil((at - now + span + interval) / 500))
redis.call('SET', KEYS[2], string.format('%.0f', at + interval), 'PX', keep)
redis.call('PEXPIRE', KEYS[1], keep)
return {at - now, at}
"""


class RedisRateLimiter(RateLimiter):
    """At most `limit` requests per sliding second for one (AppId, Action), across replicas."""

    def __init__(self, redis: Any, app_id: int, action: str, limit: float, clock: Clock,
                 pacing: float = DEFAULT_PACING, fallback_limit: float | None = None) -> None:
        # The local bucket (the parent) is the fallback, at this replica's share.
        self.fallback_limit = fallback_limit or limit
        super().__init__(self.fallback_limit, clock, pacing)
        self.limit = limit
        self._redis = redis
        self._keys = [f"{KEY_PREFIX}:{app_id}:{action}:slots",
                      f"{KEY_PREFIX}:{app_id}:{action}:next"]
        self._args = [max(1, math.floor(limit)), max(1, round(1e6 / (limit * pacing))),
                      round(1e6 / pacing)]
        self._script = redis.register_script(BOOK_SLOT)
        self._degraded = False
        self.booked: list[float] | None = None  # set to a list to record slots (Redis time, s)

    async def acquire(self) -> Departure:
        """Wait for a shared slot (booked in Redis when granted; `left` marks nothing there)."""
        try:
            wait_us, at_us = await self._script(keys=self._keys, args=self._args)
        except Exception as exc:  # any Redis failure: keep polling within the local share
            if not self._degraded:
                log.warning("ratelimit_redis_unavailable", error=str(exc),
                            fallback_limit=self.fallback_limit)
                self._degraded = True
            return await super().acquire()
        if self._degraded:
            log.info("ratelimit_redis_recovered")
            self._degraded = False
        wait = int(wait_us) / 1e6
        if self.booked is not None:
            self.booked.append(int(at_us) / 1e6)
        self.granted += 1
        if wait > 0:
            self.waited_seconds += wait
            await asyncio.sleep(wait)  # Redis' clock is real time, whatever the local clock
        return Departure(self._clock, max(0.0, wait))


def redis_limiter_factory(
    url: str, shared_limits: dict[int, float], pacing: float
) -> tuple[Any, Callable[[AppConfig, str], RateLimiter]]:
    """A Redis client and a factory of shared limiters for Exporter(limiter_factory=...).

    `shared_limits`: each app's whole rate_limit (before sharding); the app's rate_limit in the
    config handed to the factory is this replica's share, used only while Redis is away.
    """
    import redis.asyncio as aioredis  # the optional extra `redis`

    client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    clock = SystemClock()

    def make(app: AppConfig, action: str) -> RateLimiter:
        return RedisRateLimiter(client, app.app_id, action,
                                shared_limits.get(app.app_id, app.rate_limit), clock, pacing,
                                fallback_limit=app.rate_limit)

    return client, make

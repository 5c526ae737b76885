"""Per (AppId, Action) request accounting: the strict sliding-second rate limit and its counters."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_RATE_LIMITS: Mapping[str, int] = {
    "DescribeTasks": 10, "DescribeRecordStatus": 10, "StartRecord": 50, "StopRecord": 50,
    "PauseRecord": 10, "ResumeRecord": 10,
}
WINDOW_SECONDS = 1.0


@dataclass(slots=True)
class ActionTraffic:
    """Requests of one (AppId, Action) and the sliding windows they are counted in."""

    requests: int = 0
    rate_limited: int = 0
    max_per_second: int = 0  # the most requests seen in any sliding second, admitted or not
    arrivals: list[float] = field(default_factory=list)  # sorted: stamps may come out of order
    admitted: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, int]:
        return {"requests": self.requests, "rate_limited": self.rate_limited,
                "max_per_second": self.max_per_second}


def _in_second(stamps: list[float], now: float) -> int:
    """How many of the sorted `stamps` fall in the sliding second (now - 1, now]."""
    return bisect.bisect_right(stamps, now) - bisect.bisect_right(stamps, now - WINDOW_SECONDS)


@dataclass(slots=True)
class Traffic:
    """Admits a request unless `limit` requests were admitted in the sliding second before it.

    Times come from the simulator's clock (`monotonic()`), so a test's ManualClock or a demo's
    ScaledClock sets the pace. A limit <= 0 (or an action without one) is unlimited. Only admitted
    requests fill the window: a client that backs off gets through again after a second. Stamps
    taken as requests arrive (`ServerOptions.arrival_header`) may reach `admit` a little out of
    order: each is counted in its own second, (now - 1, now], wherever it falls.
    """

    limits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    total_requests: int = 0
    by_key: dict[tuple[int, str], ActionTraffic] = field(default_factory=dict)

    def arrive(self) -> None:
        self.total_requests += 1

    def admit(self, app_id: int, action: str, now: float) -> bool:
        """Count one authenticated request; False if it exceeds the action's rate limit."""
        traffic = self.by_key.setdefault((app_id, action), ActionTraffic())
        traffic.requests += 1
        latest = max(now, traffic.arrivals[-1]) if traffic.arrivals else now
        kept_from = latest - 2 * WINDOW_SECONDS  # room for stamps a second out of order
        for window in (traffic.arrivals, traffic.admitted):
            del window[:bisect.bisect_right(window, kept_from)]
        bisect.insort(traffic.arrivals, now)
        # The seconds this arrival is in: the one it ends, and those of any later ones within
        # a second (counted already, without it, if it came out of order).
        later = traffic.arrivals[bisect.bisect_left(traffic.arrivals, now):bisect.bisect_left(
            traffic.arrivals, now + WINDOW_SECONDS)]
        traffic.max_per_second = max(traffic.max_per_second,
                                     *(_in_second(traffic.arrivals, t) for t in later))
        limit = self.limits.get(action, 0)
        if limit > 0 and _in_second(traffic.admitted, now) >= limit:
            traffic.rate_limited += 1
            return False
        bisect.insort(traffic.admitted, now)
        return True

    def reset(self) -> None:
        self.total_requests = 0
        self.by_key.clear()

    def to_json(self) -> dict[str, Any]:
        by_action: dict[str, dict[str, int]] = {}
        for (_, action), traffic in sorted(self.by_key.items()):
            merged = by_action.setdefault(action, {"requests": 0, "rate_limited": 0,
                                                   "max_per_second": 0})
            merged["requests"] += traffic.requests
            merged["rate_limited"] += traffic.rate_limited
            merged["max_per_second"] = max(merged["max_per_second"], traffic.max_per_second)
        return {
            "total_requests": self.total_requests,
            "rate_limited": sum(t.rate_limited for t in self.by_key.values()),
            "max_per_second": max((t.max_per_second for t in self.by_key.values()), default=0),
            "by_action": by_action,
            "by_app_action": [{"app_id": app_id, "action": action, **traffic.to_json()}
                              for (app_id, action), traffic in sorted(self.by_key.items())],
            "limits": dict(self.limits),
        }

"""Chooses, for each app and cycle, the cheaper way to list its rooms.

Per-room: one DescribeTasks query per room and status, `pages(tasks of the room)` requests each.
App-wide: one query per status for the whole app, filtered to the configured rooms,
`pages(tasks of the app)` requests each. Which is cheaper depends on how many tasks the app's
other rooms have, so the planner keeps the last cycle's counts: app-wide cycles reveal every
count; per-room cycles probe the app's totals now and then with two one-row queries (TotalCount
comes back whatever the page size). It switches only when the other plan is clearly cheaper.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from exporter.zego.limits import PAGE_SIZE
from exporter.zego.models import RecordingTask

PROBE_EVERY = 20  # cycles between app-wide probes while per-room
SWITCH_ABOVE = 1.1  # switch when this plan needs over 1.1 × the other's requests


def pages(tasks: int) -> int:
    return max(1, math.ceil(tasks / PAGE_SIZE))


class Planner:
    def __init__(self, rooms: tuple[str, ...]) -> None:
        self.rooms = rooms
        # Start app-wide: its first cycle costs little and learns every count.
        self.app_wide = len(rooms) > 1
        self._by_room: dict[int, dict[str, int]] = {}  # status -> room -> tasks
        self._app_total: dict[int, int] = {}  # status -> tasks of the whole app
        self._since_probe = PROBE_EVERY

    @property
    def plan(self) -> str:
        return "app-wide" if self.app_wide else "per-room"

    def needs_probe(self) -> bool:
        """Per-room and the app's totals are old: spend two requests to learn them."""
        return not self.app_wide and len(self.rooms) > 1 and self._since_probe >= PROBE_EVERY

    def record_rows(self, status: int, rows: Iterable[RecordingTask]) -> None:
        counts = dict.fromkeys(self.rooms, 0)
        for row in rows:
            if row.room_id in counts:
                counts[row.room_id] += 1
        self._by_room[status] = counts

    def record_app_total(self, status: int, total: int) -> None:
        self._app_total[status] = total
        self._since_probe = 0

    def costs(self) -> Mapping[str, int | None]:
        per_room = sum(pages(n) for counts in self._by_room.values() for n in counts.values())
        if len(self._by_room) < 2:
            per_room = 2 * len(self.rooms)
        app_wide = (sum(pages(n) for n in self._app_total.values())
                    if len(self._app_total) == 2 else None)
        return {"per-room": per_room, "app-wide": app_wide}

    def end_cycle(self) -> None:
        """Choose next cycle's plan from this cycle's counts, with hysteresis."""
        self._since_probe += 1
        costs = self.costs()
        per_room, app_wide = costs["per-room"], costs["app-wide"]
        if per_room is None or app_wide is None or len(self.rooms) < 2:
            return
        if self.app_wide and app_wide > SWITCH_ABOVE * per_room:
            self.app_wide = False
        elif not self.app_wide and per_room > SWITCH_ABOVE * app_wide:
            self.app_wide = True

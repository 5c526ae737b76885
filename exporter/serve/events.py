"""`GET /api/v1/events`: the last counted events, newest first, as JSON (and the landing page's
table). From an alert to the recording: each event names its task, source and quit_reason.

The query is outside input: `app_id`, `room_id`, `event` and `limit` are checked, and anything
else about them is a 400 naming the parameter, never a 500.
"""

from __future__ import annotations

import datetime as dt
import heapq
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from exporter.state.changes import EventKind, TaskEvent
from exporter.state.model import QUIT_REASONS, RECENT_EVENTS, ExporterState
from exporter.text import text_problem
from exporter.zego.limits import MAX_ROOM_ID_BYTES

DEFAULT_LIMIT = 100
KNOWN_PARAMETERS = frozenset({"app_id", "room_id", "event", "limit"})


class BadQuery(ValueError):
    """A query the API cannot answer; the message names the parameter."""


@dataclass(frozen=True)
class EventQuery:
    app_id: int | None = None
    room_id: str | None = None
    event: EventKind | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> EventQuery:
        unknown = sorted(set(query) - KNOWN_PARAMETERS)
        if unknown:
            raise BadQuery(f"unknown parameter {unknown[0][:40]!r}: use "
                           f"{', '.join(sorted(KNOWN_PARAMETERS))}")
        app_id = query.get("app_id")
        if app_id is not None and not (app_id.isascii() and app_id.isdigit() and len(app_id) <= 10):
            raise BadQuery("app_id is not an AppId")
        room_id = query.get("room_id")
        if room_id is not None and (problem := text_problem(room_id, MAX_ROOM_ID_BYTES)):
            raise BadQuery(f"room_id {problem}")
        event = query.get("event")
        kinds = {kind.value: kind for kind in EventKind}
        if event is not None and event not in kinds:
            raise BadQuery(f"event is not one of {', '.join(kinds)}")
        limit = query.get("limit", str(DEFAULT_LIMIT))
        if not (limit.isascii() and limit.isdigit() and 1 <= int(limit[:5]) <= RECENT_EVENTS
                and len(limit) <= 5):
            raise BadQuery(f"limit is not a whole number from 1 to {RECENT_EVENTS}")
        return cls(None if app_id is None else int(app_id), room_id,
                   None if event is None else kinds[event], int(limit))


def recent(state: ExporterState, query: EventQuery) -> list[tuple[int, TaskEvent]]:
    """(app_id, event) of the latest events that match, newest first."""
    def matching(app_id: int, events: Sequence[TaskEvent]) -> Iterator[tuple[int, TaskEvent]]:
        for event in reversed(events):
            if (query.room_id is None or event.room_id == query.room_id) and \
                    (query.event is None or event.kind is query.event):
                yield app_id, event

    streams = [matching(app_id, app.recent) for app_id, app in state.apps.items()
               if query.app_id in (None, app_id)]
    newest = heapq.merge(*streams, key=lambda pair: pair[1].at_ms or 0, reverse=True)
    return [pair for pair, _ in zip(newest, range(query.limit), strict=False)]


def as_json(app_id: int, event: TaskEvent) -> dict[str, Any]:
    at = dt.datetime.fromtimestamp((event.at_ms or 0) / 1000, dt.UTC)
    return {
        "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "app_id": app_id,
        "room_id": event.room_id,
        "task_id": event.task_id,
        "event": event.kind.value,
        "source": event.source.value,
        "quit_reason": int(event.quit_reason) if event.quit_reason in QUIT_REASONS else None,
        "duration_s": event.duration_s,
    }

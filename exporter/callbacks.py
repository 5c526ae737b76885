"""ZEGO recording callbacks: a second, faster event source, reconciled with polling.

ZEGO POSTs a signed JSON callback when a task pauses, resumes, ends (normally or not) and when
its files are uploaded. Callbacks are at-most-3-times and may be lost or repeated, so polling
stays the source of truth for starts and for anything a callback missed; a callback only makes
an end visible sooner and adds the `quit_reason`. Whichever source sees a transition first
counts it; the other recognises it (the task is finished, or its status already flipped).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from exporter.clock import Clock
from exporter.config import Secret
from exporter.diff import EventKind, TaskEvent
from exporter.state import AppState, ExporterState
from exporter.web import ServerLimits, body_limit
from exporter.zego.callback_signing import verify_callback_signature
from exporter.zego.models import TaskStatus

MAX_BODY_BYTES = 256 * 1024
MAX_CLOCK_SKEW_S = 600  # ZEGO's own signatures are valid for 10 minutes
# Callbacks, nonces and sequences are remembered this long: a callback sent earlier than that
# is refused as stale whenever it arrives, so none older can be a repeat, a replay or a reorder.
REMEMBERED_S = 2 * MAX_CLOCK_SKEW_S

EVENT_UPLOADED = 1
EVENT_ABNORMAL_END = 2
EVENT_NORMAL_END = 5
EVENT_PAUSED = 201
EVENT_RESUMED = 202
KNOWN_EVENTS = frozenset({1, 2, 3, 4, 5, 6, 7, 102, 201, 202})
UPLOADED_OK = 3

log = structlog.get_logger("exporter.callbacks")


@dataclass(frozen=True)
class Callback:
    app_id: int
    task_id: str
    room_id: str
    event_type: int
    sequence: int
    timestamp: str
    nonce: str
    signature: str
    detail: Mapping[str, Any]

    @property
    def event_label(self) -> str:
        return str(self.event_type) if self.event_type in KNOWN_EVENTS else "other"


# Results that are refused, with their HTTP status; every other result is answered 200.
REJECTED = {"malformed": 400, "unknown_app": 401, "bad_signature": 401,
            "stale": 401, "replayed": 401}


class CallbackRejected(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result


def parse_callback(body: bytes) -> Callback:
    try:
        raw = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise CallbackRejected("malformed", "body is not JSON") from None
    if not isinstance(raw, dict):
        raise CallbackRejected("malformed", "body is not a JSON object")

    def field(name: str, kind: type | tuple[type, ...]) -> Any:
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise CallbackRejected("malformed", f"{name} missing or of the wrong type")
        return value

    app_id = field("app_id", (int, str))
    try:
        app_id = int(app_id)
    except ValueError:
        raise CallbackRejected("malformed", "app_id is not a number") from None
    detail = raw.get("detail") or {}
    if not isinstance(detail, dict):
        raise CallbackRejected("malformed", "detail is not an object")
    return Callback(
        app_id=app_id,
        task_id=field("task_id", str),
        room_id=field("room_id", str),
        event_type=field("event_type", int),
        sequence=field("sequence", int),
        timestamp=str(field("timestamp", (str, int))),
        nonce=str(field("nonce", (str, int))),
        signature=field("signature", str),
        detail=detail,
    )


class CallbackReceiver:
    """Verifies callbacks and turns them into the same events polling produces."""

    def __init__(
        self,
        state: ExporterState,
        secrets: Mapping[int, Secret],
        clock: Clock,
        on_change: Callable[[AppState], None] = lambda app: None,
    ) -> None:
        self._state = state
        self._secrets = secrets
        self._clock = clock
        self._on_change = on_change
        self._seen: _Recent[None] = _Recent(REMEMBERED_S)
        self._nonces: _Recent[None] = _Recent(REMEMBERED_S)
        self._last_sequence: _Recent[int] = _Recent(REMEMBERED_S)

    @property
    def app_ids(self) -> list[int]:
        return list(self._secrets)

    def handle(self, body: bytes) -> tuple[str, str, str]:
        """Check and apply one callback: (app_id label, event_type label, result)."""
        try:
            callback = parse_callback(body)
        except CallbackRejected as exc:
            return "unknown", "unknown", exc.result
        app = self._state.apps.get(callback.app_id)
        secret = self._secrets.get(callback.app_id)
        if app is None or secret is None:
            return "unknown", callback.event_label, "unknown_app"
        labels = str(app.app_id), callback.event_label
        try:
            sent = int(callback.timestamp)
        except ValueError:
            return (*labels, "malformed")
        if not verify_callback_signature(secret.reveal(), callback.timestamp, callback.nonce,
                                         callback.signature):
            return (*labels, "bad_signature")
        now = self._clock.time()
        if abs(now - sent) > MAX_CLOCK_SKEW_S:
            return (*labels, "stale")
        key = (callback.app_id, callback.task_id, callback.event_type, callback.sequence)
        if key in self._seen:
            return (*labels, "duplicate")  # ZEGO's retry of a callback already applied
        nonce_key = (callback.app_id, callback.timestamp, callback.nonce)
        if nonce_key in self._nonces:
            return (*labels, "replayed")
        self._seen.add(key, now)
        self._nonces.add(nonce_key, now)
        if app.rooms is not None and callback.room_id not in app.rooms:
            return (*labels, "ignored")
        result = self._apply(app, callback)
        if result == "applied":
            self._on_change(app)
        return (*labels, result)

    def _apply(self, app: AppState, callback: Callback) -> str:
        tracking = app.tracking
        task = tracking.live.get(callback.task_id)
        now_ms = int(self._clock.time() * 1000)
        events: list[TaskEvent] = []
        if callback.event_type in (EVENT_ABNORMAL_END, EVENT_NORMAL_END):
            if callback.task_id in tracking.finished:
                return "recognised"
            abnormal = callback.event_type == EVENT_ABNORMAL_END
            if abnormal:
                reason = str(callback.detail.get("quit_reason", "unknown"))
                app.ended_by_reason[reason] = app.ended_by_reason.get(reason, 0) + 1
            if task is None and tracking.has_baseline:
                events.append(TaskEvent(EventKind.STARTED, callback.task_id, callback.room_id))
            duration = None if task is None else max(0.0, (now_ms - task.begin_ms) / 1000)
            events.append(TaskEvent(EventKind.ENDED, callback.task_id, callback.room_id, duration))
            if abnormal:
                events.append(TaskEvent(EventKind.ENDED_ABNORMALLY, callback.task_id,
                                        callback.room_id))
            # In place: a copy of 50,000 live tasks per callback would cost more than all else
            # a callback does. The render thread copies what it reads in one step (collector).
            tracking.live.pop(callback.task_id, None)
            tracking.finished[callback.task_id] = now_ms
            app.unsaved_tasks.add(callback.task_id)
            app.apply(tracking, events, flush_deferred=False, new_live=False)
            log.info(f"task_{'ended_abnormally' if abnormal else 'ended'}", app_id=app.app_id,
                     room_id=callback.room_id, task_id=callback.task_id, source="callback",
                     **({"quit_reason": callback.detail.get("quit_reason")} if abnormal else {}))
            return "applied"
        if callback.event_type in (EVENT_PAUSED, EVENT_RESUMED):
            # Only news counts: a callback older than one already applied for the task, or sent
            # before the last poll, describes a state polling has already seen (counted, or
            # missed for good). Applying it would flip a newer state back: a false event.
            task_key = (app.app_id, callback.task_id)
            if callback.sequence < self._last_sequence.get(task_key, -1):
                return "out_of_order"
            self._last_sequence.add(task_key, self._clock.time(), callback.sequence)
            if task is None or int(callback.timestamp) * 1000 < (app.last_observed_ms or 0):
                return "recognised"
            paused = callback.event_type == EVENT_PAUSED
            if (task.status is TaskStatus.PAUSED) == paused:
                return "recognised"
            kind = EventKind.PAUSED if paused else EventKind.RESUMED
            status = TaskStatus.PAUSED if paused else TaskStatus.RECORDING
            tracking.live[task.task_id] = replace(task, status=status)
            app.unsaved_tasks.add(task.task_id)
            app.apply(tracking, [TaskEvent(kind, task.task_id, task.room_id)],
                      flush_deferred=False, new_live=False)
            app.flipped_at_ms[task.task_id] = now_ms
            log.info(f"task_{kind.value}", app_id=app.app_id, room_id=task.room_id,
                     task_id=task.task_id, source="callback")
            return "applied"
        if callback.event_type == EVENT_UPLOADED:
            files = callback.detail.get("file_info") or []
            failed = sum(1 for f in files if isinstance(f, dict) and f.get("status") != UPLOADED_OK)
            if failed:
                room = app.room_label(callback.room_id)
                app.upload_failures[room] = app.upload_failures.get(room, 0) + failed
                log.warning("upload_failed", app_id=app.app_id, room_id=callback.room_id,
                            task_id=callback.task_id, files=failed)
                return "applied"
        return "counted"

    def make_app(self, path: str = "/callback", middlewares: Sequence[Middleware] = ()
                 ) -> web.Application:
        """POST `path` only (405 otherwise), bodies up to 256 KiB, read within the limits'
        timeout; `middlewares` from the listener's web config (TLS is the site's)."""
        limits = ServerLimits(client_max_size=MAX_BODY_BYTES)
        async def receive(request: web.Request) -> web.Response:
            app_id, event_type, result = self.handle(await request.read())
            self._count(app_id, event_type, result)
            status = REJECTED.get(result, 200)
            if status != 200:
                log.warning("callback_rejected", app_id=app_id, event_type=event_type,
                            result=result)
            return web.json_response({"code": 0 if status == 200 else 1, "message": result},
                                     status=status)

        @web.middleware
        async def count_too_large(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except web.HTTPRequestEntityTooLarge:
                self._count("unknown", "unknown", "too_large")
                log.warning("callback_rejected", result="too_large")
                raise

        app = web.Application(client_max_size=MAX_BODY_BYTES,
                              middlewares=[*middlewares, count_too_large, body_limit(limits)],
                              handler_args=limits.handler_args())
        app.router.add_post(path, receive)
        return app

    def _count(self, app_id: str, event_type: str, result: str) -> None:
        key = (app_id, event_type, result)
        self._state.callbacks[key] = self._state.callbacks.get(key, 0) + 1


V = TypeVar("V")


class _Recent(Generic[V]):
    """What was seen in the last `ttl_s` seconds, by a 64-bit fingerprint of the key (Python's
    salted hash: about 100 bytes an entry instead of 250 for the key itself; a collision, about
    one in 10^14 per lookup at 100,000 entries, would only take a callback for a repeat, which
    polling then finds). Complete for `ttl_s`, not capped at a count: a busy app's callbacks
    cannot push a nonce out early and open it to replay."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._until: dict[int, float] = {}
        self._values: dict[int, V] = {}
        self._prune_at = -math.inf

    def __contains__(self, key: Hashable) -> bool:
        return hash(key) in self._until

    def get(self, key: Hashable, default: V) -> V:
        return self._values.get(hash(key), default)

    def add(self, key: Hashable, now: float, value: V | None = None) -> None:
        fingerprint = hash(key)
        self._until[fingerprint] = now + self._ttl_s
        if value is not None:
            self._values[fingerprint] = value
        if now >= self._prune_at:  # a tenth of the entries' life: a rebuild now and then
            self._until = {f: until for f, until in self._until.items() if until > now}
            self._values = {f: v for f, v in self._values.items() if f in self._until}
            self._prune_at = now + self._ttl_s / 10

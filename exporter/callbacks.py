"""ZEGO recording callbacks: a second, faster event source, reconciled with polling.

ZEGO POSTs a signed JSON callback when a task pauses, resumes, ends (normally or not) and when
its files are uploaded. Callbacks are at-most-3-times and may be lost or repeated, so polling
stays the source of truth for starts and for anything a callback missed; a callback only makes
an end visible sooner and adds the `quit_reason`. Whichever source sees a transition first
counts it; the other recognises it (the task is finished, or its status already flipped).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from exporter.clock import Clock
from exporter.config import Secret
from exporter.logs import Throttle
from exporter.poll.diff import EventKind, TaskEvent
from exporter.serve.web import Edge, ServerLimits, body_limit
from exporter.state.model import QUIT_REASONS, AppState, ExporterState
from exporter.text import text_problem
from exporter.zego.callback_signing import verify_callback_signature
from exporter.zego.models import MAX_ROOM_ID_BYTES, MAX_TASK_ID_BYTES, TaskStatus

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


# What a callback may hold: ZEGO's ids and numbers with room to spare, never more.
MAX_NONCE_CHARS = 64
MAX_DEPTH = 8  # ZEGO's bodies nest 3 deep (detail.file_info[].field)
MAX_FILES = 1000
MAX_SEQUENCE = 2**53 - 1
_NONCE = re.compile(rf"[\x21-\x7e]{{1,{MAX_NONCE_CHARS}}}")  # printable ASCII, no spaces
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-fA-F]{40}")  # sha1, hex


@dataclass(frozen=True, slots=True)
class Envelope:
    """Who sent a callback and what its signature covers: checked before anything else."""

    app_id: int
    event_label: str  # ZEGO's event type if documented, else "other": a bounded label
    timestamp: str
    nonce: str
    signature: str
    digest: bytes  # of the whole body: a retry repeats it, a forgery under a stolen nonce not


@dataclass(frozen=True, slots=True)
class Callback:
    """A signed callback's content, validated: only clean ids and ZEGO's documented values."""

    app_id: int
    task_id: str
    room_id: str
    event_type: int
    sequence: int
    sent_s: int
    quit_reason: str  # a documented code, "unknown" (none given) or "other"
    failed_files: int  # files of an upload callback whose status is not "uploaded"


# Results that are refused, with their HTTP status; every other result is answered 200.
REJECTED = {"malformed": 400, "unknown_app": 401, "bad_signature": 401,
            "stale": 401, "replayed": 401}


class CallbackRejected(Exception):
    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result


def _malformed(reason: str) -> CallbackRejected:
    return CallbackRejected("malformed", reason)


def _depth(value: object) -> int:
    """How deep a parsed JSON value nests, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:  # past it the answer is known
            continue
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _integer(raw: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _malformed(f"{name} missing, not an integer or out of range")
    return value


def _id(raw: Mapping[str, Any], name: str, max_bytes: int) -> str:
    value = raw.get(name)
    problem = text_problem(value, max_bytes)
    if problem is not None:
        raise _malformed(f"{name} {problem}")
    assert isinstance(value, str)
    return value


def parse_envelope(body: bytes) -> tuple[Envelope, dict[str, Any]]:
    """The JSON object and its envelope, or CallbackRejected("malformed")."""
    try:
        raw = json.loads(body)
    except RecursionError:
        raise _malformed(f"nested deeper than {MAX_DEPTH} levels") from None
    except (UnicodeDecodeError, ValueError):
        raise _malformed("body is not JSON") from None
    if not isinstance(raw, dict):
        raise _malformed("body is not a JSON object")
    if _depth(raw) > MAX_DEPTH:
        raise _malformed(f"nested deeper than {MAX_DEPTH} levels")
    app_id = raw.get("app_id")
    if isinstance(app_id, str) and app_id.isascii() and app_id.isdigit() and len(app_id) <= 10:
        app_id = int(app_id)
    if isinstance(app_id, bool) or not isinstance(app_id, int) or not 0 < app_id < 2**32:
        raise _malformed("app_id missing or not an AppId")
    texts = {}
    for name, pattern in (("timestamp", _TIMESTAMP), ("nonce", _NONCE),
                          ("signature", _SIGNATURE)):
        value = raw.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and name != "signature":
            value = str(value)
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise _malformed(f"{name} missing or not of ZEGO's form")
        texts[name] = value
    event_type = raw.get("event_type")
    label = str(event_type) if type(event_type) is int and event_type in KNOWN_EVENTS \
        else "other"
    return Envelope(app_id, label, texts["timestamp"], texts["nonce"], texts["signature"],
                    hashlib.blake2b(body, digest_size=16).digest()), raw


def parse_callback(envelope: Envelope, raw: Mapping[str, Any]) -> Callback:
    """The content of a signed callback, or CallbackRejected("malformed")."""
    detail = raw.get("detail")
    detail = {} if detail is None else detail
    if not isinstance(detail, dict):
        raise _malformed("detail is not an object")
    event_type = _integer(raw, "event_type", -(2**31), 2**31 - 1)
    quit_reason = detail.get("quit_reason")
    failed_files = 0
    if event_type == EVENT_UPLOADED:
        files = detail.get("file_info")
        files = [] if files is None else files
        if not isinstance(files, list) or len(files) > MAX_FILES or \
                not all(isinstance(f, dict) for f in files):
            raise _malformed(f"detail.file_info is not a list of at most {MAX_FILES} objects")
        failed_files = sum(1 for f in files if f.get("status") != UPLOADED_OK)
    return Callback(
        app_id=envelope.app_id,
        task_id=_id(raw, "task_id", MAX_TASK_ID_BYTES),
        room_id=_id(raw, "room_id", MAX_ROOM_ID_BYTES),
        event_type=event_type,
        sequence=_integer(raw, "sequence", 0, MAX_SEQUENCE),
        sent_s=int(envelope.timestamp),
        quit_reason=("unknown" if quit_reason is None
                     else str(quit_reason) if type(quit_reason) is int
                     and str(quit_reason) in QUIT_REASONS else "other"),
        failed_files=failed_files,
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
        self._nonces: _Recent[bytes] = _Recent(REMEMBERED_S)  # -> the digest of its body
        self._last_sequence: _Recent[int] = _Recent(REMEMBERED_S)
        self._rejections = Throttle()  # anyone can send a bad callback: a line per 10 s

    @property
    def app_ids(self) -> list[int]:
        return list(self._secrets)

    def handle(self, body: bytes) -> tuple[str, str, str]:
        """Check and apply one callback: (app_id label, event_type label, result)."""
        try:
            envelope, raw = parse_envelope(body)
        except CallbackRejected as exc:
            return "unknown", "unknown", exc.result
        app = self._state.apps.get(envelope.app_id)
        secret = self._secrets.get(envelope.app_id)
        if app is None or secret is None:
            return "unknown", envelope.event_label, "unknown_app"
        labels = str(app.app_id), envelope.event_label
        if not verify_callback_signature(secret.reveal(), envelope.timestamp, envelope.nonce,
                                         envelope.signature):
            return (*labels, "bad_signature")
        # The signature covers the timestamp and nonce, not the body: a nonce is good for one
        # body. Its retransmission (ZEGO's retry, byte for byte) repeats a decision already
        # taken; any other body under it is a forgery.
        now, sent = self._clock.time(), int(envelope.timestamp)
        nonce_key = (envelope.app_id, envelope.timestamp, envelope.nonce)
        first_digest = self._nonces.get(nonce_key, b"")
        if not first_digest:  # every signed nonce, stale too: one dated ahead becomes fresh
            self._nonces.add(nonce_key, now, envelope.digest,
                             until=max(now, sent + MAX_CLOCK_SKEW_S) + 1)
        if abs(now - sent) > MAX_CLOCK_SKEW_S:
            return (*labels, "stale")
        if first_digest:
            return (*labels, "duplicate" if first_digest == envelope.digest else "replayed")
        try:
            callback = parse_callback(envelope, raw)
        except CallbackRejected as exc:
            return (*labels, exc.result)
        key = (callback.app_id, callback.task_id, callback.event_type, callback.sequence)
        if key in self._seen:
            return (*labels, "duplicate")  # ZEGO's retry of a callback already applied
        self._seen.add(key, now)
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
                reason = callback.quit_reason
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
                     **({"quit_reason": callback.quit_reason} if abnormal else {}))
            return "applied"
        if callback.event_type in (EVENT_PAUSED, EVENT_RESUMED):
            # Only news counts: a callback older than one already applied for the task, or sent
            # before the last poll, describes a state polling has already seen (counted, or
            # missed for good). Applying it would flip a newer state back: a false event.
            task_key = (app.app_id, callback.task_id)
            if callback.sequence < self._last_sequence.get(task_key, -1):
                return "out_of_order"
            self._last_sequence.add(task_key, self._clock.time(), callback.sequence)
            if task is None or callback.sent_s * 1000 < (app.last_observed_ms or 0):
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
            failed = callback.failed_files
            if failed:
                room = app.room_label(callback.room_id)
                app.upload_failures[room] = app.upload_failures.get(room, 0) + failed
                log.warning("upload_failed", app_id=app.app_id, room_id=callback.room_id,
                            task_id=callback.task_id, files=failed)
                return "applied"
        return "counted"

    def make_app(self, edge: Edge, path: str = "/callback",
                 middlewares: Sequence[Middleware] = ()) -> web.Application:
        """POST `path` only (405 otherwise), bodies up to 256 KiB, read within the limits'
        timeout; `middlewares` from the listener's web config (TLS is the site's)."""
        limits = ServerLimits(client_max_size=MAX_BODY_BYTES)

        async def receive(request: web.Request) -> web.Response:
            app_id, event_type, result = self.handle(await request.read())
            self._count(app_id, event_type, result)
            status = REJECTED.get(result, 200)
            if status != 200 and (dropped := self._rejections.allow(result)) is not None:
                log.warning("callback_rejected", app_id=app_id, event_type=event_type,
                            result=result, **({"suppressed": dropped} if dropped else {}))
            return web.json_response({"code": 0 if status == 200 else 1, "message": result},
                                     status=status)

        @web.middleware
        async def count_too_large(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except web.HTTPRequestEntityTooLarge:
                self._count("unknown", "unknown", "too_large")
                raise

        outer, inner = edge.middlewares()
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            middlewares=[outer, *middlewares, count_too_large, body_limit(limits), inner],
            handler_args=limits.handler_args(edge.server_log()))
        app.router.add_post(path, receive, expect_handler=edge.expect_handler(limits))
        return app

    def _count(self, app_id: str, event_type: str, result: str) -> None:
        key = (app_id, event_type, result)
        self._state.callbacks[key] = self._state.callbacks.get(key, 0) + 1


V = TypeVar("V")


class _Recent(Generic[V]):
    """What was seen in the last `ttl_s` seconds, by a 64-bit fingerprint of the key (Python's
    salted hash: about 100 bytes an entry instead of 250 for the key itself; a collision, about
    one in 10^14 per lookup at 100,000 entries, would only refuse a callback as a repeat or a
    replay, and polling then finds its event). Complete for its time, not capped at a count: a
    busy app's callbacks cannot push a nonce out early and open it to replay."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._until: dict[int, float] = {}
        self._values: dict[int, V] = {}
        self._prune_at = -math.inf

    def __contains__(self, key: Hashable) -> bool:
        return hash(key) in self._until

    def get(self, key: Hashable, default: V) -> V:
        return self._values.get(hash(key), default)

    def add(self, key: Hashable, now: float, value: V | None = None,
            until: float | None = None) -> None:
        """Remember `key` until `until`, or for `ttl_s` from `now`."""
        fingerprint = hash(key)
        self._until[fingerprint] = now + self._ttl_s if until is None else until
        if value is not None:
            self._values[fingerprint] = value
        if now >= self._prune_at:  # a tenth of the entries' life: a rebuild now and then
            self._until = {f: end for f, end in self._until.items() if end > now}
            self._values = {f: v for f, v in self._values.items() if f in self._until}
            self._prune_at = now + self._ttl_s / 10

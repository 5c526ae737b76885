"""The callback listener: verifies a callback, drops repeats and replays, and hands it to
`reconcile`; its change set goes to `AppState.apply`."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from exporter.callbacks.parse import (
    MAX_BODY_BYTES,
    REJECTED,
    CallbackRejected,
    parse_callback,
    parse_envelope,
)
from exporter.callbacks.reconcile import reconcile
from exporter.clock import Clock
from exporter.config import Secret
from exporter.logs import Throttle
from exporter.serve.web import Edge, ServerLimits, body_limit
from exporter.state.model import AppState, ExporterState
from exporter.zego.callback_signing import verify_callback_signature
from exporter.zego.limits import CALLBACK_MAX_SKEW_S, EVENT_PAUSED, EVENT_RESUMED

MAX_CLOCK_SKEW_S = CALLBACK_MAX_SKEW_S
# Callbacks, nonces and sequences are remembered this long: a callback sent earlier than that
# is refused as stale whenever it arrives, so none older can be a repeat, a replay or a reorder.
REMEMBERED_S = 2 * MAX_CLOCK_SKEW_S

log = structlog.get_logger("exporter.callbacks")


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
        if callback.event_type in (EVENT_PAUSED, EVENT_RESUMED):
            # A pause or resume older than one already taken for the task would flip a newer
            # state back: a false event.
            task_key = (app.app_id, callback.task_id)
            if callback.sequence < self._last_sequence.get(task_key, -1):
                return (*labels, "out_of_order")
            self._last_sequence.add(task_key, now, callback.sequence)
        result, changes = reconcile(app.tracking, callback, int(now * 1000),
                                    app.last_observed_ms)
        if changes is not None:
            app.apply(changes)
            self._on_change(app)
        return (*labels, result)

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

"""The exporter's HTTP face: /metrics, a landing page, the runbook, health and readiness probes.

Also what both listeners share at the edge: request limits, 4xx answers counted by reason
(and logged at a bounded rate, never with a traceback), and a handler's bug contained."""

from __future__ import annotations

import asyncio
import html
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import structlog
from aiohttp import hdrs, web, web_response
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler, Middleware
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.logs import ContainedErrors, Throttle
from exporter.serve.events import BadQuery, EventQuery, as_json, recent
from exporter.serve.exposition import EXPOSITION
from exporter.serve.serving import call_on, handed_over, on_loop
from exporter.state.model import ExporterState

# aiohttp names itself and Python's version in every answer's Server header, its own error
# answers to unparseable requests included, which no middleware sees: name the product only.
web_response.SERVER_SOFTWARE = "zego-cloudrecord-exporter"  # type: ignore[attr-defined]
REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
           405: "method_not_allowed", 408: "timeout", 413: "too_large",
           417: "expectation_failed", 429: "rate_limited", 431: "headers_too_large"}

log = structlog.get_logger("exporter.serve.web")


@dataclass(frozen=True)
class ServerLimits:
    """What one client may cost the server. No route takes a body; the header limits are far
    above what Prometheus or a browser sends; `read_timeout` is aiohttp's keep-alive timeout,
    which also runs from the moment a connection opens until its first request is complete
    (aiohttp 3.14), so a client that sends its headers slowly (slowloris) is cut off; the same
    bound applies to reading a request body."""

    client_max_size: int = 64 * 1024
    max_line_size: int = 4096  # request line: method, path, query, version
    max_field_size: int = 8190  # one header line (aiohttp's default)
    max_headers: int = 64
    read_timeout: float = 20.0  # not a usual scrape interval, so no close races a scrape
    lingering_time: float = 2.0  # reading (and dropping) an unread body after the response

    def handler_args(self, logger: logging.Logger | logging.LoggerAdapter[Any] | None = None
                     ) -> dict[str, Any]:
        """aiohttp's server arguments; `logger` takes its own error reports (see Edge)."""
        return {
            **({"logger": logger} if logger is not None else {}),
            "keepalive_timeout": self.read_timeout,
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "max_headers": self.max_headers,
            "lingering_time": self.lingering_time,
        }


class Edge:
    """One listener's edge: counts each 4xx by reason, logs client mistakes at a bounded rate
    and without a traceback, and contains a handler's bug (counted, logged once, a 500)."""

    def __init__(self, state: ExporterState, listener: str, errors: ContainedErrors,
                 owner: asyncio.AbstractEventLoop | None = None) -> None:
        self._state = state
        self.listener = listener
        self._errors = errors
        self._owner = owner  # the loop that writes state (None: the caller's)
        self._throttle = Throttle()

    def refused(self, reason: str, **fields: Any) -> None:
        call_on(self._owner, partial(self._refused, reason, **fields))

    def contained(self, where: str, exc: BaseException) -> None:
        """A bug caught at this edge: counted and logged (see ContainedErrors)."""
        call_on(self._owner, self._errors.record, where, exc)

    def _refused(self, reason: str, **fields: Any) -> None:
        self._state.refused[(self.listener, reason)] += 1
        dropped = self._throttle.allow(reason)
        if dropped is not None:
            log.warning("request_refused", listener=self.listener, reason=reason,
                        **fields, **({"suppressed": dropped} if dropped else {}))

    def middlewares(self) -> tuple[Middleware, Middleware]:
        """(outermost, innermost): the first sees every answer, the second every handler."""

        @web.middleware
        async def count_refusals(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                response = await handler(request)
            except web.HTTPException as error:
                if 400 <= error.status < 500:
                    self.refused(REASONS.get(error.status, str(error.status)))
                raise
            if 400 <= response.status < 500:
                self.refused(REASONS.get(response.status, str(response.status)))
            return response

        @web.middleware
        async def contain(request: web.Request, handler: Handler) -> web.StreamResponse:
            try:
                return await handler(request)
            except (web.HTTPException, asyncio.CancelledError, ConnectionError):
                raise
            except Exception as exc:
                self.contained(f"{self.listener}_handler", exc)
                raise web.HTTPInternalServerError() from None

        return count_refusals, contain

    def server_log(self) -> logging.LoggerAdapter[Any]:
        """For aiohttp's server: a request it cannot parse (a malformed request line, headers
        too long) is a client's mistake, counted and logged as such, not an error traceback."""
        edge = self

        class ServerLog(logging.LoggerAdapter[Any]):
            def exception(self, msg: object, *args: object, exc_info: Any = True,
                          **kwargs: Any) -> None:
                if isinstance(exc_info, HttpProcessingError):
                    edge.refused(_snake(type(exc_info).__name__))
                elif isinstance(exc_info, BaseException):
                    edge.contained(f"{edge.listener}_server", exc_info)
                else:
                    super().exception(msg, *args, exc_info=exc_info, **kwargs)

            def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
                # aiohttp reports an unknown method on a connection's first request here.
                if isinstance(kwargs.get("exc_info"), HttpProcessingError):
                    edge.refused(_snake(type(kwargs["exc_info"]).__name__))
                else:
                    super().debug(msg, *args, **kwargs)

        return ServerLog(logging.getLogger("aiohttp.server"))

    def expect_handler(self, limits: ServerLimits) -> Callable[[web.Request], Any]:
        """`Expect: 100-continue` is answered only for a body within the limit: 413 at once
        otherwise, before the client sends it; any other expectation gets 417."""

        async def expect(request: web.Request) -> web.StreamResponse | None:
            if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
                return _refusal(self, web.HTTPExpectationFailed())
            length = request.content_length
            if length is not None and length > limits.client_max_size:
                return _refusal(self, web.HTTPRequestEntityTooLarge(
                    max_size=limits.client_max_size, actual_size=length))
            if request.version >= (1, 1):
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0
            return None

        return expect


def _refusal(edge: Edge, error: web.HTTPException) -> web.Response:
    """An expect handler's answer: it bypasses the middlewares, so it is counted here."""
    edge.refused(REASONS.get(error.status, str(error.status)))
    response = web.Response(status=error.status, text=error.text)
    response.force_close()  # the client may send the body anyway: never read it
    return response


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def body_limit(limits: ServerLimits) -> Middleware:
    """413 for a body over `client_max_size` (before any handler), 408 for one read too slowly.
    Reading small bodies here leaves the connection clean for the next request."""

    @web.middleware
    async def limit_body(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > limits.client_max_size:
            raise web.HTTPRequestEntityTooLarge(max_size=limits.client_max_size,
                                                actual_size=length)
        if request.body_exists:
            try:
                async with asyncio.timeout(limits.read_timeout):
                    await request.read()  # raises 413 past client_max_size (chunked bodies)
            except TimeoutError:
                raise web.HTTPRequestTimeout() from None
        return await handler(request)

    return limit_body


def make_app(
    registry: CollectorRegistry,
    state: ExporterState,
    telemetry_path: str = "/metrics",
    ready: Callable[[], bool] = lambda: True,
    middlewares: Sequence[Middleware] = (),
    limits: ServerLimits | None = None,
    edge: Edge | None = None,
    owner: asyncio.AbstractEventLoop | None = None,
) -> web.Application:
    """The app. `middlewares` (e.g. `WebConfig.middlewares()`) run outermost but for the
    edge's counting; every route answers GET and HEAD only (405 with Allow otherwise).
    `owner`: the state's loop, when the app is served by another (`ServingThread`): every route
    runs there but /metrics (the kept render) and /runbook (static)."""
    limits = limits or ServerLimits()
    edge = edge or Edge(state, "metrics", ContainedErrors(state.internal_errors), owner)

    async def metrics(request: web.Request) -> web.Response:
        cache = request.app.get(EXPOSITION)  # the daemon's: rendered once per state change
        if cache is not None:
            return await cache.respond(request, owner)
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))

        async def encoded() -> bytes:  # the whole registry: it reads the state
            return encoder(registry)

        return web.Response(body=await on_loop(owner, encoded()),
                            headers={"Content-Type": content_type})

    async def healthy(request: web.Request) -> web.Response:
        return web.Response(text="OK\n")

    async def readiness(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="OK\n")
        return web.Response(status=503, text="not ready: no poll cycle has finished yet\n")

    async def events(request: web.Request) -> web.Response:
        if len(request.query) != len(set(request.query)):
            raise web.HTTPBadRequest(text="a parameter is given twice\n")
        try:
            query = EventQuery.parse(request.query)
        except BadQuery as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        return web.json_response({"events": [as_json(app_id, event)
                                             for app_id, event in recent(state, query)]})

    async def landing(request: web.Request) -> web.Response:
        return web.Response(text=landing_page(state, telemetry_path), content_type="text/html")

    runbook_html = runbook_page()

    async def runbook(request: web.Request) -> web.Response:
        return web.Response(text=runbook_html, content_type="text/html")

    outer, inner = edge.middlewares()
    app = web.Application(middlewares=[outer, *middlewares, body_limit(limits), inner],
                          client_max_size=limits.client_max_size,
                          handler_args=limits.handler_args(edge.server_log()))
    expect = edge.expect_handler(limits)
    # /-/healthy is the liveness probe: answered by the main loop, so that a stuck one fails it.
    for path, handler in ((telemetry_path, metrics), ("/-/healthy", handed_over(owner, healthy)),
                          ("/-/ready", handed_over(owner, readiness)),
                          ("/", handed_over(owner, landing)), ("/runbook", runbook),
                          ("/api/v1/events", handed_over(owner, events))):
        app.router.add_get(path, handler, expect_handler=expect)
    return app


def landing_page(state: ExporterState, telemetry_path: str) -> str:
    rows = []
    for app_id, app in state.apps.items():
        rooms = "all rooms (*)" if app.rooms is None else ", ".join(app.rooms)
        if app.last_success_time is None:
            last = "never"
        else:
            last = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(app.last_success_time))
        status = "up" if app.up else ("down: " + (app.last_error or "no cycle yet"))
        rows.append(
            f"<tr><td>{app_id}</td><td>{html.escape(rooms)}</td><td>{len(app.tracking.live)}"
            f"</td><td>{last}</td><td>{html.escape(status)}</td></tr>"
        )
    latest = [as_json(app_id, event) for app_id, event in recent(state, EventQuery(limit=50))]
    events = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(e[key]) if e[key] is not None else '')}</td>"
                         for key in ("time", "app_id", "room_id", "task_id", "event", "source",
                                     "quit_reason", "duration_s")) + "</tr>"
        for e in latest)
    path = html.escape(telemetry_path)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ZEGO Cloud Recording exporter</title></head>
<body>
<h1>ZEGO Cloud Recording exporter</h1>
<p>Version {html.escape(__version__)}. Metrics: <a href="{path}">{path}</a>.
Health: <a href="/-/healthy">/-/healthy</a>, <a href="/-/ready">/-/ready</a>.</p>
<table border="1" cellpadding="4">
<tr><th>AppId</th><th>Rooms watched</th><th>Live tasks</th><th>Last successful poll</th>
<th>Last cycle</th></tr>
{"".join(rows)}
</table>
<h2>Latest events</h2>
<p>The last {len(latest)} counted events, newest first (all of them, filtered, as JSON:
<a href="/api/v1/events">/api/v1/events</a>?app_id=&amp;room_id=&amp;event=&amp;limit=).</p>
<table border="1" cellpadding="4">
<tr><th>Time</th><th>AppId</th><th>Room</th><th>Task</th><th>Event</th><th>Source</th>
<th>quit_reason</th><th>Duration (s)</th></tr>
{events}
</table>
</body></html>
"""


def runbook_page() -> str:
    """exporter/runbook.md as a minimal HTML page whose headings carry GitHub's anchors, so an
    alert's runbook_url (`/runbook#<alert name in lower case>`) lands on its section. Written
    here because a Markdown library as a runtime dependency is too much for one static page:
    headings, links, `code` and **bold** are rendered, the rest shows as text."""
    markdown = resources.files("exporter").joinpath("runbook.md").read_text(encoding="utf-8")
    parts: list[str] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            parts.append(f"<p>{_inline(chr(10).join(paragraph))}</p>")
            paragraph.clear()

    for line in markdown.splitlines():
        heading = re.fullmatch(r"(#{1,6})\s+(.+?)\s*", line)
        if heading:
            flush()
            level, text = len(heading.group(1)), heading.group(2)
            parts.append(f'<h{level} id="{html.escape(heading_anchor(text))}">{_inline(text)}'
                         f"</h{level}>")
        elif line.strip():
            paragraph.append(line)
        else:
            flush()
    flush()
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\">"
            "<title>zego-cloudrecord-exporter runbook</title>"
            "<style>p{white-space:pre-wrap}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading, so links work here and on GitHub alike."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _inline(text: str) -> str:
    escaped = html.escape(text, quote=True)
    escaped = re.sub(r"\[([^\]]+)\]\(((?:#|https?://)[^)\s]+)\)", r'<a href="\2">\1</a>', escaped)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)

"""The exporter's HTTP face: /metrics, a landing page, and health and readiness probes."""

from __future__ import annotations

import asyncio
import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.exposition import EXPOSITION
from exporter.state import ExporterState


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

    def handler_args(self) -> dict[str, Any]:
        return {
            "keepalive_timeout": self.read_timeout,
            "max_line_size": self.max_line_size,
            "max_field_size": self.max_field_size,
            "max_headers": self.max_headers,
            "lingering_time": self.lingering_time,
        }


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
) -> web.Application:
    """The app. `middlewares` (e.g. `WebConfig.middlewares()`) run outermost; every route
    answers GET and HEAD only (405 with Allow otherwise)."""
    limits = limits or ServerLimits()
    async def metrics(request: web.Request) -> web.Response:
        cache = request.app.get(EXPOSITION)  # the daemon's: rendered once per state change
        if cache is not None:
            return await cache.respond(request)
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def healthy(request: web.Request) -> web.Response:
        return web.Response(text="OK\n")

    async def readiness(request: web.Request) -> web.Response:
        if ready():
            return web.Response(text="OK\n")
        return web.Response(status=503, text="not ready: no poll cycle has finished yet\n")

    async def landing(request: web.Request) -> web.Response:
        return web.Response(text=landing_page(state, telemetry_path), content_type="text/html")

    app = web.Application(middlewares=[*middlewares, body_limit(limits)],
                          client_max_size=limits.client_max_size,
                          handler_args=limits.handler_args())
    app.router.add_get(telemetry_path, metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", readiness)
    app.router.add_get("/", landing)
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
</body></html>
"""

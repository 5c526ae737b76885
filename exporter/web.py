"""The exporter's HTTP face: /metrics, a landing page, and health and readiness probes."""

from __future__ import annotations

import html
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from exporter import __version__
from exporter.state import ExporterState


def make_app(
    registry: CollectorRegistry,
    state: ExporterState,
    telemetry_path: str = "/metrics",
    ready: Callable[[], bool] = lambda: True,
) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
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

    app = web.Application()
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

"""The benchmark's scrapes as Prometheus makes them; its callback -> /metrics probe, and the
bare server that gives a scrape's cost on this machine without the exporter, each in a process of
its own (the driver spawns `probe_main` and `bare_main`)."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import math
import random
import time
from typing import Any

import aiohttp

from bench import rig

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.5,"
                     "text/plain;version=0.0.4;q=0.3,*/*;q=0.1")
# The driver's probe callbacks name a room outside the configured ones: counted "ignored", which
# nothing else is in the benchmark.
PROBE_ROOM = "bench-probe"
PROBE_POLL_S = 0.005  # real seconds between the probe's scrapes
PROBE_GIVE_UP_S = 10.0


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[float, bytes, str]:
    """One scrape as Prometheus does it; returns (seconds, body as sent, content encoding)."""
    begun = time.perf_counter()
    async with session.get(url, headers={"Accept": PROMETHEUS_ACCEPT,
                                         "Accept-Encoding": "gzip"}) as response:
        body = await response.read()
        response.raise_for_status()
        return time.perf_counter() - begun, body, response.headers.get("Content-Encoding", "")


def decoded(body: bytes, encoding: str) -> bytes:
    return gzip.decompress(body) if encoding == "gzip" else body


def probe_body(number: int, now: float) -> bytes:
    """A signed abnormal-end callback for a task in a room the exporter does not watch."""
    from exporter.zego.callback_signing import callback_signature

    timestamp, nonce = str(int(now)), str(10_000_000 + number)
    return json.dumps({
        "app_id": rig.APP_ID, "task_id": f"bench-probe-{number}", "room_id": PROBE_ROOM,
        "event_type": 2, "message": "record task exited abnormally", "nonce": nonce,
        "timestamp": timestamp, "sequence": 0, "detail": {"quit_reason": 1},
        "signature": callback_signature(rig.CALLBACK_SECRET, timestamp, nonce),
    }).encode()


def probe_main(workload: rig.Workload, callback_url: str, metrics_url: str, out: Any,
               stop: Any) -> None:
    """The probe's own process, so that its scrapes (a whole body inflated each few ms) load
    neither the driver's loop, which times the scrapes, nor the exporter's CPU share of it."""
    latencies: list[float] = []

    async def run() -> None:
        probing = asyncio.create_task(probe_callbacks(callback_url, metrics_url,
                                                      workload.clock(), latencies))
        await rig.wait_for(stop)
        probing.cancel()

    asyncio.run(run())
    out.put(latencies)


def probe_count(body: bytes, encoding: str) -> float:
    """The probes counted in a /metrics body: the callbacks counted "ignored"."""
    text, count, at = decoded(body, encoding), 0.0, 0
    while (at := text.find(b'result="ignored"}', at)) >= 0:
        end = text.index(b"\n", at)
        line_start = text.rindex(b"\n", 0, at) + 1
        if text.startswith(b"zego_cloudrecord_callbacks_total{", line_start):
            count += float(text[at + len(b'result="ignored"}'):end].split()[0])
        at = end
    return count


async def probe_callbacks(callback_url: str, metrics_url: str, clock: Any,
                          latencies: list[float]) -> None:
    """Callback -> /metrics in real time: send one callback, then scrape every few ms until a
    body shows it; from the callback's HTTP answer to the end of that scrape. Then a pause of
    0.1 to 0.5 s (random, so that probes fall anywhere between renders), and the next."""
    rng = random.Random(7)
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for number in itertools.count(1):
            async with session.post(callback_url, data=probe_body(number, clock.time()),
                                    headers={"Content-Type": "application/json"}) as response:
                await response.read()
            answered = time.perf_counter()
            while time.perf_counter() - answered < PROBE_GIVE_UP_S:
                _, body, encoding = await scrape(session, metrics_url)
                if probe_count(body, encoding) >= number:
                    latencies.append(time.perf_counter() - answered)
                    break
                await asyncio.sleep(PROBE_POLL_S)
            else:
                latencies.append(math.inf)
            await asyncio.sleep(rng.uniform(0.1, 0.5))


def bare_main(body: bytes, headers: dict[str, str], port_out: Any, stop: Any) -> None:
    """A server in a process of its own that answers every GET /metrics with `body`, a /metrics
    answer as sent: what a scrape of that size costs on this machine, under the same load,
    without the exporter's work beside it (the driver spawns it after its first scrape)."""
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    async def run() -> None:
        app = web.Application()
        app.router.add_get("/metrics", answer)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port_out.put(runner.addresses[0][1])
        await rig.wait_for(stop)
        await runner.cleanup()

    asyncio.run(run())

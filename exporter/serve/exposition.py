"""The /metrics exposition, rendered once per state change and kept ready (text, OpenMetrics, gzip).

The state changes only when a poll cycle ends or a callback arrives, so a scrape need not rebuild
thousands of series. The exposition has two parts: the cached one (every exporter family but the
per-request ones) and a small live one rendered on each scrape (api_*, rate_limit_*, process_*,
python_*), appended to it (gzip members concatenate). `invalidate()` marks the cached part
stale; the next scrape, or the eager render after a cycle (`prerender()`), renders it once, in a
worker thread, so that the event loop, which paces ZEGO requests, is never blocked for long.
Concurrent scrapes of one version share one render. The thread reads the live state while the
loop may change it (a cycle's apply), so a render that trips over a dict changing size is
retried.

A scrape never waits for a render that is already under way: it gets the previous one (the state
before the cycle that just ended, at most one render old). A callback's change is rendered once,
soon (`invalidate(soon=True)`), and scrapes get the last render until then. A scrape waits only
before the first render, or when a cycle's change has no render under way (no `prerender`).
Renders are kept gzipped only (what Prometheus asks for): at 10,000 rooms that is
0.7 MB instead of 8; a client without gzip gets the body decompressed in a worker thread.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import math
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

log = structlog.get_logger("exporter.exposition")

GZIP_LEVEL = 6
SOON_S = 1.0  # a callback's change is on /metrics after this (or 4 renders' time), at most
GZIP_WBITS = 31  # zlib's gzip framing: one gzip member
EOF = b"# EOF\n"
RETRIES = 3
Encoder = Callable[[CollectorRegistry], bytes]
# Rendered eagerly from the start: what Prometheus asks for, and plain text (curl).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@dataclass(frozen=True, slots=True)
class Rendered:
    version: int
    gzipped: bytes  # the body, gzip-compressed


class SplitCollector(Protocol):
    # Its own protocol: prometheus_client's Collector is one only in its newer versions.
    def collect(self) -> Iterable[Metric]: ...

    def request_families(self) -> Iterator[Metric]: ...


class _Without(Collector):
    def __init__(self, collector: Collector, names: set[str]) -> None:
        self._collector, self._names = collector, names

    def collect(self) -> Iterator[Metric]:
        return (m for m in self._collector.collect() if m.name not in self._names)


class _RequestFamilies(Collector):
    def __init__(self, collector: SplitCollector) -> None:
        self._collector = collector

    def collect(self) -> Iterator[Metric]:
        return self._collector.request_families()


class _Only(CollectorRegistry):
    """A registry of the given families, to encode them on their own."""

    def __init__(self, *families: Metric) -> None:
        super().__init__(auto_describe=False)
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def split_registry(collector: SplitCollector, standard: Iterable[Collector]
                   ) -> tuple[CollectorRegistry, CollectorRegistry]:
    """(cached, live) registries: the exporter's families, and the per-request and process ones."""
    live = CollectorRegistry(auto_describe=False)
    live.register(_RequestFamilies(collector))
    for each in standard:
        live.register(each)
    cached = CollectorRegistry(auto_describe=False)
    cached.register(_Without(collector, {m.name for m in collector.request_families()}))
    return cached, live


_QVALUE = re.compile(r"q=(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)", re.ASCII | re.IGNORECASE)


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header (RFC 9110, 12.5.3) gives gzip a weight above 0:
    its own, or else that of `*`. A weight that is not a valid qvalue counts as 0."""
    weights: dict[str, float] = {}
    for part in header.split(","):
        coding, *params = (item.strip() for item in part.split(";"))
        q = next((p for p in params if p[:2].lower() == "q="), None)
        match = None if q is None else _QVALUE.fullmatch(q)
        weights.setdefault(coding.lower(), 1.0 if q is None else float(match[1]) if match else 0.0)
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0))) > 0


class _GcPause:
    """Cyclic garbage collection off while any holder is inside; back as it was after the last.

    Renders of two caches, or a cancelled render's thread still running, can overlap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._was_enabled = False

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._holders += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._was_enabled:
                gc.enable()


_GC_PAUSE = _GcPause()


class ExpositionCache:
    """One registry's exposition per content type, re-rendered only after `invalidate()`."""

    def __init__(self, registry: CollectorRegistry, live: CollectorRegistry | None = None, *,
                 in_thread: bool = True, soon_s: float = SOON_S) -> None:
        self._registry = registry
        self._live = live
        self._in_thread = in_thread
        self._soon_s = soon_s
        self._version = 0
        self._exact_from = 0  # scrapes never get a render older than this version
        self._timer: asyncio.TimerHandle | None = None
        self._last_done = -math.inf  # time.monotonic() when the last render ended
        self._took: dict[str, float] = {}  # content type -> seconds its last render took
        self._ready: dict[str, Rendered] = {}  # content type -> last render
        self._rendering: dict[str, tuple[int, asyncio.Future[Rendered]]] = {}
        self._encoders: dict[str, Encoder] = {}
        self._background: set[asyncio.Task[Rendered]] = set()
        # One render at a time: two formats rendered at once would double the peak memory.
        self._one_at_a_time = asyncio.Lock()
        self.renders = 0
        for accept in (PROMETHEUS_ACCEPT, ""):
            self._remember(accept)

    @property
    def version(self) -> int:
        return self._version

    @property
    def shown_version(self) -> int:
        """The newest state every format kept ready shows (-1 before the first renders)."""
        return min((self._ready[t].version if t in self._ready else -1)
                   for t in self._encoders)

    def invalidate(self, soon: bool = False) -> None:
        """The state changed: the next scrape (or `prerender`) renders afresh.

        `soon` (a callback's change): scrapes may go on getting the last render until a render
        scheduled `soon_s` (or 4 × the last renders' time, every format, if longer) after the
        last one has run: under a stream of callbacks, renders then take at most a fifth of a
        core, and scrapes never wait for one."""
        self._version += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            soon = False
        if not soon:
            self._exact_from = self._version
        elif self._timer is None:
            self._timer = loop.call_later(self._soon_delay(), self._soon_due)

    def _soon_delay(self) -> float:
        """Seconds until the window after the last render has passed (a render under way
        counts as just ending)."""
        wait = max(self._soon_s, 4 * sum(self._took.values()))
        if self._rendering:
            return wait
        return max(0.0, self._last_done + wait - time.monotonic())

    def _soon_due(self) -> None:
        delay = self._soon_delay()
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(delay, self._soon_due)
            return
        self._timer = None
        self.prerender()

    def prerender(self) -> None:
        """Render, in the background, every format seen so far (call on the event loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for content_type in list(self._encoders):
            task = loop.create_task(self._fresh(content_type))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def settled(self) -> None:
        """Wait for the background renders `prerender` started (tests, and a clean shutdown)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _remember(self, accept: str) -> str:
        encoder, content_type = choose_encoder(accept)
        self._encoders.setdefault(content_type, encoder)
        return content_type

    async def get(self, content_type: str) -> Rendered:
        """What a scrape gets in `content_type`: the render of the current state; the last
        render while a newer one is under way or, after changes made `soon`, is scheduled;
        else a render of the current state, waited for."""
        ready = self._ready.get(content_type)
        if ready is not None:
            if ready.version >= self._exact_from:
                return ready
            rendering = self._rendering.get(content_type)
            if rendering is not None and rendering[0] >= self._exact_from:
                return ready  # the previous state while this one renders: no waiting
        return await self._fresh(content_type)

    async def _fresh(self, content_type: str) -> Rendered:
        """The render of the current state: the one under way, or a new one."""
        version = self._version
        ready = self._ready.get(content_type)
        if ready is not None and ready.version == version:
            return ready
        rendering = self._rendering.get(content_type)
        if rendering is not None and rendering[0] == version:
            return await asyncio.shield(rendering[1])
        future: asyncio.Future[Rendered] = asyncio.get_running_loop().create_future()
        self._rendering[content_type] = (version, future)
        try:
            encoder = self._encoders[content_type]
            async with self._one_at_a_time:
                begun = time.monotonic()
                if self._in_thread:
                    gzipped = await asyncio.to_thread(self._render, encoder)
                else:
                    gzipped = self._render(encoder)
                self._last_done = time.monotonic()
                self._took[content_type] = self._last_done - begun
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            if self._rendering.get(content_type, (None,))[0] == version:
                del self._rendering[content_type]
        self.renders += 1
        rendered = Rendered(version, gzipped)
        kept = self._ready.get(content_type)
        if kept is None or kept.version < version:  # the newest render is what scrapes get
            self._ready[content_type] = rendered
        future.set_result(rendered)
        return rendered

    def _render(self, encoder: Encoder) -> bytes:
        # No cyclic garbage collection during a render. Its samples (100,000 at 10,000 rooms)
        # live through many young collections and land in the oldest generation, which then
        # grows by a quarter and gets a full collection: at 10,000 rooms with callbacks, 350
        # of them in a benchmark run, up to 130 ms each with the event loop stopped. They hold
        # no reference cycles, so reference counting frees them all when the render ends.
        # (The loop's own garbage waits for the render's end: a second or so.)
        with _GC_PAUSE:
            for attempt in range(RETRIES):
                try:
                    return self._render_once(encoder)
                except RuntimeError as exc:  # the loop changed a dict while the thread walked it
                    if attempt == RETRIES - 1:
                        raise
                    log.debug("exposition_render_retried", error=str(exc))
            raise AssertionError("unreachable")

    def _render_once(self, encoder: Encoder) -> bytes:
        """The cached part, gzipped, one family at a time: the text of the whole exposition
        (8 MB at 10,000 rooms, and prometheus_client's line list besides) is never in memory
        at once. OpenMetrics' `# EOF` is written once, at the end, unless the live part ends it."""
        packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
        parts = [packer.compress(encoder(_Only(family)).removesuffix(EOF))
                 for family in self._registry.collect()]
        if self._live is None:
            parts.append(packer.compress(encoder(_Only())))  # OpenMetrics: `# EOF`; text: b""
        parts.append(packer.flush())
        return b"".join(parts)

    async def respond(self, request: web.Request) -> web.Response:
        """The /metrics answer: the format the Accept header asks for, gzipped if allowed."""
        content_type = self._remember(request.headers.get("Accept", ""))
        rendered = await self.get(content_type)
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        live = b"" if self._live is None else self._encoders[content_type](self._live)
        if accepts_gzip(request.headers.get("Accept-Encoding", "")):
            headers["Content-Encoding"] = "gzip"
            body = rendered.gzipped + gzip.compress(live, compresslevel=GZIP_LEVEL, mtime=0)
        else:
            body = await asyncio.to_thread(gzip.decompress, rendered.gzipped) + live
        return web.Response(body=body, headers=headers)


EXPOSITION = web.AppKey("exposition", ExpositionCache)

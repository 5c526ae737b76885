"""The /metrics exposition, rendered once per state change and kept ready (text, OpenMetrics, gzip).

The state changes only when a poll cycle ends or a callback arrives, so a scrape need not rebuild
thousands of series. The exposition has two parts: the cached one (every exporter family but the
per-request ones) and a small live one rendered on each scrape (api_*, rate_limit_*, process_*,
python_*; `LiveEncoder`: prometheus_client's lines, written once per label set, with each
scrape's values), appended to it (gzip members concatenate). `invalidate()` marks the cached part
stale; the next scrape, or the eager render after a cycle (`prerender()`), renders it once, for
every format kept ready (the daemon's: Prometheus' from the start, others once asked for), in a
worker thread, so that the event loop, which paces ZEGO requests, is never blocked for long. The
thread reads the live state while the loop may change it (a cycle's apply), so a render that
trips over a dict changing size is retried.

A render costs what changed, not what there is. A family comes in blocks (`RowBlocks`: rows of
`add_metric` arguments, a few rooms' worth each, which the collector keeps between renders; any
other family is one block, its samples). Per format, the gzip members are kept with the length
of each block's text and what tells each block's rows from the next render's (the collector's
stamps, or the rows); a render re-encodes only the blocks whose rows differ, with
prometheus_client's own encoders, and recompresses only the gzip members whose texts changed,
their unchanged texts taken from the old member: a member holds MEMBER_TEXTS block texts, and
the body is the members' concatenation (valid gzip).

A scrape never waits for a render that is already under way: it gets the previous one (the state
before the cycle that just ended, at most one render old). A callback's change is rendered soon
(`invalidate(soon=True)`): four times the last such render's CPU time after the last render
ended, so that under a stream of callbacks their renders take at most a fifth of a core
(milliseconds at a few rooms); scrapes get the last render until then. A cycle's render, which
may cost a hundred callbacks' worth, comes once a poll interval and does not set the wait. A
scrape waits only before the first render, or when a cycle's change has no render under way (no
`prerender`). A client without gzip gets the body decompressed in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import gzip
import itertools
import math
import re
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString as _untyped_go_string

from exporter.serve.serving import on_loop

log = structlog.get_logger("exporter.exposition")
T = TypeVar("T")

GZIP_LEVEL = 6
# A callback's change is rendered this many renders' time after the last render ended: renders
# then take at most 1 / (1 + SOON_RENDERS) of a core under a stream of callbacks.
SOON_RENDERS = 4
GZIP_WBITS = 31  # zlib's gzip framing: one gzip member
EOF = b"# EOF\n"
RETRIES = 3
SCRAPE_PAUSE_S = 0.05  # the most a render steps aside, in all, for scrapes under way
BLOCK_ROWS = 16  # rows per block (RowBlocks.of): what a change to one row costs to re-encode
# Block texts per gzip member (128 rooms with the collector's blocks of 2): what a change costs to
# recompress (tens of KB), and what the body gives up against one member per family (10 % larger
# at 1,000 rooms, 15 % at 10,000; `python -m bench` prints the body's size).
MEMBER_TEXTS = 64
ENCODE_BLOCKS = 256  # changed blocks per encoder call
Encoder = Callable[[CollectorRegistry], bytes]
Row = tuple[Any, ...]  # positional arguments of a family's add_metric
Block = tuple[Any, ...]  # a block's rows (RowBlocks), or a family's samples (one block)
# What Prometheus asks for: the daemon renders it from the start, other formats once asked for.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@dataclass(frozen=True, slots=True)
class Rendered:
    version: int
    gzipped: bytes  # the body, gzip-compressed


class RowBlocks(Metric):
    """A family given as rows (the positional arguments of its `add_metric`, exemplars
    included) cut into blocks, so that a render re-encodes only the blocks whose rows changed.

    `new()` makes the empty family (CounterMetricFamily(...), say). `samples` builds every
    block's samples on first use, for prometheus_client's own encoders."""

    def __init__(self, new: Callable[[], Metric], blocks: Sequence[Block],
                 stamps: Sequence[int] | None = None) -> None:
        self.new = new
        self.blocks = blocks
        # Optional: one number per block, new whenever the block's rows change (the collector's).
        # A render then keeps the stamps, not the rows, to tell which blocks changed.
        self.stamps = stamps
        self._built: list[Sample] | None = None
        empty = new()
        super().__init__(empty.name, empty.documentation, empty.type, empty.unit)

    @classmethod
    def of(cls, new: Callable[[], Metric], rows: Iterable[Iterable[Row]]) -> RowBlocks:
        """Rows in groups (an app's, say), each group cut into blocks of BLOCK_ROWS."""
        blocks: list[Block] = []
        for group in rows:
            listed = list(group)
            blocks.extend(tuple(listed[i:i + BLOCK_ROWS])
                          for i in range(0, len(listed), BLOCK_ROWS))
        return cls(new, blocks)

    def family(self, blocks: Iterable[Block]) -> Metric:
        """The family with the samples of `blocks`."""
        family = self.new()
        for block in blocks:
            for row in block:
                family.add_metric(*row)  # type: ignore[attr-defined]
        return family

    @property
    def samples(self) -> list[Sample]:
        if self._built is None:
            self._built = self.family(self.blocks).samples
        return self._built

    @samples.setter
    def samples(self, value: list[Sample]) -> None:
        self._built = value or None  # Metric.__init__ sets [] before the blocks exist


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


class LiveEncoder:
    """The live part in one format, each scrape, at the cost of its values: a sample's line is
    prometheus_client's own (its encoder writes it once per label set, on first sight) with the
    value written by prometheus_client's own `floatToGoString`. Its own encoder spends about
    10 us a line escaping label names and values that do not change (0.4 ms for the api_*
    families, on the event loop, on every scrape). A family whose line is not `prefix value`
    (an exemplar, a timestamp, a family the encoder splits) is encoded whole."""

    def __init__(self, encoder: Encoder) -> None:
        self._encoder = encoder
        self._eof = encoder(_Only())
        # (family name, type, help, unit, sample name, label items) -> the line up to its value;
        # kept for the label sets of the last scrape only, so it never outgrows the live part.
        self._prefixes: dict[tuple[Any, ...], bytes] = {}
        self._headers: dict[tuple[str, str, str, str], bytes] = {}

    def __call__(self, registry: CollectorRegistry) -> bytes:
        prefixes: dict[tuple[Any, ...], bytes] = {}
        headers: dict[tuple[str, str, str, str], bytes] = {}
        parts = [self._family(family, prefixes, headers) for family in registry.collect()]
        self._prefixes, self._headers = prefixes, headers
        return b"".join(parts) + self._eof

    def _family(self, family: Metric, prefixes: dict[tuple[Any, ...], bytes],
                headers: dict[tuple[str, str, str, str], bytes]) -> bytes:
        key = (family.name, family.type, family.documentation, family.unit)
        header = headers.get(key) or self._headers.get(key)
        if header is None:
            header = self._encoder(_Only(_with(family, []))).removesuffix(EOF)
        headers[key] = header
        lines = [header]
        for sample in family.samples:
            if sample.exemplar is not None or sample.timestamp is not None \
                    or sample.native_histogram is not None:
                return self._whole(family)
            line_key = (*key, sample.name, tuple(sample.labels.items()))
            prefix = prefixes.get(line_key) or self._prefixes.get(line_key)
            if prefix is None:
                prefix = self._prefix(family, sample, header)
                if prefix is None:
                    return self._whole(family)
            prefixes[line_key] = prefix
            lines.append(prefix + _go_string(sample.value) + b"\n")
        return b"".join(lines)

    def _prefix(self, family: Metric, sample: Sample, header: bytes) -> bytes | None:
        """The sample's line up to its value, as the encoder writes it; None if its line is
        not the header's family's one line `prefix value`."""
        text = self._encoder(_Only(_with(family, [sample]))).removesuffix(EOF)
        value = b" " + _go_string(sample.value) + b"\n"
        line = text[len(header):]
        if not text.startswith(header) or not line.endswith(value) or line.startswith(b"#"):
            return None
        return line[:-len(value) + 1]

    def _whole(self, family: Metric) -> bytes:
        return self._encoder(_Only(family)).removesuffix(EOF)


def _go_string(value: float) -> bytes:
    """prometheus_client's own writing of a sample value (untyped there)."""
    text: str = _untyped_go_string(value)  # type: ignore[no-untyped-call]
    return text.encode()


def _with(family: Metric, samples: list[Sample]) -> Metric:
    """`family` with only these samples."""
    copied = copy.copy(family)
    copied.samples = samples
    return copied


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


@dataclass(slots=True)
class _Kept:
    """A family as the last render left it: its blocks' marks, and per format its gzip members and
    the length of each text they hold (the header's, then each block's). The texts themselves
    are not kept (13 MB at 10,000 rooms): a member to redo gives back its unchanged ones."""

    key: tuple[str, str, str, str]  # name, type, documentation, unit
    marks: Sequence[Any]  # what tells a changed block: its stamp if it has one, else its rows
    headers: dict[str, bytes] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=dict)  # the header's, then each block's
    members: dict[str, list[bytes]] = field(default_factory=dict)  # MEMBER_TEXTS texts each


class _NotConcatenable(Exception):
    """A block's text has comment lines of its own (the text format's `_created`, `_gsum` and
    `_gcount` sections): the family is encoded whole instead."""


def _gzip(data: bytes) -> bytes:
    return zlib.compress(data, GZIP_LEVEL, wbits=GZIP_WBITS)


def _gzip_parts(*parts: bytes) -> bytes:
    """One gzip member of the parts, without joining them first."""
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)
    packed = [packer.compress(part) for part in parts]
    packed.append(packer.flush())
    return b"".join(packed)


def _members(texts: list[bytes | None], old_lengths: list[int], old_members: list[bytes]
             ) -> tuple[list[bytes], list[int]]:
    """A family's gzip members, MEMBER_TEXTS texts each, and their texts' lengths. A text is
    None where it did not change: the old member is kept where all of its texts are, and
    decompressed for them where some are not."""
    members: list[bytes] = []
    lengths: list[int] = []
    for number, start in enumerate(range(0, len(texts), MEMBER_TEXTS)):
        part = texts[start:start + MEMBER_TEXTS]
        was = old_lengths[start:start + MEMBER_TEXTS]
        if len(was) == len(part) and all(text is None for text in part):
            members.append(old_members[number])
            lengths.extend(was)
            continue
        old = (zlib.decompress(old_members[number], wbits=GZIP_WBITS)
               if any(text is None for text in part) else b"")
        ends = list(itertools.accumulate(was))  # a None text is one the old member holds
        whole = [old[ends[j] - was[j]:ends[j]] if text is None else text
                 for j, text in enumerate(part)]
        members.append(_gzip_parts(*whole))
        lengths.extend(len(text) for text in whole)
    return members, lengths


def _retried(step: Callable[[], T]) -> T:
    """`step()`, again if the main loop changed a dict while this thread walked it."""
    for attempt in range(RETRIES):
        try:
            return step()
        except RuntimeError as exc:
            if attempt == RETRIES - 1:
                raise
            log.debug("exposition_read_retried", error=str(exc))
    raise AssertionError("unreachable")


class _Scrapes:
    """The scrapes under way, for the render thread to step aside. A render and a scrape share
    the GIL: a scrape answered during a render took up to 5 ms more (bench/README, run B). The
    render waits between families while one is under way, SCRAPE_PAUSE_S at most per render,
    so that a flood of scrapes cannot hold the renders back."""

    def __init__(self) -> None:
        self._idle = threading.Event()
        self._idle.set()
        self._under_way = 0  # written by the thread that serves scrapes only
        self._left = 0.0  # of this render's pause (the render thread's)

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        self._under_way += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._under_way -= 1
            if not self._under_way:
                self._idle.set()

    def new_render(self) -> None:
        self._left = SCRAPE_PAUSE_S

    def step_aside(self) -> None:
        if self._left > 0 and not self._idle.is_set():
            begun = time.monotonic()
            self._idle.wait(self._left)
            self._left -= time.monotonic() - begun


class ExpositionCache:
    """One registry's exposition, every format kept ready, re-rendered only after `invalidate()`."""

    def __init__(self, registry: CollectorRegistry, live: CollectorRegistry | None = None, *,
                 in_thread: bool = True, soon_renders: float = SOON_RENDERS,
                 accepts: Iterable[str] = (PROMETHEUS_ACCEPT, ""),
                 now: Callable[[], float] = time.monotonic,
                 cpu_time: Callable[[], float] = time.thread_time) -> None:
        self._registry = registry
        self._live = live
        self._in_thread = in_thread
        self._soon_renders = soon_renders
        self._now = now  # schedules a callback's render after the last one
        self._cpu_time = cpu_time  # the render thread's CPU time: what a render costs
        self._version = 0
        self._exact_from = 0  # scrapes never get a render older than this version
        self._timer: asyncio.TimerHandle | None = None
        self._last_done = -math.inf  # self._now() when the last render ended
        self._soon_took = 0.0  # CPU seconds the last callback render took, every format
        self._ready: dict[str, Rendered] = {}  # content type -> last render
        # The render under way or waiting its turn: (version, its end, the formats it renders).
        self._rendering: tuple[int, asyncio.Future[None], frozenset[str]] | None = None
        self._encoders: dict[str, Encoder] = {}
        self._live_encoders: dict[str, LiveEncoder] = {}  # content type -> the live part's
        self._scrapes = _Scrapes()
        self._kept: dict[str, _Kept] = {}  # family name -> its last render
        self._background: set[asyncio.Task[None]] = set()
        # One thread for every render: what a render keeps is allocated where the next one
        # frees it (threads taken in turn from a pool each grow a malloc arena of their own).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="exposition-render")
        weakref.finalize(self, self._thread.shutdown, wait=False)
        # One render at a time: they share what the last one kept, and memory.
        self._one_at_a_time = asyncio.Lock()
        self.renders = 0
        self.render_cpu_seconds = 0.0  # the render thread's CPU time, all renders (benchmark)
        for accept in accepts:  # formats rendered from the start; the others once asked for
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
        scheduled `soon_delay()` from now has run: one render for the changes made meanwhile,
        at most a fifth of a core in renders under a stream of callbacks, and no scrape waits."""
        self._version += 1
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            soon = False
        if not soon:
            self._exact_from = self._version
        elif self._timer is None:
            self._timer = loop.call_later(self.soon_delay(), self._soon_due)

    def soon_delay(self) -> float:
        """Seconds until a callback's change is rendered: `soon_renders` times the last callback
        render's cost (its thread's CPU time: a busy machine does not stretch it) after the last
        render ended; a render under way counts as just ending. No fixed floor: milliseconds at
        a few rooms."""
        wait = self._soon_renders * self._soon_took
        if self._rendering is not None:
            return wait
        return max(0.0, self._last_done + wait - self._now())

    def _soon_due(self) -> None:
        delay = self.soon_delay()
        if delay > 0:
            self._timer = asyncio.get_running_loop().call_later(delay, self._soon_due)
            return
        self._timer = None
        self.prerender(soon=True)

    def prerender(self, soon: bool = False) -> None:
        """Render, in the background, every format seen so far (call on the event loop).
        `soon`: the render for callbacks' changes, whose cost sets the next one's wait. The
        render counts as under way from this call on: a scrape that the loop serves before the
        render's first step gets the last render, as it would a moment later."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._begin(soon)

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
        ready = self._current(content_type)
        if ready is not None:
            return ready
        await self._fresh()
        return self._ready[content_type]

    def _current(self, content_type: str) -> Rendered | None:
        """What `get` gives without waiting, or None. It only reads, so a thread may call it
        too: a render's end or an `invalidate()` it meets halfway gives the state before or
        after it, as a scrape a moment earlier or later would get."""
        ready = self._ready.get(content_type)
        if ready is None:
            return None
        exact_from = self._exact_from
        rendering = self._rendering
        if ready.version >= exact_from or (rendering is not None and rendering[0] >= exact_from):
            return ready  # the previous state while this one renders: no waiting
        return None

    async def _asked(self, accept: str) -> Rendered:
        return await self.get(self._remember(accept))

    async def _fresh(self) -> None:
        """Render the current state in every format, or wait for the render of it under way."""
        future = self._begin()
        if future is not None:
            await asyncio.shield(future)

    def _begin(self, soon: bool = False) -> asyncio.Future[None] | None:
        """The end of the render of the current state in every format: the one under way, or
        one started now in a task of its own (a scrape's cancellation does not cancel it);
        None if every format shows the current state."""
        version = self._version
        formats = frozenset(self._encoders)
        if all(t in self._ready and self._ready[t].version == version for t in formats):
            return None
        rendering = self._rendering
        if rendering is not None and rendering[0] == version and formats <= rendering[2]:
            return rendering[1]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._rendering = (version, future, formats)
        task = loop.create_task(self._render_in_turn(version, future, formats, soon))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return future

    async def _render_in_turn(self, version: int, future: asyncio.Future[None],
                              formats: frozenset[str], soon: bool) -> None:
        try:
            encoders = {t: self._encoders[t] for t in formats}
            async with self._one_at_a_time:
                if self._in_thread:
                    bodies, took = await asyncio.get_running_loop().run_in_executor(
                        self._thread, self._render, encoders)
                else:
                    bodies, took = self._render(encoders)
                self._last_done = self._now()
                if soon:
                    self._soon_took = took
        except BaseException as exc:
            self._rendered(future)
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        self.renders += 1
        for content_type, body in bodies.items():
            kept = self._ready.get(content_type)
            if kept is None or kept.version < version:  # the newest render is what scrapes get
                self._ready[content_type] = Rendered(version, body)
        self._rendered(future)  # after the bodies: `_current` never sees neither
        future.set_result(None)

    def _rendered(self, future: asyncio.Future[None]) -> None:
        if self._rendering is not None and self._rendering[1] is future:
            self._rendering = None

    def _render(self, encoders: dict[str, Encoder]) -> tuple[dict[str, bytes], float]:
        """Every format's body, and the CPU seconds it took this thread."""
        # No cyclic garbage collection during a render. Its objects live through many young
        # collections and land in the oldest generation, which then grows by a quarter and gets
        # a full collection, with the event loop stopped (up to 130 ms at 10,000 rooms). They
        # hold no reference cycles, so reference counting frees them when the render ends.
        begun = self._cpu_time()
        try:
            with _GC_PAUSE:
                self._scrapes.new_render()
                bodies = _retried(partial(self._render_once, encoders))
        finally:
            took = self._cpu_time() - begun
            self.render_cpu_seconds += took
        return bodies, took

    def _render_once(self, encoders: dict[str, Encoder]) -> dict[str, bytes]:
        """The cached part in every format, gzipped: one gzip member per family, kept from the
        last render if none of its blocks changed. OpenMetrics' `# EOF` is written once, at the
        end, unless the live part ends it."""
        kept: dict[str, _Kept] = {}
        members: dict[str, list[bytes]] = {t: [] for t in encoders}
        old = self._kept
        for family in self._registry.collect():
            if self._in_thread:
                self._scrapes.step_aside()
            key = (family.name, family.type, family.documentation, family.unit)
            # Taken out as used, so that old rows and texts go as the render goes (a render
            # that fails leaves the rest to be encoded afresh).
            before = old.pop(family.name, None)
            this = kept[family.name] = self._family(
                family, key, before if before is not None and before.key == key else None,
                encoders)
            for content_type in encoders:
                members[content_type].extend(this.members[content_type])
        if self._live is None:  # OpenMetrics: `# EOF`; text: b""
            for content_type, encoder in encoders.items():
                members[content_type].append(_gzip(encoder(_Only())))
        self._kept = kept  # whole, and only after a render that went through
        return {t: b"".join(parts) for t, parts in members.items()}

    def _family(self, family: Metric, key: tuple[str, str, str, str], before: _Kept | None,
                encoders: dict[str, Encoder]) -> _Kept:
        blocks: Sequence[Block] = (family.blocks if isinstance(family, RowBlocks)
                                   else (tuple(family.samples),))
        marks = blocks if not isinstance(family, RowBlocks) or family.stamps is None \
            else family.stamps
        this = _Kept(key, marks)
        for content_type, encoder in encoders.items():
            lengths = None if before is None else before.lengths.get(content_type)
            if lengths is not None and before is not None and before.marks == marks:
                this.headers[content_type] = before.headers[content_type]
                this.lengths[content_type] = lengths
                this.members[content_type] = before.members[content_type]
                continue
            old = () if before is None or lengths is None else before.marks
            old_header = None if before is None or lengths is None else before.headers[content_type]
            try:
                header, fresh = self._texts(family, encoder, blocks, marks, old, old_header)
            except _NotConcatenable:
                header, fresh = b"", [b"", encoder(_Only(family)).removesuffix(EOF)]
                this.marks = (tuple(blocks),)  # one block from now on
            this.headers[content_type] = header
            old_members = [] if before is None else before.members.get(content_type, [])
            this.members[content_type], this.lengths[content_type] = _members(
                fresh, lengths or [], old_members)
        return this

    @staticmethod
    def _texts(family: Metric, encoder: Encoder, blocks: Sequence[Block], marks: Sequence[Any],
               old: Sequence[Any], old_header: bytes | None) -> tuple[bytes, list[bytes | None]]:
        """The header, and the header's text then each block's, None for each that did not
        change since the last render (`old`: its marks; `old_header`: None if none)."""
        if not isinstance(family, RowBlocks):
            return b"", [b"", encoder(_Only(family)).removesuffix(EOF)]
        header = encoder(_Only(family.new())).removesuffix(EOF)
        fresh: list[bytes | None] = [None if header == old_header else header]
        changed: list[int] = []  # places in `fresh` of the blocks to encode
        for i, mark in enumerate(marks, start=1):
            unchanged = i <= len(old) and (old[i - 1] is mark or old[i - 1] == mark)
            fresh.append(None if unchanged else b"")
            if not unchanged:
                changed.append(i)
        if not changed:
            return header, fresh
        # The changed blocks in few encoder calls (a call's own cost is the header's), cut back
        # into blocks by their sample counts: a sample is a line, where no comment line is.
        # ENCODE_BLOCKS at a time: the first render's samples and text at once would add tens of
        # MB to the peak at 10,000 rooms.
        for start in range(0, len(changed), ENCODE_BLOCKS):
            some = changed[start:start + ENCODE_BLOCKS]
            together, counts = family.new(), []
            for i in some:
                before = len(together.samples)
                for row in blocks[i - 1]:
                    together.add_metric(*row)  # type: ignore[attr-defined]
                counts.append(len(together.samples) - before)
            text = encoder(_Only(together)).removesuffix(EOF)
            lines = text[len(header):].split(b"\n")  # escaped label values hold no newline
            if (not text.startswith(header) or len(lines) != sum(counts) + 1
                    or any(line.startswith(b"#") for line in lines)):
                raise _NotConcatenable
            at = 0
            for i, count in zip(some, counts, strict=True):
                fresh[i] = b"".join(line + b"\n" for line in lines[at:at + count])
                at += count
        return header, fresh

    async def respond(self, request: web.Request,
                      owner: asyncio.AbstractEventLoop | None = None) -> web.Response:
        """The /metrics answer: the format the Accept header asks for, gzipped if allowed.
        `owner`: the loop that renders, when another serves the scrape (`ServingThread`); it
        is asked only for a render to wait for, or a format not asked for before."""
        accept = request.headers.get("Accept", "")
        content_type = choose_encoder(accept)[1]
        rendered = self._current(content_type)
        if rendered is None:
            rendered = await on_loop(owner, self._asked(accept))
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        with self._scrapes.one():
            live = b""
            if self._live is not None:
                if content_type not in self._live_encoders:
                    self._live_encoders[content_type] = LiveEncoder(self._encoders[content_type])
                # The main loop may add a label set while this thread reads: read again.
                live = _retried(partial(self._live_encoders[content_type], self._live))
            if accepts_gzip(request.headers.get("Accept-Encoding", "")):
                headers["Content-Encoding"] = "gzip"
                body = rendered.gzipped + gzip.compress(live, compresslevel=GZIP_LEVEL, mtime=0)
            else:
                body = await asyncio.to_thread(gzip.decompress, rendered.gzipped) + live
        return web.Response(body=body, headers=headers)


EXPOSITION = web.AppKey("exposition", ExpositionCache)

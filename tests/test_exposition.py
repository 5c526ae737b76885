"""/metrics served from the exposition cache: fresh after each cycle's render, never waiting for
one under way, gzip and OpenMetrics ready."""

from __future__ import annotations

import asyncio
import gc
import gzip
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar

from exporter.clock import ManualClock
from exporter.daemon import Exporter, ListenAddress
from exporter.serve import exposition
from exporter.serve.exposition import (
    ExpositionCache,
    LiveEncoder,
    RowBlocks,
    _Scrapes,
    accepts_gzip,
)
from exporter.simulator.engine import SimEngine
from exporter.simulator.server import ServerOptions, SimulatorServer, rate_limits
from tests.conftest import APP_ID, QUIET, SECRET, make_config

OPENMETRICS = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3"


@dataclass
class Served:
    clock: ManualClock
    engine: SimEngine
    exporter: Exporter
    http: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.exporter.bound_port}/metrics"

    async def cycle(self, settle: bool = True) -> None:
        """One poll cycle; with `settle`, also the render it starts in the background."""
        await self.exporter.pollers[APP_ID].run_cycle()
        self.clock.advance(15.0)
        if settle:
            await self.exporter.exposition.settled()

    async def started(self, room: str) -> float:
        async with self.http.get(self.url, headers={"Accept-Encoding": "identity"}) as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (sample.name == "zego_cloudrecord_tasks_started_total"
                        and sample.labels["room_id"] == room):
                    return sample.value
        raise AssertionError(f"no started counter for {room}")


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    clock = ManualClock(start=1_750_000_000.0)
    engine = SimEngine(clock, {APP_ID: SECRET}, seed=3, rooms=["r1", "r2"], rates=QUIET)
    sim = SimulatorServer(engine, ServerOptions(rate_limits=rate_limits(1_000_000)))
    await sim.start()
    exporter = Exporter(make_config(sim.url, ("r1", "r2")), clock=clock)
    await exporter.start(ListenAddress("127.0.0.1", 0), schedule=False)
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        yield Served(clock, engine, exporter, http)
    await exporter.stop()
    await sim.stop()


async def test_a_scrape_after_a_cycle_shows_the_cycles_events(served: Served) -> None:
    await served.cycle()  # baseline
    assert await served.started("r1") == 0
    served.engine.start(APP_ID, "r1")
    assert await served.started("r1") == 0  # no cycle yet: the cached exposition still holds
    await served.cycle()
    assert await served.started("r1") == 1
    served.engine.start(APP_ID, "r1")
    await served.cycle()
    assert await served.started("r1") == 2


async def test_a_scrape_renders_a_changed_state_itself_when_no_render_is_under_way(
        served: Served) -> None:
    await served.cycle()
    served.engine.start(APP_ID, "r2")
    served.exporter.exposition.prerender = lambda: None  # type: ignore[method-assign]
    await served.cycle(settle=False)
    assert await served.started("r2") == 1


@pytest.mark.parametrize("queued", [False, True], ids=["render-running", "scrape-queued-first"])
async def test_a_scrape_during_a_render_gets_the_previous_one_without_waiting(
        queued: bool) -> None:
    """`queued`: the loop serves the scrape between `prerender()` and the render's first step,
    as it does a request read in the same loop iteration as a cycle's end."""
    value = [1.0]
    gate = threading.Event()

    class Slow(Collector):  # the second render blocks in its worker thread until `gate`
        def collect(self) -> Iterator[Metric]:
            if value[0] > 1:
                gate.wait(10)
            yield GaugeMetricFamily("thing", "A thing.", value=value[0])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Slow())
    cache = ExpositionCache(registry)
    _, plain = choose_encoder("")
    assert b"thing 1.0" in gzip.decompress((await cache.get(plain)).gzipped)
    value[0] = 2.0
    scrape = asyncio.ensure_future(cache.get(plain)) if queued else None  # its step runs first
    cache.invalidate()
    cache.prerender()
    if scrape is None:
        await asyncio.sleep(0.05)  # the render of the new state is under way, blocked
        scrape = asyncio.ensure_future(cache.get(plain))
    done, _ = await asyncio.wait({scrape}, timeout=1.0)
    gate.set()
    assert scrape in done
    assert b"thing 1.0" in gzip.decompress(scrape.result().gzipped)
    await cache.settled()
    assert b"thing 2.0" in gzip.decompress((await cache.get(plain)).gzipped)


class Clock:
    """A clock for the cache's render timings; a collector may move it (a render's cost)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def thing_cache(value: list[float], clock: Clock, render_cost: float | list[float] = 0.0
                ) -> ExpositionCache:
    cost = render_cost if isinstance(render_cost, list) else [render_cost]  # list: it may change

    class Thing(Collector):
        def collect(self) -> Iterator[Metric]:
            clock.now += cost[0]
            yield GaugeMetricFamily("thing", "A thing.", value=value[0])

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Thing())
    return ExpositionCache(registry, now=clock, cpu_time=clock)


async def test_a_callbacks_change_waits_four_times_the_last_callback_renders_cost(
        ) -> None:
    clock = Clock()
    cache = thing_cache([1.0], clock, render_cost=0.25)
    _, plain = choose_encoder("")
    await cache.get(plain)  # the first render: a scrape's, not a callback's
    assert cache.soon_delay() == 0.0
    cache.invalidate(soon=True)
    await asyncio.sleep(0.01)  # the callback's render, at once
    await cache.settled()
    assert cache.soon_delay() == pytest.approx(1.0)  # 4 × 0.25 s, from the render's end
    clock.now += 0.75
    assert cache.soon_delay() == pytest.approx(0.25)
    cheap = thing_cache([1.0], Clock(), render_cost=0.001)
    await cheap.get(plain)
    cheap.invalidate(soon=True)
    await asyncio.sleep(0.01)
    await cheap.settled()
    assert cheap.soon_delay() == pytest.approx(0.004)  # a cheap render: milliseconds


async def test_a_cycles_costly_render_does_not_delay_the_next_callbacks() -> None:
    clock = Clock()
    cost = [0.001]
    cache = thing_cache([1.0], clock, render_cost=cost)
    _, plain = choose_encoder("")
    await cache.get(plain)
    cache.invalidate(soon=True)
    await asyncio.sleep(0.01)
    await cache.settled()
    cost[0] = 0.5  # a cycle changed every room
    cache.invalidate()
    cache.prerender()
    await cache.settled()
    assert cache.soon_delay() == pytest.approx(0.004)  # the callbacks' renders still cost 1 ms


async def test_callback_changes_are_rendered_once_soon_and_scrapes_never_wait() -> None:
    value = [1.0]
    clock = Clock()
    cache = thing_cache(value, clock)
    _, plain = choose_encoder("")

    async def shown() -> bytes:
        return gzip.decompress((await cache.get(plain)).gzipped)

    assert b"thing 1.0" in await shown()
    renders = cache.renders
    for i in range(20):  # a burst of callbacks, scraped after each
        value[0] = 2.0 + i
        cache.invalidate(soon=True)
        assert b"thing 1.0" in await shown()  # the last render, at once
    assert cache.renders == renders
    clock.now += 1.0  # the last render cost nothing on this clock: due at once
    for _ in range(3):
        await asyncio.sleep(0)
    await cache.settled()
    assert b"thing 21.0" in await shown()
    assert cache.renders == renders + 1  # one render, every format kept ready
    value[0] = 99.0
    cache.invalidate()  # a cycle's change: the next scrape waits for it
    assert b"thing 99.0" in await shown()


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
async def test_the_family_by_family_render_equals_prometheus_clients_own(accept: str) -> None:
    registry = CollectorRegistry(auto_describe=False)
    Counter("things", "Things.", ["room"], registry=registry).labels("a\"b").inc(3)
    Histogram("took_seconds", "Took.", registry=registry).observe(0.3)
    Gauge("up", "Up.", registry=registry).set(1)
    encoder, content_type = choose_encoder(accept)
    rendered = await ExpositionCache(registry).get(content_type)
    assert gzip.decompress(rendered.gzipped) == encoder(registry)


async def test_unchanged_state_is_rendered_once_for_many_scrapes(served: Served) -> None:
    await served.cycle()
    await served.started("r2")  # plain text: rendered once asked for (Prometheus' from the start)
    renders = served.exporter.exposition.renders
    for _ in range(5):
        await served.started("r2")
    assert served.exporter.exposition.renders == renders


async def test_gzip_is_sent_to_clients_that_accept_it(served: Served) -> None:
    await served.cycle()
    async with served.http.get(served.url, headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert "Accept-Encoding" in response.headers["Vary"]
        text = gzip.decompress(await response.read()).decode()
    assert "zego_cloudrecord_tasks_started_total{" in text
    async with served.http.get(served.url, headers={"Accept-Encoding": "identity"}) as response:
        assert "Content-Encoding" not in response.headers
        plain = (await response.read()).decode()

    def ours(text: str) -> list[str]:  # process_* figures move between two scrapes
        return [line for line in text.splitlines() if "zego_cloudrecord_tasks" in line]

    assert ours(plain) == ours(text)


async def test_openmetrics_is_served_when_asked_for(served: Served) -> None:
    served.engine.start(APP_ID, "r2")
    await served.cycle()
    async with served.http.get(served.url, headers={"Accept": OPENMETRICS,
                                                    "Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = gzip.decompress(await response.read()).decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(text)}
    live = families["zego_cloudrecord_tasks"]
    assert any(s.labels["room_id"] == "r2" and s.value == 1 for s in live.samples)
    assert await served.started("r2") == 0  # plain text, cached separately, baseline counted 0


@pytest.mark.parametrize(("header", "expected"), [
    ("gzip", True), ("deflate, gzip;q=0.5", True), ("gzip;q=0", False), ("identity", False),
    ("", False), ("*", True), ("br, deflate", False),
])
def test_accept_encoding_is_read_with_its_q_values(header: str, expected: bool) -> None:
    assert accepts_gzip(header) is expected


async def test_no_cyclic_garbage_collection_runs_during_a_render() -> None:
    """A render's samples would otherwise fill the oldest generation and set off full
    collections that stop the event loop (see ExpositionCache._render); after it, and after
    a render that fails, collection is on again."""
    seen: list[bool] = []

    class Watching(Collector):
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def collect(self) -> Iterator[Metric]:
            seen.append(gc.isenabled())
            if self.fail:
                raise ValueError("a broken collector")
            yield GaugeMetricFamily("watched", "A gauge.", value=1)

    for fail in (False, True):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(Watching(fail))
        cache = ExpositionCache(registry)
        if fail:
            with pytest.raises(ValueError, match="a broken collector"):
                await cache.get("text/plain; version=0.0.4; charset=utf-8")
        else:
            await cache.get("text/plain; version=0.0.4; charset=utf-8")
        assert gc.isenabled()
    assert seen == [False, False]


def test_overlapping_renders_turn_collection_back_on_only_after_the_last() -> None:
    from exporter.serve.exposition import _GC_PAUSE

    first, second = _GC_PAUSE, _GC_PAUSE  # e.g. a cancelled render's thread and the next one
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()
    second.__exit__(None, None, None)
    assert gc.isenabled()


class Rooms(Collector):
    """Row-block families (as the collector's per-room ones) beside ordinary ones; `encoded`
    counts the rows of "ends" put into a family to encode (or for `samples`)."""

    def __init__(self, rooms: int) -> None:
        self.counts = {f"room-{i}": i % 3 for i in range(rooms)}
        self.exemplars: dict[str, Exemplar] = {}
        self.encoded = 0

    def _counter(self) -> CounterMetricFamily:
        rooms = self

        class Counted(CounterMetricFamily):
            def add_metric(self, *row: Any) -> None:
                rooms.encoded += 1
                super().add_metric(*row)

        return Counted("ends", "Ends \\ \"quoted\".", labels=["room"])

    def collect(self) -> Iterator[Metric]:
        rows = [((room,), count, None, None, self.exemplars.get(room))
                for room, count in self.counts.items()]
        yield RowBlocks.of(self._counter, [rows[:50], rows[50:]])  # two apps, say
        yield RowBlocks.of(partial(GaugeMetricFamily, "live", "Live.", labels=["room"]),
                           [[((room,), count) for room, count in self.counts.items()]])
        created = CounterMetricFamily("born", "Born.", created=1.5e9, value=1)
        yield created
        yield RowBlocks.of(partial(CounterMetricFamily, "with_created", "Created.",
                                   labels=["room"]),
                           [[((room,), 1, 1.5e9) for room in list(self.counts)[:40]]])
        yield RowBlocks.of(partial(GaugeMetricFamily, "none_yet", "No rows."), [])


def prometheus_clients_own(collector: Collector, accept: str) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return choose_encoder(accept)[0](registry)


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
async def test_row_blocks_render_as_prometheus_clients_own_before_and_after_changes(
        accept: str) -> None:
    rooms = Rooms(120)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(rooms)
    cache = ExpositionCache(registry)
    content_type = cache._remember(accept)

    async def ours() -> bytes:
        cache.invalidate()
        return gzip.decompress((await cache.get(content_type)).gzipped)

    assert await ours() == prometheus_clients_own(rooms, accept)
    rooms.counts["room-7"] += 1  # one block of one family
    rooms.exemplars["room-70"] = Exemplar({"task_id": "t-70"}, 1.0, 1.75e9)
    rooms.counts["room-200"] = 0  # a new room: a new block at the end
    assert await ours() == prometheus_clients_own(rooms, accept)
    if accept:
        assert b'ends_total{room="room-70"} 1.0 # {task_id="t-70"} 1.0 1750000000.0' \
            in await ours()
    del rooms.counts["room-3"]  # every later block shifts
    assert await ours() == prometheus_clients_own(rooms, accept)


async def test_a_render_encodes_only_the_blocks_that_changed() -> None:
    rooms = Rooms(100)  # "ends": 7 blocks of 16 rooms (6 + 1 for the second app's 50)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(rooms)
    cache = ExpositionCache(registry)
    _, plain = choose_encoder("")

    async def encoded_by_a_render() -> int:
        before = rooms.encoded
        cache.invalidate()
        await cache.get(plain)
        return rooms.encoded - before

    formats = 2  # OpenMetrics and text, both kept ready
    assert await encoded_by_a_render() == formats * 100  # every row
    assert await encoded_by_a_render() == 0  # nothing changed
    rooms.counts["room-60"] += 1
    assert await encoded_by_a_render() == formats * 16  # that room's block


LABEL_VALUES = st.text(st.characters(codec="utf-8"), max_size=6)  # quotes, \\, newlines too
VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**18, 10**18)


@st.composite
def live_families(draw: st.DrawFn, rooms: list[str]) -> list[Metric]:
    """Families of every kind the live part has (and more), for some of `rooms`, with values of
    every float kind; some with a created time, an exemplar or a timestamp (encoded whole)."""
    labels = draw(st.lists(st.sampled_from(rooms), min_size=1, unique=True))
    value = partial(draw, VALUES)
    counter = CounterMetricFamily("things", "Things \\ done.", labels=["room"])
    gauge = GaugeMetricFamily("level", "A level.", labels=["room", "kind"])
    histogram = HistogramMetricFamily("took_seconds", "Took.", labels=["action"])
    for label in labels:
        counter.add_metric([label], abs(value()), created=draw(st.none() | st.just(1.5e9)),
                           timestamp=draw(st.none() | st.just(1.7e9)))
        gauge.add_metric([label, "x"], value())
        histogram.add_metric([label], [("0.1", 1), ("1.0", 2), ("+Inf", 3)], value())
    return [counter, gauge, histogram,
            SummaryMetricFamily("wait_seconds", "Waited.", count_value=2, sum_value=value()),
            InfoMetricFamily("build", "Build.", value={"version": draw(st.sampled_from(rooms))}),
            GaugeMetricFamily("bare", "No labels.", value=value())]


class Families(Collector):
    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["", OPENMETRICS]),
       st.lists(LABEL_VALUES, min_size=1, max_size=4, unique=True), st.data())
def test_the_live_part_is_prometheus_clients_own_scrape_after_scrape(
        accept: str, rooms: list[str], data: st.DataObject) -> None:
    """Each scrape's live part (its label sets seen before or new, its values changed) equals
    prometheus_client's own encoding of the same families."""
    collector = Families()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    encoder = choose_encoder(accept)[0]
    live = LiveEncoder(encoder)
    for _ in range(data.draw(st.integers(1, 5))):
        collector.families = data.draw(live_families(rooms))
        assert live(registry) == encoder(registry)


async def test_a_live_part_read_while_the_main_loop_changed_it_is_read_again() -> None:
    """The main loop may add a label set to the live part's dicts while /metrics' thread walks
    them (RuntimeError): the scrape reads them again instead of failing."""
    trips = [1]

    class Changing(Collector):
        def collect(self) -> Iterator[Metric]:
            if trips[0]:
                trips[0] -= 1
                raise RuntimeError("dictionary changed size during iteration")
            yield GaugeMetricFamily("live_thing", "A live thing.", value=2.0)

    live = CollectorRegistry(auto_describe=False)
    live.register(Changing())
    cache = ExpositionCache(CollectorRegistry(auto_describe=False), live)
    response = await cache.respond(make_mocked_request("GET", "/metrics"))
    assert response.status == 200 and trips == [0]
    assert isinstance(response.body, bytes) and b"live_thing 2.0" in response.body


def test_a_render_steps_aside_while_a_scrape_is_under_way_within_its_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    scrapes = _Scrapes()
    order: list[str] = []
    scraping, finish = threading.Event(), threading.Event()

    def scrape() -> None:
        with scrapes.one():
            scraping.set()
            finish.wait(10)
            order.append("scrape answered")

    def render_step() -> None:
        threading.Thread(target=scrape).start()
        assert scraping.wait(10)
        scrapes.new_render()
        scrapes.step_aside()
        order.append("render went on")

    monkeypatch.setattr(exposition, "SCRAPE_PAUSE_S", 10.0)
    threading.Timer(0.05, finish.set).start()
    render_step()
    assert order == ["scrape answered", "render went on"]
    # A scrape that outlasts the render's pause does not hold it back further.
    monkeypatch.setattr(exposition, "SCRAPE_PAUSE_S", 0.01)
    order.clear()
    scraping.clear()
    finish.clear()
    releasing = threading.Timer(10, finish.set)  # ends the scrape if the render waited on
    releasing.start()
    render_step()
    assert order == ["render went on"] and not finish.is_set()
    finish.set()
    releasing.cancel()

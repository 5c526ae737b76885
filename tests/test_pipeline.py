"""The pipelined poll cycle: look-ups start as soon as the pages read so far show a task missing,
beside the rest of the listings; a missing row alone never ends a task.

Overlap is shown by the order in which a scripted ZEGO receives requests, never by timing: a
gated reply is held until another request has arrived (or a real-time deadline passes, and the
test then fails on the order it recorded).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from exporter.clock import ManualClock
from exporter.daemon import Exporter
from exporter.state.changes import EventKind
from tests.conftest import APP_ID, make_config
from tests.test_adversarial import (
    DESCRIBE_RECORD_STATUS,
    DESCRIBE_TASKS,
    NOW_MS,
    NOW_S,
    Key,
    Reply,
    ScriptedZego,
    benign,
    page,
    record_status,
    request_key,
    row,
    serve,
)

HOLD_S = 3.0  # real seconds a gated reply waits at most for what it waits for


@dataclass
class GatedZego(ScriptedZego):
    """A scripted ZEGO whose reply to a gated key waits until `until(served keys)` holds."""

    gates: dict[Key, Callable[[list[Key]], bool]] = field(default_factory=dict)
    held_in_vain: list[Key] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = request_key(request.query["Action"], json.loads(await request.read()))
        until = self.gates.get(key)
        if until is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + HOLD_S
            while not until([s.key for s in self.served]):
                if loop.time() > deadline:
                    self.held_in_vain.append(key)
                    break
                await asyncio.sleep(0.005)
        return await super().handle(request)  # aiohttp keeps the body it read


def live_rows(count: int) -> list[dict[str, object]]:
    """`count` live tasks L0 (newest) .. L{count-1}, a second apart, begun over an hour ago."""
    return [row(f"L{i}", "r1", 2, NOW_MS - 3_600_000 - i * 1000) for i in range(count)]


def live_page(number: int) -> Key:
    return (DESCRIBE_TASKS, 2, None, number, 50)


def ended_page(number: int) -> Key:
    return (DESCRIBE_TASKS, 3, None, number, 50)


def lookup(task_id: str) -> Key:
    return (DESCRIBE_RECORD_STATUS, task_id)


async def run_two_cycles(zego: GatedZego, baseline: dict[Key, list[Reply]],
                         cycle: dict[Key, list[Reply]]) -> dict[EventKind, int]:
    """A baseline cycle, then the cycle under test; returns the counters of room r1."""
    runner, url = await serve(zego)
    exporter = Exporter(make_config(url, None, timeout=10.0), clock=ManualClock(NOW_S))
    await exporter.start(None, schedule=False)
    poller = exporter.pollers[APP_ID]
    try:
        gates, zego.gates = zego.gates, {}
        zego.reset(baseline, benign)
        assert (await poller.run_cycle()).ok
        zego.gates = gates
        zego.reset(cycle, benign)
        await poller.run_cycle()
        return dict(exporter.state.apps[APP_ID].counters["r1"])
    finally:
        await exporter.stop()
        await runner.cleanup()


def three_pages(rows: list[dict[str, object]]) -> dict[Key, list[Reply]]:
    total = len(rows)
    return {live_page(n): [page(rows[50 * (n - 1):50 * n], total=total)] for n in (1, 2, 3)}


def test_a_lookup_starts_before_the_live_listing_ends_once_the_pages_reach_past_the_task(
) -> None:
    rows = live_rows(150)
    now = [r for r in rows if r["TaskId"] != "L5"]  # L5 ended: rows below it move up one
    zego = GatedZego(gates={live_page(3): lambda served: lookup("L5") in served})
    counters = asyncio.run(run_two_cycles(
        zego, three_pages(rows), {**three_pages(now), lookup("L5"): [record_status(3)]}))
    order = [s.key for s in zego.served]
    assert zego.held_in_vain == []
    assert order.index(lookup("L5")) < order.index(live_page(3))
    assert counters[EventKind.ENDED] == 1
    assert [k for k in order if k[0] == DESCRIBE_RECORD_STATUS] == [lookup("L5")]


def test_the_ended_listing_runs_beside_the_lookups() -> None:
    rows = live_rows(40)
    now = [r for r in rows if r["TaskId"] != "L5"]
    # Two pages of tasks that began and ended since the baseline (window: the last 10 minutes).
    ended = [row(f"E{i}", "r1", 3, NOW_MS - 60_000 - i) for i in range(80)]
    zego = GatedZego(gates={ended_page(2): lambda served: lookup("L5") in served})
    counters = asyncio.run(run_two_cycles(
        zego, {live_page(1): [page(rows)]},
        {live_page(1): [page(now)], ended_page(1): [page(ended[:50], total=80)],
         ended_page(2): [page(ended[50:], total=80)], lookup("L5"): [record_status(4)]}))
    order = [s.key for s in zego.served]
    assert zego.held_in_vain == []
    assert order.index(lookup("L5")) < order.index(ended_page(2))
    assert counters[EventKind.ENDED_ABNORMALLY] == 1
    assert counters[EventKind.ENDED] == 81


def test_a_task_missing_from_the_first_pages_but_listed_on_a_later_one_is_not_ended() -> None:
    """Its row moved down a page (drift, or ZEGO's order): the look-up it got early answers
    "ended", and still the row decides, because a task listed live in any page is live."""
    rows = live_rows(150)
    moved = [r for r in rows if r["TaskId"] != "L5"]
    moved.insert(60, rows[5])  # on page 2 now
    zego = GatedZego(gates={live_page(2): lambda served: lookup("L5") in served})
    counters = asyncio.run(run_two_cycles(
        zego, three_pages(rows), {**three_pages(moved), lookup("L5"): [record_status(3)]}))
    assert lookup("L5") in [s.key for s in zego.served]  # asked early, as it was missing
    assert counters[EventKind.ENDED] == 0
    assert counters[EventKind.LOST] == 0


def test_a_task_missing_from_every_page_whose_lookup_says_live_is_not_ended() -> None:
    rows = live_rows(150)
    now = [r for r in rows if r["TaskId"] != "L5"]
    zego = GatedZego()
    counters = asyncio.run(run_two_cycles(
        zego, three_pages(rows), {**three_pages(now), lookup("L5"): [record_status(2)]}))
    assert counters[EventKind.ENDED] == 0
    assert [s.key for s in zego.served if s.key[0] == DESCRIBE_RECORD_STATUS] == [lookup("L5")]


def test_a_task_begun_inside_the_ended_window_waits_for_the_ended_listing() -> None:
    """No look-up for a task whose ended row the Status=3 listing, still being read, will show."""
    recent = row("R0", "r1", 2, NOW_MS - 60_000)  # begun after the baseline's ended window opens
    rows = [recent, *live_rows(40)]
    zego = GatedZego(gates={ended_page(1): lambda served: live_page(1) in served})
    counters = asyncio.run(run_two_cycles(
        zego, {live_page(1): [page(rows)]},
        {live_page(1): [page(rows[1:])],
         ended_page(1): [page([row("R0", "r1", 3, NOW_MS - 60_000)])]}))
    assert zego.held_in_vain == []
    assert [s.key for s in zego.served if s.key[0] == DESCRIBE_RECORD_STATUS] == []
    assert counters[EventKind.ENDED] == 1


def test_rows_out_of_order_leave_the_lookups_to_the_last_page() -> None:
    """A page holding a new row newer than an earlier page's oldest: ZEGO is not listing newest
    first, so the pages read say nothing of the rest, and nothing more is looked up before the
    last page is in."""
    rows = live_rows(150)
    now = [r for r in rows if r["TaskId"] not in ("L5", "L60")]
    now.insert(55, row("X", "r1", 2, NOW_MS - 1000))  # newest of all, on page 2
    zego = GatedZego(gates={live_page(3): lambda served: lookup("L60") in served})
    asyncio.run(run_two_cycles(zego, three_pages(rows), three_pages(now)))
    order = [s.key for s in zego.served]
    assert zego.held_in_vain == [live_page(3)]  # L60 was not asked for before page 3
    assert order.index(lookup("L5")) < order.index(live_page(2))  # asked before the disorder
    assert order.index(live_page(3)) < order.index(lookup("L60"))

"""The planner picks the cheaper listing plan from last cycle's counts, without flapping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exporter.poll.planner import Planner, pages
from exporter.zego.models import RecordingTask, TaskStatus
from tests.conftest import APP_ID, Rig

Factory = Callable[..., Any]


def rows(room_counts: dict[str, int]) -> list[RecordingTask]:
    return [RecordingTask(f"{room}-{i}", room, TaskStatus.RECORDING, 0)
            for room, n in room_counts.items() for i in range(n)]


def cycle(planner: Planner, live: dict[str, int], app_live: int, app_ended: int = 0) -> None:
    planner.record_rows(2, rows(live))
    planner.record_rows(3, [])
    planner.record_app_total(2, app_live)
    planner.record_app_total(3, app_ended)
    planner.end_cycle()


def test_pages_of_zero_tasks_is_still_one_request() -> None:
    assert [pages(n) for n in (0, 1, 50, 51, 100, 101)] == [1, 1, 1, 2, 2, 3]


def test_many_quiet_rooms_go_app_wide() -> None:
    planner = Planner(tuple(f"r{i}" for i in range(1000)))
    cycle(planner, {"r1": 3}, app_live=300)
    assert planner.plan == "app-wide"
    assert planner.costs() == {"per-room": 2000, "app-wide": 7}


def test_few_rooms_in_a_busy_app_go_per_room() -> None:
    planner = Planner(("a", "b"))
    cycle(planner, {"a": 2}, app_live=5000)
    assert planner.plan == "per-room"
    assert planner.needs_probe() is False


def test_per_room_probes_the_app_totals_every_so_often() -> None:
    planner = Planner(("a", "b"))
    cycle(planner, {"a": 2}, app_live=5000)
    for _ in range(18):  # the probe was one cycle ago; 20 cycles between probes
        planner.record_rows(2, [])
        planner.end_cycle()
        assert not planner.needs_probe()
    planner.end_cycle()
    assert planner.needs_probe()


def test_a_plan_within_ten_percent_of_the_other_is_kept() -> None:
    planner = Planner(tuple(f"r{i}" for i in range(10)))  # per-room costs 20
    cycle(planner, {}, app_live=50 * 20)  # app-wide costs 21, per-room 20
    assert planner.plan == "app-wide"  # 21 ≤ 1.1 × 20: no switch
    cycle(planner, {}, app_live=50 * 25)  # 26 > 22: switch
    assert planner.plan == "per-room"
    cycle(planner, {}, app_live=50 * 18)  # 19 is not below 20 / 1.1: stay
    assert planner.plan == "per-room"


def test_a_single_room_is_always_queried_by_room() -> None:
    planner = Planner(("only",))
    assert planner.plan == "per-room"
    cycle(planner, {}, app_live=0)
    assert planner.plan == "per-room"


async def test_a_thousand_quiet_rooms_cost_two_requests_a_cycle(rig_factory: Factory) -> None:
    rooms = tuple(f"room{i}" for i in range(1000))
    rig: Rig = await rig_factory(rooms=rooms)
    for room in rooms[:120]:
        rig.engine.start(APP_ID, room)
    for _ in range(3):
        await rig.cycle()
    assert [r.requests for r in rig.reports] == [4, 4, 4]  # 3 live pages + 1 ended


async def test_busy_other_rooms_make_the_watched_ones_go_per_room(rig_factory: Factory) -> None:
    rig: Rig = await rig_factory(rooms=("a", "b"), sim_rooms=["a", "b", "c"])
    for _ in range(400):
        rig.engine.start(APP_ID, "c")  # not watched, but counted by app-wide queries
    await rig.cycle()
    rig.engine.start(APP_ID, "a")
    await rig.cycle()
    await rig.cycle()
    # app-wide: 8 pages of 400 live tasks + 1 ended page; then per-room: 2 rooms × 2 statuses.
    assert [r.requests for r in rig.reports] == [9, 4, 4]
    rig.assert_counters_match_ledger(["a", "b"])

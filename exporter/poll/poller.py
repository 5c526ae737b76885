"""One app's poll cycle: read every page of its scopes, ask about vanished tasks, apply the diff."""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import structlog

from exporter.clock import Clock
from exporter.logs import ContainedErrors
from exporter.poll import uploads
from exporter.poll.diff import (
    NOT_FOUND,
    Lookup,
    LookupFailed,
    Snapshot,
    diff,
    horizon_start_ms,
    needs_lookup,
)
from exporter.poll.planner import Planner
from exporter.state.changes import ChangeSet, CycleOutcome, Source, TrackedTask
from exporter.state.model import AppState
from exporter.zego.client import ZegoApp, ZegoClient
from exporter.zego.errors import Code, ZegoApiError, ZegoError, ZegoResponseError
from exporter.zego.limits import LISTING_ENDED, LISTING_LIVE, PAGE_SIZE
from exporter.zego.models import RecordingTask, RecordStatus

MAX_PAGES = 1000  # 50,000 tasks in one scope: past this, TotalCount is lying
MAX_LOOKUPS_IN_FLIGHT = 16
# From this many vanished tasks begun before the cycle's Status=3 window on, a Status=3 read over
# their begin times runs beside the look-ups (fewer are looked up within seconds).
EXTENDED_READ_MIN = 64
T = TypeVar("T")

log = structlog.get_logger("exporter.poll.poller")


@dataclass(frozen=True)
class Listing:
    rows: list[RecordingTask]  # in the app's scope
    consistent: bool  # TotalCount stayed put and the pages added up to it
    requests: int
    total: int  # TotalCount of the query (all rooms, for an app-wide one)


@dataclass(frozen=True)
class Resolution:
    """What became of the tasks that vanished from the live listing."""

    lookups: dict[str, Lookup]  # DescribeRecordStatus answers
    ended: dict[str, RecordingTask]  # Status=3 rows of the extended read, for vanished tasks only
    pages: int  # DescribeTasks requests of the extended read


@dataclass(frozen=True)
class CycleReport:
    ok: bool
    requests: int  # all of the cycle's, look-ups and the extended read included
    events: int
    seconds: float
    extended_pages: int = 0  # DescribeTasks requests of the extended ended read


async def all_or_nothing(*steps: Awaitable[T]) -> list[T]:
    """Run `steps` concurrently; if one fails, cancel the others and raise its error, so no
    request of a failed cycle goes on after it."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_run(step)) for step in steps]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def _run(step: Awaitable[T]) -> T:
    return await step


class AppPoller:
    """Polls one AppId; `run_cycle` is the scheduled job (never overlapping itself)."""

    def __init__(
        self,
        client: ZegoClient,
        app: ZegoApp,
        state: AppState,
        clock: Clock,
        margin_s: float,
        on_cycle_done: Callable[[AppState], None] | None = None,
        budget_per_cycle: float = math.inf,
        poll_interval: float = 15.0,
        errors: ContainedErrors | None = None,
        lookup_budget: float = math.inf,
        callbacks: bool = False,
        on_change: Callable[[AppState], None] | None = None,
    ) -> None:
        self._client = client
        self._app = app
        self._state = state
        self._clock = clock
        self._margin_ms = int(margin_s * 1000)
        # A busy app's live listing is often inconsistent; the ended-listing watermark may then
        # lag, but at most this far: a task live for 10 cycles was surely listed in one of them.
        self._max_lag_ms = int((10 * poll_interval + margin_s) * 1000)
        self._on_cycle_done = on_cycle_done
        self._errors = errors or ContainedErrors(collections.Counter())
        self._budget = budget_per_cycle  # DescribeTasks requests the limit allows per interval
        self._lookup_budget = lookup_budget  # likewise, DescribeRecordStatus
        self._interval_s = poll_interval
        self._callbacks = callbacks  # the app's upload callbacks come: look up later
        self._on_change = on_change  # upload outcomes counted after the cycle's render
        self._over_budget = False
        rooms = state.rooms
        self.planner = Planner(rooms) if rooms is not None else None
        self._in_scope = (lambda room: True) if rooms is None else frozenset(rooms).__contains__

    @property
    def scopes(self) -> list[str | None]:
        """What this cycle queries: each room, or the whole app (None)."""
        if self.planner is None or self.planner.app_wide:
            return [None]
        return list(self.planner.rooms)

    async def run_cycle(self) -> CycleReport:
        try:
            return await self._cycle()
        except Exception as exc:  # a bug must not leave `up` stale or kill the scheduler's job
            self._errors.record("poll_cycle", exc)
            return self._finish(None, 0, time.perf_counter(),
                                f"internal error: {type(exc).__name__}")

    async def _cycle(self) -> CycleReport:
        state = self._state
        started, begun = time.perf_counter(), self._clock.monotonic()
        now_ms = int(self._clock.time() * 1000)
        try:
            snapshot, requests = await self._observe(now_ms)
        except ZegoError as exc:
            return self._finish(None, 0, started, str(exc))
        self._check_budget(requests)
        vanished = needs_lookup(state.tracking, snapshot, self._margin_ms)
        resolution = await self._resolve([state.tracking.live[t] for t in vanished],
                                         self._ended_from(now_ms), now_ms)
        if resolution.ended:
            snapshot = replace(snapshot, ended={**snapshot.ended, **resolution.ended})
        # Callbacks may have changed the tracking while this cycle awaited ZEGO: diff against
        # the tracking as it is now, and let the snapshot not undo their newer flips.
        scope = None if state.rooms is None else frozenset(state.rooms)
        result = diff(state.tracking, snapshot, resolution.lookups, self._margin_ms,
                      state.fresher_than(now_ms), scope, self._max_lag_ms,
                      learned_ms=int(self._clock.time() * 1000))
        failed = len(result.pending)
        # The events stand; the pending tasks are asked about again next cycle.
        error = f"DescribeRecordStatus failed for {failed} tasks" if failed else None
        report = self._finish(result.changes, requests + resolution.pages
                              + len(resolution.lookups), started, error, resolution.pages)
        await self._check_uploads(len(resolution.lookups), self._clock.monotonic() - begun)
        return report

    async def _check_uploads(self, lookups_used: int, cycle_s: float) -> None:
        """Ask about awaited uploads with what end detection left of the interval's
        DescribeRecordStatus budget and time, after the cycle's ends are applied: they never
        delay an end, this cycle's or the next's. Those left wait for a later cycle, counted
        as skipped."""
        state = self._state
        now_ms = int(self._clock.time() * 1000)
        tracking = state.tracking
        wanted = [t for t in uploads.due(tracking, now_ms, self._callbacks)
                  if not uploads.timed_out(tracking, t, now_ms)]
        room = len(wanted)
        if not math.isinf(self._lookup_budget):
            per_s = self._lookup_budget / self._interval_s
            room = max(0, min(int(self._lookup_budget) - lookups_used,
                              int((self._interval_s - cycle_s) * per_s) - 1))
        asked = wanted[:room]
        answers: dict[str, RecordStatus | None] = {}

        async def worker() -> None:
            while asked:
                task_id = asked.pop()
                outcome = await self._look_up(task_id)
                if isinstance(outcome, RecordStatus):
                    answers[task_id] = outcome
                elif outcome == NOT_FOUND:
                    answers[task_id] = None

        await all_or_nothing(*(worker() for _ in range(min(MAX_LOOKUPS_IN_FLIGHT, len(asked)))))
        changes = uploads.settle(state.tracking, answers, int(self._clock.time() * 1000),
                                 skipped=max(0, len(wanted) - room))
        if changes.events or changes.awaited or changes.uploads_skipped:
            state.apply(changes)
            if changes.events and self._on_change is not None:
                self._on_change(state)

    def _check_budget(self, requests: int) -> None:
        """Say so when the rooms need more listing requests than one interval's budget: cycles
        then take longer than poll_interval (the limit is kept, never exceeded to catch up)."""
        over = requests > self._budget
        if over and not self._over_budget:
            log.warning("poll_budget_exceeded", app_id=self._app.app_id,
                        requests_per_cycle=requests, budget_per_interval=round(self._budget, 1),
                        plan=self.planner.plan if self.planner else "app-wide",
                        hint="cycles take longer than poll_interval; the rate limit is kept")
        elif self._over_budget and not over:
            log.info("poll_budget_ok", app_id=self._app.app_id, requests_per_cycle=requests)
        self._over_budget = over

    def _finish(self, changes: ChangeSet | None, requests: int, started: float,
                error: str | None, extended_pages: int = 0) -> CycleReport:
        """Apply the cycle's changes (none if it failed) with its outcome, and log it."""
        seconds = time.perf_counter() - started
        now = self._clock.time()
        ok = changes is not None and error is None
        outcome = CycleOutcome(ok, seconds, error, now)
        changes = changes or ChangeSet(Source.POLL, int(now * 1000))
        self._state.apply(replace(changes, cycle=outcome))
        fields = {"app_id": self._app.app_id, "requests": requests,
                  "events": len(changes.events), "seconds": round(seconds, 3),
                  "live": len(self._state.tracking.live)}
        if error is not None:
            log.warning("poll_cycle_failed", error=error, **fields)
        else:
            log.info("poll_cycle_done", **fields)
        if self._on_cycle_done is not None:
            self._on_cycle_done(self._state)
        return CycleReport(ok, requests, len(changes.events), seconds, extended_pages)

    def _ended_from(self, now_ms: int) -> int:
        """Where this cycle's Status=3 read begins (a window of begin times up to now)."""
        since = self._state.tracking.marks.ended_since_ms
        if since is None:
            return now_ms - self._margin_ms  # baseline: what just ended is not ours to count
        return max(horizon_start_ms(now_ms, self._margin_ms), since)

    async def _observe(self, now_ms: int) -> tuple[Snapshot, int]:
        oldest = horizon_start_ms(now_ms, self._margin_ms)
        ended_from = self._ended_from(now_ms)
        windows = {LISTING_LIVE: oldest, LISTING_ENDED: ended_from}
        planner = self.planner
        probe = planner is not None and planner.needs_probe()
        live, ended = await all_or_nothing(self._list_all(LISTING_LIVE, oldest, now_ms),
                                           self._list_all(LISTING_ENDED, ended_from, now_ms))
        probes = await all_or_nothing(
            *(self._probe(status, start, now_ms) for status, start in windows.items() if probe))
        if planner is not None:
            for status, listing in ((LISTING_LIVE, live), (LISTING_ENDED, ended)):
                planner.record_rows(status, listing.rows)
                if planner.app_wide:
                    planner.record_app_total(status, listing.total)
            for status, total in zip(windows, probes, strict=False):
                planner.record_app_total(status, total)
            plan = planner.plan
            planner.end_cycle()
            if planner.plan != plan:
                log.info("poll_plan_changed", app_id=self._app.app_id, plan=planner.plan,
                         **{f"cost_{k}": v for k, v in planner.costs().items()})
        snapshot = Snapshot(
            taken_ms=now_ms,
            live={r.task_id: r for r in live.rows},
            ended={r.task_id: r for r in ended.rows},
            consistent=live.consistent and ended.consistent,
        )
        return snapshot, live.requests + ended.requests + len(probes)

    async def _probe(self, status: int, start_ms: int, end_ms: int) -> int:
        """The app-wide TotalCount for `status`, for one request of one row."""
        page = await self._client.describe_tasks(self._app, status, None, start_ms, end_ms, 1, 1)
        return page.total_count

    async def _list_all(self, status: int, start_ms: int, end_ms: int) -> Listing:
        listings = await all_or_nothing(
            *(self._list_scope(status, room, start_ms, end_ms) for room in self.scopes)
        )
        return Listing(
            rows=[row for listing in listings for row in listing.rows],
            consistent=all(listing.consistent for listing in listings),
            requests=sum(listing.requests for listing in listings),
            total=sum(listing.total for listing in listings),
        )

    async def _list_scope(self, status: int, room: str | None, start_ms: int, end_ms: int
                          ) -> Listing:
        """Every page of one scope (a room, or the app), de-duplicated, kept to the app's rooms."""
        rows: dict[str, RecordingTask] = {}
        totals: list[int] = []
        page = 1
        while True:
            result = await self._client.describe_tasks(
                self._app, status, room, start_ms, end_ms, page, PAGE_SIZE
            )
            totals.append(result.total_count)
            rows.update({t.task_id: t for t in result.tasks})
            # The latest TotalCount says how many pages there are: a short page before the last
            # is drift (rows moved while we read), not the end. Stopping there would leave every
            # task of the unread pages to a look-up of its own.
            if not result.tasks or page >= math.ceil(result.total_count / PAGE_SIZE):
                break
            if page >= MAX_PAGES:
                raise ZegoResponseError("DescribeTasks", f"more than {MAX_PAGES} pages")
            page += 1
        if status == LISTING_ENDED:
            # Ended tasks never leave a window of begin times; they only join it (rows shift
            # down: duplicates, not gaps). Complete unless the total shrank or rows are missing.
            consistent = totals == sorted(totals) and len(rows) >= totals[0]
        else:
            consistent = len(set(totals)) == 1 and len(rows) == totals[0]
        # Rows of another room than asked, or begun outside the window asked for, are a broken
        # upstream: dropped, never taken as news about a task.
        kept = [t for t in rows.values() if (room is None or t.room_id == room)
                and self._in_scope(t.room_id) and start_ms <= t.begin_ms <= end_ms]
        return Listing(kept, consistent, page, totals[0])

    async def _resolve(self, vanished: list[TrackedTask], ended_from_ms: int, now_ms: int
                       ) -> Resolution:
        """Learn what became of tasks missing from the live listing.

        Each gets a DescribeRecordStatus look-up, oldest first. When many began before this
        cycle's Status=3 window, a Status=3 read over their begin times runs beside the
        look-ups (each has its own rate limit): an ended row is as good as a look-up and one
        page holds 50. Rows only ever settle tasks in `vanished`; a task the read does not
        show is still looked up, so nothing is concluded from a missing row.
        """
        waiting = _Waiting(vanished)
        lookups: dict[str, Lookup] = {}
        found: dict[str, RecordingTask] = {}

        async def worker() -> None:
            while (task := waiting.take_oldest()) is not None:
                # A callback may have finished it meanwhile.
                if task.task_id in self._state.tracking.live:
                    lookups[task.task_id] = await self._look_up(task.task_id)

        async def look_up_all() -> int:
            # A few workers use the budget; thousands of waiting tasks would only crowd memory
            # and the event loop (whose late wake-ups would bunch requests).
            await all_or_nothing(*(worker() for _ in range(min(MAX_LOOKUPS_IN_FLIGHT,
                                                                len(vanished)))))
            return 0

        before = [t.begin_ms for t in vanished if t.begin_ms < ended_from_ms]
        read = len(before) >= EXTENDED_READ_MIN and self.scopes == [None]
        pages, _ = await all_or_nothing(
            self._extended_read(waiting, min(before), ended_from_ms, found) if read else _zero(),
            look_up_all())
        return Resolution(lookups, found, pages)

    async def _extended_read(self, waiting: _Waiting, oldest_ms: int, end_ms: int,
                             found: dict[str, RecordingTask]) -> int:
        """Status=3 pages over [oldest_ms, end_ms] (kept inside ZEGO's horizon as it is now),
        newest first, settling waiting tasks into `found` for as long as that pays; returns
        the pages asked for."""
        now_ms = int(self._clock.time() * 1000)
        start_ms = max(horizon_start_ms(now_ms, self._margin_ms), oldest_ms)
        if start_ms >= end_ms:
            return 0
        page = 0
        recent: collections.deque[int] = collections.deque(maxlen=4)  # settled per page
        while waiting.oldest() is not None:
            page += 1
            try:
                result = await self._client.describe_tasks(
                    self._app, LISTING_ENDED, None, start_ms, end_ms, page, PAGE_SIZE)
            except ZegoError as exc:  # the look-ups answer for the rest
                log.warning("extended_read_failed", app_id=self._app.app_id, error=str(exc))
                return page
            settled = [row for row in result.tasks
                       if start_ms <= row.begin_ms <= end_ms and waiting.settle(row)]
            found.update((row.task_id, row) for row in settled)
            # A page pays while it settles at least the one look-up it costs: stop when the
            # last pages (the first alone, at first) settled fewer than one each. And ZEGO
            # lists newest first: once the rows are older than every waiting task, no later
            # page helps.
            recent.append(len(settled))
            lowest = min((row.begin_ms for row in result.tasks), default=start_ms)
            oldest = waiting.oldest()
            if sum(recent) < len(recent) or oldest is None or oldest.begin_ms > lowest \
                    or page >= min(math.ceil(result.total_count / PAGE_SIZE), MAX_PAGES):
                break
        return page

    async def _look_up(self, task_id: str) -> Lookup:
        """DescribeRecordStatus of one task: its status, NOT_FOUND, or FAILED."""
        try:
            return await self._client.describe_record_status(self._app, task_id)
        except ZegoApiError as exc:
            if exc.code == Code.TASK_NOT_FOUND:
                return NOT_FOUND
            log.warning("lookup_failed", app_id=self._app.app_id, task_id=task_id,
                        error=str(exc))
        except ZegoError as exc:
            log.warning("lookup_failed", app_id=self._app.app_id, task_id=task_id,
                        error=str(exc))
        return LookupFailed.FAILED


async def _zero() -> int:
    return 0


class _Waiting:
    """Vanished tasks not settled yet: look-ups take the oldest, the ended read settles any."""

    def __init__(self, tasks: list[TrackedTask]) -> None:
        self._order = sorted(tasks, key=lambda t: t.begin_ms, reverse=True)  # newest first
        self._by_id = {t.task_id: t for t in self._order}

    def oldest(self) -> TrackedTask | None:
        while self._order and self._order[-1].task_id not in self._by_id:
            self._order.pop()
        return self._order[-1] if self._order else None

    def take_oldest(self) -> TrackedTask | None:
        task = self.oldest()
        if task is not None:
            del self._by_id[task.task_id]
        return task

    def settle(self, row: RecordingTask) -> bool:
        """Settle the task an ended row shows, if it is waiting and the row is its own."""
        task = self._by_id.get(row.task_id)
        if task is None or row.room_id != task.room_id or row.status.live:
            return False
        del self._by_id[row.task_id]
        return True

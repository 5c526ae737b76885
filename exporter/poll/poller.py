"""One app's poll cycle: read every page of its scopes, ask about vanished tasks as the pages
reach past them, apply the diff."""

from __future__ import annotations

import asyncio
import bisect
import collections
import math
import time
from collections.abc import Awaitable, Callable, Iterable
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
from exporter.zego.models import RecordingTask, RecordStatus, TaskPage

MAX_PAGES = 1000  # 50,000 tasks in one scope: past this, TotalCount is lying
MAX_LOOKUPS_IN_FLIGHT = 16
# Pages of one scope asked for at once (each still waits for its slot): a page's answer may then
# take up to this many pacing intervals without leaving a slot of the budget unused.
PAGES_IN_FLIGHT = 3
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
class Observation:
    """What the listings of one cycle saw, and what the tail of the cycle added to it."""

    snapshot: Snapshot
    requests: int  # DescribeTasks requests of the listings and probes
    vanished: list[str]  # tracked tasks missing from the complete listings
    ended: dict[str, RecordingTask]  # Status=3 rows of the extended read, for vanished tasks
    extended_pages: int  # DescribeTasks requests of the extended read


@dataclass(frozen=True)
class Found:
    """What one cycle's listings and look-ups came to: the diff's changes (None: the cycle
    failed), why the cycle failed, if it did, and the requests spent."""

    changes: ChangeSet | None
    error: str | None
    requests: int = 0  # all of the cycle's end detection: listings, extended read, look-ups
    extended_pages: int = 0
    lookups: int = 0
    lookups_needed: int = 0


@dataclass(frozen=True)
class CycleReport:
    ok: bool
    requests: int  # all of the cycle's, look-ups and the extended read included
    events: int
    seconds: float
    extended_pages: int = 0  # DescribeTasks requests of the extended ended read
    lookups: int = 0  # DescribeRecordStatus requests
    lookups_needed: int = 0  # of which, for tasks the complete listings missed
    applied_s: float = 0.0  # the exporter's clock when its changes were applied (before the
    # upload look-ups that follow, in what is left of the interval)


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
        """What the listings and look-ups found, applied; then the upload look-ups. The rows
        read are gone before the apply: at 10,000 rooms they are tens of MB beside its own."""
        started, begun = time.perf_counter(), self._clock.monotonic()
        found = await self._detect()
        applied = found.changes is not None
        report = self._finish(found.changes, found.requests, started, found.error,
                              found.extended_pages, found.lookups, found.lookups_needed)
        del found  # its changes are applied: not kept through the upload look-ups
        if applied:
            await self._check_uploads(report.lookups, self._clock.monotonic() - begun)
        return report

    async def _detect(self) -> Found:
        """The listings, and beside them the look-ups of the tasks the pages read so far show
        missing (see `_Sweep`); then the diff of what they saw."""
        state = self._state
        now_ms = int(self._clock.time() * 1000)
        ended_from = self._ended_from(now_ms)
        waiting = _Waiting()
        sweep = _Sweep(state.tracking.live.values(), self.scopes, ended_from,
                       horizon_start_ms(now_ms, self._margin_ms), waiting)
        lookups: dict[str, Lookup] = {}

        async def worker() -> None:
            while (task := await waiting.next_oldest()) is not None:
                # A callback may have finished it meanwhile, or a later page shown it.
                if task.task_id in state.tracking.live and not sweep.seen(task):
                    lookups[task.task_id] = await self._look_up(task.task_id)

        async def observe() -> Observation:
            try:
                return await self._observe(now_ms, ended_from, sweep, waiting)
            finally:
                waiting.close()  # nothing more to look up: the workers end when it is empty

        async def look_up_all() -> None:
            # A few workers use the budget; thousands of waiting tasks would only crowd memory
            # and the event loop (whose late wake-ups would bunch requests).
            await all_or_nothing(*(worker() for _ in range(MAX_LOOKUPS_IN_FLIGHT)))

        try:
            observed, _ = await all_or_nothing(observe(), look_up_all())
        except ZegoError as exc:
            return Found(None, str(exc), lookups=len(lookups))
        assert isinstance(observed, Observation)
        snapshot = observed.snapshot
        if observed.ended:
            snapshot = replace(snapshot, ended={**snapshot.ended, **observed.ended})
        # Look-ups of tasks a later page showed are spent, not evidence: the rows decide.
        needed = {tid: lookups[tid] for tid in observed.vanished if tid in lookups}
        # Callbacks may have changed the tracking while this cycle awaited ZEGO: diff against
        # the tracking as it is now, and let the snapshot not undo their newer flips.
        scope = None if state.rooms is None else frozenset(state.rooms)
        result = diff(state.tracking, snapshot, needed, self._margin_ms,
                      state.fresher_than(now_ms), scope, self._max_lag_ms,
                      learned_ms=int(self._clock.time() * 1000))
        failed = len(result.pending)
        # The events stand; the pending tasks are asked about again next cycle.
        error = f"DescribeRecordStatus failed for {failed} tasks" if failed else None
        requests = observed.requests + observed.extended_pages + len(lookups)
        return Found(result.changes, error, requests, observed.extended_pages, len(lookups),
                     len(needed))

    async def _check_uploads(self, lookups_used: int, cycle_s: float) -> None:
        """Ask about awaited uploads with what end detection left of the interval's
        DescribeRecordStatus budget and time, after the cycle's ends are applied: they never
        delay an end, this cycle's or the next's. Those left wait for a later cycle, counted
        as skipped."""
        state = self._state
        now_ms = int(self._clock.time() * 1000)
        wanted = uploads.due(state.tracking, now_ms, self._callbacks)
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
                error: str | None, extended_pages: int = 0, lookups: int = 0,
                lookups_needed: int = 0) -> CycleReport:
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
        return CycleReport(ok, requests, len(changes.events), seconds, extended_pages, lookups,
                           lookups_needed, now)

    def _ended_from(self, now_ms: int) -> int:
        """Where this cycle's Status=3 read begins (a window of begin times up to now)."""
        since = self._state.tracking.marks.ended_since_ms
        if since is None:
            return now_ms - self._margin_ms  # baseline: what just ended is not ours to count
        return max(horizon_start_ms(now_ms, self._margin_ms), since)

    async def _observe(self, now_ms: int, ended_from: int, sweep: _Sweep, waiting: _Waiting
                       ) -> Observation:
        """Both listings (and the planner's probes) at once, each page shown to `sweep` as it
        comes, and the extended ended read once the live listing is in, if it pays; then every
        tracked task the complete listings miss joins `waiting` (if the pages did not already
        release it)."""
        oldest = horizon_start_ms(now_ms, self._margin_ms)
        windows = {LISTING_LIVE: oldest, LISTING_ENDED: ended_from}
        planner = self.planner
        probe = planner is not None and planner.needs_probe()

        found: dict[str, RecordingTask] = {}
        extended_pages = 0

        async def live_listing() -> Listing:
            nonlocal extended_pages
            listing = await self._list_all(LISTING_LIVE, oldest, now_ms, sweep)
            # When many tasks to look up began before the Status=3 window, a Status=3 read over
            # their begin times runs beside the look-ups (each has its own rate limit) and the
            # ended listing: an ended row is as good as a look-up and one page holds 50.
            joined = sum(1 for t in waiting.joined() if t.begin_ms < ended_from)
            before = [t.begin_ms for t in waiting.untaken() if t.begin_ms < ended_from]
            if joined >= EXTENDED_READ_MIN and before and self.scopes == [None]:
                # Over the begin times of the tasks still waiting only: the newest vanished ones
                # were mostly looked up while the pages were read, and ended rows of their begin
                # times would settle nothing.
                extended_pages = await self._extended_read(
                    waiting, min(before), min(ended_from, max(before) + 1), found)
            return listing

        async def ended_listing() -> Listing:
            listing = await self._list_all(LISTING_ENDED, ended_from, now_ms, sweep)
            sweep.ended_read()
            return listing

        live, ended, *probes = await all_or_nothing(
            live_listing(), ended_listing(),
            *(self._probe(status, start, now_ms) for status, start in windows.items() if probe))
        requests = live.requests + ended.requests + len(probes)
        if planner is not None:
            for status, listing in ((LISTING_LIVE, live), (LISTING_ENDED, ended)):
                planner.record_rows(status, listing.rows)
                if planner.app_wide:
                    planner.record_app_total(status, listing.total)
            for status, probed in zip(windows, probes, strict=False):
                planner.record_app_total(status, probed.total)
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
        self._check_budget(requests)
        tracking = self._state.tracking
        vanished = needs_lookup(tracking, snapshot, self._margin_ms)
        for task_id in vanished:  # those the pages did not already release (or a callback added)
            waiting.add(tracking.live[task_id])
        return Observation(snapshot, requests, vanished, found, extended_pages)

    async def _probe(self, status: int, start_ms: int, end_ms: int) -> Listing:
        """The app-wide TotalCount for `status` (in `total`), for one request of one row."""
        page = await self._client.describe_tasks(self._app, status, None, start_ms, end_ms, 1, 1)
        return Listing([], True, 1, page.total_count)

    async def _list_all(self, status: int, start_ms: int, end_ms: int, sweep: _Sweep
                        ) -> Listing:
        listings = await all_or_nothing(
            *(self._list_scope(status, room, start_ms, end_ms, sweep) for room in self.scopes)
        )
        return Listing(
            rows=[row for listing in listings for row in listing.rows],
            consistent=all(listing.consistent for listing in listings),
            requests=sum(listing.requests for listing in listings),
            total=sum(listing.total for listing in listings),
        )

    async def _list_scope(self, status: int, room: str | None, start_ms: int, end_ms: int,
                          sweep: _Sweep) -> Listing:
        """Every page of one scope (a room, or the app), de-duplicated, kept to the app's rooms.

        Up to PAGES_IN_FLIGHT pages are asked for at once; the pages answered so far, in page
        order without a gap, are shown to `sweep`."""
        def wanted(t: RecordingTask) -> bool:
            # Rows of another room than asked, or begun outside the window asked for, are a
            # broken upstream: dropped, never taken as news about a task.
            return (room is None or t.room_id == room) and start_ms <= t.begin_ms <= end_ms

        answers: dict[int, TaskPage] = {}
        shown = _Shown(sweep, status, room, self._in_scope)
        first = await self._describe_page(status, room, start_ms, end_ms, 1)
        answers[1] = first
        shown.page([t for t in first.tasks if wanted(t)])
        # The latest TotalCount says how many pages there are: a short page before the last is
        # drift (rows moved while we read), not the end. Stopping there would leave every task
        # of the unread pages to a look-up of its own. An empty page is the end.
        latest, more = first.total_count, bool(first.tasks)
        asked: dict[asyncio.Task[TaskPage], int] = {}
        next_page = 2
        try:
            while True:
                while more and len(asked) < PAGES_IN_FLIGHT \
                        and next_page <= math.ceil(latest / PAGE_SIZE):
                    if next_page > MAX_PAGES:
                        raise ZegoResponseError("DescribeTasks", f"more than {MAX_PAGES} pages")
                    request = asyncio.create_task(
                        self._describe_page(status, room, start_ms, end_ms, next_page))
                    asked[request] = next_page
                    next_page += 1
                if not asked:
                    break
                done, _ = await asyncio.wait(asked, return_when=asyncio.FIRST_COMPLETED)
                for request in sorted(done, key=asked.__getitem__):
                    number = asked.pop(request)
                    answers[number] = result = request.result()
                    latest, more = result.total_count, more and bool(result.tasks)
                    while shown.next in answers:
                        shown.page([t for t in answers[shown.next].tasks if wanted(t)])
        finally:
            for request in asked:
                request.cancel()
            if asked:
                await asyncio.gather(*asked, return_exceptions=True)
        shown.done()
        rows: dict[str, RecordingTask] = {}
        for number in sorted(answers):  # a later page's row is the newer read
            rows.update({t.task_id: t for t in answers[number].tasks})
        totals = [answers[number].total_count for number in sorted(answers)]
        if status == LISTING_ENDED:
            # Ended tasks never leave a window of begin times; they only join it (rows shift
            # down: duplicates, not gaps). Complete unless the total shrank or rows are missing.
            consistent = totals == sorted(totals) and len(rows) >= totals[0]
        else:
            consistent = len(set(totals)) == 1 and len(rows) == totals[0]
        kept = [t for t in rows.values() if wanted(t) and self._in_scope(t.room_id)]
        return Listing(kept, consistent, len(answers), totals[0])

    async def _describe_page(self, status: int, room: str | None, start_ms: int, end_ms: int,
                             page: int) -> TaskPage:
        return await self._client.describe_tasks(self._app, status, room, start_ms, end_ms,
                                                 page, PAGE_SIZE)

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


class _Sweep:
    """Releases tracked tasks to the look-ups as soon as the pages read so far show them missing.

    ZEGO lists newest first: once a scope's pages read so far (in page order, no gap) hold a row
    begun at `t`, every task of the scope begun after `t` that ZEGO listed is among them. A
    tracked task begun after `t` and missing from them has ended, or drift moved its row (its
    look-up answers "still live"), or ZEGO left it out for a while: it is looked up now rather
    than after the last page. Nothing is concluded from its absence: the look-up decides, and a
    row of it on a later page still wins (the diff prefers rows; that look-up is then spent for
    nothing). A task begun inside the Status=3 window waits for that listing, which may settle
    it; a scope whose rows come out of order releases its tasks only when its last page is in.
    """

    def __init__(self, tracked: Iterable[TrackedTask], scopes: list[str | None],
                 ended_from_ms: int, oldest_ms: int, waiting: _Waiting) -> None:
        app_wide = scopes == [None]
        rooms = set(scopes)
        self._by_scope: dict[str | None, list[TrackedTask]] = {}
        for task in tracked:
            scope = None if app_wide else task.room_id
            if scope in rooms:
                self._by_scope.setdefault(scope, []).append(task)
        for tasks in self._by_scope.values():
            tasks.sort(key=lambda t: t.begin_ms)  # oldest first: the newest leave first
        self._seen: set[tuple[str, str]] = set()
        self._ended_from = ended_from_ms
        self._oldest = oldest_ms
        self._ended_read = False
        self._held: list[TrackedTask] = []  # begun inside the Status=3 window
        self._waiting = waiting

    def saw(self, rows: Iterable[RecordingTask]) -> None:
        self._seen.update((row.task_id, row.room_id) for row in rows)

    def seen(self, task: TrackedTask) -> bool:
        """Has a row of the task, in its own room, been read this cycle?"""
        return (task.task_id, task.room_id) in self._seen

    def reached(self, scope: str | None, begin_ms: float) -> None:
        """Every row of `scope` begun after `begin_ms` has been read (-inf: every row)."""
        tasks = self._by_scope.get(scope)
        while tasks and tasks[-1].begin_ms > begin_ms:
            self._release(tasks.pop())

    def ended_read(self) -> None:
        """The Status=3 listing is complete."""
        self._ended_read = True
        held, self._held = self._held, []
        for task in held:
            self._release(task)

    def _release(self, task: TrackedTask) -> None:
        if self.seen(task) or task.begin_ms < self._oldest:  # past the horizon: the diff decides
            return
        if task.begin_ms >= self._ended_from and not self._ended_read:
            self._held.append(task)
        else:
            self._waiting.add(task)


class _Shown:
    """Feeds one scope's pages to `_Sweep` in page order: rows seen, and how far back they reach."""

    def __init__(self, sweep: _Sweep, status: int, room: str | None,
                 in_scope: Callable[[str], bool]) -> None:
        self.next = 1  # the page to show next
        self._sweep = sweep
        self._live = status == LISTING_LIVE
        self._room = room
        self._in_scope = in_scope
        self._ids: set[str] = set()
        self._reach = math.inf
        self._ordered = True

    def page(self, rows: list[RecordingTask]) -> None:
        """The next page's rows (those of the scope and window asked for)."""
        self.next += 1
        ours = [row for row in rows if self._in_scope(row.room_id)]
        if not self._live:  # a Status=3 listing: only its ended rows are news
            self._sweep.saw(row for row in ours if not row.status.live)
            return
        self._sweep.saw(ours)
        # A row newer than an earlier page's oldest, and not a duplicate pushed down by drift:
        # ZEGO is not listing newest first, and the pages read tell nothing about what is left.
        if any(row.begin_ms > self._reach and row.task_id not in self._ids for row in rows):
            self._ordered = False
        self._ids.update(row.task_id for row in rows)
        self._reach = min((row.begin_ms for row in rows), default=self._reach)
        if self._ordered:
            self._sweep.reached(self._room, self._reach)

    def done(self) -> None:
        """The scope's last page is in."""
        if self._live:
            self._sweep.reached(self._room, -math.inf)


class _Waiting:
    """Tasks to look up, not taken yet: look-ups take the oldest, the extended read settles any.
    Tasks join while the listings are read; `close` says no more will."""

    def __init__(self) -> None:
        self._order: list[TrackedTask] = []  # newest first (settled ones linger until popped)
        self._by_id: dict[str, TrackedTask] = {}
        self._joined: dict[str, TrackedTask] = {}
        self._closed = False
        self._changed = asyncio.Event()

    def add(self, task: TrackedTask) -> None:
        """Wait for a look-up (once a cycle per task)."""
        if task.task_id in self._joined:
            return
        self._joined[task.task_id] = task
        self._by_id[task.task_id] = task
        bisect.insort(self._order, task, key=lambda t: -t.begin_ms)
        self._changed.set()

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    def joined(self) -> Iterable[TrackedTask]:
        """Every task that joined this cycle, taken or not."""
        return self._joined.values()

    def untaken(self) -> list[TrackedTask]:
        return list(self._by_id.values())

    def oldest(self) -> TrackedTask | None:
        while self._order and self._order[-1].task_id not in self._by_id:
            self._order.pop()
        return self._order[-1] if self._order else None

    def take_oldest(self) -> TrackedTask | None:
        task = self.oldest()
        if task is not None:
            del self._by_id[task.task_id]
        return task

    async def next_oldest(self) -> TrackedTask | None:
        """The oldest task waiting, once there is one; None once closed and empty."""
        while (task := self.take_oldest()) is None and not self._closed:
            self._changed.clear()
            await self._changed.wait()
        return task

    def settle(self, row: RecordingTask) -> bool:
        """Settle the task an ended row shows, if it is waiting and the row is its own."""
        task = self._by_id.get(row.task_id)
        if task is None or row.room_id != task.room_id or row.status.live:
            return False
        del self._by_id[row.task_id]
        return True

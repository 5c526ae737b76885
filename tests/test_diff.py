"""Each rule of the diff, as a pure function of tracking, observation and look-ups."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from exporter.poll.diff import NOT_FOUND, Lookup, LookupFailed, Snapshot, diff, needs_lookup
from exporter.state.changes import EventKind, Marks, TrackedTask, Tracking
from exporter.zego.limits import HORIZON_MS, MAX_RECORD_MS
from exporter.zego.models import RecordingTask, RecordStatus, TaskStatus

NOW = 1_700_000_000_000
MARGIN = 600_000
S = TaskStatus


def row(task_id: str, status: TaskStatus = S.RECORDING, begin: int = NOW - 60_000,
        room: str = "r1") -> RecordingTask:
    return RecordingTask(task_id, room, status, begin)


def snap(live: Sequence[RecordingTask] = (), ended: Sequence[RecordingTask] = (),
         at: int = NOW, consistent: bool = True) -> Snapshot:
    return Snapshot(at, {r.task_id: r for r in live}, {r.task_id: r for r in ended}, consistent)


def tracking(*tasks: RecordingTask, finished: Mapping[str, int] | None = None) -> Tracking:
    return Tracking(
        live={t.task_id: TrackedTask(t.task_id, t.room_id, t.status, t.begin_ms) for t in tasks},
        finished=dict(finished or {}),
        marks=Marks(ended_since_ms=NOW - 15_000 - MARGIN),
    )


def marked(state: Tracking, **marks: object) -> Tracking:
    """`state` with some of its marks (baseline, watermark) changed."""
    return replace(state, marks=replace(state.marks, **marks))  # type: ignore[arg-type]


def kinds(state: Tracking, snapshot: Snapshot, lookups: Mapping[str, Lookup] | None = None
          ) -> list[tuple[EventKind, str]]:
    result = diff(state, snapshot, lookups or {}, MARGIN)
    return [(e.kind, e.task_id) for e in result.events]


def status(task_id: str, value: TaskStatus, end: int | None = None) -> RecordStatus:
    return RecordStatus(task_id, "r1", value, NOW - 60_000, end, ())


def test_first_cycle_without_stored_state_is_a_baseline_not_starts() -> None:
    result = diff(Tracking(), snap([row("a"), row("b")], ended=[row("c", S.ENDED)]), {}, MARGIN)
    assert result.events == ()
    assert set(result.tracking.live) == {"a", "b"}
    assert "c" in result.tracking.finished
    assert result.tracking.has_baseline


def test_task_ended_before_the_baseline_is_not_counted_later() -> None:
    base = diff(Tracking(), snap(ended=[row("c", S.ENDED)]), {}, MARGIN).tracking
    assert kinds(base, snap(ended=[row("c", S.ENDED)], at=NOW + 15_000)) == []


def test_new_live_task_is_started() -> None:
    assert kinds(tracking(), snap([row("a")])) == [(EventKind.STARTED, "a")]


def test_a_started_task_seen_again_is_not_started_twice() -> None:
    assert kinds(tracking(row("a")), snap([row("a")])) == []


def test_initializing_to_recording_is_no_event() -> None:
    assert kinds(tracking(row("a", S.INITIALIZING)), snap([row("a", S.RECORDING)])) == []


def test_recording_to_paused_is_paused_and_back_is_resumed() -> None:
    assert kinds(tracking(row("a")), snap([row("a", S.PAUSED)])) == [(EventKind.PAUSED, "a")]
    assert kinds(tracking(row("a", S.PAUSED)), snap([row("a")])) == [(EventKind.RESUMED, "a")]


def test_task_missing_from_the_live_rows_needs_a_lookup_and_is_not_reported_ended() -> None:
    state = tracking(row("a"), row("b"))
    observed = snap([row("b")])
    assert needs_lookup(state, observed, MARGIN) == ["a"]
    result = diff(state, observed, {"a": LookupFailed.FAILED}, MARGIN)
    assert result.events == ()
    assert result.pending == ["a"]
    assert "a" in result.tracking.live


def test_lookup_ended_is_ended_with_its_real_duration() -> None:
    result = diff(tracking(row("a", begin=NOW - 100_000)), snap(),
                  {"a": status("a", S.ENDED, end=NOW - 40_000)}, MARGIN)
    assert [(e.kind, e.duration_s) for e in result.events] == [(EventKind.ENDED, 60.0)]
    assert "a" in result.tracking.finished and "a" not in result.tracking.live


def test_lookup_ended_abnormally_is_ended_and_ended_abnormally() -> None:
    assert kinds(tracking(row("a")), snap(), {"a": status("a", S.ENDED_ABNORMALLY, NOW)}) == [
        (EventKind.ENDED, "a"),
        (EventKind.ENDED_ABNORMALLY, "a"),
    ]


def test_lookup_still_live_is_page_drift_and_keeps_the_task() -> None:
    result = diff(tracking(row("a")), snap(), {"a": status("a", S.RECORDING)}, MARGIN)
    assert result.events == ()
    assert "a" in result.tracking.live


def test_page_drift_lookup_still_reports_a_pause() -> None:
    assert kinds(tracking(row("a")), snap(), {"a": status("a", S.PAUSED)}) == [
        (EventKind.PAUSED, "a")
    ]


def test_task_zego_does_not_know_is_lost() -> None:
    assert kinds(tracking(row("a")), snap(), {"a": NOT_FOUND}) == [(EventKind.LOST, "a")]


def test_task_beyond_the_three_day_horizon_is_lost_without_a_lookup() -> None:
    old = row("a", begin=NOW - HORIZON_MS)
    state = tracking(old)
    assert needs_lookup(state, snap(), MARGIN) == []
    assert kinds(state, snap()) == [(EventKind.LOST, "a")]


def test_short_task_between_cycles_is_started_and_ended() -> None:
    assert kinds(tracking(), snap(ended=[row("s", S.ENDED)])) == [
        (EventKind.STARTED, "s"),
        (EventKind.ENDED, "s"),
    ]


def test_short_task_ended_abnormally_between_cycles_counts_all_three() -> None:
    assert kinds(tracking(), snap(ended=[row("s", S.ENDED_ABNORMALLY)])) == [
        (EventKind.STARTED, "s"),
        (EventKind.ENDED, "s"),
        (EventKind.ENDED_ABNORMALLY, "s"),
    ]


def test_tracked_task_in_the_ended_rows_needs_no_lookup() -> None:
    state = tracking(row("a"))
    observed = snap(ended=[row("a", S.ENDED_ABNORMALLY)])
    assert needs_lookup(state, observed, MARGIN) == []
    assert kinds(state, observed) == [(EventKind.ENDED, "a"), (EventKind.ENDED_ABNORMALLY, "a")]


def test_task_in_both_listings_ended_between_the_reads() -> None:
    assert kinds(tracking(row("a")), snap([row("a")], ended=[row("a", S.ENDED)])) == [
        (EventKind.ENDED, "a")
    ]


def test_finished_task_listed_again_counts_nothing() -> None:
    state = tracking(finished={"a": NOW + HORIZON_MS})
    assert kinds(state, snap([row("a")], ended=[row("a", S.ENDED)])) == []


def test_finished_task_ids_are_forgotten_once_zego_can_no_longer_list_them() -> None:
    hour = 3_600_000
    edge = NOW - 2 * MARGIN - hour  # the watermark less a margin, less the live listing's grace
    finished = {"past-horizon": NOW - HORIZON_MS - MARGIN - 1, "26h": NOW - 26 * hour,
                "before-edge": edge - 1, "at-edge": edge, "10min": NOW - 600_000}
    # Learned an hour and two margins ago: listed live no more, and begun before the watermark.
    assert set(diff(tracking(finished=finished), snap(), {}, MARGIN).tracking.finished) == {
        "at-edge", "10min"}
    # After days down, the next Status=3 read starts at the stored watermark: a task begun since
    # then may be in it, and must stay known however old, up to ZEGO's 3 days.
    restarted = marked(tracking(finished=finished), ended_since_ms=NOW - 80 * hour)
    result = diff(restarted, snap(consistent=False), {}, MARGIN, max_lag_ms=None)
    assert set(result.tracking.finished) == {"26h", "before-edge", "at-edge", "10min"}


def test_a_finished_task_is_remembered_from_when_its_end_was_learned() -> None:
    """The cycle's last answer, not its start: a look-up late in a long cycle may see an end
    that came after the listings began, and a live listing may lag that end."""
    state = tracking(row("a"), row("b"), row("c"))
    result = diff(state, snap(ended=[row("a", S.ENDED)]), {"b": status("b", S.ENDED),
                                                           "c": NOT_FOUND},
                  MARGIN, learned_ms=NOW + 300_000)
    # "Does not exist" says nothing of when it ended: kept as if it recorded for 24 h.
    assert result.tracking.finished == {"a": NOW + 300_000, "b": NOW + 300_000,
                                        "c": NOW - 60_000 + MAX_RECORD_MS}
    baseline = diff(Tracking(), snap(ended=[row("d", S.ENDED)]), {}, MARGIN, learned_ms=NOW + 5)
    assert baseline.tracking.finished == {"d": NOW + 5}


def test_terminal_row_in_a_live_listing_is_treated_as_ended() -> None:
    assert kinds(tracking(row("a")), snap([row("a", S.ENDED)])) == [(EventKind.ENDED, "a")]


def test_ended_watermark_moves_only_after_a_consistent_listing() -> None:
    state = tracking()
    moved = diff(state, snap(at=NOW + 15_000), {}, MARGIN).tracking
    kept = diff(state, snap(at=NOW + 15_000, consistent=False), {}, MARGIN).tracking
    assert moved.marks.ended_since_ms == NOW + 15_000 - MARGIN
    assert kept.marks.ended_since_ms == state.marks.ended_since_ms


def test_events_carry_the_room_of_the_task() -> None:
    result = diff(tracking(), snap([row("a", room="lobby")]), {}, MARGIN)
    assert [e.room_id for e in result.events] == ["lobby"]


def test_one_lifecycle_counts_each_event_exactly_once() -> None:
    state = tracking()
    cycle = [
        (snap([row("t", S.INITIALIZING)], at=NOW), {}),
        (snap([row("t")], at=NOW + 15_000), {}),
        (snap([row("t", S.PAUSED)], at=NOW + 30_000), {}),
        (snap([], at=NOW + 45_000), {"t": LookupFailed.FAILED}),
        (snap([row("t")], at=NOW + 60_000), {}),
        (snap([], at=NOW + 75_000), {"t": status("t", S.ENDED_ABNORMALLY, NOW + 70_000)}),
        (snap([], ended=[row("t", S.ENDED_ABNORMALLY)], at=NOW + 90_000), {}),
    ]
    seen: list[EventKind] = []
    for observed, lookups in cycle:
        result = diff(state, observed, lookups, MARGIN)
        state = result.tracking
        seen += [e.kind for e in result.events]
    assert seen == [
        EventKind.STARTED,
        EventKind.PAUSED,
        EventKind.RESUMED,
        EventKind.ENDED,
        EventKind.ENDED_ABNORMALLY,
    ]


def test_a_listing_older_than_a_callback_flip_does_not_flip_it_back() -> None:
    # A callback paused "a" while this cycle's listing (taken earlier) still showed it recording.
    state = tracking(row("a", S.PAUSED))
    result = diff(state, snap([row("a", S.RECORDING)]), {}, MARGIN, fresher={"a"})
    assert result.events == ()
    assert result.tracking.live["a"].status is S.PAUSED
    looked_up = diff(state, snap(), {"a": status("a", S.RECORDING)}, MARGIN, fresher={"a"})
    assert looked_up.events == ()


def test_a_task_a_callback_tracked_during_the_cycle_is_neither_pending_nor_ended() -> None:
    # A pause callback tracked "a" after this cycle's listings were read (it began after them):
    # no page shows it and no look-up was asked. Nothing is pending: the cycle has not failed.
    state = tracking(row("a", S.PAUSED))
    result = diff(state, snap(), {}, MARGIN, fresher={"a"})
    assert result.pending == [] and result.events == ()
    assert result.tracking.live["a"].status is S.PAUSED
    assert diff(state, snap(), {}, MARGIN).pending == ["a"]  # not fresher: its look-up failed


def test_a_fresher_task_still_ends_when_the_listing_says_so() -> None:
    state = tracking(row("a", S.PAUSED))
    result = diff(state, snap(ended=[row("a", S.ENDED)]), {}, MARGIN, fresher={"a"})
    assert [e.kind for e in result.events] == [EventKind.ENDED]


def test_a_row_naming_a_tracked_task_under_another_room_is_not_news_about_it() -> None:
    state = tracking(row("a", room="r1"))
    observed = snap(ended=[row("a", S.ENDED_ABNORMALLY, room="r2")])
    assert needs_lookup(state, observed, MARGIN) == ["a"]
    assert kinds(state, observed, {"a": LookupFailed.FAILED}) == []
    wrong_room = RecordStatus("a", "r2", S.ENDED_ABNORMALLY, NOW - 60_000, NOW, ())
    assert kinds(state, snap(), {"a": wrong_room}) == []
    listed_elsewhere = snap([row("a", room="r2")])  # live there, absent from its own room
    assert needs_lookup(state, listed_elsewhere, MARGIN) == ["a"]
    assert kinds(state, listed_elsewhere, {"a": status("a", S.ENDED)}) == [(EventKind.ENDED, "a")]


def test_a_task_a_callback_finished_before_the_baseline_stays_finished() -> None:
    # The baseline listing was read before the task died; its callback was counted meanwhile.
    state = Tracking(finished={"a": NOW + HORIZON_MS})
    result = diff(state, snap([row("a")]), {}, MARGIN)
    assert "a" not in result.tracking.live
    assert "a" in result.tracking.finished


def test_a_room_the_baseline_does_not_cover_gets_a_baseline_of_its_own() -> None:
    state = marked(tracking(), rooms=frozenset({"r1"}))
    result = diff(state, snap([row("old", room="r2"), row("new", room="r1")],
                              ended=[row("done", S.ENDED_ABNORMALLY, room="r2")]),
                  {}, MARGIN, scope=frozenset({"r1", "r2"}))
    assert [(e.kind, e.task_id) for e in result.events] == [(EventKind.STARTED, "new")]
    assert {"old", "new"} <= set(result.tracking.live)
    assert "done" in result.tracking.finished
    assert result.tracking.marks.rooms == {"r1", "r2"}


def test_an_inconsistent_cycle_leaves_the_watermark_behind_at_most_max_lag() -> None:
    state = marked(tracking(), ended_since_ms=NOW - 3_600_000)
    result = diff(state, snap(consistent=False), {}, MARGIN, max_lag_ms=750_000)
    assert result.tracking.marks.ended_since_ms == NOW - 750_000


def test_a_task_the_baselines_listing_missed_is_tracked_not_started() -> None:
    # Page drift skipped "early" in the baseline's listing; it shows up a cycle later.
    base = diff(Tracking(), snap([row("a")]), {}, MARGIN).tracking
    assert base.marks.baseline_ms == NOW
    later = snap([row("a"), row("early", begin=NOW - 1), row("new", begin=NOW + 1)],
                 ended=[row("gone", S.ENDED_ABNORMALLY, begin=NOW - 5_000)], at=NOW + 15_000)
    result = diff(base, later, {}, MARGIN)
    assert [(e.kind, e.task_id) for e in result.events] == [
        (EventKind.STARTED, "new"),
        (EventKind.ENDED, "gone"), (EventKind.ENDED_ABNORMALLY, "gone")]
    assert {"early", "new"} <= set(result.tracking.live)
    # Its end is real and counts.
    ended = diff(result.tracking, snap([row("a"), row("new", begin=NOW + 1)],
                                       ended=[row("early", S.ENDED, begin=NOW - 1)],
                                       at=NOW + 30_000), {}, MARGIN)
    assert [(e.kind, e.task_id) for e in ended.events] == [(EventKind.ENDED, "early")]


def test_a_room_added_later_counts_starts_from_its_own_baseline() -> None:
    state = marked(tracking(), rooms=frozenset({"r1"}), baseline_ms=NOW - 3_600_000)
    first = diff(state, snap([row("seen", room="r2")]), {}, MARGIN,
                 scope=frozenset({"r1", "r2"})).tracking
    assert first.marks.room_baselines_ms == {"r2": NOW}
    later = snap([row("seen", room="r2"), row("missed", begin=NOW - 10, room="r2"),
                  row("new", begin=NOW + 10, room="r2"), row("r1-task", begin=NOW - 10)],
                 at=NOW + 15_000)
    result = diff(first, later, {}, MARGIN, scope=frozenset({"r1", "r2"}))
    assert sorted((e.kind.value, e.task_id) for e in result.events) == [
        ("started", "new"), ("started", "r1-task")]
    # A room dropped from the config forgets its baseline (re-added, it gets a new one).
    dropped = diff(result.tracking, snap(at=NOW + 30_000), {}, MARGIN, scope=frozenset({"r1"}))
    assert dropped.tracking.marks.room_baselines_ms == {}


def test_a_switch_from_a_room_list_to_all_rooms_baselines_the_new_rooms_now() -> None:
    state = marked(tracking(), rooms=frozenset({"r1"}), baseline_ms=NOW - 36_000_000)
    first = diff(state, snap([row("seen", room="r2")]), {}, MARGIN, scope=None).tracking
    assert first.marks.baseline_ms == NOW
    assert first.marks.room_baselines_ms == {"r1": NOW - 36_000_000}
    later = snap([row("seen", room="r2"), row("missed", begin=NOW - 10, room="r2"),
                  row("r1-task", begin=NOW - 10)], at=NOW + 15_000)
    result = diff(first, later, {}, MARGIN, scope=None)
    assert [(e.kind, e.task_id) for e in result.events] == [(EventKind.STARTED, "r1-task")]


def test_a_task_first_seen_paused_counts_its_start_and_its_pause() -> None:
    """ZEGO's tasks go 1 → 2 → 5: one first seen in 5 paused since the last cycle."""
    assert kinds(tracking(), snap([row("p", S.PAUSED)])) == [(EventKind.STARTED, "p"),
                                                              (EventKind.PAUSED, "p")]


def test_a_task_the_baseline_missed_first_seen_paused_counts_nothing() -> None:
    state = marked(tracking(), baseline_ms=NOW - 30_000)
    result = diff(state, snap([row("p", S.PAUSED, begin=NOW - 60_000)]), {}, MARGIN)
    assert result.events == ()
    assert result.tracking.live["p"].status is S.PAUSED


def test_a_task_a_callback_tracked_takes_its_begin_from_the_first_listing() -> None:
    """A callback cannot say when a task began; polling recognises its events and corrects it."""
    state = tracking()
    state = replace(state, live={"c": TrackedTask("c", "r1", S.PAUSED, NOW - 5_000)})
    result = diff(state, snap([row("c", S.PAUSED, begin=NOW - 90_000)]), {}, MARGIN)
    assert result.events == ()
    assert result.changes.tracked == {"c": TrackedTask("c", "r1", S.PAUSED, NOW - 90_000)}


def test_a_change_set_names_exactly_what_changed() -> None:
    state = tracking(row("same"), row("pauses"), row("ends"), finished={"old": NOW - HORIZON_MS})
    result = diff(state, snap([row("same"), row("pauses", S.PAUSED), row("new")],
                              ended=[row("ends", S.ENDED)]), {}, MARGIN)
    changes = result.changes
    assert set(changes.tracked) == {"pauses", "new"}
    assert changes.untracked == {"ends"}
    assert changes.finished == {"ends": NOW}
    assert changes.forgotten == {"old"}
    assert changes.observed_ms == NOW
    assert changes.marks is not None and changes.marks.ended_since_ms == NOW - MARGIN
    assert sorted((e.kind.value, e.task_id) for e in changes.events) == [
        ("ended", "ends"), ("paused", "pauses"), ("started", "new")]

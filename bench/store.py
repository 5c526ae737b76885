"""The state file's cost at scale: `python -m bench.store --rooms 10000` prints how long a save
takes on the event loop, the first one (everything), one after nothing changed, one after a
callback's change (the daemon writes those at most once a second), one after a cycle that
changed 1 % of the live tasks, and the apply and save of a busy cycle (5 % of the live tasks
end, as many start). Saves write only the rows that changed; finding them is the cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from exporter.logs import configure_logging
from exporter.state.changes import (
    AwaitedUpload,
    ChangeSet,
    EventKind,
    Marks,
    Source,
    TaskEvent,
    TrackedTask,
)
from exporter.state.model import AppState
from exporter.state.store import Store
from exporter.zego.models import TaskStatus


def _timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run(rooms: int, live: int, finished: int, repeat: int = 20) -> dict[str, float | int]:
    configure_logging("error", "logfmt", sys.stderr)  # the counted events' lines: not figures
    names = tuple(f"room-{i:05d}" for i in range(rooms))
    app = AppState(1, names, max_rooms=rooms, callbacks=True)
    tasks = {f"live-{i:07d}": TrackedTask(f"live-{i:07d}", names[i % rooms],
                                          TaskStatus.RECORDING, 1_700_000_000_000 + i)
             for i in range(live)}
    done = {f"done-{i:07d}": 1_700_000_000_000 + i for i in range(finished)}
    app.apply(ChangeSet(Source.POLL, 1, tracked=tasks, finished=done,
                        marks=Marks(1, None, 1, dict.fromkeys(names, 1))))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "state.db")
        first = _timed(lambda: store.save(app))
        unchanged = min(_timed(lambda: store.save(app)) for _ in range(repeat))
        by_callback = []
        ids = iter(list(tasks))
        for _ in range(repeat):
            task_id = next(ids)
            ended = TaskEvent(EventKind.ENDED, task_id, tasks[task_id].room_id, Source.CALLBACK,
                              60.0)
            app.apply(ChangeSet(Source.CALLBACK, 1_700_000_100_000, (ended,),
                                untracked=frozenset({task_id}),
                                finished={task_id: 1_700_000_100_000}))  # as a callback does
            by_callback.append(_timed(lambda: store.save(app)))
        saved = AppState(1, names, max_rooms=rooms)
        Store(Path(tmp) / "state.db").load(saved)
        assert saved.tracking == app.tracking, "the file must hold what was saved"
        changed = {task_id: replace(task, status=TaskStatus.PAUSED)
                   for task_id, task in list(app.tracking.live.items())[::100]}
        app.apply(ChangeSet(Source.POLL, 1_700_000_200_000, tracked=changed))
        after_cycle = _timed(lambda: store.save(app))
        # A cycle at 10,000 busy rooms: about 5 % of the live tasks end and as many start.
        ending = list(app.tracking.live)[:live // 20]
        by_id = app.tracking.live
        new = {f"new-{i:07d}": TrackedTask(f"new-{i:07d}", names[(7 * i) % rooms],
                                           TaskStatus.RECORDING, 1_700_000_300_000)
               for i in range(len(ending))}
        cycle = ChangeSet(
            Source.POLL, 1_700_000_300_000,
            (*(TaskEvent(EventKind.ENDED, t, by_id[t].room_id, duration_s=60.0) for t in ending),
             *(TaskEvent(EventKind.STARTED, t, task.room_id) for t, task in new.items())),
            tracked=new, untracked=frozenset(ending),
            finished=dict.fromkeys(ending, 1_700_000_300_000),
            awaited={t: AwaitedUpload(by_id[t].room_id, 1_700_000_300_000) for t in ending},
            observed_ms=1_700_000_300_000)
        applied = _timed(lambda: app.apply(cycle))
        after_busy_cycle = _timed(lambda: store.save(app))
        store.close()
    by_callback.sort()
    return {"rooms": rooms, "live_tasks": live, "finished_ids": finished,
            "first_save_s": first, "unchanged_save_s": unchanged,
            "callback_save_p50_s": by_callback[len(by_callback) // 2],
            "cycle_save_1pct_s": after_cycle, "busy_cycle_apply_s": applied,
            "busy_cycle_save_s": after_busy_cycle}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--live", type=int, help="live tasks (default 5 × rooms)")
    parser.add_argument("--finished", type=int, help="finished ids (default 10 × rooms)")
    args = parser.parse_args(argv)
    figures = run(args.rooms, args.live or 5 * args.rooms, args.finished or 10 * args.rooms)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

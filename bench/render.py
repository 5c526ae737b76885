"""The /metrics render alone: `python -m bench.render --rooms 10000 --changes 1` prints what the
first render takes, what a render after `--changes` callbacks' changes takes (median of
`--renders`), the body's size gzipped against one gzip member, and peak RSS.

A synthetic state in one process, no HTTP: R configured rooms with callbacks on, 5 × R live
tasks, and every event kind counted once in every room (so that every counter has an exemplar:
the worst case for memory). A change is an abnormal-end callback's: one task untracked, one
event counted, in a random room. Renders run on the calling thread, in OpenMetrics only (what
Prometheus asks for).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import resource
import statistics
import sys
import time

from prometheus_client.exposition import choose_encoder

from exporter.logs import configure_logging
from exporter.serve.collector import ExporterCollector
from exporter.serve.exposition import PROMETHEUS_ACCEPT, ExpositionCache, split_registry
from exporter.state.changes import ChangeSet, EventKind, Source, TaskEvent, TrackedTask
from exporter.state.model import ExporterState
from exporter.zego.models import TaskStatus


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(rooms: int, changes: int, renders: int, seed: int = 1) -> dict[str, float | int]:
    configure_logging("error", "logfmt", sys.stderr)  # the counted events' lines: not figures
    names = tuple(f"room-{i:05d}" for i in range(rooms))
    state = ExporterState.for_apps([(1, names, rooms)], callbacks=frozenset({1}),
                                   persistent=False)
    app = state.apps[1]
    live = [f"live-{i}" for i in range(5 * rooms)]
    app.apply(ChangeSet(
        Source.POLL, 1_700_000_000_000,
        tuple(TaskEvent(kind, f"t{i}-{kind.value}", room) for i, room in enumerate(names)
              for kind in EventKind),
        tracked={t: TrackedTask(t, names[i % rooms], TaskStatus.RECORDING, 0)
                 for i, t in enumerate(live)}))
    state_mb = _peak_mb()
    cache = ExpositionCache(*split_registry(ExporterCollector(state, {}, 15.0), []),
                            in_thread=False, accepts=(PROMETHEUS_ACCEPT,))
    content_type = choose_encoder(PROMETHEUS_ACCEPT)[1]
    begun = time.perf_counter()
    await cache.get(content_type)
    first = time.perf_counter() - begun
    rng = random.Random(seed)
    times = []
    for render in range(renders):
        for change in range(changes):
            task = live.pop(rng.randrange(len(live)))
            room = names[int(task.removeprefix("live-")) % rooms]
            app.apply(ChangeSet(Source.CALLBACK, 1_700_000_100_000 + render, (TaskEvent(
                EventKind.ENDED_ABNORMALLY, f"cb-{render}-{change}", room, Source.CALLBACK),),
                untracked=frozenset({task})))
        cache.invalidate()
        begun = time.perf_counter()
        await cache.get(content_type)
        times.append(time.perf_counter() - begun)
    peak_mb = _peak_mb()  # before the size check below inflates the body
    body = (await cache.get(content_type)).gzipped
    text = gzip.decompress(body)
    return {"rooms": rooms, "changes_per_render": changes, "renders": renders,
            "first_render_s": first, "render_after_changes_p50_s": statistics.median(times),
            "text_bytes": len(text), "gzip_bytes": len(body),
            "gzip_to_one_member": len(body) / len(gzip.compress(text, 6)),
            "state_peak_rss_mb": state_mb, "peak_rss_mb": peak_mb}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__)
    parser.add_argument("--rooms", type=int, default=10_000)
    parser.add_argument("--changes", type=int, default=1, help="callbacks' changes per render")
    parser.add_argument("--renders", type=int, default=20)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args.rooms, args.changes, args.renders)), indent=1))


if __name__ == "__main__":
    main()

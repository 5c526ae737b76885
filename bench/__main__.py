"""`python -m bench --rooms 1000`: the exporter against the simulator over loopback, measured.

Prints requests per cycle against the workload's minimum, abnormal-end detection latency,
budget use, /metrics scrape time against prometheus_client's generate_latest on the same series,
CPU per cycle, peak RSS and the diff's cost per task. bench/README.md explains every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import multiprocessing
import queue
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp

from bench import rig
from bench.probe import bare_main, decoded, probe_main, scrape
from exporter.demo import free_port

ABNORMAL_LINE = re.compile(
    rb"^zego_cloudrecord_tasks_ended_abnormally_total\{[^}]*\} ([0-9.e+]+)", re.MULTILINE)
CALLBACKS_LINE = re.compile(
    rb"^zego_cloudrecord_callbacks_total\{[^}]*\} ([0-9.e+]+)", re.MULTILINE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rooms", type=int, default=100, help="rooms of the app (default 100)")
    parser.add_argument("--tasks", type=int, help="live tasks in steady state (default 5 × rooms)")
    parser.add_argument("--cycles", type=int, default=4,
                        help="poll cycles, the baseline included (default 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--all-rooms", action="store_true",
                        help="configure rooms \"*\" (app-wide) instead of listing the rooms")
    parser.add_argument("--speed", type=float,
                        help="clock acceleration (default 10 at 10 requests/s)")
    parser.add_argument("--pacing", type=float, default=0.8,
                        help="the exporter's zego.pacing (default 0.8: see bench/README.md)")
    parser.add_argument("--rate-limit", type=int, default=10,
                        help="DescribeTasks requests/s per app, both sides (default 10)")
    parser.add_argument("--poll-interval", type=float, default=15.0, help="simulated seconds")
    parser.add_argument("--scrape-interval", type=float, default=2.0,
                        help="simulated seconds between scrapes (default 2)")
    parser.add_argument("--mean-duration", type=float, default=1800.0,
                        help="mean recording length, simulated seconds (default 1800)")
    parser.add_argument("--abnormal", type=float, default=0.2,
                        help="probability that a recording ends abnormally (default 0.2)")
    parser.add_argument("--callbacks", action="store_true",
                        help="the simulator also sends ZEGO's recording callbacks to the exporter")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    return parser


def auto_speed(args: argparse.Namespace) -> float:
    """Fast enough to keep a run short, slow enough that loop jitter stays well inside the
    pacing's margin: 10 at 10 requests/s up to 25,000 live tasks, slower in proportion above
    (5 at 50,000): a bigger simulator answers each page more slowly, and its delays, like all
    real-time jitter, are multiplied by the speed."""
    tasks = args.tasks if args.tasks is not None else 5 * args.rooms
    return float(max(1.0, min(10.0, 100.0 / args.rate_limit, 10.0 * 25_000 / max(tasks, 1))))


def generate_latest_seconds(text: str, budget_s: float = 3.0) -> tuple[list[float], int]:
    """prometheus_client's own generate_latest on the families of `text`: times and samples."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector, CollectorRegistry

    families = list(text_string_to_metric_families(text))

    class Parsed(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Parsed())
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 5 or (len(times) < 50 and time.perf_counter() < deadline):
        begun = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - begun)
    return times, sum(len(f.samples) for f in families)


def diff_seconds(tasks: int) -> float:
    """One diff over `tasks` tracked tasks (1 % change status, 1 % end, 1 % are new); best of 3."""
    from exporter.poll.diff import Snapshot, diff
    from exporter.state.changes import Marks, TrackedTask, Tracking
    from exporter.zego.models import RecordingTask, TaskStatus

    now_ms = 1_750_000_000_000
    live = {f"t{i}": TrackedTask(f"t{i}", f"room-{i % 1000}", TaskStatus.RECORDING,
                                 now_ms - 60_000) for i in range(tasks)}
    rows = {}
    ended = {}
    for i in range(tasks + tasks // 100):
        task_id = f"t{i}"
        status = TaskStatus.PAUSED if i % 100 == 1 else TaskStatus.RECORDING
        row = RecordingTask(task_id, f"room-{i % 1000}", status, now_ms - 60_000)
        if i % 100 == 2:
            ended[task_id] = RecordingTask(task_id, row.room_id, TaskStatus.ENDED, row.begin_ms)
        else:
            rows[task_id] = row
    snapshot = Snapshot(taken_ms=now_ms, live=rows, ended=ended)
    best = math.inf
    for _ in range(3):
        tracking = Tracking(live=dict(live), marks=Marks(ended_since_ms=now_ms - 15_000))
        begun = time.perf_counter()
        diff(tracking, snapshot, {}, 600_000)
        best = min(best, time.perf_counter() - begun)
    return best


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


async def drive(args: argparse.Namespace, workload: rig.Workload) -> dict[str, Any]:
    sim_ports = multiprocessing.get_context("spawn").Queue()
    events = multiprocessing.get_context("spawn").Queue()
    stop = multiprocessing.get_context("spawn").Event()
    loop = asyncio.get_running_loop()
    wall_begun = time.perf_counter()
    sim = rig.spawn(rig.simulator_main, workload, sim_ports, stop)
    exporter = None
    try:
        sim_port = await loop.run_in_executor(None, sim_ports.get, True, 600)
        sim_url = f"http://127.0.0.1:{sim_port}/"
        exporter = rig.spawn(rig.exporter_main, workload, sim_url, events, stop)
        kind, ready = await loop.run_in_executor(None, events.get, True, 600)
        assert kind == "ready", kind
        return await _measure(args, workload, sim_url, ready, events, wall_begun)
    finally:
        stop.set()
        for process in (exporter, sim):
            if process is not None:
                process.join(10)
                if process.is_alive():
                    process.kill()


async def _measure(args: argparse.Namespace, workload: rig.Workload, sim_url: str,
                   ready: dict[str, Any], events: Any, wall_begun: float) -> dict[str, Any]:
    clock = workload.clock()
    metrics_url = f"http://127.0.0.1:{ready['port']}/metrics"
    cycles: list[dict[str, Any]] = []
    visible: dict[int, float] = {}  # cycle index -> when its render was ready
    scrape_times: list[float] = []
    scrape_started: list[float] = []
    bare_times: list[float] = []  # the same body from a bare server, scraped right after each
    gzip_answers = 0
    bare_url: str | None = None
    bare: multiprocessing.process.BaseProcess | None = None
    done: dict[str, Any] | None = None
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        next_scrape = clock.time()
        probes: list[float] = []
        prober: multiprocessing.process.BaseProcess | None = None
        probe_stop = multiprocessing.get_context("spawn").Event()
        probe_out = multiprocessing.get_context("spawn").Queue()
        bare_stop = multiprocessing.get_context("spawn").Event()
        while done is None:
            while True:
                try:
                    kind, payload = events.get_nowait()
                except queue.Empty:
                    break
                if kind == "cycle":
                    cycles.append(payload)
                elif kind == "visible":
                    visible[payload["cycle"]] = payload["at"]
                elif kind == "done":
                    done = payload
            if (cycles and prober is None and workload.callback_port is not None
                    and not workload.all_rooms):
                prober = rig.spawn(probe_main, workload,
                                   f"http://127.0.0.1:{workload.callback_port}/callback",
                                   metrics_url, probe_out, probe_stop)
            # Scraping starts once the first cycle is done (the exporter is ready), on a
            # connection one untimed scrape opened: Prometheus keeps its connection open, and
            # a first request's one-time costs made it the slowest but one of 170 (14 ms).
            # The bare server answers with that scrape's body, warmed the same way.
            if cycles and bare_url is None:
                _, body, encoding = await scrape(session, metrics_url)
                headers = {"Content-Type": "text/plain"}
                if encoding:
                    headers["Content-Encoding"] = encoding
                bare_port = multiprocessing.get_context("spawn").Queue()
                bare = rig.spawn(bare_main, body, headers, bare_port, bare_stop)
                port = await asyncio.get_running_loop().run_in_executor(
                    None, bare_port.get, True, 60)
                bare_url = f"http://127.0.0.1:{port}/metrics"
                await scrape(session, bare_url)
            if cycles and (clock.time() >= next_scrape or done is not None):
                scrape_started.append(clock.time())
                seconds, body, encoding = await scrape(session, metrics_url)
                scrape_times.append(seconds)
                gzip_answers += encoding == "gzip"
                assert bare_url is not None
                bare_times.append((await scrape(session, bare_url))[0])
                next_scrape = clock.time() + args.scrape_interval
            await asyncio.sleep(min(0.05, args.scrape_interval / workload.speed))
        assert done is not None
        if prober is not None:
            probe_stop.set()
            probes = await asyncio.get_running_loop().run_in_executor(
                None, probe_out.get, True, 60)
            prober.join(10)
        bare_stop.set()
        if bare is not None:
            bare.join(10)
        _, body, encoding = await scrape(session, metrics_url)
        last_text = decoded(body, encoding)
        last_gzip = len(body) if encoding == "gzip" else None
        async with session.get(f"{sim_url}_sim/stats") as r:
            stats = await r.json()
        async with session.get(f"{sim_url}_bench/lag") as r:
            sim_lag = await r.json()
        # Asked once, at the end (it walks every room): the last cycle's window.
        ended_from_ms = int(cycles[-2]["started"] * 1000) if len(cycles) > 1 else 0
        async with session.get(f"{sim_url}_bench/minimum",
                               params={"ended_from_ms": str(ended_from_ms)}) as r:
            minimum = await r.json()
        window = (cycles[0]["ended"], cycles[-1]["started"])
        async with session.get(f"{sim_url}_bench/abnormal",
                               params={"since": str(window[0])}) as r:
            ended = await r.json()
            ends = [(task_id, at) for task_id, at, _ in ended]
            begun = {task_id: begin for task_id, _, begin in ended}
    # An end is on /metrics once the render after the cycle that counted it is ready.
    counted_at = {task_id: visible.get(i, c["ended"])
                  for i, c in enumerate(cycles) for task_id in c["abnormal"]}
    counted_at.update((task_id, at) for c in (*cycles, done)
                      for task_id, at in c["by_callback"])
    latencies, missed = rig.detection_latencies(ends, counted_at, scrape_started, window)
    shown = sum(float(v) for v in ABNORMAL_LINE.findall(last_text))
    baseline, samples = generate_latest_seconds(last_text.decode())
    by_action = stats["by_action"]
    describe = by_action.get("DescribeTasks", {})
    lookups = by_action.get("DescribeRecordStatus", {})
    polled_s = cycles[-1]["ended"] - cycles[0]["started"]
    extended = sum(c["extended_pages"] for c in cycles)
    steady = cycles[1:] or cycles
    # A cycle can take no less than its busier Action's requests at the paced rate.
    per_second = workload.rate_limit * workload.pacing
    floors = [max(c["requests"] - c["lookups"], c["lookups"]) / per_second for c in steady]
    cycle_mean = _mean([c["ended"] - c["started"] for c in steady])
    floor_mean = _mean(floors)
    needed = sum(c["lookups_needed"] for c in cycles)
    cpu = [b["cpu"] - a["cpu"] for a, b in itertools.pairwise(cycles)]
    first, last = cycles[0], cycles[-1]
    render_cpu_share = ((last["render_cpu"] - first["render_cpu"]) / (last["real"] - first["real"])
                        if last.get("render_cpu") is not None and last["real"] > first["real"]
                        else None)
    scrape_p99 = rig.percentile(scrape_times, 0.99)
    generate_p99 = rig.percentile(baseline, 0.99)
    diff_sizes = sorted({max(1, workload.tasks // 4), max(1, workload.tasks // 2), workload.tasks})
    diff_costs = {n: diff_seconds(n) for n in diff_sizes}
    plans = sorted({c["plan"] for c in cycles[1:]} or {cycles[0]["plan"]})
    minimum_key = "app_wide" if plans == ["app-wide"] else "per_room"
    return {
        "rooms": workload.rooms,
        "tasks": workload.tasks,
        "tasks_live_seen": minimum["live"],
        "cycles": len(cycles),
        "cycles_ok": sum(1 for c in cycles if c["ok"]),
        "seed": workload.seed,
        "callbacks": workload.callback_port is not None,
        "callbacks_per_second": sum(float(v) for v in CALLBACKS_LINE.findall(last_text))
        / polled_s if polled_s > 0 else None,
        "speed": workload.speed,
        "plan": "+".join(plans),
        "requests_per_cycle": describe.get("requests", 0) / len(cycles),
        "listing_requests_per_cycle": (describe.get("requests", 0) - extended) / len(cycles),
        "extended_read_pages_per_cycle": extended / len(cycles),
        "lookups_per_cycle": lookups.get("requests", 0) / len(cycles),
        "lookups_needed_per_cycle": needed / len(cycles),
        "lookups_per_needed": sum(c["lookups"] for c in cycles) / needed if needed else None,
        "min_requests_per_cycle": minimum[minimum_key],
        "min_requests_per_cycle_per_room": minimum["per_room"],
        "min_requests_per_cycle_app_wide": minimum["app_wide"],
        "cycle_seconds": cycle_mean,
        "cycle_floor_seconds": floor_mean,
        "cycle_to_floor": cycle_mean / floor_mean
        if cycle_mean is not None and floor_mean else None,
        "detection_latency_p50_s": rig.percentile(latencies, 0.5),
        "detection_latency_p99_s": rig.percentile(latencies, 0.99),
        "abnormal_ends": len(latencies),
        "abnormal_ends_missed": len(missed),
        "abnormal_ends_missed_begun_before_baseline": sum(
            1 for task_id in missed
            if (begin := begun.get(task_id)) is not None and begin < cycles[0]["started"]),
        "abnormal_counted_on_metrics": shown,
        "rate_limit": workload.rate_limit,
        "budget_use": describe.get("requests", 0) / polled_s / workload.rate_limit
        if polled_s > 0 else None,
        "max_requests_in_a_second": describe.get("max_per_second", 0),
        "departed_max_in_a_second": done["departed_max_in_a_second"],
        "rate_limited_answers": stats["rate_limited"],
        "rate_limited_by_action": {action: figures["rate_limited"]
                                   for action, figures in by_action.items()},
        "series": samples,
        "metrics_bytes": len(last_text),
        "metrics_gzip_bytes": last_gzip,
        "scrapes": len(scrape_times),
        "scrapes_gzip": gzip_answers,
        "scrape_p50_s": rig.percentile(scrape_times, 0.5),
        "scrape_p99_s": scrape_p99,
        "bare_scrape_p50_s": rig.percentile(bare_times, 0.5),
        "bare_scrape_p99_s": rig.percentile(bare_times, 0.99),
        "generate_latest_p50_s": rig.percentile(baseline, 0.5),
        "generate_latest_p99_s": generate_p99,
        "scrape_to_generate_latest_p99": scrape_p99 / generate_p99
        if scrape_p99 is not None and generate_p99 else None,
        "cpu_seconds_per_cycle": _mean(cpu),
        "callback_probes": len(probes),
        "callback_to_metrics_p50_ms": _ms(rig.percentile(probes, 0.5)),
        "callback_to_metrics_p99_ms": _ms(rig.percentile(probes, 0.99)),
        "callback_to_metrics_max_ms": _ms(max(probes, default=None)),
        "renders_per_cycle": (last["renders"] - first["renders"]) / (len(cycles) - 1)
        if len(cycles) > 1 else None,
        "render_cpu_share": render_cpu_share,
        "peak_rss_mb": done["peak_rss_bytes"] / 2**20,
        "gc_full_collections": len(done["gc_pauses"]),
        "gc_pause_max_s": done["gc_pause_max"],
        "loop_lag_p99_s": rig.percentile(done["loop_lags"], 0.99),
        "loop_lag_max_s": max(done["loop_lags"], default=None),
        "simulator_lag_p99_s": sim_lag["p99"], "simulator_lag_max_s": sim_lag["max"],
        "simulator_priority": sim_lag["priority"],
        "diff_seconds": {str(n): s for n, s in diff_costs.items()},
        "diff_us_per_task": {str(n): s / n * 1e6 for n, s in diff_costs.items()},
        "wall_seconds": time.perf_counter() - wall_begun,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}{unit}"
    return f"{value}{unit}"


def table(r: dict[str, Any]) -> str:
    sizes = list(r["diff_seconds"])
    rows = [
        ("workload", f"{r['rooms']} rooms, {r['tasks']} tasks ({_fmt(r['tasks_live_seen'])} live "
                     f"at the end), {r['cycles']} cycles ({r['cycles_ok']} ok), seed {r['seed']},"
                     f" clock ×{_fmt(r['speed'])}{', callbacks on' if r['callbacks'] else ''}"),
        ("plan", r["plan"]),
        ("DescribeTasks requests / cycle", f"{_fmt(r['requests_per_cycle'], digits=5)}: "
         f"listing {_fmt(r['listing_requests_per_cycle'], digits=5)} (minimum: per-room "
         f"{_fmt(r['min_requests_per_cycle_per_room'], digits=5)}, app-wide "
         f"{_fmt(r['min_requests_per_cycle_app_wide'], digits=5)}) + extended read "
         f"{_fmt(r['extended_read_pages_per_cycle'], digits=4)}"),
        ("DescribeRecordStatus / cycle", f"{_fmt(r['lookups_per_cycle'], digits=5)} (for tasks "
         f"the complete listings missed: {_fmt(r['lookups_needed_per_cycle'], digits=5)}; made "
         f"/ needed {_fmt(r['lookups_per_needed'])})"),
        ("cycle length", f"{_fmt(r['cycle_seconds'], ' s')} (simulated; floor "
         f"{_fmt(r['cycle_floor_seconds'], ' s')}, cycle / floor {_fmt(r['cycle_to_floor'])})"),
        ("abnormal end -> /metrics", f"p50 {_fmt(r['detection_latency_p50_s'], ' s')}, p99 "
         f"{_fmt(r['detection_latency_p99_s'], ' s')} (simulated; {r['abnormal_ends']} ends, "
         f"{r['abnormal_ends_missed']} not shown, of which "
         f"{r['abnormal_ends_missed_begun_before_baseline']} begun before the baseline)"),
        ("budget use", f"{_fmt(r['budget_use'])} of {r['rate_limit']}/s; busiest second "
         f"{r['max_requests_in_a_second']} (as sent: {r['departed_max_in_a_second']}); "
         f"300000003 answers {r['rate_limited_answers']} "
         f"{r['rate_limited_by_action']}"),
        ("simulator", f"woke late by p99 {_fmt(_ms(r['simulator_lag_p99_s']), ' ms')}, worst "
         f"{_fmt(_ms(r['simulator_lag_max_s']), ' ms')} (real); priority "
         f"{r['simulator_priority']}"),
        ("/metrics scrape", f"p50 {_fmt(r['scrape_p50_s'] * 1000, ' ms')}, p99 "
         f"{_fmt(r['scrape_p99_s'] * 1000, ' ms')} ({r['scrapes']} scrapes, {r['scrapes_gzip']} "
         f"gzip; {r['series']} series, {r['metrics_bytes'] / 2**20:.2f} MB, "
         f"{_fmt((r['metrics_gzip_bytes'] or 0) / 2**20, ' MB')} gzipped)"),
        ("same body, bare server", f"p50 {_fmt(_ms(r['bare_scrape_p50_s']), ' ms')}, p99 "
         f"{_fmt(_ms(r['bare_scrape_p99_s']), ' ms')} (its own process, scraped after each)"),
        ("generate_latest, same series", f"p50 {_fmt(r['generate_latest_p50_s'] * 1000, ' ms')}, "
         f"p99 {_fmt(r['generate_latest_p99_s'] * 1000, ' ms')}; scrape/generate_latest p99 = "
         f"{_fmt(r['scrape_to_generate_latest_p99'])}"),
        ("callback -> /metrics", f"p50 {_fmt(r['callback_to_metrics_p50_ms'], ' ms')}, p99 "
         f"{_fmt(r['callback_to_metrics_p99_ms'], ' ms')}, max "
         f"{_fmt(r['callback_to_metrics_max_ms'], ' ms')} (real; {r['callback_probes']} probes)"),
        ("renders", f"{_fmt(r['renders_per_cycle'])} per cycle; render thread CPU "
         f"{_fmt(r['render_cpu_share'])} of a core"),
        ("CPU / cycle", _fmt(r["cpu_seconds_per_cycle"], " s")),
        ("peak RSS", _fmt(r["peak_rss_mb"], " MB")),
        ("event loop", f"woke late by p99 {_fmt(_ms(r['loop_lag_p99_s']), ' ms')}, worst "
         f"{_fmt(_ms(r['loop_lag_max_s']), ' ms')}; {r['gc_full_collections']} full GCs, longest "
         f"GC {_fmt(_ms(r['gc_pause_max_s']), ' ms')}"),
        ("diff", ", ".join(f"{n} tasks {_fmt(r['diff_seconds'][n] * 1000, ' ms')} "
                           f"({_fmt(r['diff_us_per_task'][n], ' µs/task')})" for n in sizes)),
        ("wall time", _fmt(r["wall_seconds"], " s")),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {text}" for name, text in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rooms < 1 or args.cycles < 2:
        print("--rooms must be >= 1 and --cycles >= 2", file=sys.stderr)
        return 2
    workload = rig.Workload(
        rooms=args.rooms, tasks=args.tasks if args.tasks is not None else 5 * args.rooms,
        seed=args.seed, speed=args.speed or auto_speed(args), rate_limit=args.rate_limit,
        pacing=args.pacing, poll_interval=args.poll_interval, cycles=args.cycles,
        all_rooms=args.all_rooms,
        mean_duration_s=args.mean_duration, abnormal_probability=args.abnormal,
        origin_real=time.monotonic(), origin_wall=time.time(),
        callback_port=free_port() if args.callbacks else None,
    )
    result = asyncio.run(drive(args, workload))
    print(json.dumps(result, sort_keys=True) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

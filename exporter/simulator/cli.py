"""`zego-cloudrecord-simulator`: serve the simulated ZEGO Cloud Recording API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from exporter.clock import ScaledClock
from exporter.simulator.api import LIST_KEYS, STATUS_SEMANTICS
from exporter.simulator.faults import FaultKind, parse_fault_option
from exporter.simulator.scenario import Scenario, ScenarioError, load_scenario
from exporter.simulator.server import create_app

log = logging.getLogger("exporter.simulator")

DEFAULT_LISTEN = "127.0.0.1:18080"


def parse_listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT`."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def parse_app(text: str) -> tuple[int, str]:
    """`APP_ID:SERVER_SECRET`."""
    app_id, sep, secret = text.partition(":")
    if not sep or not app_id.isdigit() or not secret:
        raise argparse.ArgumentTypeError("--app takes APP_ID:SERVER_SECRET (APP_ID an integer)")
    return int(app_id), secret


def parse_callback_secret(text: str) -> tuple[int, str]:
    """`APP_ID:CALLBACK_SECRET`."""
    app_id, sep, secret = text.partition(":")
    if not sep or not app_id.isdigit() or not secret:
        raise argparse.ArgumentTypeError(
            "--callback-secret takes APP_ID:CALLBACK_SECRET (APP_ID an integer)")
    return int(app_id), secret


def parse_probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability in [0, 1]")
    return value


def _fault(text: str) -> dict[str, Any]:
    try:
        return parse_fault_option(text).to_json()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    kinds = ", ".join(k.value for k in FaultKind)
    parser = argparse.ArgumentParser(
        prog="zego-cloudrecord-simulator",
        description="A simulated ZEGO Cloud Recording server API (DescribeTasks, "
                    "DescribeRecordStatus, Start/Stop/Pause/ResumeRecord) with seeded recording "
                    "activity, ZEGO's signature checks and rate limits, fault injection, "
                    "recording status callbacks (signed, retried, sometimes lost or repeated, as "
                    "ZEGO sends them), and a test harness under /_sim/ (ledger, upload outcomes, "
                    "summary, stats, control, faults, callbacks).")
    parser.add_argument("--listen-address", type=parse_listen_address, default=DEFAULT_LISTEN,
                        metavar="HOST:PORT", help=f"where to listen (default {DEFAULT_LISTEN})")
    parser.add_argument("--app", type=parse_app, action="append", default=[],
                        metavar="APP_ID:SERVER_SECRET",
                        help="an app the simulator knows (repeatable; at least one unless the "
                             "scenario lists apps)")
    rooms = parser.add_mutually_exclusive_group()
    rooms.add_argument("--rooms", type=int, metavar="N",
                       help="rooms room-1..room-N in every app (default 3)")
    rooms.add_argument("--scenario", metavar="FILE",
                       help="a scenario YAML file (format: exporter/simulator/scenario.py); "
                            "the other options override it")
    parser.add_argument("--seed", type=int, help="RNG seed for recordings and faults (default 0)")
    parser.add_argument("--speed", type=float,
                        help="clock acceleration: 60 runs an hour per minute (default 1). The "
                             "API's clock (signature timestamps, the 3-day window, the rate "
                             "limit's second) runs at this speed too, so clients must share it")
    parser.add_argument("--warmup", type=float, metavar="SECONDS",
                        help="simulate this much activity before the start (default 0)")
    parser.add_argument("--fault", type=_fault, action="append", default=[],
                        metavar="KIND=PROBABILITY",
                        help=f"inject a fault into API requests (repeatable); KIND is one of: "
                             f"{kinds}")
    parser.add_argument("--latency", type=float, metavar="MS",
                        help="latency added by `latency` faults; alone, added to every request")
    parser.add_argument("--jitter", type=float, metavar="MS",
                        help="+/- jitter on that latency")
    parser.add_argument("--hang-seconds", type=float, metavar="S",
                        help="how long a `hang` fault holds the request (default 60)")
    parser.add_argument("--clock-skew", type=float, metavar="SECONDS",
                        help="offset of the simulator's API clock (signature expiry, 3-day rule)")
    parser.add_argument("--list-key", choices=LIST_KEYS,
                        help="DescribeTasks' task-list field (default TaskidList)")
    parser.add_argument("--status-semantics", choices=STATUS_SEMANTICS,
                        help="inclusive (default): Status=2 lists statuses 1, 2, 5 and Status=3 "
                             "lists 3, 4; strict: only 2, only 3")
    parser.add_argument("--rate-limit", type=int, metavar="N",
                        help="DescribeTasks and DescribeRecordStatus requests per app per "
                             "sliding second (default 10; 0 = unlimited)")
    parser.add_argument("--callback-url", metavar="URL",
                        help="POST recording status callbacks (event_type 1, 2, 4-7, 201, 202) "
                             "here, for the apps given a --callback-secret; failed deliveries "
                             "are retried twice, 5 s apart on the simulator's clock")
    parser.add_argument("--callback-secret", type=parse_callback_secret, action="append",
                        default=[], metavar="APP_ID:SECRET",
                        help="an app's CallbackSecret, which signs its callbacks (repeatable)")
    parser.add_argument("--callback-loss", type=parse_probability, metavar="P",
                        help="probability that a callback is never sent (default 0)")
    parser.add_argument("--callback-duplicate", type=parse_probability, metavar="P",
                        help="probability that a callback is sent twice (default 0)")
    parser.add_argument("--callback-late", type=parse_probability, metavar="P",
                        help="probability that a callback arrives 1-10 s late, so that a "
                             "later one may overtake it (default 0)")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="debug logs one line per request (default info)")
    return parser


def scenario_from_args(args: argparse.Namespace) -> Scenario:
    """The scenario file (if any) with the command-line options laid over it."""
    scenario = load_scenario(args.scenario) if args.scenario else Scenario()
    scenario.apps.update(dict(args.app))
    if args.rooms is not None:
        scenario.default_rooms = args.rooms
    for key in ("seed", "speed", "list_key", "status_semantics", "rate_limit"):
        if getattr(args, key) is not None:
            setattr(scenario, key, getattr(args, key))
    if args.warmup is not None:
        scenario.warmup_s = args.warmup
    if args.callback_url is not None:
        scenario.callback_url = args.callback_url
    scenario.callback_secrets.update(dict(args.callback_secret))
    if args.callback_loss is not None:
        scenario.callback_loss = args.callback_loss
    if args.callback_duplicate is not None:
        scenario.callback_duplicate = args.callback_duplicate
    if args.callback_late is not None:
        scenario.callback_late = args.callback_late
    faults = scenario.faults
    rules = [*faults.get("rules", ()), *args.fault]
    for key, value in (("latency_ms", args.latency), ("jitter_ms", args.jitter),
                       ("hang_seconds", args.hang_seconds), ("clock_skew_s", args.clock_skew)):
        if value is not None:
            faults[key] = value
    if args.latency is not None and not any(r.get("kind") == "latency" for r in rules):
        rules.append({"kind": "latency", "probability": 1.0})
    faults["rules"] = rules
    if not scenario.apps:
        raise ScenarioError("no apps: give --app APP_ID:SERVER_SECRET or a scenario with apps")
    if scenario.speed <= 0:
        raise ScenarioError("--speed must be > 0")
    return scenario


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        scenario = scenario_from_args(args)
        engine, options = scenario.build(ScaledClock(scenario.speed))
    except (ScenarioError, ValueError) as exc:
        parser.error(str(exc))
    if options.callback_url and not options.callback_secrets:
        log.warning("callbacks_off reason=%r", "a callback URL but no --callback-secret: "
                    "callbacks go only to apps with a callback secret")
    host, port = args.listen_address
    log.info("simulator_starting listen=%s:%s apps=%s rooms=%s seed=%s speed=%s callbacks=%s",
             host, port, sorted(engine.apps), sum(len(r) for r in engine.rooms.values()),
             scenario.seed, scenario.speed,
             sorted(options.callback_secrets) if options.callback_url else "off")
    web.run_app(create_app(engine, options), host=host, port=port, access_log=None,
                print=lambda text: log.info("simulator_listening %s", text.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

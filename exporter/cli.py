"""Command line: Prometheus-style flags, logging set-up, the daemon's lifetime and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import signal
import ssl
import sys
from collections.abc import Sequence

import structlog

from exporter import __version__
from exporter.config import Config, ConfigError, load_config
from exporter.daemon import Exporter, ListenAddress
from exporter.logs import LEVELS, configure_logging
from exporter.serve.webconfig import CLIENT_AUTH_TYPES, WebConfig, WebConfigError, parse_web_config
from exporter.sharding import Shard, shard_config
from exporter.state.store import StoreError

DEFAULT_LISTEN = ":9867"
DEMO_LISTEN = "127.0.0.1:9867"
DEFAULT_STORAGE = "data/zego-cloudrecord-exporter.db"
HEALTHCHECK_TIMEOUT = 4.0  # seconds; under deploy/Dockerfile's HEALTHCHECK --timeout
log = structlog.get_logger("exporter")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zego-cloudrecord-exporter",
        description="Prometheus exporter for ZEGO Cloud Recording: polls DescribeTasks for the "
        "configured rooms and serves recording events and gauges on /metrics.",
    )
    parser.add_argument("--config.file", dest="config_file", metavar="PATH",
                        help="YAML configuration file (see README: Configuration)")
    parser.add_argument("--web.listen-address", dest="listen_address", default=None,
                        metavar="HOST:PORT",
                        help=f"address for /metrics and the landing page ({DEFAULT_LISTEN}; "
                        f"with --demo, {DEMO_LISTEN})")
    parser.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                        metavar="PATH", help="path of the metrics endpoint (default /metrics)")
    parser.add_argument("--web.config.file", dest="web_config_file", metavar="PATH",
                        help="TLS, basic auth and response headers, in the Prometheus "
                        "exporter-toolkit format; re-read when it changes (see README)")
    parser.add_argument("--log.level", dest="log_level", choices=list(LEVELS), default="info",
                        help="only log at this level and above (default info)")
    parser.add_argument("--log.format", dest="log_format", choices=["logfmt", "json"],
                        default="logfmt", help="log line format (default logfmt)")
    parser.add_argument("--callback.listen-address", dest="callback_listen", metavar="HOST:PORT",
                        help="serve ZEGO recording callbacks here (off by default); apps need a "
                        "callback_secret")
    parser.add_argument("--callback.web-config.file", dest="callback_web_config_file",
                        metavar="PATH", help="TLS (and headers) for the callback listener, in "
                        "the --web.config.file format")
    parser.add_argument("--callback.path", dest="callback_path", default="/callback",
                        metavar="PATH", help="path of the callback endpoint (default /callback)")
    parser.add_argument("--storage.path", dest="storage_path", metavar="PATH",
                        help=f"SQLite file keeping counters and tracked tasks across restarts "
                        f"(default {DEFAULT_STORAGE}; '' for none; --demo: none unless given)")
    parser.add_argument("--config.check", dest="config_check", action="store_true",
                        help="validate the configuration, print what is wrong, exit 0 or 1")
    parser.add_argument("--healthcheck", action="store_true",
                        help="ask the exporter running with these --web.listen-address and "
                        "--web.config.file whether it is healthy (GET /-/healthy); print one "
                        "line, exit 0 if it answers 200, else 1 (a container HEALTHCHECK)")
    parser.add_argument("--demo", action="store_true",
                        help="start the built-in ZEGO simulator on loopback and export its "
                        "recordings: live metrics with no ZEGO account")
    parser.add_argument("--shard.count", dest="shard_count", type=int, default=1, metavar="N",
                        help="replicas sharing the config: each polls its share of the apps and "
                        "rooms by a stable hash (default 1)")
    parser.add_argument("--shard.index", dest="shard_index", type=int, default=0, metavar="I",
                        help="this replica's shard, 0..N-1 (e.g. the StatefulSet pod ordinal)")
    parser.add_argument("--ratelimit.redis-url", dest="redis_url", metavar="URL",
                        help="share each app's ZEGO budget among replicas through this Redis "
                        "(redis://host:6379/0); needs the `redis` extra")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _load(args: argparse.Namespace) -> Config:
    if args.config_file is None:
        raise ConfigError(["--config.file is required (or --demo to run against the simulator)"])
    loaded = load_config(args.config_file)
    for warning in loaded.warnings:
        log.warning("config_warning", problem=warning)
    return loaded.config


def _load_web_config(path: str | None) -> WebConfig | None:
    if not path:
        return None
    web_config = WebConfig(path)
    for warning in web_config.settings.warnings:
        log.warning("web_config_warning", problem=warning)
    return web_config


def listen_address(args: argparse.Namespace) -> str:
    """--web.listen-address, else the default: loopback only for the demo, which is for this
    machine's eyes (its simulated secrets are no secret), every interface otherwise."""
    if args.listen_address is not None:
        return str(args.listen_address)
    return DEMO_LISTEN if args.demo else DEFAULT_LISTEN


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    if not args.telemetry_path.startswith("/") or args.telemetry_path == "/":
        print("--web.telemetry-path: must start with / and not be / itself", file=sys.stderr)
        return 1
    try:
        listen = ListenAddress.parse(listen_address(args))
    except ValueError as exc:
        print(f"--web.listen-address: {exc}", file=sys.stderr)
        return 1
    if args.healthcheck:
        return healthcheck(listen, args.web_config_file)
    try:
        callback_listen = ListenAddress.parse(args.callback_listen) if args.callback_listen \
            else None
    except ValueError as exc:
        print(f"--callback.listen-address: {exc}", file=sys.stderr)
        return 1
    if not args.callback_path.startswith("/"):
        print("--callback.path: must start with /", file=sys.stderr)
        return 1
    args.callback_listen = callback_listen
    try:
        args.web_config = _load_web_config(args.web_config_file)
        args.callback_web_config = _load_web_config(args.callback_web_config_file)
    except WebConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.demo:
        return asyncio.run(_run_demo(args, listen))
    try:
        config = _load(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.config_check:
        print(f"{args.config_file}: OK ({len(config.apps)} apps)")
        return 0
    try:
        shard = Shard(args.shard_count, args.shard_index)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    args.shared_limits = {app.app_id: app.rate_limit for app in config.apps}
    config = shard_config(config, shard)
    if shard.count > 1:
        log.info("sharded", shard_index=shard.index, shard_count=shard.count,
                 apps=[a.app_id for a in config.apps],
                 rooms=sum(len(a.rooms or ()) for a in config.apps))
    storage = DEFAULT_STORAGE if args.storage_path is None else args.storage_path
    return asyncio.run(_serve(config, args, storage or None, listen))


def healthcheck(listen: ListenAddress, web_config_file: str | None) -> int:
    """--healthcheck: 0 if the exporter at `listen` answers 200 on /-/healthy, else 1.

    http.client rather than urllib: no proxy from the environment, no redirects, for a probe of
    this host. Health endpoints need no password, so the web config only says HTTP or HTTPS."""
    try:
        tls = parse_web_config(web_config_file).tls if web_config_file else None
    except WebConfigError as exc:
        print(f"unhealthy: {'; '.join(exc.errors)}", file=sys.stderr)
        return 1
    if tls is not None and CLIENT_AUTH_TYPES[tls.client_auth_type] == ssl.CERT_REQUIRED:
        print(f"unhealthy: cannot probe: client_auth_type {tls.client_auth_type} refuses a probe "
              "without a client certificate", file=sys.stderr)
        return 1
    # Every interface (no host, 0.0.0.0, ::) includes loopback.
    host = listen.host or "127.0.0.1"
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    connection: http.client.HTTPConnection
    if tls is None:
        connection = http.client.HTTPConnection(host, listen.port, timeout=HEALTHCHECK_TIMEOUT)
    else:
        # Not verified: the certificate is for the name Prometheus scrapes, from a CA this host
        # need not trust; the probe only asks its own process whether it is alive.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(host, listen.port,
                                                 timeout=HEALTHCHECK_TIMEOUT, context=context)
    bracketed = f"[{host}]" if ":" in host else host
    url = f"{'https' if tls else 'http'}://{bracketed}:{listen.port}/-/healthy"
    try:
        connection.request("GET", "/-/healthy")
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        print(f"unhealthy: GET {url}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    if status != 200:
        print(f"unhealthy: GET {url}: {status}", file=sys.stderr)
        return 1
    print(f"healthy: GET {url}: {status}")
    return 0


async def _run_demo(args: argparse.Namespace, listen: ListenAddress) -> int:
    from exporter.demo import demo_simulator  # the simulator is imported in demo mode only

    # The demo's simulated recordings are new every run: no state to keep unless asked.
    async with demo_simulator() as (config, callback_listen):
        args.callback_listen = args.callback_listen or callback_listen
        return await _serve(config, args, args.storage_path or None, listen)


async def _serve(config: Config, args: argparse.Namespace, storage_path: str | None,
                 listen: ListenAddress) -> int:
    if args.callback_listen is not None and not any(a.callback_secret for a in config.apps):
        print("--callback.listen-address: no app has a callback_secret; callbacks from ZEGO "
              "could not be verified", file=sys.stderr)
        return 1
    redis_client, limiter_factory = None, None
    if getattr(args, "redis_url", None):
        from exporter.zego.ratelimit_redis import redis_limiter_factory

        redis_client, limiter_factory = redis_limiter_factory(
            args.redis_url, getattr(args, "shared_limits", {}), config.zego.pacing)
    try:
        exporter = Exporter(config, telemetry_path=args.telemetry_path,
                            storage_path=storage_path, callback_path=args.callback_path,
                            web_config=args.web_config, limiter_factory=limiter_factory,
                            callback_web_config=args.callback_web_config)
    except StoreError as exc:
        print(f"--storage.path: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await exporter.start(listen, callback_listen=args.callback_listen)
    except OSError as exc:
        log.error("cannot_listen", address=f"{listen.host or ''}:{listen.port}", error=str(exc))
        await exporter.stop()
        return 1
    log.info("started", version=__version__, apps=[a.app_id for a in exporter.config.apps],
             poll_interval_s=exporter.config.poll_interval)
    await stop.wait()
    log.info("stopping")
    with contextlib.suppress(Exception):
        await exporter.stop()
        if redis_client is not None:
            await redis_client.aclose()
    return 0


def run() -> None:
    sys.exit(main())

"""Structured logging (logfmt or JSON) for our own events and for the libraries' stdlib logs.

Lines look like promslog's (the Go exporters' logger): `time=... level=INFO source=... msg=...`,
levels DEBUG, INFO, WARN and ERROR; `source` is the logger's name (Python has no file:line that
helps an operator more)."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from typing import Any, TextIO

import structlog

_log = structlog.get_logger("exporter")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (tests swap it), not the one at start-up."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "error": logging.ERROR}


_PROMSLOG_LEVELS = {"debug": "DEBUG", "info": "INFO", "warning": "WARN", "error": "ERROR",
                    "critical": "ERROR", "exception": "ERROR"}


def _promslog(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog's keys and levels as promslog names them."""
    now = time.time()
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1000):03d}Z",
            "level": _PROMSLOG_LEVELS.get(event.pop("level", "info"), "INFO"),
            "source": event.pop("logger", None), "msg": event.pop("event", "")}
    return {**line, **event}


def configure_logging(level: str = "info", fmt: str = "logfmt", stream: TextIO | None = None
                      ) -> None:
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.processors.LogfmtRenderer(
            key_order=["time", "level", "source", "msg"], bool_as_flag=False, drop_missing=True)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.format_exc_info,
        _promslog,
    ]
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream) if stream else _StderrHandler()
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(LEVELS[level])
    # Library chatter stays out of info logs.
    logging.getLogger("aiohttp.access").setLevel(max(LEVELS[level], logging.WARNING))


class Throttle:
    """At most one log line per key every `every_s` seconds, for lines an outsider can cause.

    Written here: the logging libraries we use have no rate limit, and this is ten lines."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """None to drop this line; else how many lines of `key` were dropped since the last."""
        now = time.monotonic()
        if now < self._next.get(key, -math.inf):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._next[key] = now + self.every_s
        return self._suppressed.pop(key, 0)


class ContainedErrors:
    """Unexpected exceptions caught where they arose (a handler, a cycle, a save): counted by
    place; the first of each kind and place is logged with its traceback, repeats are a line
    at most every `every_s` seconds, so a bug hit on every request cannot flood the log."""

    def __init__(self, counts: Counter[str], every_s: float = 60.0) -> None:
        self._counts = counts
        self._seen: set[tuple[str, str]] = set()
        self._throttle = Throttle(every_s)

    def record(self, where: str, exc: BaseException) -> None:
        self._counts[where] += 1
        kind = type(exc).__qualname__
        if (where, kind) not in self._seen:
            self._seen.add((where, kind))
            _log.error("internal_error", where=where, error=kind, exc_info=exc)
        elif (dropped := self._throttle.allow(f"{where}:{kind}")) is not None:
            _log.error("internal_error", where=where, error=kind, repeated=True,
                       suppressed=dropped)

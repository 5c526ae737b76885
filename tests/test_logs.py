"""Log lines as Prometheus users know them from promslog: time, level, source, msg."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from exporter.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    configure_logging()


def test_a_logfmt_line_reads_like_promslog(stream: io.StringIO) -> None:
    configure_logging("debug", "logfmt", stream)
    structlog.get_logger("exporter.poll.poller").warning("poll_budget_exceeded", app_id=7)
    line = stream.getvalue().strip()
    assert re.fullmatch(r"time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=WARN "
                        r"source=exporter\.poll\.poller msg=poll_budget_exceeded app_id=7",
                        line), line


@pytest.mark.parametrize(("method", "level"), [("debug", "DEBUG"), ("info", "INFO"),
                                               ("warning", "WARN"), ("error", "ERROR")])
def test_levels_are_promslogs(stream: io.StringIO, method: str, level: str) -> None:
    configure_logging("debug", "json", stream)
    getattr(structlog.get_logger("exporter"), method)("something_happened")
    line = json.loads(stream.getvalue())
    assert (line["level"], line["msg"], line["source"]) == (level, "something_happened",
                                                            "exporter")


def test_library_lines_get_the_same_keys(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream)
    logging.getLogger("aiohttp.server").error("boom %s", 1)
    line = json.loads(stream.getvalue())
    assert (line["level"], line["source"], line["msg"]) == ("ERROR", "aiohttp.server", "boom 1")


def test_the_warn_flag_hides_info(stream: io.StringIO) -> None:
    configure_logging("warn", "logfmt", stream)
    structlog.get_logger("exporter").info("quiet")
    structlog.get_logger("exporter").warning("loud")
    assert "msg=quiet" not in stream.getvalue() and "msg=loud" in stream.getvalue()

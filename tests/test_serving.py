"""/metrics' listener in a thread of its own (exporter/serve/serving.py): scrapes are answered
while the main loop is busy, and what the listener counts is written by the main loop alone."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections import Counter
from typing import Any

from tests.conftest import StartExporter


def get(url: str, method: str = "GET") -> tuple[int, bytes]:
    """One blocking request (for a thread: it needs no event loop)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method),
                                    timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def in_thread(url: str, method: str = "GET") -> tuple[threading.Event, list[tuple[int, bytes]]]:
    done, answers = threading.Event(), []

    def run() -> None:
        answers.append(get(url, method))
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return done, answers


async def test_a_scrape_is_answered_while_the_main_loop_is_blocked(serve: StartExporter) -> None:
    exporter = await serve()
    url = f"http://127.0.0.1:{exporter.bound_port}"
    # The first scrape in a format not asked for before waits for the main loop to render it.
    assert (await asyncio.to_thread(get, f"{url}/metrics"))[0] == 200
    done, answers = in_thread(f"{url}/metrics")
    assert done.wait(10)  # the main loop waits here, blocked: it serves nothing meanwhile
    status, body = answers[0]
    assert status == 200 and b"zego_cloudrecord_up" in body
    # A route that reads the state is answered by the main loop, once it runs again; so is
    # the liveness probe, which a stuck main loop must fail.
    for path in ("/api/v1/events", "/-/healthy"):
        done, answers = in_thread(url + path)
        assert not done.wait(0.5)
        await asyncio.to_thread(done.wait, 10)
        assert answers[0][0] == 200


class Writers(Counter[Any]):
    """A state counter that notes which threads write it."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    def __setitem__(self, key: Any, value: int) -> None:
        self.threads.add(threading.current_thread().name)
        super().__setitem__(key, value)


async def test_the_listeners_counts_are_written_by_the_main_loop(serve: StartExporter) -> None:
    exporter = await serve()
    refused = exporter.state.refused = Writers()
    url = f"http://127.0.0.1:{exporter.bound_port}"
    for method, path in (("POST", "/metrics"), ("GET", "/nowhere")):
        assert (await asyncio.to_thread(get, url + path, method))[0] in (404, 405)
    await asyncio.sleep(0)  # the counts handed to this loop
    assert refused == {("metrics", "method_not_allowed"): 1, ("metrics", "not_found"): 1}
    assert refused.threads == {threading.current_thread().name}

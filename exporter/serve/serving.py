"""The /metrics listener's own thread and event loop, and the hand-over to the main loop.

The main loop is the state's one writer: it runs the poll cycles (a cycle's diff holds it for
milliseconds), answers callbacks and ZEGO's answers. A scrape served there waits behind all of
that; served here it waits for none of it, only for its share of the GIL. What this thread
does is read: the kept render, the live part's collectors. Whatever writes state (an edge's
counters, a reload's count) or reads more than a kept value (the landing page, the events API,
readiness, a render to wait for) is handed to the main loop (`on_loop`, `call_on`), and so is
the liveness probe, which a stuck main loop must fail."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


def running_on(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether the caller runs on `loop` (None: the caller's loop, whichever it is)."""
    if loop is None:
        return True
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def call_on(loop: asyncio.AbstractEventLoop | None, function: Callable[..., None],
            *args: Any) -> None:
    """`function(*args)` now if the caller runs on `loop`, else soon, on `loop`."""
    if running_on(loop):
        function(*args)
    else:
        assert loop is not None
        loop.call_soon_threadsafe(function, *args)


async def on_loop(loop: asyncio.AbstractEventLoop | None, step: Coroutine[Any, Any, T]) -> T:
    """Await `step` run on `loop` (here if the caller runs on it)."""
    if running_on(loop):
        return await step
    assert loop is not None
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step, loop))


def handed_over(loop: asyncio.AbstractEventLoop | None,
                handler: Callable[[web.Request], Coroutine[Any, Any, web.Response]]
                ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """`handler`, run on `loop`: a route that reads the state."""

    async def handle(request: web.Request) -> web.Response:
        return await on_loop(loop, handler(request))

    return handle


class ServingThread:
    """One aiohttp app served by a thread of its own, with its own event loop."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._runner: web.AppRunner | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    async def start(self, app: web.Application, host: str | None, port: int,
                    ssl_context: ssl.SSLContext | None) -> int:
        """Serve `app` on host:port; the port bound. Raises what binding raises."""
        self._thread.start()
        try:
            return await on_loop(self._loop, self._serve(app, host, port, ssl_context))
        except BaseException:
            await self.stop()
            raise

    async def _serve(self, app: web.Application, host: str | None, port: int,
                     ssl_context: ssl.SSLContext | None) -> int:
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving (requests under way are answered first) and end the thread."""
        if not self._thread.is_alive():
            return
        if self._runner is not None:
            await on_loop(self._loop, self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join)

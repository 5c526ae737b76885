"""Async client for the ZEGO Cloud Recording server API: signed, rate-limited, retried, typed."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp

from exporter.clock import Clock
from exporter.zego.errors import (
    Code,
    Kind,
    ZegoApiError,
    ZegoError,
    ZegoResponseError,
    ZegoTransportError,
)
from exporter.zego.models import (
    MAX_SAFE_INT,
    RecordStatus,
    ShapeError,
    TaskPage,
    parse_record_status,
    parse_task_page,
)
from exporter.zego.ratelimit import Departure, RateLimiter
from exporter.zego.signing import common_params

DESCRIBE_TASKS = "DescribeTasks"
DESCRIBE_RECORD_STATUS = "DescribeRecordStatus"
T = TypeVar("T")
MAX_BODY_BYTES = 4 * 1024 * 1024  # a page of 50 tasks is ~5 KB; anything near this is broken
MAX_MESSAGE_CHARS = 300  # of ZEGO's Message and RequestId kept in errors (logs, landing page)


def _printable(value: Any) -> str:
    """Upstream text fit for errors, logs and the landing page: a bounded, encodable string.

    A lone surrogate ("\\ud800" in the JSON) would make the landing page fail to encode.
    """
    if not isinstance(value, str):
        return ""
    text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


class Revealable(Protocol):
    def reveal(self) -> str: ...


@dataclass
class ZegoApp:
    """One AppId's credentials and its rate limiters, one per Action, shared by all its rooms."""

    app_id: int
    secret: Revealable = field(repr=False)
    limiters: Mapping[str, RateLimiter] = field(repr=False)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries in all, the first included
    base_delay: float = 0.5
    max_delay: float = 8.0
    rate_limited_delay: float = 1.0  # after 300000003, wait at least one server window


# Called once per HTTP attempt: (app_id, action, result label, seconds taken).
RequestObserver = Callable[[int, str, str, float], None]


def _no_observer(app_id: int, action: str, label: str, seconds: float) -> None:
    return None


class ZegoClient:
    """Talks to one ZEGO endpoint over one reused `aiohttp.ClientSession`."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        clock: Clock,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        observe: RequestObserver = _no_observer,
        rng: random.Random | None = None,
    ) -> None:
        self._session = session
        self._endpoint = endpoint
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._retry = retry
        self._observe = observe
        self._rng = rng or random.Random()

    async def describe_tasks(
        self,
        app: ZegoApp,
        status: int,
        room_id: str | None,
        start_ms: int,
        end_ms: int,
        page: int = 1,
        page_size: int = 50,
    ) -> TaskPage:
        body: dict[str, Any] = {
            "Status": status,
            "StartTime": start_ms,
            "EndTime": end_ms,
            "PageOffset": page,
            "PageSize": page_size,
        }
        if room_id is not None:
            body["RoomId"] = room_id
        return await self.call(app, DESCRIBE_TASKS, body, parse_task_page)

    async def describe_record_status(self, app: ZegoApp, task_id: str) -> RecordStatus:
        return await self.call(app, DESCRIBE_RECORD_STATUS, {"TaskId": task_id},
                               lambda data: parse_record_status(task_id, data))

    async def call(self, app: ZegoApp, action: str, body: Mapping[str, Any],
                   parse: Callable[[Any], T]) -> T:
        """One API call with bounded, jittered, re-signed retries; returns the parsed Data.

        A Data of the wrong shape is retried like any malformed body.
        """
        limiter = app.limiters[action]
        resigned = False
        attempt = 0
        while True:
            attempt += 1
            departure = await limiter.acquire()
            params = common_params(action, app.app_id, app.secret.reveal(), self._clock.time())
            started = time.perf_counter()
            try:
                try:
                    data = await self._post(action, params, body, departure)
                finally:
                    departure.left()  # if the session's trace did not mark it: sent by now
                try:
                    result = parse(data)
                except ShapeError as exc:
                    raise ZegoResponseError(action, str(exc)) from None
            except asyncio.CancelledError:
                # The cycle gave up on this request (a sibling failed); it may have reached ZEGO.
                self._observe(app.app_id, action, "cancelled", time.perf_counter() - started)
                raise
            except ZegoError as exc:
                self._observe(app.app_id, action, exc.label, time.perf_counter() - started)
                expired = isinstance(exc, ZegoApiError) and exc.code == Code.SIGNATURE_EXPIRED
                if expired and not resigned:
                    resigned = True  # one immediate retry with a fresh signature
                    continue
                if exc.kind is not Kind.RETRYABLE or attempt >= self._retry.attempts:
                    raise
                await self._clock.sleep(self._backoff(attempt, exc))
                continue
            self._observe(app.app_id, action, "0", time.perf_counter() - started)
            return result

    def _backoff(self, attempt: int, exc: ZegoError) -> float:
        ceiling = min(self._retry.max_delay, self._retry.base_delay * 2 ** (attempt - 1))
        delay = self._rng.uniform(ceiling / 2, ceiling)
        if isinstance(exc, ZegoApiError) and exc.code == Code.RATE_LIMITED:
            delay = max(delay, self._retry.rate_limited_delay)
        return delay

    async def _post(self, action: str, params: dict[str, str], body: Mapping[str, Any],
                    departure: Departure) -> Any:
        try:
            async with self._session.post(
                self._endpoint, params=params, json=body, timeout=self._timeout,
                trace_request_ctx=departure,
            ) as response:
                raw = await response.content.read(MAX_BODY_BYTES + 1)
                status = response.status
        except TimeoutError:
            raise ZegoTransportError(action, "timed out", "timeout") from None
        except aiohttp.ClientPayloadError as exc:
            raise ZegoResponseError(action, f"truncated body ({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise ZegoTransportError(
                action, f"connection failed ({type(exc).__name__})", "connection_error"
            ) from None
        if status >= 500:
            raise ZegoTransportError(action, f"HTTP {status}", "http_5xx")
        if len(raw) > MAX_BODY_BYTES:
            raise ZegoResponseError(action, f"body larger than {MAX_BODY_BYTES} bytes")
        return self._unwrap(action, status, raw)

    @staticmethod
    def _unwrap(action: str, status: int, raw: bytes) -> Any:
        try:
            envelope = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ZegoResponseError(action, f"HTTP {status}, body is not JSON") from None
        except RecursionError:  # json's own depth guard: `[[[[...` a few thousand deep
            raise ZegoResponseError(action, f"HTTP {status}, JSON nested too deeply") from None
        if not isinstance(envelope, dict):
            raise ZegoResponseError(action, "body is not a JSON object")
        code = envelope.get("Code")
        if isinstance(code, bool) or not isinstance(code, int) or abs(code) > MAX_SAFE_INT:
            raise ZegoResponseError(action, "missing or non-integer Code")
        if code != 0:
            message = envelope.get("Message")
            request_id = envelope.get("RequestId")
            raise ZegoApiError(action, code, _printable(message), _printable(request_id))
        if status >= 400:
            raise ZegoResponseError(action, f"HTTP {status} with Code 0")
        return envelope.get("Data")

"""Recording status callbacks from the simulated ZEGO: events read off the ledger, signed, and
delivered the way ZEGO delivers them (at most 3 attempts 5 s apart, sometimes lost, repeated or
late: a late callback keeps the time and sequence it was sent with, so a later one of the same task
can overtake it).

Timing follows the engine's clock, not the event loop's: the sender keeps a queue of what is due
when, and `deliver_due(now)` sends everything due by `now`. The server calls it in the background
every `interval` real seconds; tests on a ManualClock call it themselves, so what a receiver gets,
and when on the clock, is exact.

Everything drawn (quit reasons, a missing stream, nonces, loss, duplication, lateness) comes from
RNGs seeded with (seed, task, sequence), so a seed replays the same callbacks whatever the timing
of the calls.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import itertools
import json
import logging
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from exporter.simulator.engine import MAX_RECORD_SECONDS, SimEngine, SimTask, Transition
from exporter.zego.callback_signing import callback_signature
from exporter.zego.models import FileStatus, TaskStatus

log = logging.getLogger(__name__)

DEFAULT_RETRY_DELAY_S = 5.0  # ZEGO: 2 retries, 5 s apart
DEFAULT_ATTEMPTS = 3
DEFAULT_TIMEOUT_S = 3.0  # real seconds a receiver has to answer one attempt
DEFAULT_LATE_S = (1.0, 10.0)  # how late a late callback is, uniform (simulated seconds)
NO_STREAM_REPEAT_S = 30.0  # ZEGO repeats event 4 every 30 s while the room has no streams
NO_STREAM_MAX_EVENTS = 10  # ZEGO goes on until MaxIdleTime; the simulator stops here
MISSING_STREAM_PROBABILITY = 0.05  # per task with files: one event 6 when recording begins
_HISTORY = 10_000  # delivery records kept
_SEQUENCE_TTL_S = 3_600.0  # forget an ended task's sequence counter this long after its end


class CallbackEvent(enum.IntEnum):
    """ZEGO's `event_type` values."""

    FILES_UPLOADED = 1
    ENDED_ABNORMALLY = 2
    IMAGE_DOWNLOAD_FAILED = 3  # not simulated
    NO_STREAMS = 4
    EXITED_NORMALLY = 5
    STREAM_MISSING = 6
    STOPPED_UPLOADING = 7
    HLS_PLAYLIST = 102  # not simulated
    PAUSED = 201
    RESUMED = 202


MESSAGES = {
    CallbackEvent.FILES_UPLOADED: "record files upload finished",
    CallbackEvent.ENDED_ABNORMALLY: "record task exited abnormally",
    CallbackEvent.IMAGE_DOWNLOAD_FAILED: "background or watermark image download failed",
    CallbackEvent.NO_STREAMS: "no stream in the room",
    CallbackEvent.EXITED_NORMALLY: "record task exited normally",
    CallbackEvent.STREAM_MISSING: "recorded stream does not exist",
    CallbackEvent.STOPPED_UPLOADING: "record stopped, uploading files",
    CallbackEvent.HLS_PLAYLIST: "hls playlist url",
    CallbackEvent.PAUSED: "record paused",
    CallbackEvent.RESUMED: "record resumed",
}

# 1 service failed to start, 2 room login failed, 3 MaxIdleTime, 4 MaxRecordTime, 5 engine failed
# to start, 6 network disconnected, 1001-1011 engine or file errors.
QUIT_REASONS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, *range(1001, 1012))
_NEVER_RECORDED_REASONS: tuple[int, ...] = (1, 2, 5)
# While recording, a dropped network is the usual end.
_WHILE_RECORDING_REASONS: tuple[int, ...] = (6, 6, 6, 3, *range(1001, 1012))


class DeliveryOutcome(enum.StrEnum):
    """What became of one attempt to deliver a callback."""

    DELIVERED = "delivered"  # the receiver answered 2xx
    REJECTED = "rejected"  # it answered another status
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    LOST = "lost"  # the simulated ZEGO never sent it (attempt 0)


@dataclass(frozen=True, slots=True)
class CallbackDelivery:
    """One delivery attempt (or the record of a lost callback), at a time on the engine's clock."""

    at: float
    app_id: int
    room_id: str
    task_id: str
    event_type: int
    sequence: int
    attempt: int  # 1..attempts; 0 for a lost callback
    outcome: DeliveryOutcome
    status: int | None = None  # the receiver's HTTP status, if it answered
    duplicate: bool = False  # the second copy of a duplicated callback
    error: str | None = None
    body: dict[str, Any] = field(default_factory=dict, repr=False)
    sent_at: float | None = None  # when ZEGO sent it (its `timestamp`, unrounded)

    @property
    def late_s(self) -> float:
        """How long after it was sent this attempt was made (0 for a lost callback)."""
        return 0.0 if self.sent_at is None else max(0.0, self.at - self.sent_at)

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "app_id": self.app_id, "room_id": self.room_id,
                "task_id": self.task_id, "event_type": self.event_type,
                "sequence": self.sequence, "attempt": self.attempt,
                "outcome": self.outcome.value, "status": self.status,
                "duplicate": self.duplicate, "error": self.error, "body": self.body,
                "sent_at": self.sent_at}


@dataclass(slots=True)
class _Pending:
    """An event that will be emitted (given its sequence, nonce and signature) when due."""

    app_id: int
    room_id: str
    task_id: str
    event_type: CallbackEvent
    detail: dict[str, Any]
    task: SimTask | None = None  # for NO_STREAMS repeats: is it still live?
    repeat: int = 0


@dataclass(frozen=True, slots=True)
class _Attempt:
    body: dict[str, Any]
    attempt: int
    duplicate: bool
    sent_at: float


def check_probability(name: str, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1]")
    return value


class CallbackSender:
    """POSTs ZEGO-shaped recording callbacks for the apps that have a callback secret.

    `deliver_due(now)` reads the engine's new transitions, emits the callbacks due by `now` and
    makes the delivery attempts due by `now`; a failed attempt is retried `retry_delay_s` later on
    the engine's clock, up to `attempts` in all. Every attempt is recorded in `deliveries`.
    With probability `late`, a callback's first attempt (each copy of a duplicated one on its
    own) is made a uniform `late_s` seconds after it was sent; `hold` delays one chosen callback.
    """

    def __init__(
        self,
        engine: SimEngine,
        url: str,
        secrets: Mapping[int, str],
        *,
        loss: float = 0.0,
        duplicate: float = 0.0,
        retry_delay_s: float = DEFAULT_RETRY_DELAY_S,
        attempts: int = DEFAULT_ATTEMPTS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        late: float = 0.0,
        late_s: tuple[float, float] = DEFAULT_LATE_S,
    ) -> None:
        if not url:
            raise ValueError("a callback URL is needed")
        if attempts < 1:
            raise ValueError("callback attempts must be >= 1")
        if retry_delay_s < 0 or timeout_s <= 0:
            raise ValueError("callback retry delay must be >= 0 and timeout > 0")
        if not 0.0 <= late_s[0] <= late_s[1]:
            raise ValueError("callback lateness must be (low, high) with 0 <= low <= high")
        self.engine = engine
        self.url = url
        self._secrets = dict(secrets)
        self.loss = check_probability("callback loss", loss)
        self.duplicate = check_probability("callback duplicate", duplicate)
        self.retry_delay_s = retry_delay_s
        self.attempts = attempts
        self.timeout_s = timeout_s
        self.late = check_probability("callback late", late)
        self.late_s = late_s
        self._held: dict[tuple[str, int], float] = {}  # (task id, event type) -> extra delay
        self._records: deque[CallbackDelivery] = deque(maxlen=_HISTORY)
        self._queue: list[tuple[float, int, _Pending | _Attempt]] = []
        self._order = itertools.count()
        self._sequences: dict[str, tuple[int, float]] = {}  # task id -> (next sequence, last at)
        self._cursor = len(engine.ledger)  # history from before the start is not called back
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._next_cleanup = engine.now + _SEQUENCE_TTL_S

    def __repr__(self) -> str:  # never the secrets
        return f"CallbackSender(url={self.url!r}, apps={sorted(self._secrets)})"

    @property
    def app_ids(self) -> list[int]:
        return sorted(self._secrets)

    @property
    def deliveries(self) -> list[CallbackDelivery]:
        """Every delivery attempt and lost callback so far (the last 10 000), oldest first."""
        return list(self._records)

    @property
    def pending(self) -> int:
        """Callbacks and retries waiting for their time."""
        return len(self._queue)

    def clear(self) -> None:
        self._records.clear()

    def hold(self, task_id: str, event_type: int, seconds: float) -> None:
        """Deliver the task's next callback of `event_type` `seconds` after it is sent (its
        sequence and timestamp stay those of its sending): a later callback can overtake it."""
        if seconds < 0:
            raise ValueError("a callback can be held for >= 0 seconds")
        self._held[(task_id, int(event_type))] = seconds

    def to_json(self, task_id: str | None = None) -> dict[str, Any]:
        records = [r for r in self._records if task_id is None or r.task_id == task_id]
        return {"enabled": True, "url": self.url, "apps": self.app_ids, "pending": self.pending,
                "loss": self.loss, "duplicate": self.duplicate, "late": self.late,
                "late_s": list(self.late_s),
                "retry_delay_s": self.retry_delay_s, "attempts": self.attempts,
                "deliveries": [r.to_json() for r in records]}

    # -- the schedule --------------------------------------------------------------------

    async def deliver_due(self, now: float | None = None) -> list[CallbackDelivery]:
        """Emit and send everything due by `now` (default: the engine clock's time).

        Returns the records made by this call. Callbacks of one task are sent one after the
        other, in order; different tasks' in parallel. Calls do not overlap.
        """
        async with self._lock:
            now = self.engine.clock.time() if now is None else now
            self.engine.advance_to(now)
            self._read_ledger()
            made: list[CallbackDelivery] = []
            due: dict[str, list[_Attempt]] = {}
            while self._queue and self._queue[0][0] <= now:
                at, _, item = heapq.heappop(self._queue)
                if isinstance(item, _Pending):
                    lost = self._emit(item, at)
                    if lost is not None:
                        made.append(lost)
                else:
                    due.setdefault(item.body["task_id"], []).append(item)
            if due:
                results = await asyncio.gather(*(self._send_in_order(items, now)
                                                 for items in due.values()))
                for record in itertools.chain.from_iterable(results):  # in a replayable order
                    self._keep(record)
                    made.append(record)
            if now >= self._next_cleanup:
                self._forget_sequences(now)
            return made

    async def run(self, interval_s: float) -> None:
        """Deliver what is due every `interval_s` real seconds, until cancelled."""
        while True:
            try:
                await self.deliver_due()
            except Exception:
                log.exception("callback_delivery_failed url=%s", self.url)
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _push(self, at: float, item: _Pending | _Attempt) -> None:
        heapq.heappush(self._queue, (at, next(self._order), item))

    def _read_ledger(self) -> None:
        ledger = self.engine.ledger
        for transition in ledger[self._cursor:]:
            if transition.app_id in self._secrets:
                self._on_transition(transition)
        self._cursor = len(ledger)

    def _on_transition(self, t: Transition) -> None:
        """The callbacks ZEGO sends for one status change (none for a start)."""
        if t.from_status is None:
            return
        task = self.engine.find(t.task_id)
        change = (t.from_status, t.to_status)

        def pending(event: CallbackEvent, **detail: Any) -> _Pending:
            return _Pending(t.app_id, t.room_id, t.task_id, event, detail)

        if change == (TaskStatus.RECORDING, TaskStatus.PAUSED):
            self._push(t.at, pending(CallbackEvent.PAUSED))
        elif change == (TaskStatus.PAUSED, TaskStatus.RECORDING):
            self._push(t.at, pending(CallbackEvent.RESUMED))
        elif change == (TaskStatus.INITIALIZING, TaskStatus.RECORDING) and task is not None:
            if not task.files:  # nobody publishes: "no streams" within 30 s, then every 30 s
                item = pending(CallbackEvent.NO_STREAMS)
                item.task = task
                self._push(t.at + NO_STREAM_REPEAT_S, item)
            elif self._rng("missing-stream", t.task_id).random() < MISSING_STREAM_PROBABILITY:
                self._push(t.at, pending(CallbackEvent.STREAM_MISSING,
                                         stream_id=f"stream-{len(task.files) + 1}"))
        elif t.to_status == TaskStatus.ENDED_ABNORMALLY:
            self._push(t.at, pending(CallbackEvent.ENDED_ABNORMALLY,
                                     quit_reason=self._quit_reason(t, task)))
            self._push_upload(t, task)
        elif t.to_status == TaskStatus.ENDED:
            self._push(t.at, pending(CallbackEvent.STOPPED_UPLOADING))
            self._push(t.at, pending(CallbackEvent.EXITED_NORMALLY))
            self._push_upload(t, task)

    def _push_upload(self, t: Transition, task: SimTask | None) -> None:
        """Event 1 when the files settle (the last one uploaded, kept in backup storage or given
        up on), if the task made files: the moment the engine writes the task's outcome.
        upload_status is 1 when every file reached the customer's storage, else 2."""
        if task is None or not task.has_files:
            return
        done = task.settle_at
        assert done is not None
        files = task.describe(done).get("RecordFiles", [])
        file_info = [{
            "user_id": f["UserId"], "user_name": f["UserName"], "stream_id": f["StreamId"],
            "file_id": f["FileId"], "file_url": f["FileUrl"], "file_size": f["FileSize"],
            "duration": f["Duration"], "begin_timestamp": f["BeginTimestamp"],
            "media_track_type": f["MediaTrackType"], "output_file_format": f["OutputFileFormat"],
            "resolution_width": f["ResolutionWidth"], "resolution_height": f["ResolutionHeight"],
            "status": f["Status"],
        } for f in files]
        all_uploaded = all(f["status"] == FileStatus.UPLOADED for f in file_info)
        self._push(done, _Pending(t.app_id, t.room_id, t.task_id, CallbackEvent.FILES_UPLOADED,
                                  {"upload_status": 1 if all_uploaded else 2,
                                   "file_info": file_info}))

    def _quit_reason(self, t: Transition, task: SimTask | None) -> int:
        given = self.engine.quit_reasons.get(t.task_id)
        if given is not None:
            return given
        rng = self._rng("quit-reason", t.task_id)
        if task is not None and t.at >= task.begin + MAX_RECORD_SECONDS - 1e-6:
            return 4  # MaxRecordTime reached
        if t.from_status == TaskStatus.INITIALIZING:
            return rng.choice(_NEVER_RECORDED_REASONS)
        if task is not None and not task.files:
            return 3  # MaxIdleTime: nobody ever published
        return rng.choice(_WHILE_RECORDING_REASONS)

    def _rng(self, purpose: str, *key: object) -> random.Random:
        return random.Random(":".join(str(k) for k in (self.engine.seed, "callbacks", purpose,
                                                       *key)))

    def _emit(self, item: _Pending, at: float) -> CallbackDelivery | None:
        """Give a due event its sequence, nonce and signature; queue its delivery (or lose it)."""
        if item.event_type == CallbackEvent.NO_STREAMS:
            task = item.task
            if task is None or (task.end is not None and task.end <= at) or task.forgotten:
                return None
            if item.repeat + 1 < NO_STREAM_MAX_EVENTS:
                self._push(at + NO_STREAM_REPEAT_S, _Pending(
                    item.app_id, item.room_id, item.task_id, item.event_type, {}, task,
                    item.repeat + 1))
        sequence = self._sequences.get(item.task_id, (0, at))[0]
        self._sequences[item.task_id] = (sequence + 1, at)
        rng = self._rng("delivery", item.app_id, item.task_id, sequence)
        nonce = str(rng.randrange(100_000, 100_000_000))
        lost = rng.random() < self.loss
        duplicated = rng.random() < self.duplicate
        held = self._held.pop((item.task_id, int(item.event_type)), 0.0)
        timestamp = str(int(at))
        body: dict[str, Any] = {
            "app_id": item.app_id, "task_id": item.task_id, "room_id": item.room_id,
            "event_type": int(item.event_type), "message": MESSAGES[item.event_type],
            "nonce": nonce, "timestamp": timestamp,
            "signature": callback_signature(self._secrets[item.app_id], timestamp, nonce),
            "sequence": sequence, "detail": item.detail,
        }
        if lost:
            return self._keep(self._record(at, body, 0, DeliveryOutcome.LOST))
        self._push(at + held + self._lateness(rng), _Attempt(body, 1, False, at))
        if duplicated:
            self._push(at + held + self._lateness(rng), _Attempt(body, 1, True, at))
        return None

    def _lateness(self, rng: random.Random) -> float:
        """Seconds a first attempt waits after the sending (no draw without lateness, so that
        a seed's other draws stay what they were)."""
        if self.late <= 0.0 or rng.random() >= self.late:
            return 0.0
        return rng.uniform(*self.late_s)

    def _forget_sequences(self, now: float) -> None:
        """Drop the counters of tasks silent and ended for a while: a task's sequence only ever
        grows, however long it records without a callback."""
        cutoff = now - _SEQUENCE_TTL_S

        def done(task_id: str) -> bool:
            task = self.engine.find(task_id)
            return task is None or (task.end is not None and task.end < cutoff)

        for task_id in [k for k, (_, last) in self._sequences.items()
                        if last < cutoff and done(k)]:
            del self._sequences[task_id]
        self._next_cleanup = now + _SEQUENCE_TTL_S

    def _keep(self, record: CallbackDelivery) -> CallbackDelivery:
        self._records.append(record)
        return record

    # -- the wire ------------------------------------------------------------------------

    async def _send_in_order(self, items: list[_Attempt], now: float) -> list[CallbackDelivery]:
        made = []
        for item in items:
            record = await self._send(item, now)
            made.append(record)
            if record.outcome != DeliveryOutcome.DELIVERED and item.attempt < self.attempts:
                self._push(now + self.retry_delay_s,
                           _Attempt(item.body, item.attempt + 1, item.duplicate, item.sent_at))
        return made

    async def _send(self, item: _Attempt, now: float) -> CallbackDelivery:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        status: int | None = None
        error: str | None = None
        try:
            async with self._session.post(
                    self.url, data=json.dumps(item.body),
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as response:
                status = response.status
                await response.read()
            outcome = (DeliveryOutcome.DELIVERED if 200 <= status < 300
                       else DeliveryOutcome.REJECTED)
        except TimeoutError:
            outcome, error = DeliveryOutcome.TIMEOUT, f"no answer within {self.timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            outcome, error = DeliveryOutcome.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}"
        return self._record(now, item.body, item.attempt, outcome, status, item.duplicate, error,
                            item.sent_at)

    def _record(self, at: float, body: dict[str, Any], attempt: int, outcome: DeliveryOutcome,
                status: int | None = None, duplicate: bool = False,
                error: str | None = None, sent_at: float | None = None) -> CallbackDelivery:
        record = CallbackDelivery(at, body["app_id"], body["room_id"], body["task_id"],
                                  body["event_type"], body["sequence"], attempt, outcome, status,
                                  duplicate, error, body, sent_at)
        log.debug("callback app_id=%s task_id=%s event_type=%s sequence=%s attempt=%s "
                  "outcome=%s status=%s duplicate=%s", record.app_id, record.task_id,
                  record.event_type, record.sequence, attempt, outcome.value, status, duplicate)
        return record

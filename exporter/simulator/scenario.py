"""Simulator scenarios from YAML: apps, rooms, lifecycle rates, API variants, faults, events,
recording callbacks.

The format (every key optional except `apps`, unless apps come from the command line)::

    seed: 42                      # RNG seed: same seed, same recordings and faults
    speed: 1.0                    # clock acceleration (60 = an hour per minute)
    rooms: 3                      # rooms per app when an app gives none: room-1 .. room-3
    warmup_seconds: 0             # simulate this much history before the start
    apps:
      - app_id: 1234567890
        server_secret: "0123456789abcdef0123456789abcdef"
        rooms: [lobby, stage]     # or a count
        callback_secret: "cb-1"   # optional: this app's recording callbacks are sent, signed so
    lifecycle:                    # see LifecycleRates
      arrivals_per_hour: 6        # per room, Poisson
      mean_duration_seconds: 1800
      min_duration_seconds: 10
      init_seconds: [1, 5]
      abnormal_probability: 0.05
      pause_probability: 0.2
      mean_pause_seconds: 60
      no_stream_probability: 0.02 # a task records no stream: no RecordFiles (outcome no_files)
      max_streams: 3              # a single-stream task records 1..max_streams files
      upload_failure_probability: 0.05  # per file: the customer's storage refuses it, then
      backup_probability: 0.7     #   ZEGO's backup storage keeps it (status 4), else failed (5)
      upload_seconds: [2, 30]     # a file uploads (status 2) this long after the end, uniform
      slow_upload_probability: 0  # per file: a slow upload, taking slow_upload_seconds instead
      slow_upload_seconds: [120, 1800]
      min_segment_seconds: 0     # soak runs: every status lasts at least this long
      max_duration_seconds: 86400
    api:
      list_key: TaskidList        # or TaskList
      status_semantics: inclusive # or strict
      rate_limit: 10              # DescribeTasks and DescribeRecordStatus, per app, per second
    faults:
      latency_ms: 200             # for `latency` rules
      jitter_ms: 50
      hang_seconds: 60
      clock_skew_seconds: 0
      rules:
        - kind: http_503          # see FaultKind
          probability: 0.05
          windows: [[60, 120]]    # offsets in seconds from the start; omitted = always
          actions: [DescribeTasks] # omitted = every action
    events:                       # scripted control, offsets in seconds from the start
      - {at: 5, op: start, room: lobby, name: show}   # app defaults to the first app
      - {at: 30, op: pause, task: show}
      - {at: 40, op: resume, task: show}
      - {at: 90, op: abort, room: lobby}              # newest live task in the room
      - {at: 95, op: abort, task: other, quit_reason: 6}  # what its callback reports
    callbacks:                    # recording callbacks as ZEGO sends them (see callbacks.py)
      url: http://127.0.0.1:9464/zego/callback
      secrets: {1234567890: "cb-1"}  # app id -> callback secret (or callback_secret on an app)
      loss: 0.0                   # probability that a callback is never sent
      duplicate: 0.0              # probability that it is sent twice
      late: 0.0                   # probability that it arrives late (a later one may overtake it)
      late_seconds: [1, 10]       # how late, uniform, on the simulator's clock
      retry_delay_seconds: 5      # between attempts, on the simulator's clock
      attempts: 3                 # 2 retries when the receiver fails, as ZEGO does
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from exporter.clock import Clock
from exporter.simulator.api import LIST_KEYS, STATUS_SEMANTICS, ListKey, StatusSemantics
from exporter.simulator.callbacks import DEFAULT_ATTEMPTS, DEFAULT_LATE_S, DEFAULT_RETRY_DELAY_S
from exporter.simulator.engine import OPS, LifecycleRates, SimEngine, room_names
from exporter.simulator.faults import FaultConfig
from exporter.simulator.server import ServerOptions, rate_limits

_RATE_KEYS = {
    "arrivals_per_hour": "arrivals_per_hour", "mean_duration_seconds": "mean_duration_s",
    "min_duration_seconds": "min_duration_s", "init_seconds": "init_s",
    "abnormal_probability": "abnormal_probability", "pause_probability": "pause_probability",
    "mean_pause_seconds": "mean_pause_s", "no_stream_probability": "no_stream_probability",
    "upload_failure_probability": "upload_failure_probability", "upload_seconds": "upload_s",
    "backup_probability": "backup_probability", "max_streams": "max_streams",
    "slow_upload_probability": "slow_upload_probability", "slow_upload_seconds": "slow_upload_s",
    "min_segment_seconds": "min_segment_s", "max_duration_seconds": "max_duration_s",
}


class ScenarioError(ValueError):
    """A scenario file that does not follow the format; the message names the field."""


@dataclass(frozen=True, slots=True)
class ScriptedEvent:
    at: float  # seconds after the start
    op: str
    app_id: int | None = None
    room: str | None = None
    task: str | None = None  # the `name` of an earlier start
    name: str | None = None
    quit_reason: int | None = None  # abort only


@dataclass(slots=True)
class Scenario:
    """A parsed scenario; `build` turns it into an engine and server options."""

    apps: dict[int, str] = field(default_factory=dict)
    rooms: dict[int, list[str]] = field(default_factory=dict)
    default_rooms: int = 3
    seed: int = 0
    speed: float = 1.0
    warmup_s: float = 0.0
    rates: LifecycleRates = field(default_factory=LifecycleRates)
    list_key: ListKey = "TaskidList"
    status_semantics: StatusSemantics = "inclusive"
    rate_limit: int = 10
    faults: dict[str, Any] = field(default_factory=dict)  # FaultConfig JSON, offsets unresolved
    events: list[ScriptedEvent] = field(default_factory=list)
    callback_url: str | None = None
    callback_secrets: dict[int, str] = field(default_factory=dict, repr=False)
    callback_loss: float = 0.0
    callback_duplicate: float = 0.0
    callback_retry_delay_s: float = DEFAULT_RETRY_DELAY_S
    callback_attempts: int = DEFAULT_ATTEMPTS
    callback_late: float = 0.0
    callback_late_s: tuple[float, float] = DEFAULT_LATE_S

    def rooms_of(self, app_id: int) -> list[str]:
        return self.rooms.get(app_id) or room_names(self.default_rooms)

    def build(self, clock: Clock) -> tuple[SimEngine, ServerOptions]:
        """The engine (with scripted events scheduled from now) and the server options."""
        if not self.apps:
            raise ScenarioError("apps: at least one app is needed")
        engine = SimEngine(clock, self.apps, self.seed,
                           {app: self.rooms_of(app) for app in self.apps}, self.rates,
                           self.warmup_s)
        start = engine.start_time
        named: dict[str, str] = {}
        first_app = next(iter(self.apps))
        for event in self.events:
            app_id = event.app_id or first_app
            task_id = named.get(event.task) if event.task else None
            if event.task and task_id is None:
                raise ScenarioError(f"events: task {event.task!r} is not named by an earlier start")
            result = engine.control(event.op, app_id=app_id, room_id=event.room, task_id=task_id,
                                    at=start + event.at, quit_reason=event.quit_reason)
            if event.name:
                named[event.name] = result
        faults = FaultConfig.from_json(self.faults, offset=start)
        self._check_callbacks()
        options = ServerOptions(self.list_key, self.status_semantics,
                                rate_limits(self.rate_limit), faults, self.callback_url,
                                dict(self.callback_secrets), self.callback_loss,
                                self.callback_duplicate, self.callback_retry_delay_s,
                                self.callback_attempts, callback_late=self.callback_late,
                                callback_late_s=self.callback_late_s)
        return engine, options

    def _check_callbacks(self) -> None:
        unknown = sorted(set(self.callback_secrets) - set(self.apps))
        if unknown:
            raise ScenarioError(f"callbacks.secrets: apps {unknown} are not among the apps")
        if self.callback_secrets and not self.callback_url:
            raise ScenarioError("callbacks.url: needed when an app has a callback secret")
        for name, value in (("loss", self.callback_loss), ("duplicate", self.callback_duplicate),
                            ("late", self.callback_late)):
            if not 0.0 <= value <= 1.0:
                raise ScenarioError(f"callbacks.{name}: must lie in [0, 1]")
        if self.callback_attempts < 1:
            raise ScenarioError("callbacks.attempts: must be >= 1")
        if self.callback_retry_delay_s < 0:
            raise ScenarioError("callbacks.retry_delay_seconds: must be >= 0")
        low, high = self.callback_late_s
        if not 0 <= low <= high:
            raise ScenarioError("callbacks.late_seconds: must be [low, high], 0 <= low <= high")


def _mapping(raw: Any, where: str) -> Mapping[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ScenarioError(f"{where}: must be a mapping")
    return raw


def _rooms(raw: Any, where: str) -> list[str]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return room_names(raw)
    if isinstance(raw, list) and all(isinstance(r, str | int) for r in raw):
        return [str(r) for r in raw]
    raise ScenarioError(f"{where}: must be a count or a list of room ids")


def _integer(raw: Any, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or raw != int(raw):
        raise ScenarioError(f"{where}: must be an integer")
    return int(raw)


def _choice(raw: Any, allowed: tuple[str, ...], where: str) -> str:
    if raw not in allowed:
        raise ScenarioError(f"{where}: must be one of {', '.join(allowed)}")
    return cast(str, raw)


def parse_scenario(doc: Any) -> Scenario:
    """A Scenario from a parsed YAML document."""
    top = _mapping(doc, "scenario")
    scenario = Scenario()
    try:
        scenario.seed = int(top.get("seed", 0))
        scenario.speed = float(top.get("speed", 1.0))
        scenario.warmup_s = float(top.get("warmup_seconds", 0.0))
        if "rooms" in top:
            scenario.default_rooms = len(_rooms(top["rooms"], "rooms"))
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"seed/speed/warmup_seconds: {exc}") from None
    if scenario.speed <= 0:
        raise ScenarioError("speed: must be > 0")
    for i, raw_app in enumerate(top.get("apps") or []):
        app = _mapping(raw_app, f"apps[{i}]")
        try:
            app_id = int(app["app_id"])
            secret = str(app["server_secret"])
        except (KeyError, TypeError, ValueError):
            raise ScenarioError(f"apps[{i}]: needs app_id (integer) and server_secret") from None
        scenario.apps[app_id] = secret
        if "rooms" in app:
            scenario.rooms[app_id] = _rooms(app["rooms"], f"apps[{i}].rooms")
        if app.get("callback_secret") is not None:
            scenario.callback_secrets[app_id] = str(app["callback_secret"])
    lifecycle = _mapping(top.get("lifecycle"), "lifecycle")
    unknown = set(lifecycle) - set(_RATE_KEYS)
    if unknown:
        raise ScenarioError(f"lifecycle: unknown keys {sorted(unknown)}")
    try:
        rates: dict[str, Any] = {
            _RATE_KEYS[k]: tuple(float(x) for x in v) if isinstance(v, list) else float(v)
            for k, v in lifecycle.items() if k != "max_streams"}
        if "max_streams" in lifecycle:
            rates["max_streams"] = _integer(lifecycle["max_streams"], "lifecycle.max_streams")
        scenario.rates = LifecycleRates(**rates)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"lifecycle: {exc}") from None
    api = _mapping(top.get("api"), "api")
    scenario.list_key = cast(ListKey, _choice(api.get("list_key", "TaskidList"), LIST_KEYS,
                                              "api.list_key"))
    scenario.status_semantics = cast(StatusSemantics, _choice(
        api.get("status_semantics", "inclusive"), STATUS_SEMANTICS, "api.status_semantics"))
    try:
        scenario.rate_limit = int(api.get("rate_limit", 10))
    except (TypeError, ValueError):
        raise ScenarioError("api.rate_limit: must be an integer") from None
    scenario.faults = dict(_mapping(top.get("faults"), "faults"))
    if "clock_skew_seconds" in scenario.faults:
        scenario.faults["clock_skew_s"] = scenario.faults.pop("clock_skew_seconds")
    try:
        FaultConfig.from_json(scenario.faults)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"faults: {exc}") from None
    for i, raw_event in enumerate(top.get("events") or []):
        scenario.events.append(_event(_mapping(raw_event, f"events[{i}]"), f"events[{i}]"))
    _callbacks(_mapping(top.get("callbacks"), "callbacks"), scenario)
    return scenario


_CALLBACK_KEYS = {"url", "secrets", "loss", "duplicate", "retry_delay_seconds", "attempts",
                  "late", "late_seconds"}


def _callbacks(raw: Mapping[str, Any], scenario: Scenario) -> None:
    unknown = set(raw) - _CALLBACK_KEYS
    if unknown:
        raise ScenarioError(f"callbacks: unknown keys {sorted(unknown)}")
    if raw.get("url") is not None:
        scenario.callback_url = str(raw["url"])
    secrets = _mapping(raw.get("secrets"), "callbacks.secrets")
    try:
        scenario.callback_secrets.update({int(app): str(s) for app, s in secrets.items()})
    except (TypeError, ValueError):
        raise ScenarioError("callbacks.secrets: maps app ids (integers) to secrets") from None
    for key, attr, kind in (("loss", "callback_loss", float),
                            ("duplicate", "callback_duplicate", float),
                            ("late", "callback_late", float),
                            ("retry_delay_seconds", "callback_retry_delay_s", float),
                            ("attempts", "callback_attempts", int)):
        if key in raw:
            try:
                setattr(scenario, attr, kind(raw[key]))
            except (TypeError, ValueError):
                raise ScenarioError(f"callbacks.{key}: must be a number") from None
    if "late_seconds" in raw:
        late_s = raw["late_seconds"]
        try:
            low, high = (float(x) for x in late_s)
        except (TypeError, ValueError):
            raise ScenarioError("callbacks.late_seconds: must be [low, high] seconds") from None
        scenario.callback_late_s = (low, high)


def _event(raw: Mapping[str, Any], where: str) -> ScriptedEvent:
    op = _choice(raw.get("op"), OPS, f"{where}.op")
    try:
        at = float(raw["at"])
        app_id = None if raw.get("app_id") is None else int(raw["app_id"])
    except (KeyError, TypeError, ValueError):
        raise ScenarioError(f"{where}: needs at (seconds from the start)") from None
    room = None if raw.get("room") is None else str(raw["room"])
    task = None if raw.get("task") is None else str(raw["task"])
    if op == "start" and room is None:
        raise ScenarioError(f"{where}: start needs a room")
    if op != "start" and room is None and task is None:
        raise ScenarioError(f"{where}: {op} needs a task (a start's name) or a room")
    name = None if raw.get("name") is None else str(raw["name"])
    quit_reason = raw.get("quit_reason")
    if quit_reason is not None and (op != "abort" or not isinstance(quit_reason, int)
                                    or isinstance(quit_reason, bool) or quit_reason <= 0):
        raise ScenarioError(f"{where}.quit_reason: a positive integer, on an abort only")
    return ScriptedEvent(at, op, app_id, room, task, name, quit_reason)


def load_scenario(path: str | Path) -> Scenario:
    """Read and parse a scenario file."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: {exc}") from None
    return parse_scenario(doc)


DEMO_SCENARIO = Path(__file__).with_name("scenarios") / "demo.yml"

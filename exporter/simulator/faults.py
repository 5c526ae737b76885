"""Fault injection for the simulated API: which misbehaviour each request gets, reproducibly."""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from exporter.zego.errors import Code


class FaultKind(enum.StrEnum):
    """One way the API (or the network in front of it) can misbehave."""

    LATENCY = "latency"  # answer late: latency_ms +/- jitter_ms, then normally
    HTTP_500 = "http_500"
    HTTP_502 = "http_502"
    HTTP_503 = "http_503"
    RESET = "reset"  # close the connection without answering
    HANG = "hang"  # answer only after hang_seconds (real time), past any sane client timeout
    MALFORMED_JSON = "malformed_json"
    TRUNCATED = "truncated"  # Content-Length promises more than is sent, then the connection closes
    SYSTEM_ERROR = "system_error"  # Code 300010000
    GATEWAY_ERROR = "gateway_error"  # Code 100000015
    RATE_LIMITED = "rate_limited"  # Code 300000003 whatever the rate


HTTP_STATUS = {FaultKind.HTTP_500: 500, FaultKind.HTTP_502: 502, FaultKind.HTTP_503: 503}
FAULT_CODES = {FaultKind.SYSTEM_ERROR: Code.SYSTEM_ERROR,
               FaultKind.GATEWAY_ERROR: Code.GATEWAY_INTERNAL,
               FaultKind.RATE_LIMITED: Code.RATE_LIMITED}


@dataclass(frozen=True, slots=True)
class FaultRule:
    """Inject `kind` with `probability`, only inside `windows` (if any) and for `actions` (if any).

    Windows are (from, to) Unix seconds on the simulator's clock.
    """

    kind: FaultKind
    probability: float
    windows: tuple[tuple[float, float], ...] = ()
    actions: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"fault {self.kind}: probability must lie in [0, 1]")

    def active(self, action: str, now: float) -> bool:
        if self.actions and action not in self.actions:
            return False
        return not self.windows or any(start <= now < end for start, end in self.windows)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "probability": self.probability,
                "windows": [list(w) for w in self.windows], "actions": sorted(self.actions)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], offset: float = 0.0) -> FaultRule:
        """From a JSON/YAML object; `offset` is added to window times (scenario start)."""
        try:
            kind = FaultKind(raw["kind"])
        except (KeyError, ValueError):
            raise ValueError(f"fault kind must be one of {[k.value for k in FaultKind]}") from None
        windows = tuple((float(a) + offset, float(b) + offset) for a, b in raw.get("windows", ()))
        return cls(kind, float(raw.get("probability", 1.0)), windows,
                   frozenset(str(a) for a in raw.get("actions", ())))


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """Every fault setting; `clock_skew_s` shifts the clock the API checks timestamps against."""

    rules: tuple[FaultRule, ...] = ()
    latency_ms: float = 200.0
    jitter_ms: float = 0.0
    hang_seconds: float = 60.0
    clock_skew_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"rules": [r.to_json() for r in self.rules], "latency_ms": self.latency_ms,
                "jitter_ms": self.jitter_ms, "hang_seconds": self.hang_seconds,
                "clock_skew_s": self.clock_skew_s}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], offset: float = 0.0) -> FaultConfig:
        default = cls()
        unknown = set(raw) - {"rules", "latency_ms", "jitter_ms", "hang_seconds", "clock_skew_s"}
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}")
        return cls(
            rules=tuple(FaultRule.from_json(r, offset) for r in raw.get("rules", ())),
            latency_ms=float(raw.get("latency_ms", default.latency_ms)),
            jitter_ms=float(raw.get("jitter_ms", default.jitter_ms)),
            hang_seconds=float(raw.get("hang_seconds", default.hang_seconds)),
            clock_skew_s=float(raw.get("clock_skew_s", default.clock_skew_s)),
        )


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What happens to one request: a delay first, then at most one fault."""

    delay_s: float = 0.0
    fault: FaultKind | None = None


@dataclass(slots=True)
class FaultInjector:
    """Draws each request's faults from its own RNG, so a seed replays the same faults."""

    config: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0
    injected: dict[str, int] = field(default_factory=dict)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(f"{self.seed}:faults")

    def decide(self, action: str, now: float) -> FaultDecision:
        """Every rule draws for every request (active or not), so draws line up across runs."""
        delay = 0.0
        fault: FaultKind | None = None
        for rule in self.config.rules:
            hit = self._rng.random() < rule.probability
            jitter = self._rng.uniform(-1.0, 1.0)
            if not hit or not rule.active(action, now):
                continue
            if rule.kind == FaultKind.LATENCY:
                ms = self.config.latency_ms + jitter * self.config.jitter_ms
                delay += max(0.0, ms) / 1000.0
                self._count(rule.kind)
            elif fault is None:
                fault = rule.kind
                self._count(rule.kind)
        return FaultDecision(delay, fault)

    def _count(self, kind: FaultKind) -> None:
        self.injected[kind.value] = self.injected.get(kind.value, 0) + 1


def parse_fault_option(text: str) -> FaultRule:
    """`KIND=PROBABILITY` (or just `KIND`, meaning always), as given to --fault."""
    kind, _, probability = text.partition("=")
    return FaultRule.from_json({"kind": kind.strip(),
                                "probability": float(probability) if probability else 1.0})


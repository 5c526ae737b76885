"""A simulated ZEGO Cloud Recording API for the demo, the tests and the benchmarks."""

from exporter.simulator.callbacks import (
    CallbackDelivery,
    CallbackEvent,
    CallbackSender,
    DeliveryOutcome,
)
from exporter.simulator.engine import (
    FilesSettled,
    LifecycleRates,
    RoomCounts,
    SimEngine,
    SimError,
    Transition,
    UploadOutcome,
    room_names,
    summarize,
)
from exporter.simulator.faults import FaultConfig, FaultKind, FaultRule
from exporter.simulator.scenario import DEMO_SCENARIO, Scenario, load_scenario
from exporter.simulator.server import ServerOptions, SimulatorServer, create_app, rate_limits

__all__ = [
    "DEMO_SCENARIO",
    "CallbackDelivery",
    "CallbackEvent",
    "CallbackSender",
    "DeliveryOutcome",
    "FaultConfig",
    "FaultKind",
    "FaultRule",
    "FilesSettled",
    "LifecycleRates",
    "RoomCounts",
    "Scenario",
    "ServerOptions",
    "SimEngine",
    "SimError",
    "SimulatorServer",
    "Transition",
    "UploadOutcome",
    "create_app",
    "load_scenario",
    "rate_limits",
    "room_names",
    "summarize",
]

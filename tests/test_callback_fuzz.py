"""Fuzzing the callback boundary: any body, signed or not, is a clean result, never an exception,
and whatever it changed still renders on /metrics and saves to the state file."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.registry import CollectorRegistry

from exporter.callbacks import REJECTED, CallbackReceiver
from exporter.clock import ManualClock
from exporter.config import Secret
from exporter.serve.collector import ExporterCollector
from exporter.state.model import AppState, ExporterState
from exporter.state.store import Store
from exporter.zego.callback_signing import callback_signature

APP_ID = 1234567890
SECRET = "cb-secret-0123456789"
NOW = 1_750_000_000
RESULTS = {*REJECTED, "applied", "recognised", "counted", "duplicate", "ignored",
           "out_of_order"}
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10, 300),
                    st.floats(allow_nan=True), st.text(), st.sampled_from(["\ud800", "a\x00",
                                                                         "x" * 1000]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
ids = st.one_of(st.text(max_size=300), st.sampled_from(["t1", "r1", "\ud800", "", "a\nb"]),
                json_values)
details = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "quit_reason": st.one_of(st.integers(-5, 2000), json_values),
    "file_info": st.one_of(json_values, st.lists(st.fixed_dictionaries(
        {}, optional={"status": st.one_of(st.integers(0, 6), json_values)}), max_size=5)),
    "upload_status": json_values}))


@st.composite
def signed_bodies(draw: st.DrawFn) -> bytes:
    """A callback signed with the real secret: a plausible one with up to three fields replaced
    by anything or removed, so most reach past the signature and many are applied."""
    timestamp = str(NOW + draw(st.integers(-700, 700)))
    nonce = draw(st.text(alphabet="0123456789abcdef", min_size=1, max_size=12))
    body: dict[str, Any] = {
        "app_id": draw(st.sampled_from([APP_ID, str(APP_ID)])),
        "task_id": draw(st.sampled_from(["t1", "t2", "t3"])),
        "room_id": draw(st.sampled_from(["r1", "r2", "r3"])),
        "event_type": draw(st.sampled_from([1, 2, 3, 4, 5, 7, 201, 202])),
        "sequence": draw(st.integers(0, 5)), "nonce": nonce, "timestamp": timestamp,
        "signature": callback_signature(SECRET, timestamp, nonce), "detail": draw(details),
    }
    for key in draw(st.lists(st.sampled_from(sorted(body)), max_size=3)):
        if draw(st.booleans()):
            body[key] = draw(ids)
        else:
            body.pop(key, None)
    return json.dumps(body).encode("utf-8", "surrogatepass")


bodies = st.one_of(signed_bodies(), st.binary(max_size=300),
                   json_values.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")))


def receiver() -> tuple[CallbackReceiver, ExporterState]:
    state = ExporterState({APP_ID: AppState(APP_ID, ("r1", "r2"), callbacks=True)})
    return CallbackReceiver(state, {APP_ID: Secret(SECRET)}, ManualClock(NOW)), state


@FUZZ
@given(st.lists(bodies, min_size=1, max_size=8))
def test_any_body_is_a_clean_result_and_the_state_still_renders_and_saves(
        sent: list[bytes]) -> None:
    callbacks, state = receiver()
    for body in sent:
        app_label, event_label, result = callbacks.handle(body)
        assert result in RESULTS
        event(result)
        assert app_label in ("unknown", str(APP_ID))
        assert event_label in ("unknown", "other") or event_label.isdigit()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ExporterCollector(state, {}, 15.0))
    generate_latest(registry).decode("utf-8")
    generate_openmetrics(registry).decode("utf-8")
    with tempfile.TemporaryDirectory() as directory:
        store = Store(Path(directory) / "state.db")
        store.save(state.apps[APP_ID])
        store.close()


@FUZZ
@given(signed_bodies(), st.binary(min_size=1, max_size=50))
def test_a_signed_nonce_never_carries_a_second_body(first: bytes, tail: bytes) -> None:
    callbacks, _ = receiver()
    callbacks.handle(first)
    raw = json.loads(first)
    forged = json.dumps({**raw, "message": tail.hex()}).encode("utf-8", "surrogatepass")
    assert callbacks.handle(forged)[2] in ("replayed", "stale", "malformed", "unknown_app",
                                           "bad_signature")

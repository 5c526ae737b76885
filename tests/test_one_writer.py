"""State has one writer: outside `AppState.apply` (and the store's restore), nothing changes it.

Three checks hold it: at run time the views refuse writes; mypy (strict, in `make test`) refuses
assignments to read-only properties and writes through `Mapping`s; ruff's SLF001 (in `make
test`) refuses reaching for private members. The last two are shown to catch each kind of
write, so that their clean runs over the code base mean something.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporter.state.changes import TrackedTask
from exporter.state.model import AppState
from exporter.zego.models import TaskStatus
from tests.conftest import cycle

ROOT = Path(__file__).resolve().parent.parent
WRITES = {  # a write from outside the state package -> the line that tries it
    "property": "app.up = True",
    "config": "app.app_id = 8",
    "live tasks": 'app.tracking.live["x"] = TrackedTask("x", "a", TaskStatus.RECORDING, 0)',
    "finished ids": 'app.tracking.finished.pop("x")',
    "counters": 'app.counters["a"][EventKind.STARTED] += 1',
    "callback counts": 'app.ended_by_reason["6"] = 1',
    "private": "app._live.clear()",
}


def busy_app() -> AppState:
    app = AppState(7, ("a",))
    app.apply(cycle(live=[TrackedTask("t", "a", TaskStatus.RECORDING, 0)], finished={"f": 1}))
    return app


@pytest.mark.parametrize("name", [name for name in dir(AppState)
                                  if isinstance(getattr(AppState, name), property)])
def test_no_public_view_can_be_assigned(name: str) -> None:
    with pytest.raises(AttributeError):
        setattr(busy_app(), name, None)


@pytest.mark.parametrize("write", [
    lambda app: app.tracking.live.pop("t"),  # type: ignore[attr-defined]
    lambda app: app.tracking.finished.clear(),  # type: ignore[attr-defined]
    lambda app: app.counters.clear(),  # type: ignore[attr-defined]
    lambda app: app.durations.pop("normal"),  # type: ignore[attr-defined]
    lambda app: app.ended_by_reason.update({"6": 1}),  # type: ignore[attr-defined]
    lambda app: app.upload_failures.update({"a": 1}),  # type: ignore[attr-defined]
    lambda app: app.deferred.append(None),  # type: ignore[attr-defined]
], ids=["live", "finished", "counters", "durations", "reasons", "uploads", "deferred"])
def test_the_views_refuse_writes_at_run_time(write: object) -> None:
    app = busy_app()
    with pytest.raises((TypeError, AttributeError)):
        write(app)  # type: ignore[operator]
    assert set(app.tracking.live) == {"t"} and app.tracking.finished == {"f": 1}


def _outsider(tmp_path: Path, line: str) -> Path:
    """A module outside the state package that tries `line`."""
    module = tmp_path / "outsider.py"
    module.write_text(
        "from exporter.state.changes import EventKind, TrackedTask\n"
        "from exporter.state.model import AppState\n"
        "from exporter.zego.models import TaskStatus\n\n\n"
        "def write(app: AppState) -> None:\n"
        f"    {line}\n")
    return module


@pytest.mark.parametrize("kind", [k for k in WRITES if k != "private"])
def test_mypy_refuses_a_write_from_outside(tmp_path: Path, kind: str) -> None:
    module = _outsider(tmp_path, WRITES[kind])
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--config-file", str(ROOT / "pyproject.toml"), str(module)],
        capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 1, result.stdout
    assert "outsider.py:7: error" in result.stdout, result.stdout


def test_ruff_refuses_reaching_for_private_state(tmp_path: Path) -> None:
    module = _outsider(tmp_path, WRITES["private"])
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "SLF001",
         "--config", str(ROOT / "pyproject.toml"), str(module)],
        capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "SLF001" in result.stdout, result.stdout


def test_no_module_reaches_for_a_private_member() -> None:
    """Also run by `make test` (ruff, and mypy for the rest): here as the rule's own check."""
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select",
                           "SLF001", "exporter", "bench", "mixin"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert ruff.returncode == 0, ruff.stdout

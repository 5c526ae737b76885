"""Prometheus exporter for ZEGO Cloud Recording tasks."""

import functools
import json
import platform
import subprocess
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

_DIST: Distribution | None
try:
    _DIST = distribution("zego-cloudrecord-exporter")
    __version__ = _DIST.version
except PackageNotFoundError:  # running from a source tree that was never installed
    _DIST, __version__ = None, "0.0.0+unknown"

PYTHON_VERSION = platform.python_version()


@functools.cache
def revision() -> str:
    """The commit this build came from, as build_info's `revision` label: pip records it for an
    install from a VCS URL; a source checkout has it in git; otherwise "unknown"."""
    try:
        direct_url = _DIST.read_text("direct_url.json") if _DIST is not None else None
        commit = json.loads(direct_url or "{}").get("vcs_info", {}).get("commit_id")
        if isinstance(commit, str) and commit:
            return commit
        source = Path(__file__).resolve().parent.parent
        if (source / ".git").exists():
            return subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                  capture_output=True, text=True, timeout=5,
                                  check=True).stdout.strip() or "unknown"
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return "unknown"

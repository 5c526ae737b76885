"""Prometheus exporter for ZEGO Cloud Recording tasks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("zego-cloudrecord-exporter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

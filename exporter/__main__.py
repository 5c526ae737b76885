"""`python -m exporter` runs the exporter's command line."""

from exporter.cli import run

run()

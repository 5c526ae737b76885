# Two entry points users need: `make demo` runs the exporter against the built-in simulator,
# `make test` runs everything CI runs (lint, types, tests).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint typecheck unit system-deps

# Real binaries the tests require (promtool, prometheus, alertmanager, redis-server, ...):
# installed from Debian's packages when one is missing (sudo unless root).
APT_PACKAGES := $(shell grep -v '^\s*\#' .ci/apt-packages.txt)
NEEDED_BINARIES := promtool prometheus prometheus-alertmanager amtool redis-server systemd-analyze

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip

venv: $(PY)
	$(PY) -m pip install -q -e '.[test]'

demo: venv
	$(VENV)/bin/zego-cloudrecord-exporter --demo

lint:
	$(VENV)/bin/ruff check exporter tests bench mixin

typecheck:
	$(VENV)/bin/mypy

unit:
	$(PY) -m pytest -q

system-deps:
	@for b in $(NEEDED_BINARIES); do command -v $$b >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	    $$sudo apt-get install -y -q --no-install-recommends $(APT_PACKAGES); \
	fi

test: system-deps venv lint typecheck unit

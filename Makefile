# Two entry points users need: `make demo` runs the exporter against the built-in simulator,
# `make test` runs everything CI runs (lint, types, tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# The binaries .ci/tools.sh unpacks (when the host lacks them) come first on the tests' PATH.
TOOLS := $(CURDIR)/.tools
TOOLS_ENV = PATH="$(TOOLS)/usr/bin:$(TOOLS)/usr/sbin:$$PATH" \
	LD_LIBRARY_PATH="$$(ls -d $(TOOLS)/usr/lib/*-linux-gnu $(TOOLS)/usr/lib/*-linux-gnu/systemd \
	  2>/dev/null | paste -sd: -)"

.PHONY: venv demo test lint typecheck unit tools

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip

# From the hashed lock (requirements-test.lock), then the project itself without dependencies.
venv: $(PY)
	$(PY) -m pip install -q --require-hashes -r requirements-test.lock
	$(PY) -m pip install -q --no-deps -e .

demo: venv
	$(VENV)/bin/zego-cloudrecord-exporter --demo

lint:
	$(VENV)/bin/ruff check exporter tests bench mixin

typecheck:
	$(VENV)/bin/mypy

tools:
	.ci/tools.sh

unit: tools
	$(TOOLS_ENV) $(PY) -m pytest -q

test: venv lint typecheck unit

# Two entry points users need: `make demo` runs the exporter against the built-in simulator,
# `make test` runs everything CI runs (lint, types, tests).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint typecheck unit

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip

venv: $(PY)
	$(PY) -m pip install -q -e '.[test]'

demo: venv
	$(VENV)/bin/zego-cloudrecord-exporter --demo

lint:
	$(VENV)/bin/ruff check exporter tests bench

typecheck:
	$(VENV)/bin/mypy

unit:
	$(PY) -m pytest -q

test: venv lint typecheck unit

# The two commands of the README: `make run` (set up + run the pipeline on digits), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

# Nothing waits on the network: telemetry off for every tool.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-unit bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[pipeline,dev]"
	rm -f $(VENV)/.installed-*; touch $@

setup: $(STAMP)

run: setup
	$(PY) -m flows.pipeline --params params.yaml --baselines none,kd

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf data/prepared.pt models reports checkpoints mlflow.db mlartifacts .pytest_cache

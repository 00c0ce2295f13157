# The two commands of the README: `make run` (set up + run the pipeline on digits), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# Re-install whenever the lock or pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha1sum | cut -c1-12)
PIP_TOOLS := pip-tools==7.6.2

# Nothing waits on the network: telemetry off for every tool.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-unit bench clean lock

# Exactly the lock (every package, transitive ones included), then the project itself without dependencies.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r $(LOCK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
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

# Re-resolve requirements.lock from pyproject.toml's pins (extras pipeline + dev) for CPython 3.11 on Linux
# x86_64. Existing pins are kept where still allowed; add `LOCK_ARGS=--upgrade` to move everything forward.
lock:
	test -x .lock-venv/bin/pip-compile || { $(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet $(PIP_TOOLS); }
	CUSTOM_COMPILE_COMMAND="make lock" .lock-venv/bin/pip-compile --quiet --extra pipeline --extra dev \
	  --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
	  $(LOCK_ARGS) --output-file $(LOCK) pyproject.toml
	{ printf '%s\n' "$$LOCK_HEADER"; grep -v '^##' $(LOCK); } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

define LOCK_HEADER
## requirements.lock: every package of `pip install -e ".[pipeline,dev]"`, resolved and pinned (CPython 3.11,
## Linux x86_64; torch is PyPI's CUDA build, which pulls the nvidia-* / cuda-* / triton wheels).
## Installed by `make setup` (pip install -r requirements.lock, then the project with --no-deps) and by the
## Dockerfile. Direct pins live in pyproject.toml; after changing one, regenerate this file with `make lock`
## (pip-tools' pip-compile in .lock-venv/) and commit both.
endef
export LOCK_HEADER

clean:
	rm -rf data/prepared.pt models reports checkpoints mlflow.db mlartifacts .pytest_cache

# syntax=docker/dockerfile:1
# gkd-pipeline worker image: the exact package set of requirements.lock on CPython 3.11 (Debian bookworm).
#
#   docker build -t gkd-pipeline:cuda .                              # default: CUDA PyTorch (gpu pool)
#   docker build --build-arg TORCH_VARIANT=cpu -t gkd-pipeline:cpu . # CPU PyTorch (cpu pool, servers)
#
# Why python:3.11-slim-bookworm and not an NVIDIA CUDA / PyTorch base: the lock's torch is PyPI's CUDA build,
# whose nvidia-* wheels carry the CUDA runtime, cuDNN, NCCL and friends. So the GPU image is the same
# lock that CI and `make setup` install, with no second CUDA toolkit in the base layer and no base image with
# its own torch to fight with the pinned one. The host needs only the NVIDIA driver (CUDA 13: >= 580) and the
# NVIDIA Container Toolkit (`docker run --gpus all`, or compose.yaml's device reservation).
# The CPU variant leaves out the CUDA-only lines of the lock (CUDA_ONLY_PACKAGES: torch, torchvision, triton,
# nvidia-*, cuda-*) and takes the same torch/torchvision versions from the PyTorch CPU index instead
# (the CUDA-only wheels are 4.1 GB of the 6.8 GB environment). Every other line of the lock installs as is.
#
# Default command: a Prefect worker polling the "gpu" work pool, with its health server for HEALTHCHECK.
# PREFECT_API_URL (and MLFLOW_TRACKING_URI for the flows) come from the environment at run time, never
# from the image: see compose.yaml and docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG CUDA_ONLY_PACKAGES="^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)=="

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 \
    DVC_NO_ANALYTICS=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_HOME=/home/gkd/.prefect \
    PREFECT_WORKER_WEBSERVER_HOST=127.0.0.1 \
    PREFECT_WORKER_WEBSERVER_PORT=8080

# git: DVC and the runs' git tags need it (a checkout mounted at /app may belong to another uid, hence
# safe.directory). Debian's versions move with security updates, so they are not pinned (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /app \
    && useradd --create-home --uid 1000 --shell /bin/bash gkd \
    && python -m venv "$VIRTUAL_ENV"

WORKDIR /app

# Exactly the lock, less what only the dev extra needs (pytest, hadolint: scripts/runtime_lock.py): every
# package pinned there, nothing resolved at build time.
COPY requirements.lock pyproject.toml ./
COPY scripts/runtime_lock.py /tmp/runtime_lock.py
RUN python /tmp/runtime_lock.py requirements.lock pyproject.toml > /tmp/runtime.lock \
    && if [ "$TORCH_VARIANT" = "cuda" ]; then \
        pip install -r /tmp/runtime.lock; \
    elif [ "$TORCH_VARIANT" = "cpu" ]; then \
        grep -Ev "$CUDA_ONLY_PACKAGES" /tmp/runtime.lock > /tmp/requirements-cpu.lock \
        && pip install -r /tmp/requirements-cpu.lock \
        && pip install --no-deps --index-url "$TORCH_CPU_INDEX" \
            "torch==$(sed -n 's/^torch==//p' requirements.lock)+cpu" \
            "torchvision==$(sed -n 's/^torchvision==//p' requirements.lock)+cpu"; \
    else \
        echo "TORCH_VARIANT must be cuda or cpu, got $TORCH_VARIANT" >&2; exit 1; \
    fi \
    && rm -f /tmp/runtime.lock /tmp/requirements-cpu.lock /tmp/runtime_lock.py \
    && pip check

# The project itself, without dependencies (they all came from the lock). Editable, so a checkout mounted
# at /app (compose.yaml) is the code that runs.
COPY --chown=gkd:gkd README.md LICENSE params.yaml dvc.yaml ./
COPY --chown=gkd:gkd gkd_core ./gkd_core
COPY --chown=gkd:gkd tasks ./tasks
COPY --chown=gkd:gkd flows ./flows
COPY --chown=gkd:gkd scripts ./scripts
RUN pip install --no-deps --no-build-isolation -e . \
    && chown -R gkd:gkd /app

# numeric, so Kubernetes runAsNonRoot and hosts without the name can check it (the user "gkd")
USER 1000:1000

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "/app/scripts/worker_healthcheck.py"]

CMD ["prefect", "worker", "start", "--pool", "gpu", "--type", "process", "--with-healthcheck"]

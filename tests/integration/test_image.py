"""The worker image built and run for real: scripts/image_check.sh (base from Debian's packages when no
registry answers, buildah build, no test tools inside, the image's CMD as the gpu pool's worker running the
nightly deployment's GPU stages, the registered version, the HEALTHCHECK command).

Not in the default run: it needs root, buildah/podman/debootstrap (apt), the PyPI mirror from inside the build,
~8 GB of disk and ~10 minutes on 2 cores. Run it with ``GKD_IMAGE_CHECK=1 make test PYTEST_ARGS=tests/integration/test_image.py``
(or ``bash scripts/image_check.sh``); docs/deploy.md has the figures it printed."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from _project import REPO
from _servers import tool_env

pytestmark = [
    pytest.mark.integration, pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("GKD_IMAGE_CHECK") != "1",
                       reason="builds and runs the 7.5 GB worker image (root, buildah, ~10 min): set GKD_IMAGE_CHECK=1"),
]


def test_the_image_builds_and_its_worker_runs_the_gpu_stages() -> None:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "image_check.sh")], cwd=REPO, env=tool_env(),
                          capture_output=True, text=True, timeout=3600)
    print(proc.stdout)  # the figures (pytest -s shows them; docs/deploy.md quotes them)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    figures = dict(re.findall(r"^figure: (\w+) = (\S+)$", proc.stdout, re.MULTILINE))
    assert {"build_seconds", "image_gb", "worker_start_seconds", "flow_seconds", "registered_version"} <= set(figures)
    for what in ("the HEALTHCHECK command passes while the worker runs", "the GPU stages ran on the image's worker",
                 "the HEALTHCHECK command fails once the worker stopped", "the gpu box's checkout is untouched",
                 "no pytest or hadolint in the image"):
        assert what in proc.stderr, what

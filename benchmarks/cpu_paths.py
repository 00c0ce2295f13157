"""`make run`'s accuracies on the CPU code paths this machine can be forced onto: how far they move.

    python benchmarks/cpu_paths.py                 # every path below, each in a fresh clone of this checkout
    python benchmarks/cpu_paths.py --paths default avx2

PyTorch picks its CPU kernels at start from the CPU's instruction set (ATen's vectorised kernels:
``ATEN_CPU_CAPABILITY``; oneDNN's convolutions: ``ONEDNN_MAX_CPU_ISA``); different kernels sum in different
orders, so the same seed gives different weights on different CPU types. Each path runs the README's pipeline
(``python -m flows.pipeline --params params.yaml --baselines none,kd``) in its own fresh clone with the same
thread count, and the table prints the four test accuracies per path next to the kernels PyTorch reported.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.sweep import cpu_model  # noqa: E402  (the model name every comparison table prints)
PATHS = {
    "default": {},  # what this CPU offers (AVX-512 on the project's machines)
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},  # no wide vectors
}
ROWS = ("teacher", "student (none)", "student (kd)", "student (gompertz)")
QUIET = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
logger = logging.getLogger("cpu_paths")


def run_path(name: str, extra: dict[str, str], threads: int, workdir: Path) -> dict[str, object]:
    clone = workdir / name
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = {**os.environ, **QUIET, **extra, "OMP_NUM_THREADS": str(threads)}
    capability = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                env=env, capture_output=True, text=True, check=True).stdout.strip()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", "params.yaml", "--baselines", "none,kd"],
                          cwd=clone, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"path {name}: the pipeline failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    found = {}
    for row in ROWS:
        match = re.search(rf"│ {re.escape(row)}\s*│[^│]*│\s*([0-9.]+)\s*│", proc.stdout)
        found[row] = float(match.group(1)) if match else None
    return {"path": name, "kernels": capability, "seconds": seconds, **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = []
    with tempfile.TemporaryDirectory(prefix="gkd-cpu-paths-") as tmp:
        for name in args.paths:
            logger.info("path %s: %s", name, PATHS[name] or "(nothing forced)")
            results.append(run_path(name, PATHS[name], args.threads, Path(tmp)))
            logger.info("path %s done in %.0f s", name, results[-1]["seconds"])
    cpu = cpu_model()
    print(f"\n`make run` test accuracy per CPU path ({cpu}, {args.threads} threads)\n")
    print("| path | kernels (ATen) | " + " | ".join(ROWS) + " | pipeline s |")
    print("|---|---|" + "---|" * len(ROWS) + "---|")
    for r in results:
        cells = " | ".join("-" if r[row] is None else f"{r[row]:.4f}" for row in ROWS)
        print(f"| {r['path']} | {r['kernels']} | {cells} | {r['seconds']:.0f} |")
    for row in ROWS:
        values = [r[row] for r in results if r[row] is not None]
        if values:
            print(f"{row}: spread {(max(values) - min(values)) * 100:.2f} points over {len(values)} paths")


if __name__ == "__main__":
    main()

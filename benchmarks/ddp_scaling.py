"""Throughput of the training loop on 1 vs N processes (torchrun + DistributedDataParallel), as ratios.

    python benchmarks/ddp_scaling.py                          # CPU: 1 vs 2 processes, resnet56 -> resnet20, KD
    python benchmarks/ddp_scaling.py --device cuda --nproc 1 2 4 8 --teacher resnet32x4 --student resnet8x4 \\
        --n-train 50000 --batch 64 --epochs 3                 # GPUs of one node

Each configuration is one torchrun launch (``--standalone``; one process runs under torchrun too) of this
script's worker, which trains with ``gkd_core.engine.fit`` on the device-resident loader, sharded per rank,
exactly as the stages do. Synthetic uint8 images (``--size`` square, 3 channels, ``--classes`` classes).
``images/s`` is the global rate (all ranks) over the epochs after the first (warm-up), from the rank-0 clock.

Scaling: ``strong`` (default) keeps the global batch ``--batch`` (each of N processes takes batch / N: the
recipe does not change, the per-process work shrinks); ``weak`` gives every process ``--batch`` (global batch
N x batch: a different recipe, the usual DDP reading). Threads: torchrun sets OMP_NUM_THREADS=1 per process
when N > 1 unless it is set; ``--threads`` sets it for every configuration (on CPU the comparison is then
cores-for-cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gkd_core import distributed  # noqa: E402
from gkd_core.config import LossesConfig, MethodConfig, TrainConfig  # noqa: E402
from gkd_core.data import DeviceLoader  # noqa: E402
from gkd_core.engine import FitOptions, fit, resolve_device, seed_everything  # noqa: E402
from gkd_core.methods import build_distiller  # noqa: E402
from gkd_core.models import build_model  # noqa: E402

CONFIGS = {
    "alone": MethodConfig(name="none"),
    "kd": MethodConfig(name="kd"),
    "kd_w_gm4": MethodConfig(name="full_constant", full_constant={"weights": {"kd": 1.0, "wasserstein": 1.0,
                                                                              "grad_match": 1.0}}),
}


def worker(args: argparse.Namespace) -> None:
    """One rank of one configuration; rank 0 writes the result as JSON."""
    device = distributed.init_from_env(resolve_device(args.device))
    rank, world = distributed.rank(), distributed.world_size()
    seed_everything(0, deterministic=False, device=device)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.n_train, 3, args.size, args.size), dtype=torch.uint8, generator=g)
    y = torch.randint(0, args.classes, (args.n_train,), generator=g)
    batch = args.batch * (world if args.scaling == "weak" else 1)
    loader = DeviceLoader(x, y, torch.full((3,), 0.5), torch.full((3,), 0.25), batch_size=batch, shuffle=True,
                          augment=True, crop_padding=4, hflip=True, drop_last=True, device=device,
                          shard=distributed.Shard(rank, world) if world > 1 else None)
    method = CONFIGS[args.config]
    teacher = build_model(args.teacher, args.classes, 3) if method.name != "none" else None
    student = build_model(args.student, args.classes, 3)
    losses = LossesConfig(grad_match={"every": 4})
    trainable = build_distiller(method, losses, student, teacher)
    cfg = TrainConfig(epochs=args.epochs, batch_size=batch, lr=0.05, warmup_epochs=0)
    result = fit(trainable, loader, None, cfg, FitOptions(device=device, progress_bar=False,
                                                          amp=device.type == "cuda"))
    timed = result.history[1:] or result.history
    seconds = sum(r["seconds"] for r in timed)
    images = sum(r["seconds"] * r["images_per_second"] for r in timed)
    if rank == 0:
        Path(args.json).write_text(json.dumps({
            "config": args.config, "processes": world, "global_batch": batch, "steps_per_epoch": len(loader),
            "images_per_second": images / seconds, "ms_per_step": 1000 * seconds / (len(loader) * len(timed)),
            "threads": torch.get_num_threads(), "device": str(device),
        }))
    distributed.shutdown()


def launch(args: argparse.Namespace, config: str, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(Path(__file__).resolve()), "--worker", "--config", config, "--json", str(out)]
        for name in ("device", "teacher", "student", "batch", "n_train", "size", "classes", "epochs", "scaling"):
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=None if args.verbose else
                       subprocess.DEVNULL)
        return json.loads(out.read_text())


def summarize(rows: list[dict], args: argparse.Namespace) -> None:
    """Per configuration and process count: images/s of each round and the ratio to the smallest process
    count *within the round* (interleaved rounds share the machine's load); the median of those ratios."""
    print(f"\n{args.teacher} -> {args.student}, {args.size}x{args.size}x3, {args.classes} classes, "
          f"{args.n_train} images, {args.scaling} scaling, device {args.device}")
    print("| configuration | processes | threads/process | images/s (each round) | x fewest processes (each round) "
          "| median x |")
    print("|---|---:|---:|---|---|---:|")
    counts = sorted({r["processes"] for r in rows})
    for config in dict.fromkeys(r["config"] for r in rows):
        for nproc in counts:
            mine = [r for r in rows if r["config"] == config and r["processes"] == nproc]
            base = {r["round"]: r["images_per_second"] for r in rows
                    if r["config"] == config and r["processes"] == counts[0]}
            ratios = sorted(r["images_per_second"] / base[r["round"]] for r in mine)
            mid = len(ratios) // 2
            median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
            rates = " / ".join(f"{r['images_per_second']:.1f}" for r in mine)
            each = " / ".join(f"{r['images_per_second'] / base[r['round']]:.2f}" for r in mine)
            print(f"| {config} | {nproc} | {mine[0]['threads']} | {rates} | {each} | {median:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=["alone", "kd"], choices=sorted(CONFIGS))
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--student", default="resnet20")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3, help="the first is warm-up, not timed")
    ap.add_argument("--scaling", choices=["strong", "weak"], default="strong")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every process (0: torchrun's default)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison (interleaved) and keep all")
    ap.add_argument("--json", default="", help="write every measurement here")
    ap.add_argument("--verbose", action="store_true", help="show the workers' stderr")
    ap.add_argument("--from-json", default="", help="print the summary of an earlier --json file, run nothing")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="kd", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.from_json:
        summarize(json.loads(Path(args.from_json).read_text()), args)
        return
    rows = []
    for r in range(args.rounds):
        for config in args.configs:
            for nproc in args.nproc:
                row = launch(args, config, nproc)
                row["round"] = r
                rows.append(row)
                print(f"round {r} {config:8s} {nproc} process(es): {row['images_per_second']:8.1f} images/s "
                      f"({row['ms_per_step']:.1f} ms/step, global batch {row['global_batch']}, "
                      f"{row['threads']} thread(s) per process)", flush=True)
    summarize(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Short-run accuracy of the fast data path vs the DataLoader paths, same settings, several seeds.

One teacher is trained once (fast path, seed 0); then, for every seed, the same KD student run is made three
ways and scored on the test split:

    fast path         gkd_core runner, runtime.loader = device (DeviceLoader: split resident, batched augment)
    DataLoader path   gkd_core runner, runtime.loader = torch  (TorchLoader: torch DataLoader with workers)
    reference-style   the loop of benchmarks/gpu_throughput.py: torchvision transforms per sample in
                      DataLoader workers, fp32, ``.item()`` every step, its own random augmentation stream

The first two draw the same per-epoch plan (order, flips, crops) from (seed, epoch), so on CPU they should agree
to float round-off; the reference-style loop has independent randomness, so it agrees within seed noise.
Objective for all three: CE + T^2 KL (method kd, constant weight 1, T = 4), same optimizer and LR schedule.

    python benchmarks/loader_parity.py                                  # Fashion-MNIST subset, CPU, 3 seeds
    python benchmarks/loader_parity.py --dataset digits --epochs 15
    python benchmarks/loader_parity.py --device cuda --limit 20000      # on a GPU (bf16 fast path + compile)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_throughput import reference_loader, reference_train  # noqa: E402

from gkd_core.config import Params, validate_params  # noqa: E402
from gkd_core.data import DeviceLoader, PreparedData, prepare_dataset  # noqa: E402
from gkd_core.engine import evaluate, resolve_device, seed_everything  # noqa: E402
from gkd_core.runner import build_net, distill_student, train_teacher  # noqa: E402

logger = logging.getLogger("loader_parity")

PATHS = ("fast path (DeviceLoader)", "DataLoader path (TorchLoader)", "reference-style loop (torchvision)")


def make_params(a: argparse.Namespace, seed: int, loader: str) -> Params:
    train = {
        "epochs": a.epochs, "batch_size": a.batch, "lr": a.lr, "optimizer": "sgd", "nesterov": True,
        "lr_schedule": "cosine", "augment": True, "crop_padding": a.crop_padding, "hflip": a.hflip,
        "eval_every": a.epochs,
    }
    dataset: dict[str, Any] = {"name": a.dataset, "limit": a.limit}
    if a.dataset != "digits":
        dataset["root"] = a.root
    return validate_params({
        "seed": seed,
        "dataset": dataset,
        "teacher": {"model": {"name": "digits_cnn", "width": a.teacher_width},
                    "train": {**train, "epochs": a.teacher_epochs}},
        "student": {"model": {"name": "digits_cnn", "width": a.student_width}, "train": train},
        "method": {"name": "kd", "kd": {"a": 1.0}},
        "losses": {"temperature": 4.0},
        "runtime": {"device": a.device, "loader": loader, "num_workers": a.workers, "compile": a.compile,
                    "progress_bar": False},
    })


def test_accuracy(model: torch.nn.Module, data: PreparedData, device: torch.device) -> float:
    loader = DeviceLoader(data.test_x, data.test_y, data.mean, data.std, batch_size=1024, device=device)
    return evaluate(model.to(device), loader, device)["accuracy"]


def reference_run(params: Params, data: PreparedData, teacher: torch.nn.Module, device: torch.device,
                  workers: int) -> torch.nn.Module:
    seed_everything(params.seed, params.runtime.deterministic, device)
    student = build_net(params.student.model, data)
    cfg = params.student.train
    loader = reference_loader(data, cfg.batch_size, workers, augment=cfg.augment, seed=params.seed,
                              padding=cfg.crop_padding, padding_mode="reflect", hflip=cfg.hflip)
    reference_train(student, teacher, loader, cfg.epochs, cfg, device, params.losses.temperature)
    return student.eval()


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "digits"])
    ap.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "fashion-mnist"))
    ap.add_argument("--limit", type=int, default=6000, help="training images kept (after the validation split)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--crop-padding", type=int, default=2)
    ap.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--teacher-width", type=float, default=1.0)
    ap.add_argument("--student-width", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="runtime.compile for the two gkd_core paths")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logger.setLevel(logging.INFO)
    device = resolve_device(a.device)
    t_start = time.perf_counter()

    base = make_params(a, a.seeds[0], "device")
    data = prepare_dataset(base.dataset, seed=0)
    teacher_run = train_teacher(base, data)
    teacher = teacher_run.model.to(device).eval()
    teacher_acc = test_accuracy(teacher, data, device)
    logger.info("teacher: test accuracy %.4f", teacher_acc)

    acc: dict[str, list[float]] = {p: [] for p in PATHS}
    secs: dict[str, list[float]] = {p: [] for p in PATHS}
    for seed in a.seeds:
        for path, loader in zip(PATHS, ("device", "torch", None)):
            t0 = time.perf_counter()
            if loader is None:
                model = reference_run(make_params(a, seed, "device"), data, teacher, device, a.workers)
            else:
                model = distill_student(make_params(a, seed, loader), data, teacher).model
            secs[path].append(time.perf_counter() - t0)
            acc[path].append(test_accuracy(model, data, device))
            logger.info("seed %d %s: test accuracy %.4f (%.1f s)", seed, path, acc[path][-1], secs[path][-1])

    shape = "x".join(map(str, data.train_x.shape[1:]))
    name = f"{a.dataset} ({len(data.train_y)} train / {len(data.test_y)} test, {shape})"
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nloader parity: {name}; teacher digits_cnn(w={a.teacher_width}) {a.teacher_epochs} epochs, test acc "
          f"{teacher_acc:.4f}; student digits_cnn(w={a.student_width}) KD, {a.epochs} epochs, batch {a.batch}, "
          f"crop pad {a.crop_padding}, hflip {a.hflip}; {dev}; torch {torch.__version__}")
    seed_cols = "".join(f"{'seed ' + str(s):>9}" for s in a.seeds)
    print(f"{'path':<38}{seed_cols} {'mean ± std':>17} {'s/run':>7}")
    for p in PATHS:
        m, s = mean_std(acc[p])
        row = "".join(f"{v:9.4f}" for v in acc[p])
        print(f"{p:<38}{row} {m:9.4f} ± {s:.4f} {statistics.fmean(secs[p]):7.1f}")
    diffs = [abs(x - y) for x, y in zip(acc[PATHS[0]], acc[PATHS[1]])]
    gap = abs(statistics.fmean(acc[PATHS[0]]) - statistics.fmean(acc[PATHS[2]]))
    print(f"max |DeviceLoader - TorchLoader| over seeds: {max(diffs):.4f}; |mean fast - mean reference-style|: "
          f"{gap:.4f}; total {time.perf_counter() - t_start:.0f} s")
    out = {"dataset": name, "device": dev, "torch": torch.__version__, "teacher_accuracy": teacher_acc,
           "seeds": a.seeds, "accuracy": acc, "seconds": secs, "args": vars(a)}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()

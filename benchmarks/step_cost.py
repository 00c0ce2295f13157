"""Cost of one training step per loss configuration, as ratios measured in one process.

    python benchmarks/step_cost.py                       # CPU: resnet56 -> resnet20, batch 32
    python benchmarks/step_cost.py --device cuda         # GPU: resnet32x4 -> resnet8x4, batch 64

Configurations: student alone (CE), KD, KD + Wasserstein (sliced), KD + W + gradient matching (input
gradients, double backward), and KD + W + GM applied every 4 steps. They are timed in interleaved rounds
(A B C D E, A B C D E, ...) so machine noise hits them alike; the figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkd_core.config import LossesConfig, MethodConfig, TrainConfig  # noqa: E402
from gkd_core.engine import build_optimizer, resolve_device  # noqa: E402
from gkd_core.methods import build_distiller  # noqa: E402
from gkd_core.models import build_model  # noqa: E402

logger = logging.getLogger("step_cost")

CONFIGS = {
    "student alone": dict(method="none"),
    "KD": dict(method="kd", w=0.0, g=0.0),
    "KD+W(sliced)": dict(method="kd", w=1.0, g=0.0),
    "KD+W+GM": dict(method="kd", w=1.0, g=1.0),
    "KD+W+GM every 4": dict(method="kd", w=1.0, g=1.0, every=4),
}


def make_step(cfg: dict, teacher, student_name: str, num_classes: int, device, amp: bool, channels_last: bool):
    student = build_model(student_name, num_classes=num_classes, in_channels=3).to(device)
    losses = LossesConfig(grad_match={"every": cfg.get("every", 1)})
    # KD alone is `kd`; KD with W and/or GM is the full objective at a constant weight with those weights
    method = MethodConfig(name=cfg["method"]) if cfg["method"] != "kd" or not (cfg.get("w") or cfg.get("g")) else \
        MethodConfig(name="full_constant", full_constant={"weights": {"kd": 1.0, "wasserstein": cfg.get("w", 0.0),
                                                                      "grad_match": cfg.get("g", 0.0)}})
    distiller = build_distiller(method, losses, student, teacher if cfg["method"] != "none" else None).to(device)
    if channels_last:
        distiller.student.to(memory_format=torch.channels_last)
    opt = build_optimizer(list(distiller.trainable_parameters()), TrainConfig(), device)
    state = {"step": 0}

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = distiller(x, y, progress=0.5, step=state["step"])
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        state["step"] += 1

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--student", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per configuration per round")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    teacher_name = args.teacher or ("resnet32x4" if gpu else "resnet56")
    student_name = args.student or ("resnet8x4" if gpu else "resnet20")
    batch = args.batch or (64 if gpu else 32)
    steps = args.steps or (20 if gpu else 3)
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    amp, channels_last = gpu, gpu

    teacher = build_model(teacher_name, num_classes=args.classes, in_channels=3).to(device).eval()
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (batch,), device=device)
    steppers = {k: make_step(c, teacher, student_name, args.classes, device, amp, channels_last)
                for k, c in CONFIGS.items()}

    def sync():
        if gpu:
            torch.cuda.synchronize()

    for fn in steppers.values():  # warm-up (allocator, cudnn autotune, lazy init)
        for _ in range(4 if not gpu else 10):
            fn(x, y)
    sync()
    times: dict[str, list[float]] = {k: [] for k in steppers}
    for r in range(args.rounds):
        for name, fn in steppers.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn(x, y)
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
        logger.info("round %d/%d done", r + 1, args.rounds)

    base = statistics.median(times["student alone"])
    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nstep cost: {teacher_name} -> {student_name}, batch {batch}, {args.size}x{args.size}x3, "
          f"{args.classes} classes, {dev_name}, torch {torch.__version__}, amp={amp}")
    print(f"{'configuration':<18} {'ms/step':>9} {'x alone':>8} {'images/s':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<18} {med * 1e3:9.1f} {med / base:8.2f} {batch / med:10.0f}")


if __name__ == "__main__":
    main()

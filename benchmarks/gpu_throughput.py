"""End-to-end training throughput of CIFAR-size distillation, reference-style loop vs our fast path.

In one process on one device, for resnet32x4 -> resnet8x4 at 32x32x3 with a 100-class head:

    (a)  ref_kd            a reference-style loop as the public KD repositories write it (RepDistiller,
                           mdistiller): torchvision DataLoader with worker processes and per-sample PIL
                           transforms, fp32, teacher forward on every batch, ``loss.item()`` every step
    (b)  fast_kd           gkd_core's engine (``engine.fit``) on a ``DeviceLoader``: the whole split
                           resident on the device as uint8, batched augmentation, bf16 autocast,
                           channels_last, fused SGD, torch.compile, device-side metrics: KD only
    (c)  fast_kd_w         (b) + sliced Wasserstein on the penultimate features
    (d)  fast_kd_w_gm<k>   (c) + input-gradient matching applied every k steps (``--gm-every 1 4``)
    (e)  fast_kd_noaug / fast_kd_noaug_cached
                           KD without augmentation, teacher run online vs cached teacher logits+features
    teacher training:      ref_teacher (reference-style loop, CE only), fast_teacher (engine, method none)

Every configuration trains for ``--warmup-epochs`` untimed epochs (torch.compile, cudnn autotuning,
allocator warm-up, DataLoader worker start) and then ``--epochs`` timed epochs; images/s is timed images
over timed seconds (each epoch ends with a device synchronisation). Peak device memory is
``torch.cuda.max_memory_allocated`` per configuration (reset before each). The projection is the standard
CIFAR-100 recipe: 240 epochs x 50,000 training images at the measured rate (+ the one-off teacher cache for
the cached configuration). The fast configurations run through the real ``gkd_core`` engine, loader and
distiller; only the reference loop (a) is written here, because it is the thing being compared against.

    python benchmarks/gpu_throughput.py                                   # GPU, synthetic CIFAR-size tensors
    python benchmarks/gpu_throughput.py --data ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.xz \\
        --prepared /tmp/cifar10-jpeg.prepared.pt                          # the CIFAR-10 JPEG copy
    python benchmarks/gpu_throughput.py --gm-every 1 4 --json perf.json   # also write the figures as JSON
    python benchmarks/gpu_throughput.py --device cpu --quick              # tiny CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gkd_core.config import DatasetConfig, LossesConfig, MethodConfig, TrainConfig  # noqa: E402
from gkd_core.data import (  # noqa: E402
    PreparedData,
    channel_stats,
    load_prepared,
    make_loaders,
    prepare_dataset,
    save_prepared,
)
from gkd_core.methods import build_distiller, compute_teacher_cache  # noqa: E402
from gkd_core.engine import FitOptions, fit, lr_factor, resolve_device, seed_everything  # noqa: E402
from gkd_core.models import build_model  # noqa: E402

logger = logging.getLogger("gpu_throughput")

RECIPE_EPOCHS = 240
RECIPE_IMAGES = 50_000
GOAL_SPEEDUP = 3.0  # fast path KD-only vs the reference-style loop
GOAL_OVERHEAD = 1.5  # KD+W+GM step time vs the KD-only fast path
GOAL_PROJECTION_MIN = 10.0  # 240-epoch recipe on one H100


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration."""

    name: str
    label: str
    path: str  # "reference" | "fast"
    teacher_training: bool = False  # train the teacher architecture alone (CE), no distillation
    wasserstein: float = 0.0
    grad_match: float = 0.0
    gm_every: int = 1
    augment: bool = True
    cache_teacher: bool = False


def build_specs(gm_every: Sequence[int] = (1, 4), workers: int = 8) -> list[Spec]:
    """All configurations, in report order."""
    specs = [
        Spec("ref_kd", f"(a) reference-style KD: DataLoader(num_workers={workers}), fp32, .item()/step",
             "reference"),
        Spec("fast_kd", "(b) fast path: KD", "fast"),
        Spec("fast_kd_w", "(c) fast path: KD + W(sliced)", "fast", wasserstein=1.0),
    ]
    for k in gm_every:
        specs.append(Spec(f"fast_kd_w_gm{k}", f"(d) fast path: KD + W + GM(input) every {k}", "fast",
                          wasserstein=1.0, grad_match=1.0, gm_every=int(k)))
    specs += [
        Spec("fast_kd_noaug", "(e) fast path: KD, no augmentation, teacher online", "fast", augment=False),
        Spec("fast_kd_noaug_cached", "(e) fast path: KD, no augmentation, cached teacher", "fast",
             augment=False, cache_teacher=True),
        Spec("ref_teacher", "teacher training, reference-style loop (CE)", "reference", teacher_training=True),
        Spec("fast_teacher", "teacher training, fast path (CE)", "fast", teacher_training=True),
    ]
    return specs


@dataclass
class Settings:
    device: str = "auto"
    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    classes: int = 100
    size: int = 32
    n_train: Optional[int] = None  # synthetic: default 50,000; real data: all training images
    data: Optional[str] = None  # image folder / archive (CIFAR-10 JPEG copy)
    prepared: Optional[str] = None  # cache file for the prepared --data
    batch: int = 64
    epochs: int = 2  # timed epochs per configuration
    warmup_epochs: int = 1  # untimed epochs per configuration
    workers: int = 8  # reference DataLoader workers
    lr: float = 0.05
    temperature: float = 4.0
    gm_every: tuple[int, ...] = (1, 4)
    configs: Optional[tuple[str, ...]] = None  # None: all
    compile: Optional[bool] = None  # None: on for CUDA
    amp: Optional[bool] = None  # None: on for CUDA
    channels_last: Optional[bool] = None  # None: on for CUDA
    seed: int = 0


@dataclass
class Measurement:
    name: str
    label: str
    images_per_s: float
    timed_images: int
    timed_seconds: float
    epoch_seconds: list[float]
    warmup_seconds: float
    peak_memory_mib: Optional[float]
    projected_240_s: float
    ratio_to_reference: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BenchResult:
    environment: dict[str, Any]
    settings: dict[str, Any]
    measurements: list[Measurement]
    goals: list[dict[str, Any]]


# --- data ------------------------------------------------------------------------------------------


def synthetic_data(n_train: int, size: int, classes: int, seed: int = 0, channels: int = 3) -> PreparedData:
    """Random uint8 images and labels of CIFAR shape (throughput does not depend on the pixel values)."""
    g = torch.Generator().manual_seed(seed)
    n_eval = min(n_train, 512)

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)

    def labels(n: int) -> torch.Tensor:
        return torch.randint(0, classes, (n,), generator=g)

    train_x = images(n_train)
    mean, std = channel_stats(train_x)
    return PreparedData(
        train_x=train_x, train_y=labels(n_train), val_x=images(n_eval), val_y=labels(n_eval),
        test_x=images(n_eval), test_y=labels(n_eval), mean=mean, std=std,
        classes=[str(i) for i in range(classes)],
        meta={"name": "synthetic", "source": f"torch.randint uint8 {channels}x{size}x{size}, seed {seed}"},
    )


def load_data(s: Settings) -> PreparedData:
    """The prepared training data: the image folder/archive in ``s.data`` (cached in ``s.prepared``), or
    synthetic tensors; ``s.n_train`` keeps the first N training images."""
    if s.data is None:
        return synthetic_data(s.n_train or RECIPE_IMAGES, s.size, s.classes, s.seed)
    if s.prepared and Path(s.prepared).is_file():
        data = load_prepared(s.prepared)
        logger.info("loaded prepared data from %s", s.prepared)
    else:
        data = prepare_dataset(DatasetConfig(name="image_folder", root=s.data, val_fraction=0.0), seed=s.seed)
        if s.prepared:
            save_prepared(data, s.prepared)
    if s.n_train is not None and s.n_train < len(data.train_y):
        data = PreparedData(
            train_x=data.train_x[: s.n_train].clone(), train_y=data.train_y[: s.n_train].clone(),
            val_x=data.val_x, val_y=data.val_y, test_x=data.test_x, test_y=data.test_y,
            mean=data.mean, std=data.std, classes=data.classes, meta=dict(data.meta),
        )
    return data


# --- the reference-style loop (a) ------------------------------------------------------------------


class ReferenceDataset(torch.utils.data.Dataset):
    """CIFAR as torchvision holds it (uint8 HWC numpy) with per-sample PIL transforms, as in the KD repos."""

    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, transform: Any):
        self.images = x_uint8.permute(0, 2, 3, 1).contiguous().numpy()
        if self.images.shape[-1] == 1:
            self.images = self.images[..., 0]
        self.targets = [int(v) for v in y.tolist()]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.targets[i]


def reference_transform(data: PreparedData, augment: bool = True, padding: int = 4,
                        padding_mode: str = "constant", hflip: bool = True) -> Any:
    """RandomCrop(padding) + RandomHorizontalFlip + ToTensor + Normalize, per sample (RepDistiller's)."""
    from torchvision import transforms

    steps: list[Any] = []
    if augment:
        if padding > 0:
            steps.append(transforms.RandomCrop(data.image_size, padding=padding, padding_mode=padding_mode))
        if hflip:
            steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(data.mean.tolist(), data.std.tolist())]
    return transforms.Compose(steps)


def reference_kd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """RepDistiller's DistillKL: ``KL(softmax(t/T) || softmax(s/T)) * T^2`` summed, divided by the batch."""
    p_s = F.log_softmax(s_logits / temperature, dim=1)
    p_t = F.softmax(t_logits / temperature, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * temperature**2 / s_logits.shape[0]


def reference_train(
    student: nn.Module, teacher: Optional[nn.Module], loader: torch.utils.data.DataLoader, epochs: int,
    cfg: TrainConfig, device: torch.device, temperature: float = 4.0,
) -> list[dict[str, float]]:
    """The loop of the public KD repositories: per batch ``input.cuda()``, teacher forward under no_grad,
    CE + KD, top-1/top-5 accuracy and ``loss.item()`` every step, SGD (non-fused). Same objective and LR
    schedule as ``gkd_core`` (CE + T^2 KL, per-step cosine), so accuracies are comparable.
    Returns one row per epoch: seconds, images, loss, accuracy."""
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0)
    steps = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, epochs * steps, cfg, steps))
    rows = []
    for _ in range(epochs):
        loss_sum, top1_sum, top5_sum, seen = 0.0, 0.0, 0.0, 0
        t0 = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
            s_logits = student(x)
            loss = F.cross_entropy(s_logits, y)
            if teacher is not None:
                loss = loss + reference_kd_loss(s_logits, t_logits, temperature)
            k = min(5, s_logits.shape[1])
            top = s_logits.topk(k, dim=1).indices
            hit = top == y.view(-1, 1)
            loss_sum += loss.item() * len(y)  # the per-step host syncs of the reference loops
            top1_sum += hit[:, 0].float().sum().item()
            top5_sum += hit.any(dim=1).float().sum().item()
            seen += len(y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rows.append({"seconds": time.perf_counter() - t0, "images": seen, "train_loss": loss_sum / seen,
                     "train_accuracy": top1_sum / seen, "train_top5": top5_sum / seen})
    return rows


def reference_loader(data: PreparedData, batch: int, workers: int, augment: bool = True, seed: int = 0,
                     padding: int = 4, padding_mode: str = "constant", hflip: bool = True,
                     ) -> torch.utils.data.DataLoader:
    """``DataLoader(dataset, batch_size, shuffle=True, num_workers)``: no pinning, no persistent workers."""
    transform = reference_transform(data, augment, padding, padding_mode, hflip)
    ds = ReferenceDataset(data.train_x, data.train_y, transform)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed))


# --- measurement ------------------------------------------------------------------------------------


def _resolved(s: Settings, device: torch.device) -> dict[str, bool]:
    gpu = device.type == "cuda"
    return {
        "compile": gpu if s.compile is None else bool(s.compile),
        "amp": gpu if s.amp is None else bool(s.amp),
        "channels_last": gpu if s.channels_last is None else bool(s.channels_last),
    }


def _reset_device(device: torch.device) -> None:
    if device.type == "cuda":  # free the previous configuration's memory before measuring this one's peak
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _summarise(spec: Spec, rows: list[dict[str, float]], warmup: int, device: torch.device,
               one_off_seconds: float = 0.0, extra: Optional[dict[str, Any]] = None) -> Measurement:
    timed = rows[warmup:]
    seconds = sum(r["seconds"] for r in timed)
    images = int(sum(r["images"] for r in timed))
    ips = images / seconds if seconds > 0 else float("nan")
    return Measurement(
        name=spec.name, label=spec.label, images_per_s=ips, timed_images=images, timed_seconds=seconds,
        epoch_seconds=[r["seconds"] for r in timed], warmup_seconds=sum(r["seconds"] for r in rows[:warmup]),
        peak_memory_mib=_peak_mib(device),
        projected_240_s=RECIPE_EPOCHS * RECIPE_IMAGES / ips + one_off_seconds if ips > 0 else float("nan"),
        extra=extra or {},
    )


def _train_cfg(s: Settings, augment: bool) -> TrainConfig:
    return TrainConfig(epochs=s.warmup_epochs + s.epochs, batch_size=s.batch, lr=s.lr, lr_schedule="cosine",
                       augment=augment, crop_padding=4, hflip=True)


def _models(spec: Spec, data: PreparedData, teacher_state: dict[str, torch.Tensor], s: Settings,
            num_classes: int) -> tuple[nn.Module, Optional[nn.Module]]:
    """The network to train (the teacher architecture for teacher training) and the frozen teacher, if any."""
    arch = s.teacher if spec.teacher_training else s.student
    student = build_model(arch, num_classes=num_classes, in_channels=data.in_channels)
    teacher = None
    if not spec.teacher_training:
        teacher = build_model(s.teacher, num_classes=num_classes, in_channels=data.in_channels)
        teacher.load_state_dict(teacher_state)
    return student, teacher


def run_reference(spec: Spec, data: PreparedData, teacher_state: dict[str, torch.Tensor], s: Settings,
                  device: torch.device, num_classes: int) -> Measurement:
    """Configuration (a) or reference teacher training: the loop above, fp32, DataLoader workers."""
    _reset_device(device)
    student, teacher = _models(spec, data, teacher_state, s, num_classes)
    loader = reference_loader(data, s.batch, s.workers, augment=spec.augment, seed=s.seed)
    rows = reference_train(student, teacher, loader, s.warmup_epochs + s.epochs, _train_cfg(s, spec.augment),
                           device, s.temperature)
    extra = {"workers": s.workers, "final_train_loss": rows[-1]["train_loss"]}
    out = _summarise(spec, rows, s.warmup_epochs, device, extra=extra)
    del student, teacher, loader
    return out


def run_fast(spec: Spec, data: PreparedData, teacher_state: dict[str, torch.Tensor], s: Settings,
             device: torch.device, num_classes: int) -> Measurement:
    """Configurations (b)-(e) and fast teacher training: ``gkd_core.engine.fit`` on a ``DeviceLoader``."""
    _reset_device(device)
    opts = _resolved(s, device)
    student, teacher = _models(spec, data, teacher_state, s, num_classes)
    if teacher is not None:
        teacher.to(device)
    weights = {"kd": 1.0, "wasserstein": spec.wasserstein, "grad_match": spec.grad_match}
    method = MethodConfig(name="none") if spec.teacher_training else \
        MethodConfig(name="full_constant", full_constant={"weights": weights})  # KD (+ W, GM when weighted)
    losses = LossesConfig(temperature=s.temperature, grad_match={"variant": "input", "every": spec.gm_every})
    distiller = build_distiller(method, losses, student, teacher, seed=s.seed)
    cfg = _train_cfg(s, spec.augment)
    train_loader, _, _ = make_loaders(data, cfg, "device", device, seed=s.seed,
                                      channels_last=opts["channels_last"], with_index=spec.cache_teacher)
    cache_seconds = 0.0
    if spec.cache_teacher:
        assert teacher is not None
        if opts["channels_last"]:
            teacher.to(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        distiller.attach_teacher_cache(compute_teacher_cache(
            teacher, data.train_x, data.mean, data.std, device, amp=opts["amp"],
            channels_last=opts["channels_last"], features=distiller.use_wasserstein,
        ))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cache_seconds = time.perf_counter() - t0
    result = fit(distiller, train_loader, None, cfg,
                 FitOptions(device=device, amp=opts["amp"], channels_last=opts["channels_last"],
                            compile=opts["compile"], progress_bar=False, desc=spec.name))
    rows = [{"seconds": r["seconds"], "images": round(r["images_per_second"] * r["seconds"])} for r in result.history]
    extra = {**opts, "final_train_loss": result.history[-1]["train_total"]}
    if spec.cache_teacher:
        extra["cache_seconds"] = cache_seconds
    out = _summarise(spec, rows, s.warmup_epochs, device, one_off_seconds=cache_seconds, extra=extra)
    del distiller, student, teacher, train_loader
    if opts["compile"]:
        torch._dynamo.reset()  # each configuration compiles fresh modules; keep the recompile budget per config
    return out


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), device_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def evaluate_goals(ms: dict[str, Measurement]) -> list[dict[str, Any]]:
    """The issue's goals, each with the measured value and whether it is met (where measured)."""
    goals: list[dict[str, Any]] = []
    ref, kd = ms.get("ref_kd"), ms.get("fast_kd")
    if ref is not None and kd is not None:
        v = kd.images_per_s / ref.images_per_s
        goals.append({"goal": f"fast path (b) >= {GOAL_SPEEDUP:g}x reference-style loop (a)", "value": f"{v:.2f}x",
                      "met": v >= GOAL_SPEEDUP})
    for name, m in ms.items():
        if name.startswith("fast_kd_w_gm") and kd is not None:
            v = kd.images_per_s / m.images_per_s
            every = name.removeprefix("fast_kd_w_gm")
            goals.append({"goal": f"KD+W+GM (every {every}) time <= {GOAL_OVERHEAD:g}x KD-only fast path",
                          "value": f"{v:.2f}x", "met": v <= GOAL_OVERHEAD})
    for name in ["fast_kd", *[n for n in ms if n.startswith("fast_kd_w_gm")]]:
        if name in ms:
            v = ms[name].projected_240_s / 60
            goals.append({"goal": f"240-epoch projection <= {GOAL_PROJECTION_MIN:g} min ({name})",
                          "value": f"{v:.1f} min", "met": v <= GOAL_PROJECTION_MIN})
    return goals


def run_benchmark(s: Settings, data: Optional[PreparedData] = None) -> BenchResult:
    """Run the selected configurations one after another in this process and collect the figures."""
    device = resolve_device(s.device)
    data = data if data is not None else load_data(s)
    num_classes = max(s.classes, data.num_classes)  # a 100-way head even on CIFAR-10 images
    specs = build_specs(s.gm_every, s.workers)
    if s.configs is not None:
        unknown = sorted(set(s.configs) - {sp.name for sp in specs})
        if unknown:
            raise ValueError(f"unknown configuration(s) {unknown}; known: {', '.join(sp.name for sp in specs)}")
        specs = [sp for sp in specs if sp.name in s.configs]
    torch.manual_seed(s.seed)
    teacher_state = build_model(s.teacher, num_classes=num_classes, in_channels=data.in_channels).state_dict()
    logger.info("data: %s, %d training images; device %s; %s", data.meta.get("name"), len(data.train_y), device,
                _resolved(s, device))
    measured: dict[str, Measurement] = {}
    for spec in specs:
        logger.info("running %s: %s", spec.name, spec.label)
        run = run_reference if spec.path == "reference" else run_fast
        m = run(spec, data, teacher_state, s, device, num_classes)
        logger.info("%s: %.0f images/s", spec.name, m.images_per_s)
        measured[spec.name] = m
    for m in measured.values():  # teacher training against its own reference-style loop
        base = measured.get("ref_teacher" if m.name.endswith("_teacher") else "ref_kd")
        m.ratio_to_reference = m.images_per_s / base.images_per_s if base is not None else None
    settings = {**asdict(s), **_resolved(s, device), "num_classes": num_classes, "n_train": len(data.train_y),
                "data_name": data.meta.get("name"), "image_shape": list(data.train_x.shape[1:])}
    return BenchResult(environment(device), settings, list(measured.values()), evaluate_goals(measured))


def format_report(r: BenchResult) -> str:
    st, env = r.settings, r.environment
    shape = "x".join(map(str, st["image_shape"]))
    cuda = f", CUDA {env['cuda']}, cuDNN {env['cudnn']}" if "cuda" in env else ""
    lines = [
        f"throughput: {st['teacher']} -> {st['student']}, {shape}, {st['num_classes']}-class head, "
        f"batch {st['batch']}, {st['n_train']} training images ({st['data_name']}), "
        f"{st['warmup_epochs']} untimed + {st['epochs']} timed epochs",
        f"device: {env['device']}; torch {env['torch']}{cuda}; fast path: compile={st['compile']} "
        f"bf16={st['amp']} channels_last={st['channels_last']}",
        f"command: {env['command']}",
        "",
        f"{'configuration':<62} {'images/s':>9} {'x ref':>6} {'peak MiB':>9} {'s/epoch':>8} {'240 ep.':>9}",
    ]
    for m in r.measurements:
        ratio = f"{m.ratio_to_reference:.2f}" if m.ratio_to_reference is not None else "-"
        mem = f"{m.peak_memory_mib:.0f}" if m.peak_memory_mib is not None else "n/a"
        per_epoch = m.timed_seconds / max(len(m.epoch_seconds), 1)
        lines.append(f"{m.label:<62} {m.images_per_s:9.0f} {ratio:>6} {mem:>9} {per_epoch:8.2f} "
                     f"{_minutes(m.projected_240_s):>9}")
    lines += ["", f"x ref: images/s over the reference-style loop (teacher rows: over its teacher-training loop); "
              f"240 ep.: {RECIPE_EPOCHS} x {RECIPE_IMAGES} images at the measured rate", "", "goals:"]
    for g in r.goals:
        lines.append(f"  {'MET  ' if g['met'] else 'SHORT'} {g['goal']}: {g['value']}")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    return f"{seconds / 60:.1f} min" if seconds < 6000 else f"{seconds / 3600:.1f} h"


def to_json(r: BenchResult) -> dict[str, Any]:
    return {"environment": r.environment, "settings": r.settings,
            "measurements": [asdict(m) for m in r.measurements], "goals": r.goals}


# --- CLI ---------------------------------------------------------------------------------------------


QUICK = dict(n_train=32, size=8, batch=16, epochs=1, warmup_epochs=1, workers=1, compile=False)


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Settings, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--classes", type=int, default=100, help="classifier width (at least the data's classes)")
    ap.add_argument("--size", type=int, default=32, help="synthetic image size")
    ap.add_argument("--n-train", type=int, default=None, help="training images (synthetic default 50000)")
    ap.add_argument("--data", default=None, help="image folder or archive, e.g. the CIFAR-10 JPEG .tar.xz")
    ap.add_argument("--prepared", default=None, help="cache file for the prepared --data (read if present)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (the standard recipe: 64)")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration")
    ap.add_argument("--warmup-epochs", type=int, default=1, help="untimed epochs per configuration (compile etc.)")
    ap.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default 8, CPU: 2)")
    ap.add_argument("--gm-every", type=int, nargs="+", default=[1, 4], help="gradient-matching periods to measure")
    ap.add_argument("--configs", nargs="+", default=None, help="subset of configuration names (default: all)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-amp", dest="amp", action="store_false", default=None)
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run, e.g. on CPU)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = ap.parse_args(argv)
    device = resolve_device(a.device)
    s = Settings(
        device=a.device, teacher=a.teacher, student=a.student, classes=a.classes, size=a.size, n_train=a.n_train,
        data=a.data, prepared=a.prepared, batch=a.batch, epochs=a.epochs, warmup_epochs=a.warmup_epochs,
        workers=a.workers if a.workers is not None else (8 if device.type == "cuda" else 2),
        gm_every=tuple(a.gm_every), configs=tuple(a.configs) if a.configs else None, compile=a.compile,
        amp=a.amp, channels_last=a.channels_last, seed=a.seed,
    )
    if a.quick:
        explicit = {"n_train": a.n_train, "workers": a.workers, "compile": a.compile}
        s = replace(s, **{k: v for k, v in QUICK.items() if explicit.get(k) is None})
    return s, a


def main(argv: Optional[Sequence[str]] = None) -> BenchResult:
    s, a = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seed_everything(s.seed, deterministic=False, device=resolve_device(s.device))
    result = run_benchmark(s)
    print("\n" + format_report(result))
    if a.json:
        Path(a.json).write_text(json.dumps(to_json(result), indent=2) + "\n")
        logger.info("wrote %s", a.json)
    return result


if __name__ == "__main__":
    main()

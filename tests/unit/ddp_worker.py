"""Scenarios that tests/unit/test_distributed.py runs on 2 CPU processes (gloo) under torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/unit/ddp_worker.py SCENARIO OUT_DIR

``train``: loader coverage, teacher and student training (with and without BatchNorm), checkpoints across
world sizes and one-step gradients, results written by rank 0 to OUT_DIR (``results.json`` and ``*.pt``).
``dies`` / ``hangs``: rank 1 exits / stops answering at step 2 (the run must fail, not wait forever).
The same functions run in one process (no torchrun) for the tests' references.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gkd_core import distributed
from gkd_core.data import DeviceLoader
from gkd_core.engine import FitOptions, fit, seed_everything
from gkd_core.sections import TrainConfig

# the runner, the methods and the config (POT, scikit-learn, ...) are imported where used: the dies/hangs
# scenarios start faster without them

WEIGHTS = {"kd": 1.0, "wasserstein": 0.5, "grad_match": 0.5}
STRIP = "strip_bn"  # state key: the student/teacher networks without BatchNorm


def tiny_params(epochs: int = 2, batch: int = 32, method: str = "gompertz", **runtime: Any) -> Any:
    from gkd_core.config import validate_params

    train = {"epochs": epochs, "batch_size": batch, "lr": 0.05, "optimizer": "sgd", "warmup_epochs": 0}
    return validate_params({
        "seed": 5,
        "dataset": {"name": "digits", "limit": 200},
        "teacher": {"model": {"name": "digits_cnn", "width": 1.0}, "train": train},
        "student": {"model": {"name": "digits_cnn", "width": 0.5}, "train": train},
        "method": {"name": method, "gompertz": {"weights": WEIGHTS}},
        "runtime": {"device": "cpu", "progress_bar": False, **runtime},
    })


def strip_bn(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm replaced by the identity: per-sample networks, so one process with batch
    B and two with B/2 compute the same gradients up to float round-off."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            strip_bn(child)
    return model


class NoBatchNorm:
    """Within the block the runner builds its networks without BatchNorm."""

    def __enter__(self) -> None:
        from gkd_core import runner

        self.runner = runner
        self.saved = runner.build_net
        runner.build_net = lambda cfg, data: strip_bn(self.saved(cfg, data))

    def __exit__(self, *exc: Any) -> None:
        self.runner.build_net = self.saved


def fixed_teacher(bn: bool = False) -> nn.Module:
    """An untrained teacher with fixed weights (the distillation terms only need it to be the same everywhere)."""
    from gkd_core.models import build_model

    torch.manual_seed(11)
    net = build_model("digits_cnn", 10, 1, 1.0)
    return (strip_bn(net) if not bn else net).eval()


def plain_history(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in history]


def weights(model: nn.Module) -> dict[str, list[float]]:
    return {k: v.flatten().tolist() for k, v in model.state_dict().items() if v.is_floating_point()}


def epoch_indices(data: Any, params: Any, epochs: int = 2) -> list[list[list[int]]]:
    """Per epoch, the training rows this rank's loader yields (DeviceLoader with_index)."""
    from gkd_core.data import make_loaders

    train, _, _ = make_loaders(data, params.student.train, "device", "cpu", seed=params.seed, with_index=True,
                               rank=distributed.rank(), world_size=distributed.world_size())
    return [[int(i) for _x, _y, idx in train for i in idx] for _ in range(epochs)]


def one_step_gradients(method: str, batch: int = 16) -> dict[str, Any]:
    """The trainable gradients of two steps (input-gradient matching on the first only, ``every: 2``) on one
    global batch: computed on the whole batch in this process (the reference), then under DDP with this rank's
    strided share. Also W on the whole batch, under DDP, and on this rank's share alone."""
    from gkd_core.config import LossesConfig, MethodConfig
    from gkd_core.methods import build_distiller
    from gkd_core.models import build_model

    seed_everything(0)
    student, teacher = strip_bn(build_model("digits_cnn", 10, 1, 0.5)), fixed_teacher()
    losses = LossesConfig(grad_match={"variant": "input", "every": 2})
    cfg = MethodConfig(name=method, gompertz={"weights": WEIGHTS})
    model = build_distiller(cfg, losses, student, teacher, seed=0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def step(xb: torch.Tensor, yb: torch.Tensor, s: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        for _, p in named:
            p.grad = None
        out = model(xb, yb, progress=0.5, step=s)
        out["total"].backward()
        return {n: p.grad.clone() for n, p in named if p.grad is not None}, {
            k: float(out[k].detach()) for k in ("total", "wasserstein", "grad_match")}

    ref = [step(x, y, s) for s in (0, 1)]
    r, w = distributed.rank(), distributed.world_size()
    with torch.no_grad():
        local_w = float(model(x[r::w], y[r::w], progress=0.5, step=1)["wasserstein"])
    model.distribute(lambda m: distributed.wrap(m, torch.device("cpu")))
    try:
        ddp = [step(x[r::w], y[r::w], s) for s in (0, 1)]
    finally:
        model.undistribute()
    result: dict[str, Any] = {"names": sorted(ref[0][0]), "local_w": local_w, "steps": []}
    for (g_ref, v_ref), (g_ddp, v_ddp) in zip(ref, ddp):
        diff = max(float((g_ref[n] - g_ddp[n]).abs().max()) for n in g_ref)
        scale = max(float(g_ref[n].abs().max()) for n in g_ref)
        result["steps"].append({"max_abs_diff": diff, "max_abs_grad": scale, "same_names": sorted(g_ddp) == sorted(g_ref),
                                "ref": v_ref, "ddp": v_ddp})
    return result


def scenario_train(out: Path) -> None:
    from gkd_core import runner
    from gkd_core.data import prepare_dataset

    params = tiny_params()
    data = prepare_dataset(params.dataset, seed=params.seed)
    res: dict[str, Any] = {"world_size": distributed.world_size(), "timings": {}}
    t0 = time.perf_counter()
    # the process group is joined by the runner; join it first so every part below runs distributed
    distributed.init_from_env(torch.device("cpu"))
    res["indices"] = epoch_indices(data, params)
    with NoBatchNorm():
        teacher_run = runner.train_teacher(params, data)
        res["teacher"] = plain_history(teacher_run.history)
        student = runner.distill_student(params, data, fixed_teacher())
        res["student"] = plain_history(student.history)
        res["student_weights"] = weights(student.model)
        res["student_summary"] = {k: student.summary[k] for k in ("processes", "best_val_epoch")}
        runner.distill_student(params, data, fixed_teacher(), checkpoint_path=out / "ddp-epoch1.ckpt",
                               stop_after_epochs=1)
        if (out / "single-epoch1.ckpt").is_file():  # written by the test with one process
            resumed = runner.distill_student(params, data, fixed_teacher(), checkpoint_path=out / "single-epoch1.ckpt")
            res["resumed_from_single"] = {"history": plain_history(resumed.history), "weights": weights(resumed.model),
                                          "resumed_from_epoch": resumed.summary["resumed_from_epoch"]}
    res["timings"]["no_bn_runs"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    res["student_bn"] = plain_history(runner.distill_student(params, data, fixed_teacher(bn=True)).history)
    res["timings"]["bn_run"] = time.perf_counter() - t0
    res["gradients"] = {m: one_step_gradients(m) for m in ("gompertz", "akd", "dynamic_kd")}
    gathered: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(gathered, res)
    if distributed.is_main():
        (out / "results.json").write_text(json.dumps({"ranks": gathered}))


class _Stops(nn.Module):
    """A plain trainable (DDP wraps it whole) whose rank 1 exits (``dies``) or stops answering (``hangs``) at
    step 2."""

    metric_names = {"total": "train_total"}

    def __init__(self, how: str) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.how = how

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.student.parameters()), "lr": base_lr}]

    def compile_networks(self) -> None:
        pass

    def training_state(self) -> dict[str, Any]:
        return self.state_dict()

    def load_training_state(self, state: Any) -> None:
        self.load_state_dict(state)

    def end_epoch(self, progress: float, row: Any) -> None:
        pass

    def forward(self, x: torch.Tensor, y: torch.Tensor, progress: float, step: int = 0) -> dict[str, torch.Tensor]:
        if step == 2 and distributed.rank() == 1:
            sys.stderr.write(f"rank 1 {self.how} at step 2\n")
            sys.stderr.flush()
            if self.how == "dies":
                os._exit(17)
            time.sleep(300)
        logits = self.student(x)
        ce = nn.functional.cross_entropy(logits, y)
        return {"total": ce, "logits": logits}


def scenario_stops(how: str) -> None:
    distributed.init_from_env(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (64, 1, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 10, (64,), generator=g)
    loader = DeviceLoader(x, y, torch.zeros(1), torch.ones(1), batch_size=16, shuffle=True, drop_last=True,
                          shard=distributed.Shard(distributed.rank(), distributed.world_size()))
    fit(_Stops(how), loader, None, TrainConfig(epochs=2, batch_size=16), FitOptions(progress_bar=False))


if __name__ == "__main__":
    name, out_dir = sys.argv[1], Path(sys.argv[2])
    if name == "train":
        scenario_train(out_dir)
    else:
        scenario_stops(name)
    distributed.shutdown()

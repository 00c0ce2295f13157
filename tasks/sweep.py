"""Sweeps: arms (methods) x seeds with one shared teacher, resumable, and the comparison table.

A sweep lives in one folder, ``reports/sweep/<name>/``: the resolved ``params.yaml`` (params.yaml + the
preset's or the command line's overrides), the shared prepared data and teacher (the project layout:
data/prepared.pt, models/teacher.pt, reports/), and ``points/<arm>-seed<n>/`` per point (its student, reports,
curves). Every point reads the shared data and teacher; its seed sets the student's initialisation and data
order, never the split. Each output carries the fingerprint of what produced it (``sweep_fingerprint`` in its
report), so an interrupted or repeated sweep skips what is done and redoes what changed.

:func:`compare` turns the points into the table of docs/results.md: per arm, mean ± std over seeds of the
final and of the best-validation-epoch test top-1, and the paired difference against the reference arm (same
seeds) with a 95% t-interval; the PNG shows every seed's value with the arms' means and intervals.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import yaml
from scipy import stats

from gkd_core.cli_support import UserError, load_params_checked
from gkd_core.config import apply_overrides
from gkd_core.engine import resolve_device
from gkd_core.io import atomic_write, safe_torch_load, write_json
from gkd_core.methods import compute_teacher_cache, save_teacher_cache
from gkd_core.plots import plot_comparison
from tasks import flow_inputs
from tasks.code_deps import code_hash
from tasks.distill_student import distill_student, teacher_cache_meta
from tasks.evaluate import evaluate
from tasks.paths import (
    DATA_REPORT, EVALUATE_REPORT, PARAMS_FILE, PREPARED, STUDENT_HISTORY, STUDENT_REPORT, TEACHER, TEACHER_CACHE,
    TEACHER_HISTORY, TEACHER_REPORT, StagePaths,
)
from tasks.inputs import load_model_checked, load_prepared_checked
from tasks.prepare_data import prepare_data
from tasks.reports import info_path, read_history_csv, read_json, read_report
from tasks.train_teacher import train_teacher

logger = logging.getLogger(__name__)
PRESETS_FILE = "sweeps.yaml"
SWEEP_DIR = "reports/sweep"
POINTS = "points"


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs: a name (its folder), the arms, the seeds, the reference arm, params overrides."""

    name: str
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    reference: Optional[str] = "kd"
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    # arms that are not a method name (e.g. "kd-tuned"): their params overrides, method.name included
    arm_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # pairs (a, b) of arms whose paired difference a - b the comparison reports besides ``arm - reference``
    contrasts: tuple[tuple[str, str], ...] = ()
    # the one comparison declared before the sweep ran (a, b); every other difference is exploratory
    primary: Optional[tuple[str, str]] = None

    def __post_init__(self) -> None:
        # the name and the arms become folders (reports/sweep/<name>/points/<arm>-seed<n>): never a path
        flow_inputs.name(self.name, "sweep name")
        flow_inputs.names(self.arms, "arm")

    def comparisons(self) -> list[tuple[str, str]]:
        """The pairs a comparison reports, in order: the primary, then the declared contrasts, whose two arms
        both ran (a contrast naming an arm outside ``arms`` is left out, e.g. under ``--methods``)."""
        pairs = [p for p in ((self.primary,) if self.primary else ()) + self.contrasts
                 if p[0] in self.arms and p[1] in self.arms]
        return list(dict.fromkeys(pairs))


def load_preset(root: Path, name: str) -> SweepSpec:
    """Preset ``name`` of ``<root>/sweeps.yaml``, or UserError naming the presets there are."""
    path = root / PRESETS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no presets file")
    presets = (yaml.safe_load(path.read_text()) or {}).get("presets") or {}
    if name not in presets:
        raise UserError(f"{path}: no preset {name!r}; presets: {', '.join(presets) or 'none'}")
    p = presets[name]
    missing = [k for k in ("arms", "seeds") if not p.get(k)]
    if missing:
        raise UserError(f"{path}: preset {name!r} lacks {', '.join(missing)}")
    arms = tuple(p["arms"])
    own = p.get("arm_params") or {}
    if not isinstance(own, Mapping) or any(a not in arms or not isinstance(v, Mapping) for a, v in own.items()):
        raise UserError(f"{path}: preset {name!r} arm_params: expected {{arm: {{dotted.key: value}}}} for arms among "
                        f"{list(arms)}, got {own!r}")
    return SweepSpec(name=name, arms=arms, seeds=tuple(int(s) for s in p["seeds"]),
                     reference=p.get("reference"), params=dict(p.get("params") or {}),
                     description=str(p.get("description", "")),
                     arm_params={a: {**dict(v), "method.name": str(v.get("method.name", a))} for a, v in own.items()},
                     contrasts=tuple(_pair(c, arms, f"{path}: preset {name!r} contrasts") for c in p.get("contrasts") or ()),
                     primary=_pair(p["primary"], arms, f"{path}: preset {name!r} primary") if p.get("primary") else None)


def _pair(value: Any, arms: Sequence[str], where: str) -> tuple[str, str]:
    """``[a, b]``: two different arms of the preset, or UserError naming ``where``."""
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value)
            and value[0] != value[1]):
        raise UserError(f"{where}: expected a pair of two different arm names [a, b], got {value!r}")
    unknown = [v for v in value if v not in arms]
    if unknown:
        raise UserError(f"{where}: {unknown} not among the preset's arms {list(arms)}")
    return (value[0], value[1])


def merged(data: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with dotted-key ``overrides``: ``-S``'s one meaning (gkd_core.config.apply_overrides)."""
    return apply_overrides(data, overrides)


def sweep_root(root: Path, spec: SweepSpec) -> Path:
    return root / SWEEP_DIR / spec.name


def resolved_params(root: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The project's params.yaml with a sweep's dotted-key ``overrides`` (not validated)."""
    return merged(yaml.safe_load((root / PARAMS_FILE).read_text()) or {}, overrides)


def write_sweep_params(root: Path, spec: SweepSpec) -> Path:
    """The sweep's own params.yaml (params.yaml + the spec's overrides), validated; every arm x seed checked."""
    resolved = resolved_params(root, spec.params)
    folder = sweep_root(root, spec)
    folder.mkdir(parents=True, exist_ok=True)
    text = f"# {spec.name}: {PARAMS_FILE} with the sweep's overrides (written by flows.sweep)\n" + \
        yaml.safe_dump(resolved, sort_keys=False)
    target = folder / PARAMS_FILE
    if not target.is_file() or target.read_text() != text:
        with atomic_write(target) as fh:
            fh.write(text)
    if not spec.arms or not spec.seeds:
        raise UserError("a sweep needs at least one arm and one seed")
    if spec.reference is not None and spec.reference not in spec.arms:
        raise UserError(f"reference arm {spec.reference!r} is not among the arms {list(spec.arms)}")
    for arm in spec.arms:
        for seed in spec.seeds:
            load_params_checked(target, {**arm_overrides(arm, spec.arm_params.get(arm)), "seed": seed},
                                check_dataset=False)
    load_params_checked(target)  # the dataset source too, once
    return target


def _picked(data: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The values of ``data`` at dotted ``keys`` (None where absent)."""

    def at(key: str) -> Any:
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return node

    return {k: at(k) for k in keys}


def _fingerprint(params_file: Path, keys: Sequence[str], extra: Mapping[str, Any]) -> str:
    """A hash of the params at dotted ``keys`` (and ``extra``): what an output depends on."""
    picked = _picked(yaml.safe_load(params_file.read_text()) or {}, keys)
    blob = json.dumps({**picked, **extra}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


TEACHER_RECIPE = ("seed", "dataset", "teacher")  # what makes a sweep's teacher (its params; code aside)


def teacher_recipe(params: Mapping[str, Any]) -> dict[str, Any]:
    """The sections of resolved params (a sweep's params.yaml, loaded) that define its shared teacher: recorded
    with tuned settings (flows.tune), so a tuned sweep can refuse settings chosen against another teacher."""
    return json.loads(json.dumps(_picked(params, TEACHER_RECIPE), default=str))


def recipe_differences(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: recorded -> current`` for every dotted key where two recipes differ."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _done(report: Path, fingerprint: str) -> bool:
    try:
        return read_report(report).get("sweep_fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def _stamp(report: Path, fingerprint: str) -> None:
    """Mark ``report``'s stage as done for ``fingerprint`` (in its companion: the metrics file holds numbers)."""
    info = info_path(report)
    write_json(info, {**(read_json(info) if info.is_file() else {}), "sweep_fingerprint": fingerprint})


TEACHER_RUNTIME = ("runtime.device", "runtime.amp", "runtime.deterministic", "runtime.channels_last")
# the modules whose code an output depends on (their import closure: the stage's code deps in dvc.yaml)
DATA_CODE = ("tasks.prepare_data",)
TEACHER_CODE = ("tasks.train_teacher",)
POINT_CODE = ("tasks.distill_student", "tasks.evaluate")


@functools.lru_cache(maxsize=None)
def code_fingerprint(modules: tuple[str, ...]) -> str:
    """The hash of the code that ``modules`` run (tasks.code_deps.code_hash), once per process."""
    return code_hash(modules)


def shared_stages(root: Path, spec: SweepSpec, parent_run_id: Optional[str] = None,
                  share_cache: bool = True) -> dict[str, Any]:
    """Prepare the data and train the teacher in the sweep's folder, unless done for the same params; with
    ``share_cache`` (points trained here, not on GPU workers) the teacher's outputs once for every point."""
    folder = sweep_root(root, spec)
    params_file = folder / PARAMS_FILE
    paths = StagePaths(folder)
    data_fp = _fingerprint(params_file, ("seed", "dataset"), {"code": code_fingerprint(DATA_CODE)})
    teacher_fp = _fingerprint(params_file, ("seed", "dataset", "teacher", *TEACHER_RUNTIME),
                              {"code": code_fingerprint(TEACHER_CODE), "data": data_fp})
    done = {"prepare_data": _done(paths.output(DATA_REPORT), data_fp),
            "train_teacher": _done(paths.output(TEACHER_REPORT), teacher_fp)}
    if not done["prepare_data"]:
        prepare_data(paths, parent_run_id=parent_run_id)
        _stamp(paths.output(DATA_REPORT), data_fp)
        done["train_teacher"] = False
    if not done["train_teacher"]:
        train_teacher(paths, parent_run_id=parent_run_id)
        _stamp(paths.output(TEACHER_REPORT), teacher_fp)
    if share_cache:
        share_teacher_cache(folder)
    return {"ran": [k for k, v in done.items() if not v], "teacher": read_report(paths.output(TEACHER_REPORT))}


def share_teacher_cache(folder: Path) -> Optional[Path]:
    """With ``runtime.cache_teacher`` on, the teacher's logits and features on the training split, computed
    once for the whole sweep (``data/teacher_cache.pt``, tagged with the teacher file's and the data's sha256)
    instead of once per point; kept while it matches. Returns the file, or None when the params cache nothing."""
    params = load_params_checked(folder / PARAMS_FILE, check_dataset=False)
    path = folder / TEACHER_CACHE
    if not params.runtime.cache_teacher:
        path.unlink(missing_ok=True)
        return None
    paths = StagePaths(folder)
    data = load_prepared_checked(paths.input(PREPARED))
    meta = teacher_cache_meta(paths.input(TEACHER), data)
    if path.is_file():
        try:
            if safe_torch_load(path).get("meta") == meta:
                return path
        except (OSError, ValueError, RuntimeError, AttributeError):
            pass
    teacher, _ = load_model_checked(paths.input(TEACHER), "teacher", "train_teacher", data, params.teacher.model,
                                    "teacher.model")
    device = resolve_device(params.runtime.device)
    cache = compute_teacher_cache(teacher.to(device), data.train_x, data.mean, data.std, device,
                                  amp=params.runtime.amp, features=True)
    save_teacher_cache(cache, path, meta)
    return path


def point_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def arm_overrides(arm: str, arm_params: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """An arm's params overrides: ``method.name=arm``, or the arm's own (a tuned arm names its method)."""
    return {"method.name": arm, **dict(arm_params or {})}


def sweep_point(arm: str, seed: int, folder: str, parent_run_id: Optional[str] = None,
                threads: Optional[int] = None, points_dir: str = POINTS,
                arm_params: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Distil and evaluate one student (``method.name=arm``, ``seed=seed``) with the data and teacher of
    ``folder`` (a sweep's folder, or the project for the pipeline's baselines), its outputs under
    ``<folder>/<points_dir>/<arm>-seed<n>/``; skipped when its reports already carry the fingerprint of these
    params. Returns its figures."""
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    name = point_name(arm, seed)
    paths = StagePaths(Path(folder), Path(points_dir) / name)
    params_file = Path(folder) / PARAMS_FILE
    overrides = {**arm_overrides(arm, arm_params), "seed": seed}
    fp = point_fingerprint(params_file, paths.root, arm, seed, arm_params)
    skipped = _done(paths.output(EVALUATE_REPORT), fp)
    if not skipped:
        distill_student(paths, PARAMS_FILE, overrides, parent_run_id, run_name=name,
                        teacher_cache=Path(folder) / TEACHER_CACHE)
        evaluate(paths, PARAMS_FILE, overrides, parent_run_id, run_name=f"{name}-evaluate")
        _stamp(paths.output(EVALUATE_REPORT), fp)
    return point_figures(arm, seed, paths, skipped)


def point_fingerprint(params_file: Path, folder: Path, arm: str, seed: int,
                      arm_params: Optional[Mapping[str, Any]] = None) -> str:
    """What a point's outputs depend on: the params, the arm and seed, the data's hash, the teacher's own
    fingerprint (its params and code) and the code of distill_student + evaluate."""
    teacher_info = info_path(folder / TEACHER_REPORT)
    return _fingerprint(params_file, ("dataset", "teacher", "student", "method", "losses", "runtime"),
                        {"arm": arm, "seed": seed, "data": read_report(folder / DATA_REPORT).get("hash"),
                         "teacher": (read_json(teacher_info) if teacher_info.is_file() else {}).get("sweep_fingerprint"),
                         "code": code_fingerprint(POINT_CODE),
                         **({"arm_params": dict(arm_params)} if arm_params else {})})


SHARED_FILES = (PARAMS_FILE, "data/prepared.pt", "models/teacher.pt",
                *(rel for report in (DATA_REPORT, TEACHER_REPORT) for rel in (report, info_path(report).as_posix())))


def point_reports(arm: str, seed: int, points_dir: str = POINTS) -> list[str]:
    """A point's report files, relative to its sweep folder (what travels back from a GPU worker)."""
    return [f"{points_dir}/{point_name(arm, seed)}/{rel}" for rel in
            (*(r for report in (STUDENT_REPORT, EVALUATE_REPORT) for r in (report, info_path(report).as_posix())),
             STUDENT_HISTORY)]


TERM_COLUMNS = {"ce": "train_ce", "kd": "train_kd", "wasserstein": "train_wasserstein",
                "grad_match": "train_grad_match", "weight": "weight"}


def dose(history: Sequence[Mapping[str, Any]]) -> dict[str, Optional[float]]:
    """The distillation weight's mean over epochs (``mean``: what ``kd_dose_matched`` matches, the curve's mean
    over training progress) and its learning-rate-weighted mean (``lr_weighted``: sum w_e lr_e / sum lr_e, where
    the weight moves the student as much as the step size lets it), from the per-epoch history."""
    rows = [r for r in history if r.get("weight") is not None and r.get("lr") is not None]
    if not rows:
        return {"mean": None, "lr_weighted": None}
    total_lr = sum(float(r["lr"]) for r in rows)
    return {"mean": statistics.fmean(float(r["weight"]) for r in rows),
            "lr_weighted": sum(float(r["weight"]) * float(r["lr"]) for r in rows) / total_lr if total_lr else None}


def point_figures(arm: str, seed: int, paths: StagePaths, skipped: bool) -> dict[str, Any]:
    """A point's summary, from its reports and training history: final and best-validation-epoch metrics,
    the per-epoch validation curve, the per-epoch mean of every loss term and of the distillation weight
    (unweighted: the objective adds ``weight * term``), the objective and the fingerprint it was made for."""
    train, ev = read_report(paths.output(STUDENT_REPORT)), read_report(paths.output(EVALUATE_REPORT))
    ev_info = info_path(paths.output(EVALUATE_REPORT))
    history_file = paths.output(STUDENT_HISTORY)
    history = read_history_csv(history_file) if history_file.is_file() else []
    return {
        "arm": arm, "seed": seed, "dir": str(paths.out_dir), "skipped": skipped,
        "objective": train.get("objective"),
        "test_accuracy": ev.get("test_accuracy"), "best_val_test_accuracy": train.get("best_val_test_accuracy"),
        "best_val_epoch": train.get("best_val_epoch"), "best_val_accuracy": train.get("best_val_accuracy"),
        "final_val_accuracy": train.get("final_val_accuracy"), "epochs": train.get("epochs"),
        "agreement": ev.get("agreement"), "test_ece": ev.get("test_ece"), "test_nll": ev.get("test_nll"),
        "train_seconds": train.get("train_seconds"), "device": train.get("device"),
        "val_curve": [row.get("val_accuracy") for row in history],
        # a term column that is 0 every epoch is a term the objective lacks; the weight is kept (0 for `none`)
        "terms": {term: [row.get(column) for row in history] for term, column in TERM_COLUMNS.items()
                  if any(row.get(column) for row in history) or (term == "weight" and history and column in history[0])},
        "dose": dose(history),
        "fingerprint": (read_json(ev_info) if ev_info.is_file() else {}).get("sweep_fingerprint"),
        # the threads the point trained with (its report); a skipped point from before they were reported: unknown
        "torch_threads": train.get("torch_threads", None if skipped else torch.get_num_threads()),
    }


def late_gain(curve: Sequence[Any]) -> Optional[float]:
    """How much the last quarter of the epochs added to the best validation accuracy before it (accuracy, not
    points): about 0 for a run that had converged on validation, clearly positive for one stopped while still
    improving. None for fewer than 2 epochs."""
    values = _finite(curve)
    if len(values) < 2:
        return None
    k = max(1, math.ceil(len(values) / 4))
    return max(values[-k:]) - max(values[:-k])


def teacher_figures(folder: Path) -> dict[str, Any]:
    """The sweep's shared teacher as trained (its report and per-epoch history in the sweep's folder): test
    accuracy, validation curve, best-validation epoch and :func:`late_gain`."""
    paths = StagePaths(folder)
    report = read_report(paths.output(TEACHER_REPORT)) if paths.output(TEACHER_REPORT).is_file() else {}
    history_file = paths.output(TEACHER_HISTORY)
    curve = [row.get("val_accuracy") for row in read_history_csv(history_file)] if history_file.is_file() else []
    return {"model": report.get("model"), "test_accuracy": report.get("test_accuracy"), "epochs": len(curve),
            "best_val_accuracy": report.get("best_val_accuracy"), "best_val_epoch": report.get("best_val_epoch"),
            "val_curve": curve, "late_gain": late_gain(curve), "stopped_at_epoch": report.get("stopped_at_epoch")}


# --- the comparison ---------------------------------------------------------------------------------------

METRICS = ("test_accuracy", "best_val_test_accuracy", "agreement", "test_ece", "train_seconds")


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _stat(values: Sequence[float]) -> dict[str, Any]:
    vals = _finite(values)
    return {"mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) > 1 else (0.0 if vals else None), "values": vals}


def paired_difference(arm: Sequence[dict[str, Any]], ref: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """``arm - ref`` per shared seed: mean, std and the 95% t-interval of the mean (n - 1 degrees of freedom)."""
    by_seed = {p["seed"]: p.get(metric) for p in ref}
    paired = [p for p in arm if p.get(metric) is not None and by_seed.get(p["seed"]) is not None]
    diffs = [float(p[metric]) - float(by_seed[p["seed"]]) for p in paired]
    out = _stat(diffs)
    out["n"] = len(diffs)
    out["seeds"] = [p["seed"] for p in paired]
    # seeds with a value on one side only: left out of the difference, and said so
    out["unmatched"] = sorted({p["seed"] for p in arm if p.get(metric) is not None} ^
                              {s for s, v in by_seed.items() if v is not None})
    if len(diffs) > 1:
        half = float(stats.t.ppf(0.975, len(diffs) - 1)) * out["std"] / math.sqrt(len(diffs))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    else:
        out["ci95"] = None
    return out


def compare(points: Sequence[dict[str, Any]], spec: SweepSpec,
            teacher: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The comparison of :func:`sweep_point` results (see the module docstring): per arm its statistics, the
    paired difference against the reference, the mean loss terms; the declared contrasts, each labelled
    ``primary`` (the one comparison declared beforehand, ``spec.primary``) or ``exploratory``; ``teacher``
    (:func:`teacher_figures`) is kept as given."""
    rows = []
    ref = [p for p in points if p["arm"] == spec.reference]
    by_arm = {arm: sorted((p for p in points if p["arm"] == arm), key=lambda p: p["seed"]) for arm in spec.arms}
    for arm in spec.arms:
        mine = by_arm[arm]
        row: dict[str, Any] = {"arm": arm, "n": len(mine), "seeds": [p["seed"] for p in mine],
                               "objective": next((p.get("objective") for p in mine if p.get("objective")), None),
                               "terms": _mean_terms(mine),
                               "dose": {k: _stat([(p.get("dose") or {}).get(k) for p in mine])["mean"]
                                        for k in ("mean", "lr_weighted")}}
        for metric in METRICS:
            row[metric] = _stat([p.get(metric) for p in mine])
        if spec.reference is not None and arm != spec.reference:
            row["vs_reference"] = {m: paired_difference(mine, ref, m)
                                   for m in ("test_accuracy", "best_val_test_accuracy")}
            row["comparison"] = "primary" if spec.primary == (arm, spec.reference) else "exploratory"
        rows.append(row)
    contrasts = [{"a": a, "b": b, "label": "primary" if spec.primary == (a, b) else "exploratory",
                  **{m: paired_difference(by_arm[a], by_arm[b], m) for m in ("test_accuracy", "best_val_test_accuracy")}}
                 for a, b in spec.comparisons()]
    return {"sweep": spec.name, "description": spec.description, "reference": spec.reference, "arms": rows,
            "contrasts": contrasts, "primary": list(spec.primary) if spec.primary else None,
            "points": list(points), "params_overrides": dict(spec.params), "hardware": hardware(points),
            "students": student_convergence(points), **({"teacher": dict(teacher)} if teacher else {}),
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _mean_terms(points: Sequence[Mapping[str, Any]]) -> dict[str, Optional[float]]:
    """Per term (and the weight): the mean over seeds of its mean over epochs."""
    out: dict[str, Optional[float]] = {}
    for term in TERM_COLUMNS:
        per_point = [statistics.fmean(v) for p in points if (v := _finite((p.get("terms") or {}).get(term) or []))]
        out[term] = statistics.fmean(per_point) if per_point else None
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(points: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Where a comparison ran: CPU model and the instruction set PyTorch's CPU kernels use (results repeat bit
    for bit on the same CPU type and thread count only: docs/results.md), threads, GPU, versions."""
    devices = sorted({str(p.get("device")) for p in points if p.get("device")})
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    threads = sorted({int(p["torch_threads"]) for p in points if p.get("torch_threads")})
    return {"cpu": platform.machine(), "cpu_model": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": ", ".join(map(str, threads)) or "unknown",  # points trained before they were reported
            "logical_cpus": os.cpu_count(), "gpu": gpu, "devices": devices,
            "torch": torch.__version__, "python": platform.python_version()}


def _pm(stat: Mapping[str, Any], digits: int = 4) -> str:
    return "-" if stat.get("mean") is None else f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _diff(d: Optional[Mapping[str, Any]]) -> str:
    if not d or d.get("mean") is None:
        return "-"
    ci = d.get("ci95")
    interval = f" [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]" if ci else ""
    return f"{d['mean'] * 100:+.2f}{interval}"


def _primary_sentence(primary: Optional[Sequence[str]], arms: Sequence[str]) -> str:
    if not primary:
        return "No primary comparison was declared: every difference is exploratory."
    if not all(a in arms for a in primary):
        return (f"The preset's pre-declared primary comparison (`{primary[0]}` vs `{primary[1]}`) did not run in this "
                "sweep: every difference here is exploratory (no correction for multiple comparisons).")
    return (f"The pre-declared primary comparison is `{primary[0]}` vs `{primary[1]}`; every other difference is "
            "exploratory (no correction for multiple comparisons).")


def kd_resolution(table: Mapping[str, Any]) -> Optional[str]:
    """Whether the sweep can tell KD variants apart: distillation itself (``kd`` - ``none``, a contrast or the
    reference difference) must be resolved at its seeds, else differences between KD variants tie by
    construction. None when the sweep has no such comparison."""
    found = next((c["test_accuracy"] for c in table.get("contrasts") or () if (c["a"], c["b"]) == ("kd", "none")), None)
    if found is None and table.get("reference") == "kd":
        found = next(((r.get("vs_reference") or {}).get("test_accuracy") for r in table["arms"] if r["arm"] == "none"),
                     None)
        found = {**found, "ci95": [-found["ci95"][1], -found["ci95"][0]]} if found and found.get("ci95") else None
    if not found or not found.get("ci95"):
        return None
    lo, hi = found["ci95"]
    if lo > 0:
        return f"Distillation itself is resolved here (`kd` - `none` {lo * 100:+.2f} to {hi * 100:+.2f} points)."
    return (f"**This sweep cannot tell KD variants apart**: distillation itself is not resolved at these seeds "
            f"(`kd` - `none` {lo * 100:+.2f} to {hi * 100:+.2f} points), so every difference between KD variants "
            "ties by construction.")


def convergence(table: Mapping[str, Any]) -> str:
    """Whether the teacher and the students had stopped improving on validation when their training ended:
    the teacher's :func:`late_gain` (when the table has the teacher) and, over every point, how many had their
    best validation epoch last and the mean late gain."""
    out = []
    teacher = table.get("teacher") or {}
    if teacher.get("late_gain") is not None:
        stopped = (f", stopped on its validation plateau (lr_schedule plateau) after epoch {teacher['stopped_at_epoch']}"
                   if teacher.get("stopped_at_epoch") else "")
        out.append(f"Teacher ({teacher['epochs']} epochs{stopped}, test {_num(teacher.get('test_accuracy'), 4)}): best "
                   f"validation epoch {teacher['best_val_epoch']}; its last quarter of epochs added "
                   f"{teacher['late_gain'] * 100:+.2f} points of validation accuracy.")
    students = table.get("students") or {}
    if students.get("points"):
        gain = students.get("late_gain")
        out.append(f"Students: best validation epoch = the last in {students['best_last']} of {students['points']} "
                   "points" + (f"; the last quarter of epochs added {gain['mean'] * 100:+.2f} points of validation "
                               f"accuracy on average (min {gain['min'] * 100:+.2f}, max {gain['max'] * 100:+.2f})"
                               if gain else "") +
                   ". A clearly positive gain means training stopped while validation was still improving.")
    return " ".join(out)


def student_convergence(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Over the points with a history: how many had their best validation epoch last, and the mean, min and
    max of their :func:`late_gain`."""
    trained = [p for p in points if p.get("epochs")]
    gains = _finite([late_gain(p.get("val_curve") or []) for p in trained])
    return {"points": len(trained), "best_last": sum(1 for p in trained if p.get("best_val_epoch") == p["epochs"]),
            "late_gain": {"mean": statistics.fmean(gains), "min": min(gains), "max": max(gains)} if gains else None}


def _points(d: Optional[Mapping[str, Any]]) -> str:
    return "-" if not d or not d.get("values") else ", ".join(f"{v * 100:+.2f}" for v in d["values"])


def _num(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_markdown(table: Mapping[str, Any], heading: bool = True) -> str:
    """The comparison as markdown: the arms' table, the contrasts, the mean loss terms, the objectives and the
    hardware. ``heading=False`` leaves out the title and description (docs/results.md embeds the rest)."""
    ref = table["reference"]
    lines = [f"# Sweep `{table['sweep']}`", "", table.get("description") or "", ""] if heading else []
    primary = table.get("primary")
    lines += [
        f"Mean ± std over seeds. Δ: paired difference against `{ref}` in points over the seeds both arms ran "
        "(paired n), with its 95% t-interval; an interval that contains 0 is not a difference at this number of "
        "seeds. " + _primary_sentence(primary, [r["arm"] for r in table["arms"]]),
        "",
        "| arm | seeds | test top-1 (final) | test top-1 (best val epoch) | Δ final vs " + f"`{ref}`" +
        " | Δ best-val vs " + f"`{ref}`" + " | paired n | agreement | ECE | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    unmatched = []
    for r in table["arms"]:
        vs = r.get("vs_reference") or {}
        final = vs.get("test_accuracy") or {}
        if final.get("unmatched"):
            unmatched.append(f"`{r['arm']}` vs `{ref}`: seeds {final['unmatched']}")
        label = " (primary)" if r.get("comparison") == "primary" else ""
        lines.append(
            f"| `{r['arm']}`{label} | {r['n']} | {_pm(r['test_accuracy'])} | {_pm(r['best_val_test_accuracy'])} | "
            f"{_diff(final)} | {_diff(vs.get('best_val_test_accuracy'))} | {final.get('n', '-') if vs else '-'} | "
            f"{_pm(r['agreement'], 3)} | {_pm(r['test_ece'], 3)} | {_pm(r['train_seconds'], 1)} |")
    contrasts = table.get("contrasts") or []
    if contrasts:
        lines += ["", "Contrasts (a - b, paired over the seeds both ran):", "",
                  "| a | b | kind | paired n | Δ final | Δ best-val | Δ final per seed |", "|---|---|---|---|---|---|---|"]
        for c in contrasts:
            final = c["test_accuracy"]
            if final.get("unmatched"):
                unmatched.append(f"`{c['a']}` vs `{c['b']}`: seeds {final['unmatched']}")
            lines.append(f"| `{c['a']}` | `{c['b']}` | {c['label']} | {final['n']} | {_diff(final)} | "
                         f"{_diff(c['best_val_test_accuracy'])} | {_points(final)} |")
    lines += ["", "Unmatched seeds (left out of a paired difference): " + ("; ".join(unmatched) or "none") + "."]
    resolution = kd_resolution(table)
    if resolution:
        lines += ["", resolution]
    settled = convergence(table)
    if settled:
        lines += ["", settled]
    if any(any(v is not None for v in (r.get("terms") or {}).values()) for r in table["arms"]):
        lines += ["", "Loss terms as trained (per-epoch means of the unweighted terms and of the distillation weight, "
                  "averaged over epochs and seeds; the objective adds weight x term; the weight's learning-rate-"
                  "weighted mean is sum w_e lr_e / sum lr_e over epochs):", "",
                  "| arm | CE | KD | W | GM | weight | weight (lr-weighted) |", "|---|---|---|---|---|---|---|"]
        for r in table["arms"]:
            d = r.get("dose") or {}
            # summaries written before point_figures kept an all-zero weight (`none`) lack it; the dose's plain
            # mean is the same number
            t = {**(r.get("terms") or {})}
            t["weight"] = t.get("weight") if t.get("weight") is not None else d.get("mean")
            lines.append(f"| `{r['arm']}` | " + " | ".join(_num(t.get(k), 4) for k in TERM_COLUMNS) +
                         f" | {_num(d.get('lr_weighted'), 4)} |")
    lines += ["", "Objectives as run:", ""]
    lines += [f"- `{r['arm']}`: {r['objective'] or '-'}" for r in table["arms"]]
    hw = table["hardware"]
    cpu = hw.get("cpu_model") or hw["cpu"]
    isa = f", kernels {hw['cpu_capability']}" if hw.get("cpu_capability") else ""
    lines += ["", f"Hardware: {cpu} ({hw['logical_cpus']} logical CPUs, torch threads per process: "
              f"{hw.get('torch_threads', '-')}{isa}), GPU: {hw['gpu'] or 'none'}, devices used: {', '.join(hw['devices']) or '-'}; "
              f"torch {hw['torch']}, Python {hw['python']}; written {table['written']}.", ""]
    return "\n".join(lines)


RESULTS_DIR = "docs/results"  # the committed copy of each sweep's comparison: docs/results/<name>/


def write_comparison(table: Mapping[str, Any], folder: Path, publish: Optional[Path] = None) -> dict[str, str]:
    """comparison.md, comparison.json and comparison.png in ``folder``; with ``publish`` (a folder meant to be
    committed, ``docs/results/<name>/``) the same three files there too, the points' summaries as
    ``points/<arm>-seed<n>.json`` beside them (small files, no weights, no machine paths). Returns the paths
    in ``folder``."""
    paths = _write_comparison_files(table, folder)
    if publish is not None:
        public = {**table, "points": [_public_point(p) for p in table["points"]]}
        _write_comparison_files({k: v for k, v in public.items() if k != "points"}, publish)
        for point in public["points"]:
            write_json(publish / POINTS / f"{point_name(point['arm'], point['seed'])}.json", point)
        stale = {f.name for f in (publish / POINTS).glob("*.json")} - \
            {f"{point_name(p['arm'], p['seed'])}.json" for p in public["points"]}
        for name in stale:  # points of an earlier run of this sweep that are not in this comparison
            (publish / POINTS / name).unlink()
        logger.info("sweep comparison published to %s (%d point summaries)", publish, len(public["points"]))
    return paths


def _public_point(point: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in point.items() if k not in ("dir", "skipped")}


def _write_comparison_files(table: Mapping[str, Any], folder: Path) -> dict[str, str]:
    paths = {"md": folder / "comparison.md", "json": folder / "comparison.json", "png": folder / "comparison.png"}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(paths["md"]) as fh:
        fh.write(comparison_markdown(table))
    write_json(paths["json"], table)
    plot_comparison([{"method": r["arm"], **r["test_accuracy"]} for r in table["arms"]], "test_accuracy",
                    paths["png"], title=f"sweep {table['sweep']}: final test top-1 by arm (dots: seeds)")
    logger.info("sweep comparison written to %s", folder)
    return {k: str(v) for k, v in paths.items()}

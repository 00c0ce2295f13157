"""Bad input ends with one clear message before any training, leaves no outputs and registers nothing:
through the Prefect flow, through the flow's CLI, and through plain `dvc repro`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from _project import make_project, run

pytestmark = pytest.mark.integration

CASES = {
    "invalid-value": ({"teacher.train.lr": -1.0}, "teacher.train.lr = -1.0"),
    "unknown-key": ({"losses.temprature": 4.0}, "losses.temprature: unknown key"),
    "missing-dataset": ({"dataset.name": "fashion_mnist", "dataset.root": "/nonexistent/fashion-mnist"},
                        "/nonexistent/fashion-mnist"),
    "unknown-model": ({"student.model.name": "resnet9000"}, "unknown model 'resnet9000'"),
}
OUTPUT_DIRS = ("data", "models", "reports", "checkpoints", "mlartifacts")


def _assert_untouched(root: Path) -> None:
    for d in OUTPUT_DIRS:
        assert not (root / d).exists(), f"{d}/ was created"
    assert not (root / "dvc.lock").exists()
    if (root / "mlflow.db").exists():  # nothing registered, no runs
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        assert client.search_registered_models() == []
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.fixture(params=list(CASES), ids=list(CASES))
def bad_project(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """A git + DVC project whose params.yaml has one kind of bad input."""
    change, message = CASES[request.param]
    return make_project(tmp_path / "project", change), message


@pytest.mark.parametrize("case", list(CASES))
def test_flow_refuses_bad_input_before_any_work(case: str, tmp_path: Path, prefect_harness: None) -> None:
    from flows.pipeline import pipeline
    from gkd_core.cli_support import UserError

    change, message = CASES[case]
    root = make_project(tmp_path / "project", change, init_git=False)
    with pytest.raises(UserError) as info:
        pipeline(str(root))
    assert message in str(info.value)
    assert "Traceback" not in str(info.value) and len(str(info.value).splitlines()) == 1
    _assert_untouched(root)


@pytest.mark.parametrize("case", ["unknown-key", "missing-dataset"])
def test_flow_cli_prints_one_message_and_exits_2(case: str, tmp_path: Path) -> None:
    change, message = CASES[case]
    root = make_project(tmp_path / "project", change, init_git=False)
    proc = run([sys.executable, "-m", "flows.pipeline", "--params", str(root / "params.yaml")], root, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    _assert_untouched(root)


def test_plain_dvc_repro_stops_at_the_first_stage(bad_project: tuple[Path, str]) -> None:
    root, message = bad_project
    proc = run([sys.executable, "-m", "dvc", "repro"], root, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Running stage 'train_teacher'" not in proc.stdout + proc.stderr
    _assert_untouched(root)


def test_invalid_yaml_is_one_message(tmp_path: Path, prefect_harness: None) -> None:
    from flows.pipeline import pipeline
    from gkd_core.cli_support import UserError

    root = make_project(tmp_path / "project", init_git=False)
    (root / "params.yaml").write_text("seed: [0\nteacher: {\n")
    with pytest.raises(UserError, match="not valid YAML"):
        pipeline(str(root))
    _assert_untouched(root)


def test_missing_upstream_output_is_a_clear_stage_error(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project", init_git=False)
    proc = run([sys.executable, "-m", "tasks.train_teacher", "--params", "params.yaml"], root, check=False)
    assert proc.returncode == 2
    assert "prepared dataset not found: data/prepared.pt" in proc.stderr and "dvc repro prepare_data" in proc.stderr
    assert "Traceback" not in proc.stderr
    _assert_untouched(root)


def test_gpu_dispatch_without_dvc_remote_is_refused_up_front(tmp_path: Path, prefect_harness: None) -> None:
    from flows.pipeline import pipeline
    from gkd_core.cli_support import UserError

    root = make_project(tmp_path / "project")
    with pytest.raises(UserError, match="dvc remote add"):
        pipeline(str(root), gpu_dispatch="deployment")
    _assert_untouched(root)


def test_unknown_baseline_method_is_refused_before_any_work(tmp_path: Path, prefect_harness: None) -> None:
    from flows.pipeline import pipeline
    from gkd_core.cli_support import UserError

    root = make_project(tmp_path / "project", {}, init_git=False)
    with pytest.raises(UserError, match="method.name = 'fitnets'"):
        pipeline(str(root), baselines=["kd", "fitnets"])
    _assert_untouched(root)

"""Flow parameters as the Prefect API hands them over: hostile until checked (tasks/flow_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gkd_core.cli_support import UserError
from tasks import flow_inputs
from tasks.handoff import PROJECT_DIR_ENV
from tasks.sweep import SweepSpec


@pytest.mark.parametrize("value", ["fashion-mnist", "custom", "a.b_c-1", "0", "x" * 100])
def test_safe_names_pass(value: str) -> None:
    assert flow_inputs.name(value, "sweep_name") == value


@pytest.mark.parametrize("value", ["../..", "..", ".hidden", "a/b", "/etc", "-rf", "--name=x", "", "a b", "x" * 101,
                                   "ü", "a\nb", None, 3, ["a"]])
def test_unsafe_names_are_refused_naming_the_field(value: object) -> None:
    with pytest.raises(UserError, match=r"^sweep_name=.*: expected a name of letters, digits"):
        flow_inputs.name(value, "sweep_name")


def test_a_sweep_spec_never_names_a_path() -> None:
    with pytest.raises(UserError, match=r"^sweep name='\.\./\.\.'"):
        SweepSpec(name="../..", arms=("kd",), seeds=(0,))
    with pytest.raises(UserError, match=r"^arm='kd/\.\./\.\.'"):
        SweepSpec(name="ok", arms=("kd/../..",), seeds=(0,))


@pytest.mark.parametrize("value", ["abc", "0" * 31, "G" * 32, "0" * 32 + "\n", 5])
def test_run_ids_are_32_hex_digits(value: object) -> None:
    assert flow_inputs.run_id(None) is None and flow_inputs.run_id("0123456789abcdef" * 2)
    with pytest.raises(UserError, match=r"^parent_run_id=.*: expected an MLflow run id"):
        flow_inputs.run_id(value)


def test_one_of_names_what_is_allowed() -> None:
    with pytest.raises(UserError, match=r"^stage='\.\./x': expected one of a, b$"):
        flow_inputs.one_of("../x", ("a", "b"), "stage")


def test_project_dir_from_a_deployment_stays_inside_the_workers_project(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    monkeypatch.setenv(PROJECT_DIR_ENV, str(project))
    assert flow_inputs.project_dir(None, from_deployment=True) == project
    assert flow_inputs.project_dir(str(project / "sub"), from_deployment=True) == project / "sub"
    for hostile in ("/", str(tmp_path), str(project / ".." / "elsewhere"), str(tmp_path / "project-other")):
        with pytest.raises(UserError, match=r"^project_dir=.*must stay inside this worker's project"):
            flow_inputs.project_dir(hostile, from_deployment=True)
    # a flow called in-process is the caller's own: any folder
    assert flow_inputs.project_dir(str(tmp_path), from_deployment=False) == tmp_path


def test_without_the_variable_the_working_directory_is_the_project(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROJECT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="must stay inside"):
        flow_inputs.project_dir("/tmp", from_deployment=True)

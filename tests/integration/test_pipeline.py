"""The pipeline end to end: Prefect flow -> DVC stages -> MLflow runs and registry; DVC's caching rules."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from _project import commit_all, edit_params, run

pytestmark = pytest.mark.integration

ALL_STAGES = ["prepare_data", "train_teacher", "distill_student", "evaluate", "export_onnx"]


def _dvc_yaml(root: Path) -> dict[str, Any]:
    return yaml.safe_load((root / "dvc.yaml").read_text())


def _exp_records(node: Any):
    """Every revision's ``data`` ({params, metrics, ...}) in `dvc exp show --json` output."""
    if isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "params" in data and "metrics" in data:
            yield data
        for value in node.values():
            yield from _exp_records(value)
    elif isinstance(node, list):
        for value in node:
            yield from _exp_records(value)


def _entries(items: list[Any]) -> set[str]:
    return {next(iter(i)) if isinstance(i, dict) else i for i in items or []}


def test_dvc_yaml_and_flow_agree(pipeline_project: Path) -> None:
    """Same stages in the same order; every stage's declared files are the ones the tasks write."""
    from flows.pipeline import STAGES
    from flows.prefect_tasks import GPU_STAGES, stage_options
    from tasks import dvc_ops
    from tasks.stages import STAGES as SPECS

    assert dvc_ops.stage_names(pipeline_project) == list(STAGES) == ALL_STAGES
    stages = _dvc_yaml(pipeline_project)["stages"]
    upstream = dvc_ops.stage_upstream(pipeline_project)
    for i, name in enumerate(STAGES):
        st = stages[name]
        assert st["cmd"] == f"python -m tasks.{name} --params params.yaml"
        assert f"tasks/{name}.py" in st["deps"]
        declared = _entries(st.get("outs")) | _entries(st.get("metrics")) | _entries(st.get("plots"))
        assert declared == set(SPECS[name].outputs), name
        assert set(upstream[name]) <= set(STAGES[:i]), f"{name} depends on a later stage"
    assert GPU_STAGES == {"train_teacher", "distill_student"}
    assert all("gpu" in stage_options(s)["tags"] for s in GPU_STAGES)
    # every section of params.yaml is some stage's dependency, except the ones only flows read
    listed = {p.split(".")[0] for st in stages.values() for p in st.get("params", [])}
    sections = set(yaml.safe_load((pipeline_project / "params.yaml").read_text()))
    assert sections - listed == {"mlflow", "promote", "timeouts"}  # read by flows, not by a stage


def test_every_prefect_task_takes_its_retries_from_the_one_table() -> None:
    """Retry counts and delays live in flows/prefect_tasks.py's RETRIES and nowhere else (tasks/ has no Prefect
    at all: tests/unit/test_layers.py)."""
    import ast

    from flows import prefect_tasks
    from flows.pipeline import STAGES, stage_task

    table = prefect_tasks.RETRIES
    assert set(STAGES) | {"register", "promote", "sweep-point", "tune-trials"} == set(table)
    expected = {name: (r.retries, r.delay_seconds) for name, r in table.items()}
    # transient failures are retried (data I/O, long training that resumes, the registry); deterministic ones not
    assert expected["prepare_data"] == (2, 10) and expected["train_teacher"] == expected["distill_student"] == (2, 30)
    assert expected["evaluate"] == expected["export_onnx"] == (0, 0)
    for stage in STAGES:
        configured = stage_task.with_options(**prefect_tasks.stage_options(stage))
        assert configured.name == stage
        assert (configured.retries, configured.retry_delay_seconds) == expected[stage], stage
    for wrapped in (prefect_tasks.register_task, prefect_tasks.promote_task, prefect_tasks.sweep_point_task,
                    prefect_tasks.tune_trials_task):
        assert (wrapped.retries, wrapped.retry_delay_seconds) == expected[wrapped.name], wrapped.name
    repo = Path(__file__).resolve().parents[2]
    for path in sorted((repo / "flows").glob("*.py")) + sorted((repo / "tasks").glob("*.py")):
        if path.name == "prefect_tasks.py":
            continue
        keywords = {k.arg for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
                    for k in node.keywords}
        assert not keywords & {"retries", "retry_delay_seconds"}, path


def test_flow_runs_every_stage_and_registers_challenger(pipeline_run: dict[str, Any], pipeline_project: Path) -> None:
    from mlflow import MlflowClient

    assert pipeline_run["ran"] == ALL_STAGES
    assert "MLFLOW_TRACKING_URI" not in os.environ  # registration must not leak MLflow's global state
    for rel in ("data/prepared.pt", "models/teacher.pt", "models/student.pt", "models/student.onnx",
                "reports/teacher.json", "reports/student.json", "reports/evaluate.json", "reports/export.json",
                "reports/plots/teacher_history.csv", "reports/plots/student_history.csv",
                "reports/plots/schedule.csv", "reports/plots/confusion.csv", "reports/plots/confusion.png",
                "reports/plots/student_curves.png", "reports/plots/schedule.png"):
        assert (pipeline_project / rel).is_file(), rel
    assert not list(pipeline_project.rglob(".*.tmp")), "temp files left behind"
    evaluation = json.loads((pipeline_project / "reports/evaluate.json").read_text())
    assert evaluation["test_accuracy"] > 0.3  # well above chance (0.1) even for the tiny configuration

    client = MlflowClient(f"sqlite:///{pipeline_project / 'mlflow.db'}")
    parent = client.get_run(pipeline_run["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["git_commit"] and parent.data.tags["dvc_data_md5"] and parent.data.tags["data_hash"]
    assert parent.data.params["method.name"] == "gompertz"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_stage = {r.data.tags["gkd.stage"]: r for r in children}
    assert set(by_stage) == set(ALL_STAGES) | {"register"}
    for name, r in by_stage.items():
        assert r.info.status == "FINISHED", name
        assert r.data.tags["cached"] == "false"
        assert r.data.tags["git_commit"] == parent.data.tags["git_commit"]
    distill = by_stage["distill_student"]
    epochs = yaml.safe_load((pipeline_project / "params.yaml").read_text())["student"]["train"]["epochs"]
    for metric in ("weight", "train_accuracy", "val_accuracy", "train_ce", "train_kd", "train_wasserstein",
                   "train_grad_match", "lr"):
        history = client.get_metric_history(distill.info.run_id, metric)
        assert [m.step for m in history] == list(range(1, epochs + 1)), metric
    weights = [m.value for m in client.get_metric_history(distill.info.run_id, "weight")]
    assert weights == sorted(weights) and weights[0] < weights[-1]  # the Gompertz weight grows
    assert distill.data.params["method.gompertz.c"]
    artifacts = {a.path for a in client.list_artifacts(distill.info.run_id, "reports/plots")}
    assert {"reports/plots/student_curves.png", "reports/plots/schedule.png",
            "reports/plots/student_history.csv"} <= artifacts
    assert any(a.path.endswith("student.onnx") for a in client.list_artifacts(by_stage["export_onnx"].info.run_id,
                                                                               "models"))
    assert any(a.path.endswith("confusion.png") for a in client.list_artifacts(by_stage["evaluate"].info.run_id,
                                                                                "reports/plots"))

    reg = pipeline_run["registration"]
    mv = client.get_model_version_by_alias("gkd-student", "challenger")
    assert str(mv.version) == reg["version"] and mv.run_id == by_stage["register"].info.run_id
    assert mv.tags["onnx_parity"] == "passed" and mv.tags["data_hash"] == parent.data.tags["data_hash"]
    assert client.get_run(mv.run_id).data.metrics["test_accuracy"] == pytest.approx(evaluation["test_accuracy"])


def test_challenger_loads_in_a_fresh_process_and_onnx_agrees(pipeline_run: dict[str, Any],
                                                             pipeline_project: Path, tmp_path: Path) -> None:
    """The three ways a user loads the registered student, in a fresh process: the PyTorch network
    (tasks.registry.load_student: .eval(), .to() work), the pyfunc on raw images (PNG bytes and uint8 arrays),
    the ONNX flavour; all agree with the local model file and with the evaluate stage."""
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent("""
        import io, json, sys
        from pathlib import Path
        import mlflow, numpy as np, pandas as pd, torch
        from PIL import Image
        from gkd_core.data import load_prepared
        from gkd_core.runner import load_model, normalise_images
        from tasks.registry import load_student

        root = Path(sys.argv[1])
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        uri = "models:/gkd-student@challenger"
        model, meta = load_student(uri, root=root)
        model = model.eval().to("cpu")
        data = load_prepared(root / "data/prepared.pt")
        x = normalise_images(data.test_x[:50], data.mean.tolist(), data.std.tolist())
        with torch.no_grad():
            registered = model(x).numpy()
            local = load_model(root / "models/student.pt")[0](x).numpy()
        pyfunc = mlflow.pyfunc.load_model(uri)
        pngs = []
        for img in data.test_x[:50].numpy():
            buf = io.BytesIO()
            Image.fromarray(img[0]).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        from_bytes = pyfunc.predict(pd.DataFrame({"image": pngs}))
        from_arrays = pyfunc.predict(pd.DataFrame({"image": list(data.test_x[:50].numpy()[:, 0])}))
        client = mlflow.MlflowClient()
        mv = client.get_model_version_by_alias("gkd-student", "challenger")
        onnx_model = mlflow.onnx.load_model(mv.tags["onnx_model_uri"])
        import onnxruntime as ort
        session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
        onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        probs = np.array(from_bytes["probabilities"].tolist())
        print(json.dumps({
            "type": type(model).__name__,
            "registered_vs_local": float(np.abs(registered - local).max()),
            "onnx_vs_registered": float(np.abs(onnx_out - registered).max()),
            "pyfunc_labels_agree": bool((from_bytes["index"].to_numpy() == registered.argmax(1)).all()),
            "pyfunc_arrays_agree": bool((from_arrays["index"].to_numpy() == registered.argmax(1)).all()),
            "pyfunc_probs_vs_softmax": float(np.abs(probs - torch.softmax(torch.from_numpy(registered), 1).numpy()).max()),
            "labels": from_bytes["label"].tolist()[:3],
            "accuracy": float((registered.argmax(1) == data.test_y[:50].numpy()).mean()),
        }))
    """))
    proc = run([sys.executable, str(script), str(pipeline_project), str(tmp_path / "dl")], cwd=pipeline_project)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["type"] == "DigitsCNN"
    assert out["registered_vs_local"] < 1e-5
    assert out["onnx_vs_registered"] < 1e-4
    assert out["pyfunc_labels_agree"] and out["pyfunc_arrays_agree"]
    assert out["pyfunc_probs_vs_softmax"] < 1e-5
    assert all(label in [str(i) for i in range(10)] for label in out["labels"])
    assert out["accuracy"] > 0.3


def test_second_flow_run_reruns_nothing_and_logs_cached_stages(pipeline_run: dict[str, Any],
                                                               pipeline_project: Path) -> None:
    from mlflow import MlflowClient

    from flows.pipeline import pipeline
    from tasks import dvc_ops

    with dvc_ops.open_repo(pipeline_project) as repo:
        assert repo.reproduce() == []  # plain `dvc repro`: nothing to do
    again = pipeline(str(pipeline_project), register_model=False)
    assert again["ran"] == []
    client = MlflowClient(f"sqlite:///{pipeline_project / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_run(again["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{again['parent_run_id']}'")
    assert {r.data.tags["gkd.stage"] for r in children} == set(ALL_STAGES)
    assert all(r.data.tags["cached"] == "true" for r in children)
    distill = next(r for r in children if r.data.tags["gkd.stage"] == "distill_student")
    assert len(client.get_metric_history(distill.info.run_id, "weight")) >= 1  # replayed from the CSV
    assert distill.data.metrics["test_accuracy"] > 0


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"export.tolerance": 0.001}, ["export_onnx"])],  # a distillation param: test_dvc_cli_exp_run_...
    ids=["export-param"],
)
def test_changed_param_reruns_only_downstream_stages(clone_project, change: dict[str, Any], expected: list[str]) -> None:
    """Stage by stage through the DVC API, as the flow does: only the stages downstream of the change run."""
    from tasks import dvc_ops

    root = clone_project()
    edit_params(root, change)
    ran = []
    for stage in dvc_ops.stage_names(root):  # what the flow does, stage by stage
        with dvc_ops.stage_environment(root, None):
            if dvc_ops.reproduce_stage(root, stage):
                ran.append(stage)
    assert ran == expected
    with dvc_ops.open_repo(root) as repo:
        assert repo.reproduce() == []


def test_editing_the_augmentation_code_reruns_the_training_stages(clone_project) -> None:
    """dvc.yaml's code deps are the stages' real imports: a change to the file that defines the batch
    augmentation makes DVC see train_teacher and distill_student as changed (no training here: status only)."""
    import inspect

    import gkd_core.data
    from _project import REPO
    from tasks import dvc_ops

    root = clone_project()
    with dvc_ops.open_repo(root) as repo:
        assert repo.status() == {}, "the clone should start up to date"
    source = Path(inspect.getsourcefile(gkd_core.data.batch_augment)).resolve().relative_to(REPO)
    with open(root / source, "a") as fh:
        fh.write("# an edit to the augmentation code\n")
    with dvc_ops.open_repo(root) as repo:
        changed = repo.status()
    assert {"train_teacher", "distill_student"} <= set(changed), changed
    for stage in ("train_teacher", "distill_student"):
        deps = {Path(p) for entry in changed[stage] if isinstance(entry, dict) for p in entry.get("changed deps", {})}
        assert any(dep == source or dep in source.parents for dep in deps), (stage, changed[stage])


def test_forced_rerun_of_a_deterministic_stage_changes_nothing_downstream(clone_project) -> None:
    """The README's recipe after raw data changed: `dvc repro -f -s prepare_data && dvc repro`. With the
    same data the prepared file comes out byte-identical, so nothing downstream reruns."""
    root = clone_project()
    before = (root / "data" / "prepared.pt").read_bytes()
    forced = run([sys.executable, "-m", "dvc", "repro", "-f", "-s", "prepare_data"], root)
    assert "Running stage 'prepare_data'" in forced.stdout + forced.stderr
    assert (root / "data" / "prepared.pt").read_bytes() == before
    after = run([sys.executable, "-m", "dvc", "repro"], root)
    assert "Running stage" not in after.stdout + after.stderr, after.stdout


def test_dvc_cli_exp_run_metrics_plots_params(clone_project) -> None:
    """`dvc exp run -S` with a distillation param reruns distill_student and what follows, nothing upstream;
    `dvc params diff`, `dvc metrics show`, `dvc exp show` and `dvc plots show` read the declared files."""
    root = clone_project()
    proc = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "method.gompertz.c=9.0"], root)
    log = proc.stdout + proc.stderr
    assert "Running stage 'distill_student'" in log and "Running stage 'export_onnx'" in log
    assert "Running stage 'train_teacher'" not in log and "Running stage 'prepare_data'" not in log
    diff = json.loads(run([sys.executable, "-m", "dvc", "params", "diff", "--json"], root).stdout)
    assert diff["params.yaml"]["method.gompertz.c"]["new"] == 9.0
    metrics = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], root).stdout)
    flat = json.dumps(metrics)
    assert "test_accuracy" in flat and "max_abs_diff" in flat and "best_val_accuracy" in flat
    exps = json.loads(run([sys.executable, "-m", "dvc", "exp", "show", "--json"], root).stdout)
    runs = list(_exp_records(exps))
    mine = [r for r in runs if r["params"]["params.yaml"]["data"]["method"]["gompertz"]["c"] == 9.0]
    assert mine, runs
    # the experiment's own metrics come back (outputs are DVC-cached, so they live in the cache, not git)
    assert all(r["metrics"]["reports/evaluate.json"]["data"]["test_accuracy"] > 0 for r in mine)
    out = root / "plots_html"
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], root)
    html = (out / "index.html").read_text()
    for title in ("Accuracy (teacher and student)", "Distillation weight over training", "Confusion matrix"):
        assert title in html, title
    commit_all(root, "experiment applied")


def test_baseline_comparison_uses_the_same_teacher_and_seed(pipeline_run: dict[str, Any],
                                                            pipeline_project: Path) -> None:
    import json

    from flows.pipeline import BASELINES_DIR
    from tasks.paths import EVALUATE_REPORT, STUDENT, StagePaths

    comparison = pipeline_run["comparison"]
    assert set(comparison) == {"teacher", "none", "gompertz"}, comparison  # params.yaml's method + baseline
    assert all(0.0 <= v <= 1.0 for v in comparison.values())
    teacher_json = json.loads((pipeline_project / "reports" / "teacher.json").read_text())
    assert comparison["teacher"] == teacher_json["test_accuracy"]
    point = StagePaths(pipeline_project, Path(BASELINES_DIR) / "none-seed0")
    report = json.loads(point.output(EVALUATE_REPORT).read_text())
    assert report["test_accuracy"] == comparison["none"] and point.output(STUDENT).is_file()
    assert pipeline_run["tracking_uri"].startswith("sqlite:///")


def test_an_unchanged_student_is_not_registered_again(pipeline_run: dict[str, Any], clone_project) -> None:
    """A nightly run with nothing changed used to register a new version (same ONNX sha256 in v2 and v3)."""
    from mlflow import MlflowClient

    from tasks.paths import StagePaths
    from tasks.register import register

    root = clone_project()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    before = client.search_model_versions("name = 'gkd-student'")
    again = register(StagePaths(root))
    assert again["registered"] is False and again["version"] == pipeline_run["registration"]["version"]
    assert len(client.search_model_versions("name = 'gkd-student'")) == len(before)

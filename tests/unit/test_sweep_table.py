"""The sweep's pure parts: presets and the command line's lists, the comparison statistics, the figure."""

import math

import pytest
from scipy import stats

from flows.sweep import build_spec, expand_multi_values
from gkd_core.cli_support import UserError
from gkd_core.plots import comparison_figure
from tasks.sweep import SweepSpec, compare, load_preset, merged, paired_difference


def test_space_separated_lists_as_the_readme_writes_them():
    argv = ["--methods", "none", "kd", "linear", "gompertz", "--seeds", "0", "1", "2", "-S", "seed=3", "--workers", "1"]
    assert expand_multi_values(argv) == ["--methods", "none", "--methods", "kd", "--methods", "linear",
                                         "--methods", "gompertz", "--seeds", "0", "--seeds", "1", "--seeds", "2",
                                         "-S", "seed=3", "--workers", "1"]
    assert expand_multi_values(["--methods", "none,kd"]) == ["--methods", "none,kd"]  # the comma form still works


def test_build_spec_from_flags_and_presets(tmp_path):
    (tmp_path / "sweeps.yaml").write_text(
        "presets:\n  p:\n    arms: [none, kd]\n    seeds: [0]\n    reference: kd\n    params: {seed: 5}\n")
    spec = build_spec(tmp_path, None, ["none,kd", "gompertz"], ["0", "1"], ["student.train.epochs=2"], None, None)
    assert spec.name == "custom" and spec.arms == ("none", "kd", "gompertz") and spec.seeds == (0, 1)
    assert spec.params == {"student.train.epochs": 2} and spec.reference == "kd"
    p = build_spec(tmp_path, "p", None, ["3"], ["x.y=1"], None, None)
    assert p.name == "p" and p.arms == ("none", "kd") and p.seeds == (3,) and p.params == {"seed": 5, "x.y": 1}
    with pytest.raises(UserError, match="no preset 'q'; presets: p"):
        load_preset(tmp_path, "q")
    with pytest.raises(UserError, match="--seeds must be integers"):
        build_spec(tmp_path, None, None, ["a"], None, None, None)


def test_mapping_overrides_merge_into_their_section():
    base = {"teacher": {"train": {"epochs": 20, "lr": 0.05}, "model": {"name": "x"}}}
    out = merged(base, {"teacher.train": {"epochs": 3}, "teacher.model": {"name": "y", "width": 2.0}, "seed": 1})
    assert out["teacher"]["train"] == {"epochs": 3, "lr": 0.05} and out["teacher"]["model"] == {"name": "y", "width": 2.0}
    assert base["teacher"]["train"]["epochs"] == 20 and out["seed"] == 1


def test_paired_difference_and_its_t_interval():
    ref = [{"seed": s, "acc": v} for s, v in ((0, 0.80), (1, 0.82), (2, 0.81))]
    arm = [{"seed": s, "acc": v} for s, v in ((0, 0.83), (1, 0.84), (2, 0.82), (3, 0.99))]  # seed 3 has no pair
    d = paired_difference(arm, ref, "acc")
    diffs = [0.03, 0.02, 0.01]
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.02)
    half = stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([0.02 - half, 0.02 + half])
    assert d["values"] == pytest.approx(diffs)


def test_compare_rows_and_the_figure_shows_every_arm_unclipped():
    spec = SweepSpec(name="t", arms=("none", "kd", "gompertz"), seeds=(0, 1), reference="kd")
    acc = {("none", 0): 0.90, ("none", 1): 0.91, ("kd", 0): 0.92, ("kd", 1): 0.935, ("gompertz", 0): 0.925,
           ("gompertz", 1): 0.94}
    points = [{"arm": a, "seed": s, "test_accuracy": v, "best_val_test_accuracy": v - 0.001, "train_seconds": 1.0,
               "device": "cpu", "objective": f"obj {a}"} for (a, s), v in acc.items()]
    table = compare(points, spec)
    rows = {r["arm"]: r for r in table["arms"]}
    assert rows["gompertz"]["vs_reference"]["test_accuracy"]["mean"] == pytest.approx(0.005)
    assert "vs_reference" not in rows["kd"] and rows["none"]["test_accuracy"]["mean"] == pytest.approx(0.905)
    fig = comparison_figure([{"method": r["arm"], **r["test_accuracy"]} for r in table["arms"]], "test_accuracy", "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["none", "kd", "gompertz"]
    lo, hi = ax.get_ylim()
    assert lo < min(acc.values()) and hi > max(acc.values())  # no seed clipped
    assert hi - lo < 0.2  # nor flattened into a 0..1 axis that hides a 1-point difference


def test_the_served_model_code_needs_only_gkd_core():
    """tasks/serving_model.py is logged as the registered model's code with gkd_core beside it: it must not
    import tasks/, and its artifact key must be the one registration uses."""
    import ast

    from tasks.registry import MODEL_FILE_ARTIFACT, SERVING_CODE

    tree = ast.parse(SERVING_CODE.read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.startswith("tasks") for m in imported if m)
    assert f'MODEL_FILE_ARTIFACT = "{MODEL_FILE_ARTIFACT}"' in SERVING_CODE.read_text()

"""The sweep's pure parts: presets and the command line's lists, the comparison statistics, the figure."""

import json
import math

import pytest
import yaml
from scipy import stats

from flows.sweep import build_spec, expand_multi_values
from gkd_core.cli_support import UserError
from gkd_core.plots import comparison_figure
from tasks.sweep import (
    SweepSpec, compare, comparison_markdown, load_preset, merged, paired_difference, write_comparison,
)


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
    assert d["seeds"] == [0, 1, 2] and d["unmatched"] == [3]  # reported, not silently dropped


def _points(acc: dict, terms: bool = False) -> list[dict]:
    return [{"arm": a, "seed": s, "test_accuracy": v, "best_val_test_accuracy": v - 0.001, "train_seconds": 1.0,
             "device": "cpu", "objective": f"obj {a}",
             **({"terms": {"ce": [1.0, 0.5], "kd": [0.4, 0.2], "weight": [0.1, 0.9]}} if terms else {})}
            for (a, s), v in acc.items()]


def test_primary_comparison_contrasts_and_unmatched_seeds_in_the_table():
    spec = SweepSpec(name="t", arms=("none", "kd", "gompertz", "gompertz_kd"), seeds=(0, 1, 2), reference="kd",
                     primary=("gompertz", "kd"), contrasts=(("gompertz", "gompertz_kd"), ("kd", "absent")))
    acc = {("none", 0): 0.90, ("none", 1): 0.91, ("kd", 0): 0.92, ("kd", 1): 0.935, ("kd", 2): 0.93,
           ("gompertz", 0): 0.925, ("gompertz", 1): 0.94, ("gompertz_kd", 0): 0.92, ("gompertz_kd", 1): 0.93,
           ("gompertz_kd", 2): 0.91}
    table = compare(_points(acc, terms=True), spec)
    rows = {r["arm"]: r for r in table["arms"]}
    assert rows["gompertz"]["comparison"] == "primary" and rows["none"]["comparison"] == "exploratory"
    assert rows["gompertz"]["vs_reference"]["test_accuracy"]["unmatched"] == [2]
    assert [(c["a"], c["b"], c["label"]) for c in table["contrasts"]] == [
        ("gompertz", "kd", "primary"), ("gompertz", "gompertz_kd", "exploratory")]  # "absent" did not run
    g_gk = table["contrasts"][1]["test_accuracy"]
    assert g_gk["n"] == 2 and g_gk["mean"] == pytest.approx(0.0075) and g_gk["unmatched"] == [2]
    assert rows["kd"]["terms"]["kd"] == pytest.approx(0.3) and rows["kd"]["terms"]["weight"] == pytest.approx(0.5)
    assert rows["kd"]["terms"]["wasserstein"] is None
    md = comparison_markdown(table)
    assert "| `gompertz` (primary) | 2 |" in md and "| `none` | 2 |" in md
    assert "| `gompertz` | `gompertz_kd` | exploratory | 2 | +0.75 [" in md and "+0.50, +1.00 |" in md
    assert "`gompertz` vs `kd`: seeds [2]" in md and "pre-declared primary comparison is `gompertz` vs `kd`" in md
    assert "| `kd` | 0.7500 | 0.3000 | - | - | 0.5000 |" in md


def test_a_preset_declares_its_primary_and_contrasts_among_its_arms(tmp_path):
    path = tmp_path / "sweeps.yaml"
    path.write_text("presets:\n  p:\n    arms: [none, kd]\n    seeds: [0]\n    primary: [kd, none]\n"
                    "    contrasts: [[none, kd]]\n")
    spec = load_preset(tmp_path, "p")
    assert spec.primary == ("kd", "none") and spec.contrasts == (("none", "kd"),)
    for bad, says in (("primary: [kd, gompertz]", "\\['gompertz'\\] not among the preset's arms"),
                      ("contrasts: [[kd]]", "contrasts: expected a pair of two different arm names"),
                      ("primary: [kd, kd]", "primary: expected a pair")):
        path.write_text(f"presets:\n  p:\n    arms: [none, kd]\n    seeds: [0]\n    {bad}\n")
        with pytest.raises(UserError, match=says):
            load_preset(tmp_path, "p")


def test_published_comparison_holds_small_point_summaries_and_drops_stale_ones(tmp_path):
    spec = SweepSpec(name="t", arms=("none", "kd"), seeds=(0, 1), reference="kd")
    acc = {("none", 0): 0.90, ("none", 1): 0.91, ("kd", 0): 0.92, ("kd", 1): 0.935}
    points = [{**p, "dir": "/machine/path", "skipped": True, "val_curve": [0.5, 0.6]} for p in _points(acc)]
    public = tmp_path / "docs" / "results" / "t"
    (public / "points").mkdir(parents=True)
    (public / "points" / "gompertz-seed0.json").write_text("{}")  # from an earlier run, not in this table
    write_comparison(compare(points, spec), tmp_path / "reports", public)
    assert sorted(f.name for f in public.iterdir()) == ["comparison.json", "comparison.md", "comparison.png", "points"]
    assert sorted(f.name for f in (public / "points").iterdir()) == [
        "kd-seed0.json", "kd-seed1.json", "none-seed0.json", "none-seed1.json"]
    point = json.loads((public / "points" / "kd-seed1.json").read_text())
    assert point["test_accuracy"] == 0.935 and point["val_curve"] == [0.5, 0.6] and "dir" not in point
    assert "points" not in json.loads((public / "comparison.json").read_text())
    assert (public / "comparison.md").read_text() == (tmp_path / "reports" / "comparison.md").read_text()


def test_compare_rows_and_the_figure_shows_every_arm_unclipped():
    spec = SweepSpec(name="t", arms=("none", "kd", "gompertz"), seeds=(0, 1), reference="kd")
    acc = {("none", 0): 0.90, ("none", 1): 0.91, ("kd", 0): 0.92, ("kd", 1): 0.935, ("gompertz", 0): 0.925,
           ("gompertz", 1): 0.94}
    table = compare(_points(acc), spec)
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


def test_a_point_is_stale_when_its_code_or_its_teacher_changes(tmp_path, monkeypatch):
    """The point's fingerprint covers the code of distill_student + evaluate (their import closure) and the
    teacher's own fingerprint, not only the params: a sweep after a code change recomputes its points."""
    import tasks.sweep as sweep_mod

    (tmp_path / "params.yaml").write_text("seed: 0\nmethod: {name: kd}\n")
    (tmp_path / "reports/info").mkdir(parents=True)
    (tmp_path / "reports/data.json").write_text(json.dumps({"hash": "d1"}))
    (tmp_path / "reports/info/teacher.json").write_text(json.dumps({"sweep_fingerprint": "t1"}))
    fp = lambda: sweep_mod.point_fingerprint(tmp_path / "params.yaml", tmp_path, "kd", 0)  # noqa: E731
    first = fp()
    assert fp() == first
    monkeypatch.setattr(sweep_mod, "code_fingerprint", lambda modules: "another-code")
    assert fp() != first
    monkeypatch.undo()
    (tmp_path / "reports/info/teacher.json").write_text(json.dumps({"sweep_fingerprint": "t2"}))
    assert fp() != first


def test_preset_arm_params_reach_the_arm_and_a_tuned_arm_runs_as_it_was_tuned(tmp_path):
    """The preset's arm_params apply to the arm; its tuned twin runs with the settings its trials held fixed
    (tuned.yaml's ``fixed``, written by flows.tune) plus what the search chose."""
    (tmp_path / "sweeps.yaml").write_text(
        "presets:\n  p:\n    arms: [kd, gompertz]\n    seeds: [0]\n    primary: [gompertz, kd]\n"
        "    arm_params:\n      gompertz: {losses.grad_match.variant: input, runtime.cache_teacher: false}\n")
    (tmp_path / "reports/tune/p").mkdir(parents=True)
    (tmp_path / "reports/tune/p/tuned.yaml").write_text(
        "methods:\n  gompertz: {overrides: {method.gompertz.a: 2.0}, fixed: {losses.grad_match.variant: input, "
        "runtime.cache_teacher: false}}\n  kd: {overrides: {method.kd.a: 0.5}}\n")
    spec = build_spec(tmp_path, "p", None, None, None, None, None, tuned=True)
    assert spec.arm_params["gompertz"] == {"losses.grad_match.variant": "input", "runtime.cache_teacher": False,
                                           "method.name": "gompertz"}
    assert spec.arm_params["gompertz-tuned"] == {"losses.grad_match.variant": "input", "runtime.cache_teacher": False,
                                                 "method.gompertz.a": 2.0, "method.name": "gompertz"}
    assert spec.arm_params["kd-tuned"] == {"method.kd.a": 0.5, "method.name": "kd"}
    assert spec.comparisons() == [("gompertz", "kd"), ("gompertz-tuned", "gompertz"), ("kd-tuned", "kd"),
                                  ("gompertz-tuned", "kd-tuned")]
    (tmp_path / "sweeps.yaml").write_text("presets:\n  p:\n    arms: [kd]\n    seeds: [0]\n    arm_params: {akd: {}}\n")
    with pytest.raises(UserError, match="arm_params: expected"):
        load_preset(tmp_path, "p")


def test_dose_is_the_weights_plain_and_learning_rate_weighted_mean():
    from tasks.sweep import dose

    history = [{"weight": 0.0, "lr": 0.1}, {"weight": 0.5, "lr": 0.05}, {"weight": 1.0, "lr": 0.01}]
    d = dose(history)
    assert d["mean"] == pytest.approx(0.5)
    assert d["lr_weighted"] == pytest.approx((0.5 * 0.05 + 1.0 * 0.01) / 0.16)  # late weight, small steps: 0.219
    assert dose([]) == {"mean": None, "lr_weighted": None}


def test_the_table_says_whether_distillation_itself_is_resolved():
    from tasks.sweep import kd_resolution

    spec = SweepSpec(name="t", arms=("none", "kd"), seeds=(0, 1, 2), reference="kd", contrasts=(("kd", "none"),))
    clear = {("none", 0): 0.80, ("none", 1): 0.81, ("none", 2): 0.805, ("kd", 0): 0.85, ("kd", 1): 0.861,
             ("kd", 2): 0.853}
    assert kd_resolution(compare(_points(clear), spec)).startswith("Distillation itself is resolved here")
    tied = {**clear, ("kd", 0): 0.79, ("kd", 1): 0.83, ("kd", 2): 0.80}
    md = comparison_markdown(compare(_points(tied), spec))
    assert "**This sweep cannot tell KD variants apart**" in md
    # without the contrast, the reference difference (none - kd) says the same, mirrored
    no_contrast = SweepSpec(name="t", arms=("none", "kd"), seeds=(0, 1, 2), reference="kd")
    assert "cannot tell" in kd_resolution(compare(_points(tied), no_contrast))
    assert kd_resolution(compare(_points(clear), SweepSpec(name="t", arms=("kd",), seeds=(0,), reference=None))) is None
    # a primary comparison whose arms did not run is not claimed
    partial = SweepSpec(name="t", arms=("none", "kd"), seeds=(0, 1, 2), reference="kd", primary=("gompertz", "kd"))
    assert "(`gompertz` vs `kd`) did not run in this sweep" in comparison_markdown(compare(_points(clear), partial))


def test_tuned_arms_can_be_picked_by_name(tmp_path):
    """`--tuned --methods kd gompertz kd-tuned gompertz_kd-tuned`: exactly those arms, untuned and tuned."""
    (tmp_path / "sweeps.yaml").write_text("presets:\n  p:\n    arms: [none, kd, gompertz_kd, gompertz]\n"
                                          "    seeds: [0]\n    reference: kd\n    primary: [gompertz, kd]\n")
    (tmp_path / "reports/tune/p").mkdir(parents=True)
    (tmp_path / "reports/tune/p/tuned.yaml").write_text(
        "methods:\n  kd: {overrides: {method.kd.a: 0.5}}\n  gompertz_kd: {overrides: {method.gompertz_kd.a: 2.0}}\n"
        "  gompertz: {overrides: {method.gompertz.a: 2.0}}\n")
    spec = build_spec(tmp_path, "p", ["kd", "gompertz", "kd-tuned", "gompertz_kd-tuned", "gompertz-tuned"], None,
                      None, None, None, tuned=True)
    assert spec.arms == ("kd", "gompertz", "kd-tuned", "gompertz_kd-tuned", "gompertz-tuned")
    assert spec.arm_params["gompertz_kd-tuned"]["method.name"] == "gompertz_kd"
    assert ("gompertz-tuned", "kd-tuned") in spec.comparisons() and ("gompertz", "kd") in spec.comparisons()
    with pytest.raises(UserError, match="a tuned arm needs --tuned"):
        build_spec(tmp_path, "p", ["kd-tuned"], None, None, None, None)
    with pytest.raises(UserError, match=r"no tuned settings for \['none-tuned'\]"):
        build_spec(tmp_path, "p", ["kd", "none-tuned"], None, None, None, None, tuned=True)


def test_the_table_says_whether_teacher_and_students_had_stopped_improving(tmp_path):
    from tasks.reports import write_history_csv
    from tasks.sweep import late_gain, teacher_figures

    # the last quarter (2 of 8 epochs) against the best before it
    assert late_gain([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.62, 0.61]) == pytest.approx(0.02)
    assert late_gain([0.5, 0.7, 0.6, 0.65]) == pytest.approx(0.65 - 0.7)  # the best came earlier: negative
    assert late_gain([0.5]) is None and late_gain([]) is None

    folder = tmp_path / "sweep"
    (folder / "reports" / "plots").mkdir(parents=True)
    (folder / "reports" / "teacher.json").write_text(json.dumps(
        {"model": "digits_cnn", "test_accuracy": 0.66, "best_val_accuracy": 0.64, "best_val_epoch": 4}))
    write_history_csv(folder / "reports" / "plots" / "teacher_history.csv",
                      [{"epoch": e + 1, "val_accuracy": v} for e, v in enumerate([0.3, 0.5, 0.6, 0.64])])
    teacher = teacher_figures(folder)
    assert teacher["epochs"] == 4 and teacher["val_curve"] == pytest.approx([0.3, 0.5, 0.6, 0.64])
    assert teacher["late_gain"] == pytest.approx(0.04) and teacher["test_accuracy"] == 0.66

    spec = SweepSpec(name="t", arms=("none", "kd"), seeds=(0, 1), reference="kd")
    points = [{**p, "epochs": 4, "best_val_epoch": 4 if p["arm"] == "kd" else 3,
               "val_curve": [0.2, 0.4, 0.5, 0.52] if p["arm"] == "kd" else [0.2, 0.4, 0.5, 0.49]}
              for p in _points({("none", 0): 0.9, ("none", 1): 0.91, ("kd", 0): 0.92, ("kd", 1): 0.93})]
    table = compare(points, spec, teacher)
    assert table["students"]["points"] == 4 and table["students"]["best_last"] == 2
    assert table["students"]["late_gain"]["mean"] == pytest.approx(0.005)
    md = comparison_markdown(table)
    assert "Teacher (4 epochs, test 0.6600): best validation epoch 4; its last quarter of epochs added +4.00 points" in md
    assert "Students: best validation epoch = the last in 2 of 4 points" in md and "(min -1.00, max +2.00)" in md
    # the published comparison (no points) renders the same sentences from the table alone
    write_comparison(table, tmp_path / "reports", tmp_path / "public")
    public = json.loads((tmp_path / "public" / "comparison.json").read_text())
    assert comparison_markdown(public) == md
    # a teacher trained to its validation plateau (lr_schedule plateau) says where it stopped
    from tasks.sweep import convergence
    stopped = convergence({"teacher": {**teacher, "stopped_at_epoch": 4}})
    assert stopped.startswith("Teacher (4 epochs, stopped on its validation plateau (lr_schedule plateau) after epoch 4,")


def test_the_student_alone_shows_its_zero_weight_in_the_terms_table():
    spec = SweepSpec(name="t", arms=("none", "kd"), seeds=(0,), reference="kd")
    points = [{**p, "terms": {"ce": [1.0, 1.0]} if p["arm"] == "none" else {"ce": [1.0], "kd": [0.5], "weight": [1.0]},
               "dose": {"mean": 0.0, "lr_weighted": 0.0} if p["arm"] == "none" else {"mean": 1.0, "lr_weighted": 1.0}}
              for p in _points({("none", 0): 0.9, ("kd", 0): 0.92})]
    md = comparison_markdown(compare(points, spec))
    assert "| `none` | 1.0000 | - | - | - | 0.0000 | 0.0000 |" in md and "| `kd` | 1.0000 | 0.5000 | - | - | 1.0000 | 1.0000 |" in md


def test_tuned_settings_apply_only_to_the_teacher_they_were_tuned_against(tmp_path, caplog):
    """flows.tune records the teacher recipe (seed, dataset, teacher) beside each method's settings; a --tuned
    sweep whose teacher differs is refused before any compute, naming the keys; an entry without a record
    (tuned before it was kept) is applied with a warning."""
    from tasks.sweep import recipe_differences, teacher_recipe

    (tmp_path / "params.yaml").write_text(
        "seed: 0\ndataset: {name: digits}\nteacher: {model: {name: digits_cnn, width: 2.0}, train: {epochs: 30}}\n"
        "student: {model: {name: digits_cnn, width: 0.5}}\n")
    (tmp_path / "sweeps.yaml").write_text("presets:\n  p:\n    arms: [kd]\n    seeds: [0]\n"
                                          "    params: {teacher.train.epochs: 20}\n")
    resolved = {"seed": 0, "dataset": {"name": "digits"},
                "teacher": {"model": {"name": "digits_cnn", "width": 2.0}, "train": {"epochs": 20}}, "student": {}}
    recipe = teacher_recipe(resolved)
    assert recipe == {k: resolved[k] for k in ("seed", "dataset", "teacher")}
    tuned = tmp_path / "reports/tune/p/tuned.yaml"
    tuned.parent.mkdir(parents=True)

    def write(teacher):
        tuned.write_text(yaml.safe_dump({"methods": {"kd": {"overrides": {"method.kd.a": 0.5},
                                                            **({"teacher": teacher} if teacher else {})}}}))

    write(recipe)  # the preset's teacher (20 epochs over params.yaml's 30): accepted
    assert build_spec(tmp_path, "p", None, None, None, None, None, tuned=True).arm_params["kd-tuned"]["method.kd.a"] == 0.5
    old = {**recipe, "teacher": {**recipe["teacher"], "train": {"epochs": 15}}}
    assert recipe_differences(old, recipe) == ["teacher.train.epochs: 15 -> 20"]
    write(old)
    with pytest.raises(UserError, match=r"kd's settings were tuned against another teacher \(teacher.train.epochs: "
                                        r"15 -> 20, tuned -> this sweep\); re-tune"):
        build_spec(tmp_path, "p", None, None, None, None, None, tuned=True)
    # -S reaches the recipe too: the same override makes it match again
    assert build_spec(tmp_path, "p", None, None, ["teacher.train.epochs=15"], None, None, tuned=True).arms == ("kd", "kd-tuned")
    write(None)
    with caplog.at_level("WARNING"):
        build_spec(tmp_path, "p", None, None, None, None, None, tuned=True)
    assert "kd's settings carry no teacher recipe" in caplog.text


def test_a_point_summary_keeps_a_zero_weight_drops_absent_terms_and_reports_its_own_threads(tmp_path):
    from tasks.paths import StagePaths
    from tasks.reports import write_history_csv
    from tasks.sweep import point_figures

    paths = StagePaths(tmp_path)
    (tmp_path / "reports/plots").mkdir(parents=True)
    (tmp_path / "reports/student.json").write_text(json.dumps({"objective": "CE", "epochs": 2}))
    (tmp_path / "reports/evaluate.json").write_text(json.dumps({"test_accuracy": 0.9}))
    write_history_csv(tmp_path / "reports/plots/student_history.csv",
                      [{"epoch": e, "lr": 0.1, "train_ce": 1.0 / e, "train_kd": 0.0, "weight": 0.0, "val_accuracy": 0.5}
                       for e in (1, 2)])
    figures = point_figures("none", 0, paths, skipped=True)
    assert figures["terms"] == {"ce": [1.0, 0.5], "weight": [0.0, 0.0]}
    assert figures["torch_threads"] is None  # skipped, trained before threads were reported: not this process's
    (tmp_path / "reports/info").mkdir()
    (tmp_path / "reports/info/student.json").write_text(json.dumps({"torch_threads": 3}))
    assert point_figures("none", 0, paths, skipped=True)["torch_threads"] == 3

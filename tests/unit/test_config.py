import math
from pathlib import Path

import pytest
import yaml

from gkd_core.config import ConfigError, Params, load_params, validate_params
from gkd_core.methods import method_schedule

MINIMAL = {"teacher": {"model": {"name": "digits_cnn", "width": 2.0}}, "student": {"model": {"name": "digits_cnn"}}}


def _write(tmp_path, data):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_minimal_params_fill_documented_defaults(tmp_path):
    params = load_params(_write(tmp_path, MINIMAL))
    assert params.dataset.name == "digits" and params.method.name == "gompertz"
    g = params.method.gompertz
    assert g.a * math.exp(-g.b) == pytest.approx(0.01, rel=1e-3)  # w0 = 1% of a
    assert math.log(g.b) / g.c == pytest.approx(0.3, rel=1e-3)  # inflection at 30%


def test_repo_params_yaml_is_valid():
    params = load_params("params.yaml")
    assert isinstance(params, Params)


def test_one_line_per_bad_field_naming_field_value_and_rule(tmp_path):
    data = {
        **MINIMAL,
        "method": {"name": "gompertz", "gompertz": {"c": -1.0}},
        "losses": {"temperature": 0, "wasserstein": {"method": "wasserstein-2"}},
        "student": {"model": {"name": "resnet9000"}},
        "bogus": 1,
    }
    with pytest.raises(ConfigError) as info:
        load_params(_write(tmp_path, data))
    lines = str(info.value).splitlines()
    assert len(lines) == 5, lines
    text = "\n".join(lines)
    assert "method.gompertz.c = -1.0: Input should be greater than 0" in text
    assert "losses.temperature = 0:" in text
    assert "losses.wasserstein.method = 'wasserstein-2'" in text and "'sliced'" in text
    assert "student.model.name = 'resnet9000': unknown model" in text and "resnet8x4" in text
    assert "bogus: unknown key" in text
    assert all(line.startswith(str(tmp_path / "params.yaml")) for line in lines)


def test_wrong_type_and_missing_section(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_params(_write(tmp_path, {"teacher": MINIMAL["teacher"], "seed": "zero"}))
    text = str(info.value)
    assert "seed = 'zero'" in text and "student: required field is missing" in text


def test_dataset_root_required_and_download_only_for_cifar(tmp_path):
    with pytest.raises(ConfigError, match="dataset.root is required for dataset 'fashion_mnist'"):
        validate_params({**MINIMAL, "dataset": {"name": "fashion_mnist"}})
    with pytest.raises(ConfigError, match="download is only supported"):
        validate_params({**MINIMAL, "dataset": {"name": "image_folder", "root": "x", "download": True}})


def test_milestones_and_warmup_rules():
    bad = {**MINIMAL, "student": {"model": {"name": "digits_cnn"}, "train": {"milestones": [0.8, 0.5]}}}
    with pytest.raises(ConfigError, match="student.train.milestones"):
        validate_params(bad)
    bad = {**MINIMAL, "student": {"model": {"name": "digits_cnn"}, "train": {"epochs": 2, "warmup_epochs": 2}}}
    with pytest.raises(ConfigError, match="warmup_epochs"):
        validate_params(bad)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("teacher: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(p)
    p.write_text("- a list")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(p)


def test_dotted_overrides(tmp_path):
    params = load_params(_write(tmp_path, MINIMAL), {"method.gompertz.c": 9.0, "method.name": "linear"})
    assert params.method.gompertz.c == 9.0 and params.method.name == "linear"


@pytest.mark.parametrize("method", ["none", "kd", "linear", "cosine", "logistic", "gompertz", "dynamic_kd", "akd", "ces_kd"])
def test_every_method_maps_to_a_schedule(method):
    params = validate_params({**MINIMAL, "method": {"name": method}})
    s = method_schedule(params.method)
    assert 0.0 <= s.weight(0.5) <= 100.0
    if method == "none":
        assert not s.enabled


def test_a_section_override_merges_the_same_way_in_every_command():
    """`-S 'student.train={epochs: 3}'` changes the epochs and keeps the section's other fields, in the stage and
    `gkd` CLIs (load_params) exactly as in the sweep (tasks.sweep.merged): one meaning of -S."""
    from gkd_core.cli_support import parse_overrides
    from tasks.sweep import merged

    repo_params = Path(__file__).resolve().parents[2] / "params.yaml"
    data = yaml.safe_load(repo_params.read_text())
    assert data["student"]["train"]["warmup_epochs"] == 1  # not the default (0): a replace would show
    for items in (["student.train={epochs: 3}"], ["student.train.epochs=3"], ["student={train: {epochs: 3}}"]):
        overrides = parse_overrides(items)
        cli = load_params(repo_params, overrides)
        assert cli.student.train.epochs == 3 and cli.student.train.warmup_epochs == 1, items
        assert cli.student.train.lr == data["student"]["train"]["lr"]
        assert cli.model_dump() == validate_params(merged(data, overrides)).model_dump(), items
    # a scalar or a list still replaces, and the caller's mapping is not modified
    overrides = parse_overrides(["student.train.epochs=4", "method.name=kd"])
    assert load_params(repo_params, overrides).method.name == "kd"
    before = yaml.safe_load(repo_params.read_text())
    merged(data, {"student.train": {"epochs": 9}})
    assert data == before

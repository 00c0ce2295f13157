"""ONNX export: single self-contained file, dynamic batch, onnxruntime parity, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from gkd_core import export as export_mod  # noqa: E402
from gkd_core.export import ExportError, export_onnx, load_onnx_session, onnx_predict  # noqa: E402
from gkd_core.models import FeatureHook, build_model  # noqa: E402


def small_model(seed: int = 0) -> nn.Module:
    """A digits CNN with a large-scale head so logits are O(1) and parity is a meaningful check."""
    torch.manual_seed(seed)
    model = build_model("digits_cnn", 10, 1, width=0.5)
    nn.init.normal_(model.fc.weight, std=1.0)
    # give BatchNorm non-trivial running statistics so eval-mode folding is exercised
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 1, 8, 8) * 2 + 0.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, object, nn.Module, torch.Tensor]:
    out_dir = tmp_path_factory.mktemp("onnx")
    model = small_model()
    hook = FeatureHook(model)  # an attached hook must neither break export nor leak into the graph
    example = torch.randn(3, 1, 8, 8)
    report = export_onnx(model, out_dir / "model.onnx", example, tolerance=1e-4, check_batch_sizes=(1, 5))
    hook.remove()
    return out_dir / "model.onnx", report, model, example


def test_dynamo_export_passes_parity(exported) -> None:
    path, report, _, example = exported
    assert report.exporter == "dynamo"
    assert report.passed and report.max_abs_diff <= 1e-4
    assert set(report.batch_sizes) == {1, 3, 5}
    assert report.input_shape == list(example.shape)
    assert report.opset == 18 and report.path == str(path)
    json.dumps(report.to_dict())


def test_single_self_contained_file_with_dynamic_batch(exported) -> None:
    path, _, _, _ = exported
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no .onnx.data, no temp file
    proto = onnx.load(str(path), load_external_data=False)
    assert all(not t.external_data for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value


def test_onnx_predict_at_unseen_batch_size(exported) -> None:
    path, _, model, _ = exported
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(x).numpy()
    got = onnx_predict(path, x.numpy())
    assert got.shape == (7, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    session = load_onnx_session(path)
    np.testing.assert_allclose(onnx_predict(session, x.numpy()[:1]), expected[:1], atol=1e-4, rtol=0)


def test_caller_model_untouched(exported) -> None:
    _, _, model, _ = exported
    fresh = small_model()
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert model.training  # export works on a copy: mode, grads and weights are the caller's
    assert all(p.requires_grad for p in model.parameters())


def test_corrupted_and_missing_files_raise_clear_error(tmp_path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07this is not a protobuf model\xff\xfe")
    with pytest.raises(ExportError, match="broken.onnx"):
        load_onnx_session(bad)
    with pytest.raises(ExportError, match="broken.onnx"):
        onnx_predict(bad, np.zeros((1, 1, 8, 8), dtype=np.float32))
    with pytest.raises(ExportError, match="not found"):
        load_onnx_session(tmp_path / "missing.onnx")


def _fail_dynamo(*args, **kwargs) -> None:
    raise RuntimeError("simulated dynamo failure")


def test_fallback_to_torchscript_exporter(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(export_mod, "_export_dynamo", _fail_dynamo)
    target = tmp_path / "m.onnx"
    (tmp_path / "m.onnx.data").write_bytes(b"stale")  # left over from an older external-data export
    model = small_model().to(memory_format=torch.channels_last)
    with caplog.at_level("WARNING", logger="gkd_core.export"):
        report = export_onnx(model, target, torch.randn(2, 1, 8, 8), check_batch_sizes=(1, 4))
    assert report.exporter == "torchscript" and report.passed
    assert "falling back" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert onnx_predict(target, np.zeros((6, 1, 8, 8), dtype=np.float32)).shape == (6, 10)


def test_external_data_is_inlined(tmp_path, monkeypatch) -> None:
    def export_with_side_file(model, example, dst, opset) -> None:
        export_mod._export_torchscript(model, example, dst, opset)
        proto = onnx.load(str(dst))
        onnx.save_model(
            proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
            location=dst.name + ".data", size_threshold=0,
        )
        assert (dst.parent / (dst.name + ".data")).exists()

    monkeypatch.setattr(export_mod, "_export_dynamo", export_with_side_file)
    target = tmp_path / "ext.onnx"
    report = export_onnx(small_model(), target, torch.randn(2, 1, 8, 8))
    assert report.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx"]
    proto = onnx.load(str(target), load_external_data=False)
    assert all(not t.external_data for t in proto.graph.initializer)


def test_parity_failure_strict_and_lenient(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(export_mod, "_export_dynamo", _fail_dynamo)  # fast exporter; parity is the subject
    real_predict = export_mod.onnx_predict
    monkeypatch.setattr(export_mod, "onnx_predict", lambda s, x: real_predict(s, x) + 0.01)
    strict_target = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match="parity"):
        export_onnx(small_model(), strict_target, torch.randn(2, 1, 8, 8), strict=True)
    assert list(tmp_path.iterdir()) == []  # nothing written on a strict failure
    report = export_onnx(small_model(), tmp_path / "lenient.onnx", torch.randn(2, 1, 8, 8))
    assert not report.passed and report.max_abs_diff == pytest.approx(0.01, abs=1e-4)
    assert (tmp_path / "lenient.onnx").exists()


def test_bad_arguments() -> None:
    with pytest.raises(ExportError):
        export_onnx(small_model(), "unused.onnx", torch.randn(0, 1, 8, 8))
    with pytest.raises(ExportError):
        export_onnx(small_model(), "unused.onnx", torch.randn(2, 1, 8, 8), check_batch_sizes=(0,))

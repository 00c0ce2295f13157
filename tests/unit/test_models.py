"""Model registry, shapes, feature hooks and width handling."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from gkd_core.models import MODELS, FeatureHook, ModelSpec, build_model, count_parameters

NUM_CLASSES = 7


@pytest.fixture(scope="module")
def built() -> dict:
    """Each (model, in_channels) built once per module: building the big ones dominates the cost."""
    cache: dict = {}

    def get(name: str, in_channels: int) -> nn.Module:
        key = (name, in_channels)
        if key not in cache:
            torch.manual_seed(0)
            cache[key] = build_model(name, NUM_CLASSES, in_channels).eval()
        return cache[key]

    return get


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_and_features_shapes_32x32(built, name: str, in_channels: int) -> None:
    model = built(name, in_channels)
    spec = MODELS[name]
    head = getattr(model, spec.classifier)
    assert isinstance(head, nn.Linear)
    assert head.in_features == model.feature_dim and head.out_features == NUM_CLASSES
    x = torch.randn(2, in_channels, 32, 32)
    with torch.no_grad(), FeatureHook(model) as hook:
        logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert hook.features is not None and hook.features.shape == (2, model.feature_dim)
    assert torch.isfinite(logits).all()
    assert not hook.attached


@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_small_inputs_work(built, name: str, size: int) -> None:
    model = built(name, 1)
    with torch.no_grad(), FeatureHook(model) as hook:
        logits = model(torch.randn(2, 1, size, size))
    assert logits.shape == (2, NUM_CLASSES)
    assert hook.features.shape == (2, model.feature_dim)


@pytest.mark.parametrize(
    "name, feature_dim",
    [
        ("resnet8x4", 256), ("resnet32x4", 256), ("resnet20", 64), ("resnet56", 64),
        ("resnet18", 512), ("resnet50", 2048), ("mobilenetv2", 1280), ("digits_cnn", 64),
    ],
)
def test_feature_dims(built, name: str, feature_dim: int) -> None:
    assert built(name, 3).feature_dim == feature_dim


@pytest.mark.parametrize(
    "name, width, millions",
    # Parameter counts for 100 classes as reported in the KD literature (RepDistiller / CRD tables).
    [
        ("resnet8x4", 1.0, 1.23), ("resnet32x4", 1.0, 7.43), ("resnet20", 1.0, 0.28),
        ("resnet56", 1.0, 0.86), ("resnet18", 1.0, 11.2), ("mobilenetv2", 0.5, 0.81),
    ],
)
def test_parameter_counts_match_literature(name: str, width: float, millions: float) -> None:
    model = build_model(name, 100, 3, width=width)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.02)


def test_feature_hook_equals_manual_features() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 5, 3).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        h = model.relu(model.bn1(model.conv1(x)))
        h = model.layer3(model.layer2(model.layer1(h)))
        manual = h.mean(dim=(2, 3))
        with FeatureHook(model) as hook:
            logits = model(x)
    torch.testing.assert_close(hook.features, manual)
    torch.testing.assert_close(model.fc(manual), logits)


def test_feature_hook_keeps_graph_and_tracks_last_batch() -> None:
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, 1)
    hook = FeatureHook(model)
    model(torch.randn(4, 1, 8, 8))
    model(torch.randn(2, 1, 8, 8))
    assert hook.features.shape == (2, model.feature_dim)
    assert hook.features.requires_grad  # not detached: feature losses must reach the model
    hook.features.pow(2).sum().backward()
    assert model.features[0][0].weight.grad is not None
    assert model.fc.weight.grad is None  # the classifier is downstream of the features
    last = hook.features
    hook.remove()
    hook.remove()  # idempotent
    model(torch.randn(5, 1, 8, 8))
    assert hook.features is last


def test_feature_hook_on_mobilenet_uses_named_classifier() -> None:
    model = build_model("mobilenetv2", 3, 3, width=0.25).eval()
    seen = []
    model.classifier.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad(), FeatureHook(model) as hook:
        model(torch.randn(2, 3, 8, 8))
    assert hook.features is seen[0]


def test_feature_hook_needs_a_classifier_name() -> None:
    with pytest.raises(ValueError, match="classifier"):
        FeatureHook(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    seq = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with FeatureHook(seq, classifier="1") as hook:
        seq(torch.ones(1, 2, 2))
    assert hook.features.shape == (1, 4)


def test_deepcopy_with_attached_hook() -> None:
    model = build_model("digits_cnn", 10, 1)
    hook = FeatureHook(model)
    model(torch.randn(2, 1, 8, 8))  # captured features carry a graph (not deep-copyable)
    clone = copy.deepcopy(model)
    clone(torch.randn(3, 1, 8, 8))
    assert hook.features.shape[0] == 2  # the copy does not write into the original hook


def test_unknown_model_names_allowed() -> None:
    with pytest.raises(ValueError) as err:
        build_model("resnet9000", 10)
    for name in MODELS:
        assert name in str(err.value)


def test_width_support() -> None:
    assert MODELS["digits_cnn"].supports_width and MODELS["mobilenetv2"].supports_width
    assert not MODELS["resnet20"].supports_width
    half = build_model("digits_cnn", 10, 1, width=0.5)
    assert half.feature_dim == 32
    assert count_parameters(half) < count_parameters(build_model("digits_cnn", 10, 1))
    mob_half = build_model("mobilenetv2", 10, 3, width=0.5)
    assert mob_half.feature_dim == 1280  # RepDistiller's mobile_half keeps the 1280-wide head
    assert build_model("mobilenetv2", 10, 3, width=1.5).feature_dim == 1920
    with pytest.raises(ValueError, match="width"):
        build_model("resnet20", 10, 3, width=0.5)
    with pytest.raises(ValueError, match="width"):
        build_model("digits_cnn", 10, 1, width=0.0)
    assert build_model("resnet20", 10, 3, width=1.0).feature_dim == 64


def test_bad_sizes_rejected() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model("digits_cnn", 0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("digits_cnn", 10, in_channels=0)


def test_spec_is_frozen_and_classifier_names_agree() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["resnet20"].classifier = "head"  # type: ignore[misc]
    assert all(isinstance(s, ModelSpec) for s in MODELS.values())
    model = build_model("mobilenetv2", 4, 3, width=0.25)
    assert model.classifier_name == MODELS["mobilenetv2"].classifier == "classifier"


def test_count_parameters_trainable_only() -> None:
    model = build_model("digits_cnn", 10, 1)
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    model.fc.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.fc.weight.numel() - 10


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = build_model("resnet8x4", 10, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        with FeatureHook(model) as hook:
            out = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert hook.features.shape == (2, 256)


def test_kaiming_init_and_train_step() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3)
    conv = model.conv1.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx((2.0 / fan_out) ** 0.5, rel=0.2)
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

"""swpfx/estimate.py: the budget's estimate equals the built graph's cost — FLOPs exactly, latency as predicted."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import swpfx
from swpfx.estimate import ConversionEstimate, predict_graph
from swpfx.pipeline import convert_with_masks
from swpfx.runtime_model import RuntimeModel

RUNTIME_MODEL = RuntimeModel()  # the shipped table: any fixed coefficients will do for consistency


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random running stats and affine terms, so dead filters emit non-zero constants of both signs."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1, generator=generator)
                m.running_var.uniform_(0.5, 2, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.uniform_(-1, 1, generator=generator)
    return model.eval()


def random_masks(prepared, generator, dead_fraction=0.25, keep=0.6):
    masks = {}
    for name, s in swpfx.skeletons(prepared).items():
        mask = torch.rand(s.shape, generator=generator) < keep
        mask[torch.rand(s.shape[0], generator=generator) < dead_fraction] = False
        masks[name] = mask
    return masks


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "grouped": lambda: nn.Sequential(  # grouped and depthwise convs, zero padding everywhere
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def prepared(request):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 48, 48, generator=g)
    model = randomize_batchnorm(MODELS[request.param](), g)
    return swpfx.prepare(model, (x,)), x


@pytest.mark.parametrize("lowering,channel_multiple", [("never", 1), ("always", 1), ("auto", 8)])
def test_estimate_equals_the_built_graphs_flops_and_predicted_latency(prepared, lowering, channel_multiple):
    prepared, x = prepared
    estimator = ConversionEstimate(prepared, (x,), lowering, channel_multiple, RUNTIME_MODEL)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        masks = random_masks(prepared, g)
        estimate = estimator.estimate(masks)
        built, removal = convert_with_masks(prepared, masks, lowering, (x,), channel_multiple,
                                            RUNTIME_MODEL.choose_form)
        assert estimate.flops == swpfx.cost(built, (x,)).flops
        assert estimate.seconds == pytest.approx(predict_graph(built, RUNTIME_MODEL), rel=1e-9)
        lowered = {d.conv for d in estimate.decisions if not d.form.startswith("dense")}
        built_lowered = {n.meta["swpfx"]["conv"] for n in built.graph.nodes
                         if n.meta.get("swpfx", {}).get("role") == "lowered_conv"}
        assert lowered == built_lowered


def test_the_ones_map_conv_of_removed_constants_is_priced():
    """Dead filters whose BN constant reaches a zero-padded conv need the ones-map conv: the estimate counts it."""
    g = torch.Generator().manual_seed(3)
    model = randomize_batchnorm(MODELS["resnet18"](), g)
    x = torch.randn(1, 3, 48, 48, generator=g)
    prepared = swpfx.prepare(model, (x,))
    masks = random_masks(prepared, g, dead_fraction=0.4)
    built, removal = convert_with_masks(prepared, masks, "never", (x,), 1)
    assert removal.bias_maps, "the case must produce ones-map convs"
    estimator = ConversionEstimate(prepared, (x,), "never", 1, RUNTIME_MODEL)
    without = ConversionEstimate(prepared, (x,), "never", 1, RUNTIME_MODEL)
    for site in without.convs:
        site.constants = None  # as if no removed channel left a constant behind
    assert estimator.estimate(masks).flops == swpfx.cost(built, (x,)).flops > without.estimate(masks).flops


def test_dense_masks_estimate_the_prepared_models_flops(prepared):
    prepared, x = prepared
    full = {n: torch.ones_like(s, dtype=torch.bool) for n, s in swpfx.skeletons(prepared).items()}
    estimate = ConversionEstimate(prepared, (x,), "auto", 1, RUNTIME_MODEL).estimate(full)
    assert estimate.flops == swpfx.cost(prepared, (x,)).flops
    assert all(d.form == "dense" and d.kept_filters == d.filters for d in estimate.decisions)

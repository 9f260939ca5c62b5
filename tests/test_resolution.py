"""Converted models run at any input resolution: a dead filter's constant is folded without fixing the size.

Converted at one size, every model is checked against the masked prepared model
at that size and at others (odd sizes, strided consumers), in torch and in ONNX
Runtime (dynamic height/width), and after a save/load round trip.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import swpfx
from swpfx.passes.graph_utils import swpfx_meta
from helpers import flat_outputs, masked_reference, randomize_batchnorm_, relative_error
from swpfx.convert import convert
from swpfx.export import run_onnx
from swpfx.masks import random_stripe_mask
from swpfx.passes.analyze_channels import analyze_channels
from swpfx.persist import load, save
from swpfx.synthetic import skeletons_from_masks_

THRESHOLD = 0.05
TOL = 1e-4


def prepared_with_dead_filters(model, x, dead=0.2, seed=0):
    """Random BN statistics, random stripe masks with ``dead`` of each conv's filters pruned."""
    randomize_batchnorm_(model, seed)
    prepared = swpfx.prepare(model.eval(), (x,)).eval()
    g = torch.Generator().manual_seed(seed)
    masks = {name: random_stripe_mask(*s.shape, keep=0.35, dead=dead, generator=g)
             for name, s in swpfx.skeletons(prepared).items()}
    skeletons_from_masks_(prepared, masks, THRESHOLD, g)
    return prepared


def worst_error(deployed, reference, size, channels=3, batch=2, seed=1):
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch, channels, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        pairs = zip(flat_outputs(deployed(x)), flat_outputs(reference(x)))
        return max(relative_error(a, e) for a, e in pairs)


def dead_channel_convs(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.meta.get("swpfx", {}).get("role") == "dead_channel_conv"]


def assert_no_size_fixed_buffers(gm):
    """Nothing of the example's spatial size is stored: no 4-D buffer besides conv weights."""
    assert not [name for name, b in gm.named_buffers() if b.dim() == 4]


# ---------------------------------------------------------------- ResNet-18: converted at 64², run elsewhere


@pytest.fixture(scope="module")
def resnet18_converted():
    prepared = prepared_with_dead_filters(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 64, 64))
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    return prepared, deployed


@pytest.mark.parametrize("size", [64, 96, 77, 224, (65, 90)])
def test_resnet18_converted_at_64_is_exact_at_other_sizes(resnet18_converted, size):
    prepared, deployed = resnet18_converted
    assert worst_error(deployed, masked_reference(prepared), size) <= TOL


def test_resnet18_position_dependent_constants_become_ones_map_convs(resnet18_converted):
    prepared, deployed = resnet18_converted
    deployed.graph.lint()
    assert sum(deployed.meta["swpfx"]["removed_filters"].values()) > 0
    convs = dead_channel_convs(deployed)
    assert convs and len(convs) == len(deployed.meta["swpfx"]["bias_maps"])
    strided = []
    for node in convs:
        conv = deployed.get_submodule(node.target)
        ones = node.args[0]
        assert conv.in_channels == 1 and conv.bias is None
        # built from the activation's shape, never a slice of it (a slice costs ORT a reorder of the activation)
        assert ones.op == "call_method" and ones.target == "new_ones" and ones.args[1][1] == 1
        base = ones.args[0]
        assert all(u.target == "new_ones" or (u.target is getattr and u.args[1] == "shape")
                   for u in base.users if swpfx_meta(u).get("role") == "dead_channel_constant")
        consumer = next(u for u in node.users).args[0]  # torch.add(consumer, dead)
        assert deployed.get_submodule(consumer.target).stride == conv.stride
        strided += [node] if conv.stride != (1, 1) else []
    assert strided, "no strided consumer exercised"
    assert_no_size_fixed_buffers(deployed)


def test_resnet18_exports_with_dynamic_height_and_width(resnet18_converted, tmp_path):
    prepared, deployed = resnet18_converted
    x = torch.randn(1, 3, 64, 64)
    result = swpfx.export_onnx(deployed, (x,), tmp_path / "r18.onnx", dynamic_hw=True)
    assert result.verified and result.dynamic_hw
    assert len(result.errors_by_size) == 3 and max(result.errors_by_size.values()) <= TOL
    reference = masked_reference(prepared)
    for size in (96, 77, 224):
        xs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            expected = reference(xs)
        assert relative_error(torch.from_numpy(run_onnx(result.path, (xs,))[0]), expected) <= TOL


def test_dynamic_hw_is_refused_where_the_graph_fixes_the_size(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(swpfx.export.ExportError, match="dynamic_hw=True, but the model"):
        swpfx.export_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "fixed.onnx", dynamic_hw=True)


def test_saved_plan_round_trips_the_ones_map_conv(resnet18_converted, tmp_path):
    prepared, deployed = resnet18_converted
    path = save(deployed, tmp_path / "r18.safetensors")
    loaded = load(path)
    for size in (64, 77):
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            assert torch.equal(loaded(x), deployed(x))
    assert len(dead_channel_convs(loaded)) == len(dead_channel_convs(deployed))


def test_converted_model_can_be_analysed_again(resnet18_converted):
    """The ones map reads only its input's shape: it must not pin the consumer's input channels."""
    _, deployed = resnet18_converted
    analysis = analyze_channels(copy.deepcopy(deployed), (torch.randn(1, 3, 64, 64),))
    assert "layer1_0_conv1" in analysis.independent_convs()


# ---------------------------------------------------------------- segmentation


def test_segmentation_model_converts_and_runs_at_two_resolutions():
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=3)
    prepared = prepared_with_dead_filters(model, torch.randn(1, 3, 64, 64), dead=0.2, seed=2)
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    deployed.graph.lint()
    assert sum(deployed.meta["swpfx"]["removed_filters"].values()) > 0
    reference = masked_reference(prepared)
    for size in (64, (80, 112), 97):
        assert worst_error(deployed, reference, size) <= TOL


# ---------------------------------------------------------------- small hand-made graphs


class PaddedChain(nn.Module):
    """conv -> BN -> ReLU -> [pre] -> conv (zero padding, stride s) -> BN -> pooled Linear."""

    def __init__(self, pre=None, stride=2, padding=1, padding_mode="zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pre = pre or nn.Identity()
        self.conv2 = nn.Conv2d(8, 6, 3, stride=stride, padding=padding, padding_mode=padding_mode)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.pre(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(self.bn2(self.conv2(x)).mean((2, 3)))


def converted_chain(model, dead=(1, 4, 5), size=12):
    torch.manual_seed(0)
    randomize_batchnorm_(model.eval(), 0)
    with torch.no_grad():
        model.bn1.bias.fill_(0.7)  # the dead channels' constants are positive after ReLU
    x = torch.randn(2, 3, size, size)
    prepared = swpfx.prepare(model, (x,)).eval()
    with torch.no_grad():
        swpfx.skeletons(prepared)["conv1"][list(dead)] = 0.0
    return prepared, convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)


@pytest.mark.parametrize("stride", [1, 2])
def test_zero_padded_consumer_is_exact_at_every_size(stride):
    prepared, deployed = converted_chain(PaddedChain(stride=stride))
    assert deployed.get_submodule("conv2").in_channels == 5
    assert deployed.meta["swpfx"]["bias_maps"] == ["conv2"]
    deployed.graph.lint()
    reference = masked_reference(prepared)
    for size in (12, 9, 16, 23, (7, 13)):
        assert worst_error(deployed, reference, size) <= 1e-5


@pytest.mark.parametrize("padding, padding_mode", [(0, "zeros"), (1, "reflect"), (1, "circular")])
def test_constant_output_folds_into_the_bias(padding, padding_mode):
    prepared, deployed = converted_chain(PaddedChain(padding=padding, padding_mode=padding_mode))
    assert deployed.get_submodule("conv2").in_channels == 5
    assert deployed.meta["swpfx"]["bias_maps"] == [] and not dead_channel_convs(deployed)
    reference = masked_reference(prepared)
    for size in (12, 9, 17):
        assert worst_error(deployed, reference, size) <= 1e-5


def test_padded_average_pool_is_replayed_on_the_ones_map():
    """Inception's branch_pool: avg_pool(3, 1, 1) counts the zero padding, so the constant varies."""
    prepared, deployed = converted_chain(PaddedChain(pre=nn.AvgPool2d(3, 1, 1)))
    assert deployed.get_submodule("conv2").in_channels == 5
    (dead,) = dead_channel_convs(deployed)
    # the ones map goes through the same pool before the conv
    assert dead.args[0].op == "call_module" and dead.args[0].target == "pre"
    reference = masked_reference(prepared)
    for size in (12, 9, 16, 21):
        assert worst_error(deployed, reference, size) <= 1e-5


class PadThenBatchNorm(nn.Module):
    """A zero pad followed by a BatchNorm: the constant's map is no longer a multiple of a ones map."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d(1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.pad(x))


def test_unreplayable_constant_keeps_its_channels_and_stays_exact():
    prepared, deployed = converted_chain(PaddedChain(pre=PadThenBatchNorm(), padding=0))
    assert deployed.get_submodule("conv1").out_channels == 8  # kept: not expressible at any size
    reference = masked_reference(prepared)
    for size in (12, 9, 16):
        assert worst_error(deployed, reference, size) <= 1e-5

"""swpfx.convert end to end: exact against the masked prepared model, smaller, lint-clean."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import swpfx
from swpfx.convert import convert
from swpfx.synthetic import synthetic_skeletons_
from helpers import randomize_batchnorm_, relative_error

THRESHOLD = 0.05
TOL = 1e-4

# A representative subset for CI (every channel-coupling pattern torchvision has:
# plain chains, residual adds, concats, depthwise, SE, channel shuffle, grouped
# convs, flatten->Linear with spatial extent). All 80 models: test_convert_all_models (slow).
CI_MODELS = {
    "resnet18": 64, "mobilenet_v2": 64, "densenet121": 64, "googlenet": 64, "vgg11_bn": 64,
    "shufflenet_v2_x0_5": 64, "efficientnet_b0": 64, "regnet_x_400mf": 64, "squeezenet1_0": 64,
    "alexnet": 64, "mnasnet0_5": 64, "mobilenet_v3_small": 64, "resnext50_32x4d": 64,
}
EXTRA_KWARGS = {"googlenet": {"aux_logits": False, "init_weights": False},
                "inception_v3": {"aux_logits": False, "init_weights": False}}


def masked_reference(prepared, threshold):
    """The prepared model with every skeleton entry at or below the threshold set to zero."""
    ref = copy.deepcopy(prepared).eval()
    with torch.no_grad():
        for s in swpfx.skeletons(ref).values():
            s.masked_fill_(s.abs() <= threshold, 0.0)
    return ref


def prepared_with_random_masks(model, x, protocol="random", seed=0):
    randomize_batchnorm_(model, torch.Generator().manual_seed(seed))
    prepared = swpfx.prepare(model.eval(), (x,)).eval()
    synthetic_skeletons_(prepared, protocol, THRESHOLD, seed=seed)
    return prepared


def check_exact(prepared, deployed, x, tol=TOL):
    with torch.no_grad():
        expected = masked_reference(prepared, THRESHOLD)(x)
        actual = deployed(x)
    err = relative_error(actual, expected)
    assert err <= tol, f"relative error {err:.2e} > {tol}"


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def build(name):
    return torchvision.models.get_model(name, weights=None, **EXTRA_KWARGS.get(name, {})).eval()


@pytest.mark.parametrize("name", sorted(CI_MODELS))
def test_torchvision_subset_exact_and_smaller(name):
    size = CI_MODELS[name]
    g = torch.Generator().manual_seed(3)
    model = build(name)
    x = torch.randn(2, 3, size, size, generator=g)
    prepared = prepared_with_random_masks(model, x)
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    check_exact(prepared, deployed, x)
    deployed.graph.lint()
    assert n_params(deployed) < n_params(model)
    assert sum(deployed.meta["swpfx"]["removed_filters"].values()) > 0
    assert not any("skeleton" in n for n, _ in deployed.named_parameters())


@pytest.mark.parametrize("protocol", ["random", "structured"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet121", "efficientnet_b0", "googlenet"])
def test_lowered_models_are_exact(name, protocol):
    g = torch.Generator().manual_seed(4)
    model = build(name)
    x = torch.randn(2, 3, 48, 48, generator=g)
    prepared = prepared_with_random_masks(model, x, protocol)
    deployed = convert(prepared, THRESHOLD, lowering="always", channel_multiple=1)
    check_exact(prepared, deployed, x)
    deployed.graph.lint()
    lowered = [n for n in deployed.graph.nodes if n.meta.get("swpfx", {}).get("lowering") not in (None, "dense")]
    assert lowered, "lowering='always' lowered nothing"


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_convert_all_models(name):
    from test_prepare_torchvision import MIN_TEST_SIZE, SMALLEST_INPUT

    size = max(SMALLEST_INPUT[name], MIN_TEST_SIZE)
    model = build(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    prepared = prepared_with_random_masks(model, x)
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    check_exact(prepared, deployed, x)
    deployed.graph.lint()
    assert n_params(deployed) <= n_params(model)


# ---------------------------------------------------------------- small hand-made graphs


class ConvBnReluChain(nn.Module):
    """conv -> BN -> ReLU -> conv (padding p2) -> BN -> flatten -> Linear."""

    def __init__(self, p2=1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=p2)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * (8 if p2 == 1 else 6) ** 2, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def kill_filters(prepared, name, filters):
    with torch.no_grad():
        swpfx.skeletons(prepared)[name][filters] = 0.0


@pytest.mark.parametrize("padding", [0, 1])
def test_dead_filter_constant_is_folded_exactly(padding):
    """The exactness trap: a dead filter's channel is relu(BN(bias)), a non-zero constant."""
    torch.manual_seed(0)
    model = ConvBnReluChain(padding).eval()
    with torch.no_grad():
        model.bn1.bias.fill_(0.7)  # makes the dead channels' constants positive after ReLU
    randomize_batchnorm_(model.bn2, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "conv1", [1, 4, 5])
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    assert deployed.get_submodule("conv1").out_channels == 5
    assert deployed.get_submodule("conv2").in_channels == 5
    # with zero padding the constant's effect depends on the position: a bias map
    assert bool(deployed.meta["swpfx"]["bias_maps"]) == (padding == 1)
    check_exact(prepared, deployed, x, tol=1e-5)
    # and dropping the channels without folding would have been wrong
    naive = copy.deepcopy(deployed)
    with torch.no_grad():
        naive.get_submodule("conv2").bias.zero_()
    if padding == 0:
        with torch.no_grad():
            assert relative_error(naive(x), masked_reference(prepared, THRESHOLD)(x)) > 1e-3


def test_dead_filters_before_flatten_linear_fold_into_linear_bias():
    model = ConvBnReluChain(1).eval()
    randomize_batchnorm_(model, torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "conv2", [0, 3])
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    assert deployed.get_submodule("fc").in_features == 4 * 64
    check_exact(prepared, deployed, x, tol=1e-5)


def test_every_filter_of_a_conv_dead_is_still_exact():
    model = ConvBnReluChain(1).eval()
    randomize_batchnorm_(model, torch.Generator().manual_seed(2))
    x = torch.randn(2, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "conv1", slice(None))
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    assert deployed.get_submodule("conv1").out_channels == 1  # one channel kept so shapes stay valid
    check_exact(prepared, deployed, x, tol=1e-5)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = self.bn1(self.conv1(x))
        return self.head(torch.relu(x + y)).mean((2, 3))


def test_residual_add_removes_only_channels_dead_in_every_producer():
    model = Residual().eval()
    randomize_batchnorm_(model, torch.Generator().manual_seed(4))
    x = torch.randn(2, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "stem", [0, 1, 2])
    kill_filters(prepared, "conv1", [1, 2, 3])
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    # channels 1 and 2 are dead in both producers; 0 and 3 are alive in one of them
    assert deployed.get_submodule("stem").out_channels == 6
    assert deployed.get_submodule("conv1").out_channels == 6
    assert deployed.get_submodule("conv1").in_channels == 6
    check_exact(prepared, deployed, x, tol=1e-5)


class DepthwiseBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
        self.bn2 = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = nn.functional.relu6(self.bn1(self.pw(x)))
        return self.out(nn.functional.relu6(self.bn2(self.dw(x))))


def test_depthwise_channel_goes_only_when_both_producers_are_dead():
    model = DepthwiseBlock().eval()
    randomize_batchnorm_(model, torch.Generator().manual_seed(5))
    x = torch.randn(2, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "pw", [0, 1])
    kill_filters(prepared, "dw", [0, 1, 4])  # input channel 0 -> outputs 0, 1 ; input 2 -> 4, 5
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    dw = deployed.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (7, 14, 7)
    check_exact(prepared, deployed, x, tol=1e-5)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1))))


def test_concat_offsets_channels():
    model = Concat().eval()
    randomize_batchnorm_(model, torch.Generator().manual_seed(6))
    x = torch.randn(2, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "a", [3])
    kill_filters(prepared, "b", [0, 5])
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    assert deployed.get_submodule("bn").num_features == 7
    assert deployed.get_submodule("c").in_channels == 7
    check_exact(prepared, deployed, x, tol=1e-5)


def test_channels_reaching_the_output_are_kept():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "0", [0, 1])
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    assert deployed.get_submodule("0").out_channels == 4
    check_exact(prepared, deployed, x, tol=1e-6)


def test_threshold_zero_and_all_kept_leave_plain_convs():
    model = ConvBnReluChain(1).eval()
    x = torch.randn(1, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    deployed = convert(prepared, threshold=0.0, lowering="auto")
    convs = [m for m in deployed.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and all(n.op != "call_function" or n.target is not torch.conv2d for n in deployed.graph.nodes)
    check_exact(prepared, deployed, x, tol=1e-6)


def test_model_without_convs():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    x = torch.randn(2, 3, 2, 2)
    prepared = swpfx.prepare(model, (x,))
    deployed = convert(prepared)
    with torch.no_grad():
        assert torch.equal(deployed(x), model(x))


def test_prepared_model_is_not_modified():
    model = ConvBnReluChain(1).eval()
    x = torch.randn(1, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "conv1", [0])
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    code = prepared.code
    convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    assert prepared.code == code
    after = prepared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_graph_is_readable_and_meta_records_masks():
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    prepared = prepared_with_random_masks(model, x)
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    names = {n.name for n in deployed.graph.nodes}
    assert "layer1_0_conv1" in names
    node = next(n for n in deployed.graph.nodes if n.name == "layer1_0_conv1")
    meta = node.meta["swpfx"]
    assert meta["conv"] == "layer1.0.conv1"
    assert meta["mask"].shape == (deployed.get_submodule("layer1.0.conv1").out_channels, 3, 3)
    assert "layer1.0.conv1" in deployed.code or 'getattr(self.layer1, "0").conv1' in deployed.code


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "0.1"])
def test_bad_thresholds_are_rejected(bad):
    prepared = swpfx.prepare(ConvBnReluChain(1), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(ValueError, match="threshold"):
        convert(prepared, bad)


def test_threshold_and_flops_target_are_exclusive():
    prepared = swpfx.prepare(ConvBnReluChain(1), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(ValueError, match="mutually exclusive"):
        convert(prepared, 0.1, flops_target=0.5)


def test_convert_requires_a_prepared_model():
    with pytest.raises(ValueError, match="swpfx.prepare"):
        convert(ConvBnReluChain(1), 0.1)


def test_convert_without_recorded_shapes_needs_example_inputs():
    prepared = swpfx.prepare(ConvBnReluChain(1))
    with pytest.raises(ValueError, match="example_inputs"):
        convert(prepared, 0.1)
    deployed = convert(prepared, 0.1, example_inputs=(torch.randn(1, 3, 8, 8),), lowering="never")
    assert isinstance(deployed, torch.fx.GraphModule)


def test_channel_multiple_rounds_kept_filters_up():
    """Kept output channels are rounded up to a multiple by keeping dead filters; still exact."""
    model = ConvBnReluChain(1).eval()
    randomize_batchnorm_(model, torch.Generator().manual_seed(7))
    x = torch.randn(2, 3, 8, 8)
    prepared = swpfx.prepare(model, (x,)).eval()
    kill_filters(prepared, "conv1", [0, 1, 2, 3, 4])  # 3 of 8 left
    assert convert(prepared, THRESHOLD, lowering="never", channel_multiple=1).get_submodule("conv1").out_channels == 3
    rounded = convert(prepared, THRESHOLD, lowering="never", channel_multiple=2)
    assert rounded.get_submodule("conv1").out_channels == 4
    assert convert(prepared, THRESHOLD, lowering="never", channel_multiple=16).get_submodule("conv1").out_channels == 8
    check_exact(prepared, rounded, x, tol=1e-5)

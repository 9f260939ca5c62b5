"""The insert_skeletons pass (via swpfx.prepare): every conv option, conv subclasses, functional convs, skips."""

from __future__ import annotations

import copy
import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import swpfx
from helpers import Conv2dCounter, ConvCalledTwice, randomize_batchnorm_, randomize_skeletons_, relative_error
from swpfx.passes.insert_skeletons import insert_skeletons, skeleton_key
from swpfx.tracing import trace

TOLERANCE = 1e-5


def roles(gm: fx.GraphModule) -> list[str]:
    return [n.meta["swpfx"]["role"] for n in gm.graph.nodes if "swpfx" in n.meta]


def conv_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.meta.get("swpfx", {}).get("role") == "conv"]


def check_prepared_conv(model: nn.Module, x: torch.Tensor, reference, generator) -> fx.GraphModule:
    """Prepare ``model``; exact at init; with a random skeleton equal to ``reference(skeleton)``."""
    model.eval()
    expected = model(x)
    prepared = swpfx.prepare(model, (x,)).eval()
    prepared.graph.lint()
    assert relative_error(prepared(x), expected) <= TOLERANCE
    (skel,) = swpfx.skeletons(prepared).values()
    randomize_skeletons_(prepared, generator)
    assert relative_error(prepared(x), reference(skel.detach())) <= TOLERANCE
    assert not torch.allclose(prepared(x), expected, rtol=1e-3, atol=1e-3)  # the skeleton is not an identity
    return prepared


# ---------------------------------------------------------------- nn.Conv2d options

CONV_OPTIONS = {
    "plain3x3": dict(in_channels=4, out_channels=6, kernel_size=3),
    "stride2": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    "stride_tuple": dict(in_channels=4, out_channels=6, kernel_size=3, stride=(2, 1), padding=(1, 0)),
    "padding_int": dict(in_channels=4, out_channels=6, kernel_size=3, padding=2),
    "padding_tuple": dict(in_channels=4, out_channels=6, kernel_size=(3, 5), padding=(1, 2)),
    "padding_same": dict(in_channels=4, out_channels=6, kernel_size=3, padding="same"),
    "padding_same_even": dict(in_channels=4, out_channels=6, kernel_size=(2, 4), padding="same"),
    "padding_same_dilated": dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", dilation=2),
    "padding_valid": dict(in_channels=4, out_channels=6, kernel_size=3, padding="valid"),
    "reflect": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate": dict(in_channels=4, out_channels=6, kernel_size=3, padding=(2, 1), padding_mode="replicate"),
    "circular": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1, padding_mode="circular", stride=2),
    "reflect_same": dict(in_channels=4, out_channels=6, kernel_size=(2, 3), padding="same", padding_mode="reflect"),
    "dilation": dict(in_channels=4, out_channels=6, kernel_size=3, dilation=2, padding=2),
    "dilation_tuple": dict(in_channels=4, out_channels=6, kernel_size=3, dilation=(1, 3), padding=(1, 3)),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise": dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=1),
    "depthwise_multiplier": dict(in_channels=3, out_channels=6, kernel_size=5, groups=3, padding=2, stride=2),
    "no_bias": dict(in_channels=4, out_channels=6, kernel_size=3, bias=False),
    "kernel2x2": dict(in_channels=4, out_channels=6, kernel_size=2, stride=2),
    "kernel1x3": dict(in_channels=4, out_channels=6, kernel_size=(1, 3), padding=(0, 1)),
    "kernel3x1": dict(in_channels=4, out_channels=6, kernel_size=(3, 1), padding=(1, 0)),
    "kernel5x5": dict(in_channels=4, out_channels=6, kernel_size=5, padding=2),
    "kernel7x7": dict(in_channels=4, out_channels=6, kernel_size=7, stride=2, padding=3),
    "kernel1x1": dict(in_channels=4, out_channels=6, kernel_size=1),
    "kernel1x1_stride": dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, bias=False),
}


def independent_conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv`` applied with another weight, written with F.pad/F.conv2d from the module's attributes."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        if isinstance(padding, str):  # 'same': total k-1 per dim (dilated), the extra one after
            pads = []
            for k, d in reversed(list(zip(conv.kernel_size, conv.dilation))):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
        else:
            pads = [p for p in reversed(padding) for _ in range(2)]
        x, padding = F.pad(x, pads, mode=conv.padding_mode), 0
    return F.conv2d(x, weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("option", CONV_OPTIONS)
@torch.no_grad()
def test_conv_option_exact_at_init_and_with_random_skeleton(option, generator):
    conv = nn.Conv2d(**CONV_OPTIONS[option])
    x = torch.randn(2, conv.in_channels, 11, 10, generator=generator)
    prepared = check_prepared_conv(
        nn.Sequential(conv), x, lambda skel: independent_conv(conv, x, conv.weight * skel[:, None]), generator
    )
    (skel,) = swpfx.skeletons(prepared).values()
    assert skel.shape == (conv.out_channels, *conv.kernel_size)
    assert roles(prepared).count("conv") == 1
    # a non-zero padding mode becomes an explicit F.pad node, as nn.Conv2d itself does
    n_pad = sum(n.target is F.pad for n in prepared.graph.nodes)
    assert n_pad == (conv.padding_mode != "zeros")


def test_graph_form_and_meta():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    prepared = swpfx.prepare(model)
    (conv,) = conv_nodes(prepared)
    assert conv.op == "call_function" and conv.target is torch.conv2d
    weight = conv.args[1]
    assert weight.target is operator.mul and weight.meta["swpfx"] == {"role": "skeleton_weight", "conv": "0"}
    param, stripes = weight.args
    assert param.op == "get_attr" and param.target == "0.weight"
    assert stripes.op == "call_method" and stripes.target == "unsqueeze" and stripes.args[1] == 1
    assert stripes.args[0].op == "get_attr" and stripes.args[0].target == "0.skeleton"
    assert stripes.meta["swpfx"]["role"] == stripes.args[0].meta["swpfx"]["role"] == "skeleton"
    assert conv.meta["swpfx"] == {"role": "conv", "conv": "0"}
    assert prepared.get_parameter("0.skeleton").shape == (8, 3, 3)


def test_prepared_code_is_readable():
    import torchvision

    prepared = swpfx.prepare(torchvision.models.resnet18())
    code = prepared.code
    for name in ("layer1_0_conv1_skeleton", "layer1_0_conv1_skeleton_weight", "layer4_1_conv2_skeleton",
                 "layer2_0_downsample_0_skeleton", "torch.conv2d("):
        assert name in code, name
    assert "layer1_0_conv1_stripes = layer1_0_conv1_skeleton.unsqueeze(1)" in code


def test_insert_skeletons_pass_directly():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)))
    result = insert_skeletons(gm)
    assert result.graph_module is gm
    assert result.skeletons == {"0": "0.skeleton", "1": "1.skeleton"}
    assert result.skipped == []
    with pytest.raises(ValueError, match="insert_skeletons.*already"):
        insert_skeletons(gm)  # a graph is prepared only once


def test_skeleton_key():
    assert skeleton_key("layer1.0.conv1.weight") == ("layer1.0.conv1", "layer1.0.conv1.skeleton")
    assert skeleton_key("weight") == ("weight", "weight_skeleton")
    assert skeleton_key("block.kernel") == ("block.kernel", "block.kernel_skeleton")


def test_shared_conv_called_twice_gets_one_skeleton(generator):
    model = ConvCalledTwice()
    x = torch.randn(1, 4, 8, 8, generator=generator)
    with Conv2dCounter() as counter:
        model(x)
    prepared = swpfx.prepare(model)
    assert counter.calls == 2 and len(counter.weight_ids) == 1
    assert list(swpfx.skeletons(prepared)) == ["conv"]
    assert roles(prepared).count("conv") == 2

    def reference(skel):
        w = model.conv.weight * skel[:, None]
        return F.conv2d(torch.relu(F.conv2d(x, w, model.conv.bias, padding=1)), w, model.conv.bias, padding=1)

    with torch.no_grad():
        check_prepared_conv(model, x, reference, generator)


# ---------------------------------------------------------------- Conv2d subclasses with their own forward


class StdConv2dBN(nn.Conv2d):
    """Weight standardisation as in timm's StdConv2d (F.batch_norm on the reshaped weight)."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2dManual(nn.Conv2d):
    """Weight standardisation written out (mean and std over each filter)."""

    def forward(self, x):
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        std = self.weight.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (self.weight - mean) / (std + 1e-5), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """TensorFlow 'SAME' padding computed from the input size at run time (like timm's Conv2dSame)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def standardized(w: torch.Tensor, eps: float, unbiased_std: bool) -> torch.Tensor:
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    if unbiased_std:  # manual form: (w - mean) / (std + eps)
        return (w - mean) / (w.std(dim=(1, 2, 3), keepdim=True, unbiased=False) + eps)
    return (w - mean) / torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True, unbiased=False) + eps)


@pytest.mark.parametrize("cls", [StdConv2dBN, StdConv2dManual])
@torch.no_grad()
def test_weight_standardisation_subclass(cls, generator):
    conv = cls(4, 6, 3, stride=2, padding=1)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, 4, 9, 9, generator=generator)
    eps, manual = (1e-5, True) if cls is StdConv2dManual else (1e-6, False)

    def reference(skel):  # the skeleton multiplies the *effective* (standardised) weight
        w = standardized(conv.weight, eps, manual) * skel[:, None]
        return torch.relu(F.conv2d(x, w, conv.bias, 2, 1))

    prepared = check_prepared_conv(model, x, reference, generator)
    assert list(swpfx.skeletons(prepared)) == ["0"]
    assert swpfx.skipped_convs(prepared) == []


@pytest.mark.parametrize("stride", [1, 2])
@torch.no_grad()
def test_dynamic_same_padding_subclass_is_specialised_with_example_inputs(stride, generator):
    conv = Conv2dSame(4, 6, (3, 4), stride=stride)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), conv)
    x = torch.randn(2, 4, 11, 10, generator=generator)

    def reference(skel):
        h = model[0](x)
        pad_h = max((math.ceil(11 / stride) - 1) * stride + 3 - 11, 0)
        pad_w = max((math.ceil(10 / stride) - 1) * stride + 4 - 10, 0)
        h = F.pad(h, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(h, conv.weight * skel[:, None], conv.bias, stride)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing stays dense
        model.eval()
        prepared = swpfx.prepare(model, (x,)).eval()
    assert list(swpfx.skeletons(prepared)) == ["0", "1"]
    assert prepared.meta["swpfx"]["specialized_convs"] == {"1": (2, 4, 11, 10)}
    assert relative_error(prepared(x), model(x)) <= TOLERANCE
    swpfx.skeletons(prepared)["0"].fill_(1.0)
    randomize_skeletons_(prepared, generator)
    swpfx.skeletons(prepared)["0"].fill_(1.0)
    assert relative_error(prepared(x), reference(swpfx.skeletons(prepared)["1"])) <= TOLERANCE
    with pytest.raises(AssertionError, match="specialised to input size"):
        prepared(torch.randn(2, 4, 12, 10))  # never silently wrong at another size


def test_dynamic_same_padding_without_example_inputs_stays_dense_and_is_reported(generator):
    model = nn.Sequential(nn.Conv2d(4, 4, 1), Conv2dSame(4, 6, 3, stride=2)).eval()
    x = torch.randn(2, 4, 9, 9, generator=generator)
    with pytest.warns(UserWarning, match="stay dense.*not symbolically traceable.*example_inputs"):
        prepared = swpfx.prepare(model)
    assert list(swpfx.skeletons(prepared)) == ["0"]
    (skipped,) = swpfx.skipped_convs(prepared)
    assert skipped.node == "_1" and "example_inputs" in skipped.reason
    assert [n.op for n in prepared.graph.nodes if n.name == "_1"] == ["call_module"]  # its own forward runs
    with torch.no_grad():
        assert relative_error(prepared(x), model(x)) <= TOLERANCE


def test_custom_conv_marked_leaf_by_user_is_reported_not_rewritten(generator):
    model = nn.Sequential(StdConv2dBN(4, 6, 3)).eval()
    x = torch.randn(1, 4, 7, 7, generator=generator)
    with pytest.warns(UserWarning, match="own forward"):
        prepared = swpfx.prepare(model, config={"leaf_modules": [StdConv2dBN]})
    assert swpfx.skeletons(prepared) == {}
    assert "own forward" in swpfx.skipped_convs(prepared)[0].reason
    with torch.no_grad():
        assert relative_error(prepared(x), model(x)) <= TOLERANCE  # its standardisation was kept


# ---------------------------------------------------------------- functional convs


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(6, 2, 3, 3))
        self.bias = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.conv2d(x, self.kernel, self.bias, stride=2, padding=1, groups=2)


@torch.no_grad()
def test_functional_conv_with_parameter_weight(generator):
    model = FunctionalConv()
    x = torch.randn(2, 4, 9, 9, generator=generator)
    prepared = check_prepared_conv(
        model, x, lambda skel: F.conv2d(x, model.kernel * skel[:, None], model.bias, 2, 1, 1, 2), generator
    )
    assert list(swpfx.skeletons(prepared)) == ["kernel"]
    assert "kernel_skeleton" in prepared.code


class InputDependentConv(nn.Module):
    """A dynamic conv: the kernel is computed from the input (left dense)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4, 4 * 4 * 9)

    def forward(self, x):
        h = self.stem(x)
        kernel = self.proj(h.mean(dim=(0, 2, 3))).view(4, 4, 3, 3)
        return F.conv2d(h, kernel, padding=1)


@torch.no_grad()
def test_conv_with_input_dependent_weight_is_skipped_and_reported(generator):
    model = InputDependentConv().eval()
    x = torch.randn(2, 3, 8, 8, generator=generator)
    with pytest.warns(UserWarning, match=r"1 convolution\(s\) stay dense: conv2d: .*computed from the inputs"):
        prepared = swpfx.prepare(model, (x,))
    assert list(swpfx.skeletons(prepared)) == ["stem"]
    (skipped,) = swpfx.skipped_convs(prepared)
    assert skipped.node == "conv2d" and "computed from the inputs" in skipped.reason
    assert relative_error(prepared(x), model(x)) <= TOLERANCE


class OtherConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1d = nn.Conv1d(4, 4, 3, padding=1)
        self.deconv = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.t_kernel = nn.Parameter(torch.randn(4, 2, 3, 3))

    def forward(self, x):
        h = self.conv2d(x)
        n, c, hh, ww = h.shape
        h = self.conv1d(h.flatten(2)).view(n, c, hh, ww)
        h = self.deconv(h)
        return F.conv_transpose2d(h, self.t_kernel, padding=1)


@torch.no_grad()
def test_conv1d_and_transposed_convs_are_reported_not_touched(generator):
    model = OtherConvs().eval()
    x = torch.randn(1, 3, 6, 6, generator=generator)
    with pytest.warns(UserWarning, match=r"3 convolution\(s\) stay dense"):
        prepared = swpfx.prepare(model, (x,))
    assert list(swpfx.skeletons(prepared)) == ["conv2d"]
    reasons = {s.node: s.reason for s in swpfx.skipped_convs(prepared)}
    assert reasons == {
        "conv1d": "Conv1d is not a 2-D convolution",
        "deconv": "ConvTranspose2d is not a 2-D convolution",
        "conv_transpose2d": "conv_transpose2d is not a 2-D convolution",
    }
    assert {n.target for n in prepared.graph.nodes if n.op == "call_module"} == {"conv1d", "deconv"}
    assert relative_error(prepared(x), model(x)) <= TOLERANCE


# ---------------------------------------------------------------- config


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body = nn.Sequential(StdConv2dBN(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.body(torch.relu(self.bn(self.stem(x)))))


@pytest.mark.parametrize(
    "config, expected",
    [
        (None, ["stem", "body.0", "body.2", "head"]),
        ({"exclude": ["stem"]}, ["body.0", "body.2", "head"]),
        ({"exclude": ["stem", "head"]}, ["body.0", "body.2"]),
        ({"include": ["body.2"]}, ["body.2"]),
        ({"exclude": [StdConv2dBN]}, ["stem", "body.2", "head"]),
        ({"include": [StdConv2dBN]}, ["body.0"]),
        ({"include": [nn.Conv2d], "exclude": ["head"]}, ["stem", "body.0", "body.2"]),
        (swpfx.PrepareConfig(exclude=["body.0"]), ["stem", "body.2", "head"]),
    ],
)
@torch.no_grad()
def test_config_include_exclude(config, expected, generator):
    model = randomize_batchnorm_(TwoBlocks(), generator).eval()
    x = torch.randn(1, 3, 8, 8, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deselected convs are not a warning
        prepared = swpfx.prepare(model, (x,), config=config)
    assert list(swpfx.skeletons(prepared)) == expected
    skipped = swpfx.skipped_convs(prepared)
    assert len(skipped) == 4 - len(expected)
    assert all(s.reason.startswith(("excluded by config", "not selected by config")) for s in skipped)
    assert relative_error(prepared(x), model(x)) <= TOLERANCE


def test_config_unknown_name_is_an_error_naming_the_pass():
    with pytest.raises(ValueError, match=r"swpfx\.insert_skeletons: config names conv 'body.1'.*Did you mean"):
        swpfx.prepare(TwoBlocks(), config={"exclude": ["body.1"]})
    with pytest.raises(ValueError, match=r"swpfx\.insert_skeletons: config names conv 'nonexistent'"):
        swpfx.prepare(TwoBlocks(), config={"include": ["nonexistent"]})


def test_config_unknown_key_or_type_is_an_error():
    with pytest.raises(ValueError, match="unknown config keys.*'exlude'"):
        swpfx.prepare(TwoBlocks(), config={"exlude": ["stem"]})
    with pytest.raises(TypeError, match="config must be a dict or PrepareConfig"):
        swpfx.prepare(TwoBlocks(), config=["stem"])


def test_caller_model_untouched_by_subclass_and_functional_rewrites(generator):
    model = TwoBlocks()
    before = copy.deepcopy(model.state_dict())
    swpfx.prepare(model, (torch.randn(1, 3, 8, 8, generator=generator),))
    assert model.state_dict().keys() == before.keys()
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)  # exactly equal; names any changed key
    assert not any("skeleton" in n for n, _ in model.named_parameters())
    assert type(model.body[0]) is StdConv2dBN


# ---------------------------------------------------------------- timm (optional test dependency)


def check_against_injected_reference(model: nn.Module, x: torch.Tensor, generator) -> fx.GraphModule:
    """Prepare; no conv skipped; one skeleton per executed conv; exact at init and with random skeletons."""
    from helpers import SkeletonInjector

    model.eval()
    with Conv2dCounter() as counter:
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = swpfx.prepare(model, (x,)).eval()
    prepared.graph.lint()
    assert swpfx.skipped_convs(prepared) == []
    assert counter.calls == len(swpfx.skeletons(prepared))  # (standardised weights are fresh tensors per call)
    assert relative_error(prepared(x), expected) <= TOLERANCE
    skels = randomize_skeletons_(prepared, generator)
    with SkeletonInjector(skels.values()) as injector:
        reference = model(x)
    assert injector.pending == []
    assert relative_error(prepared(x), reference) <= TOLERANCE
    return prepared


@torch.no_grad()
def test_timm_conv_layers(generator):
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(
        timm_layers.StdConv2d(3, 8, 3, stride=2),
        timm_layers.Conv2dSame(8, 8, 3, stride=2),
        timm_layers.StdConv2dSame(8, 8, (3, 2), stride=2),
        timm_layers.ScaledStdConv2d(8, 8, 3),
        timm_layers.create_conv2d(8, 8, 5, stride=2, padding="same", depthwise=True),
    )
    x = torch.randn(2, 3, 29, 30, generator=generator)
    prepared = check_against_injected_reference(model, x, generator)
    assert set(prepared.meta["swpfx"]["specialized_convs"]) == {"1", "2", "4"}


@pytest.mark.parametrize(
    "name, size, conv_class",
    [("tf_mobilenetv3_small_minimal_100", 32, "Conv2dSame"), ("resnetv2_50x1_bit", 32, "StdConv2d")],
)
@torch.no_grad()
def test_timm_models(name, size, conv_class, generator):
    timm = pytest.importorskip("timm")
    model = randomize_batchnorm_(timm.create_model(name, pretrained=False, num_classes=10), generator)
    assert any(type(m).__name__ == conv_class for m in model.modules())
    x = torch.randn(1, 3, size, size, generator=generator)
    check_against_injected_reference(model, x, generator)

"""channel_rules: one registry for how ops relate channels and how they are sliced; users' rules."""

from __future__ import annotations

import doctest
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import swpfx
from helpers import masked_reference, randomize_batchnorm_, relative_error
from swpfx.convert import convert
from swpfx.passes import channel_rules, graph_utils
from swpfx.passes.analyze_channels import analyze_channels
from swpfx.passes.channel_rules import RULES, Channelwise, ChannelRule, Conv, Elementwise, rule_for
from swpfx.passes.graph_utils import new_conv
from swpfx.tracing import trace

THRESHOLD = 0.05


@pytest.mark.parametrize("module", [channel_rules, graph_utils], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    """channel_rules' module example registers a rule for a custom module; graph_utils has new_conv's."""
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_lookup_by_module_mro_function_and_method_name():
    class MyConv(nn.Conv2d):
        pass

    graph = fx.Graph()
    x = graph.placeholder("x")
    module_node = graph.call_module("c", (x,))
    assert isinstance(rule_for(module_node, MyConv(3, 4, 1)), Conv)  # a subclass finds its base's rule
    assert rule_for(module_node, nn.LayerNorm(4)) is None  # unknown: pins its channels
    assert isinstance(rule_for(graph.call_function(operator.add, (x, x)), None), Elementwise)
    assert isinstance(rule_for(graph.call_method("mul_", (x, x)), None), Elementwise)
    assert isinstance(rule_for(graph.call_function(F.relu, (x,)), None), Channelwise)
    assert rule_for(x, None) is None


class ChannelScale(nn.Module):
    """A learnable per-channel scale (a leaf module of the user's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x):
        return x * self.scale[:, None, None]


class ChannelScaleRule(Channelwise):
    def slice(self, module, kept):
        new = ChannelScale(len(kept.out))
        with torch.no_grad():
            new.scale.copy_(module.scale[kept.out])
        return new


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.scale = ChannelScale(8)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.scale(self.bn_a(self.a(x))))
        return self.fc(self.bn_b(self.b(x)).mean((2, 3)))


DEAD = [1, 4, 6]


def convert_scaled_net():
    model = randomize_batchnorm_(ScaledNet().eval(), torch.Generator().manual_seed(5))
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(6))
    prepared = swpfx.prepare(model, (x,), config={"leaf_modules": [ChannelScale]}).eval()
    with torch.no_grad():
        swpfx.skeletons(prepared)["a"][DEAD] = 0.0
    return prepared, convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)


def check_exact(prepared, deployed, tol=1e-5):
    reference = masked_reference(prepared, THRESHOLD)
    for seed, size in enumerate([(10, 10), (13, 9), (24, 24)]):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            err = relative_error(deployed(x), reference(x))
        assert err <= tol, f"relative error {err:.2e} at {size}"


def test_custom_leaf_module_pins_its_channels_without_a_rule():
    assert rule_for(fx.Graph().call_module("scale", ()), ChannelScale(2)) is None
    gm = trace(ScaledNet().eval(), leaf_modules=[ChannelScale])
    analysis = analyze_channels(gm, (torch.randn(1, 3, 8, 8),))
    a = next(n for n in analysis.producers if n.name == "a")
    assert set(analysis.classes_of(a).tolist()) <= analysis.blocked_classes()
    prepared, deployed = convert_scaled_net()
    assert deployed.get_submodule("a").out_channels == 8 and deployed.get_submodule("scale").scale.shape == (8,)
    check_exact(prepared, deployed)


def test_custom_leaf_module_with_a_rule_loses_its_channels_exactly(monkeypatch):
    monkeypatch.setitem(RULES, ChannelScale, ChannelScaleRule())
    prepared, deployed = convert_scaled_net()
    deployed.graph.lint()
    assert deployed.get_submodule("a").out_channels == 5
    assert deployed.get_submodule("bn_a").num_features == 5
    assert deployed.get_submodule("b").in_channels == 5
    kept = [c for c in range(8) if c not in DEAD]
    assert torch.equal(deployed.get_submodule("scale").scale, ScaledNet().scale.scale[kept])
    assert deployed.meta["swpfx"]["removed_filters"] == {"a": 3}
    check_exact(prepared, deployed)


def test_register_accepts_a_class_or_an_instance(monkeypatch):
    monkeypatch.setattr(channel_rules, "RULES", dict(RULES))  # leave the real registry untouched
    rule = ChannelRule()
    channel_rules.register("my_method")(rule)
    assert channel_rules.RULES["my_method"] is rule
    cls = channel_rules.register("other_method")(ChannelScaleRule)
    assert cls is ChannelScaleRule and isinstance(channel_rules.RULES["other_method"], ChannelScaleRule)


# ---------------------------------------------------------------- the one conv constructor


@pytest.mark.parametrize("groups", [1, 2])
def test_new_conv_holds_the_given_tensors_and_copies_geometry(groups):
    like = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=groups, padding_mode="reflect").eval()
    weight, bias = torch.randn(6, 4 // groups, 3, 3), torch.randn(6)
    conv = new_conv(weight, bias, like=like)
    assert torch.equal(conv.weight, weight) and torch.equal(conv.bias, bias)
    assert (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode, conv.training) == \
        ((2, 2), (1, 1), (2, 2), groups, "reflect", False)
    plain = new_conv(weight[:, :1], None, 1, 0, 1, 1)  # positional, as lower_stripe_convs calls it
    assert plain.bias is None and (plain.in_channels, plain.padding, plain.groups) == (1, (0, 0), 1)

"""swpfx.tracing: the tracer's leaf rules, the errors users get, and the specialisation fallback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import swpfx
from helpers import relative_error
from swpfx.tracing import SwpfxTracer, TracingError, conv_input_shapes, normalize_example_inputs, trace


class Gate(nn.Module):
    """Data-dependent control flow: untraceable by torch.fx."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(self.gate(self.conv1(x)))


def test_untraceable_submodule_raises_tracing_error_naming_it_and_the_fix():
    with pytest.raises(TracingError) as info:
        swpfx.prepare(GatedNet())
    message = str(info.value)
    assert "inside submodule 'gate'" in message
    assert "if x.sum() > 0" in message  # the user's source line
    assert "config={'leaf_modules': ['gate']}" in message
    assert isinstance(info.value, ValueError)


def test_untraceable_root_forward_suggests_wrapping():
    class Root(nn.Module):
        def forward(self, x):
            return x if x.mean() > 0 else -x

    with pytest.raises(TracingError, match="(?s)in the model's own forward.*leaf_modules"):
        trace(Root())


@pytest.mark.parametrize("leaf", ["gate", Gate])
@torch.no_grad()
def test_leaf_modules_make_an_untraceable_submodule_traceable(leaf, generator):
    model = GatedNet().eval()
    prepared = swpfx.prepare(model, config={"leaf_modules": [leaf]})
    prepared.graph.lint()
    assert list(swpfx.skeletons(prepared)) == ["conv1", "conv2"]
    assert [n.target for n in prepared.graph.nodes if n.op == "call_module"] == ["gate"]
    for sign in (1.0, -1.0):  # both branches of the gate
        x = sign * torch.rand(1, 3, 6, 6, generator=generator)
        model.conv1.bias.fill_(sign)
        prepared.get_parameter("conv1.bias").fill_(sign)
        assert relative_error(prepared(x), model(x)) <= 1e-6


def test_standard_convs_are_leaves_and_subclasses_with_forward_are_traced_through():
    class WS(nn.Conv2d):
        def forward(self, x):
            return F.conv2d(x, self.weight - self.weight.mean(), self.bias, self.stride, self.padding)

    class Plain(nn.Conv2d):  # subclass without its own forward: still a leaf
        pass

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Plain(3, 3, 1), WS(3, 3, 1))
    gm = trace(model)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert sum(n.target is torch.conv2d for n in gm.graph.nodes) == 1
    assert gm.meta["swpfx_trace"] == {"specialized_convs": {}, "leaf_convs": {}}


def test_trace_copies_by_default():
    model = nn.Sequential(nn.Conv2d(3, 3, 1))
    gm = trace(model)
    assert gm.get_submodule("0") is not model[0]
    assert trace(model, copy_model=False).get_submodule("0") is model[0]
    with pytest.raises(TypeError, match="expected an nn.Module"):
        trace(lambda x: x)


class DynamicSame(nn.Conv2d):
    def forward(self, x):
        ih = x.size()[-2]
        iw = x.shape[-1]
        kh, kw = self.weight.shape[-2:]
        ph = max((math.ceil(ih / self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((math.ceil(iw / self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        return F.conv2d(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), self.weight, self.bias, self.stride)


def test_failed_trace_through_is_rolled_back_cleanly():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), DynamicSame(4, 4, 3, stride=2), nn.ReLU())
    x = torch.randn(1, 3, 7, 7)
    for inputs, expect_leaf in ((None, True), ((x,), False)):
        gm = trace(model, example_inputs=inputs)
        gm.graph.lint()
        info = gm.meta["swpfx_trace"]
        assert ("1" in info["leaf_convs"]) is expect_leaf
        assert ("1" in info["specialized_convs"]) is not expect_leaf
        # no leftovers of the failed attempt: every node is used or is the output
        assert all(n.users or n.op == "output" or n.target is torch._assert for n in gm.graph.nodes)
        assert torch.equal(gm(x), model(x))


def test_conv_input_shapes_only_for_custom_convs_seen_with_one_shape():
    class TwoSizes(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = DynamicSame(3, 3, 3)
            self.b = DynamicSame(3, 3, 3)
            self.plain = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.a(x) + self.b(self.b(F.avg_pool2d(x, 2)).repeat(1, 1, 2, 2))

    model = TwoSizes().train()
    shapes = conv_input_shapes(model, (torch.randn(1, 3, 8, 8),))
    assert shapes == {"a": torch.Size([1, 3, 8, 8])}  # b is called at two sizes; plain has no own forward
    assert model.training and model.a.training  # modes restored
    assert conv_input_shapes(model, None) == {}


def test_normalize_example_inputs():
    x = torch.randn(1)
    assert normalize_example_inputs(x) == (x,)
    assert normalize_example_inputs([x, x]) == (x, x)
    assert normalize_example_inputs(None) is None
    with pytest.raises(TypeError, match="example_inputs must be a tensor or a tuple"):
        normalize_example_inputs("x")


def test_swpfx_tracer_is_an_fx_tracer():
    tracer = SwpfxTracer(leaf_modules=["gate"])
    graph = tracer.trace(GatedNet())
    assert isinstance(graph, fx.Graph)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["conv1", "gate", "conv2"]

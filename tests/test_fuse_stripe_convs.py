"""Tests for passes/fuse_stripe_convs.py and swpfx/kernels/fused_conv.py: ``convert(lowering="fused")``.

Every fused graph is checked against the model it came from on seeded inputs with random BatchNorm
statistics and random stripe masks. Tests that run the compiled kernel are skipped, with the reason,
only when it cannot be built here (no C++ compiler); the fallback (standard ops) is tested everywhere.
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

import swpfx
from swpfx.kernels import fused_conv, stripe_conv
from swpfx.kernels.fused_conv import FusedStripeConv2d
from swpfx.kernels.max_pool import CompiledMaxPool2d
from swpfx.masks import random_stripe_mask, structured_stripe_mask
from swpfx.passes.fuse_stripe_convs import fuse_stripe_convs
from swpfx.passes.lower_stripe_convs import mark_stripe_conv
from swpfx.pipeline import make_fused_conv
from swpfx.synthetic import synthetic_skeletons_

from helpers import RUNTIME_MODEL, randomize_batchnorm_, relative_error

needs_kernel = pytest.mark.skipif(not stripe_conv.is_available(),
                                  reason=f"fused stripe kernel unavailable: {stripe_conv.unavailable_reason()}")
REL_TOL = 1e-4


class Block(nn.Module):
    """conv -> BN -> (+ identity) -> ReLU, the pattern the pass absorbs whole."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


def block_graph(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gm = fx.symbolic_trace(randomize_batchnorm_(Block(), g).eval())
    mask = random_stripe_mask(16, 3, 3, dead=0.0, generator=g)
    x = torch.randn(2, 16, 12, 12, generator=g)
    mark_stripe_conv(gm, "conv", mask, example_input=x)
    return gm, mask, x


@needs_kernel
def test_pass_absorbs_batchnorm_residual_add_and_relu_exactly():
    gm, mask, x = block_graph()
    expected = gm(x)
    result = fuse_stripe_convs(gm, make_fused_conv)
    assert result.modified and list(result.fused) == ["conv"] and len(result.fused["conv"]) == 3
    ops = [(n.op, n.target) for n in gm.graph.nodes]
    assert ops == [("placeholder", "x"), ("call_module", "conv"), ("output", "output")]
    fused_node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert len(fused_node.args) == 2 and fused_node.meta["swpfx"]["lowering"] == "fused"
    module = gm.get_submodule("conv")
    assert isinstance(module, FusedStripeConv2d) and module.relu and module.residual
    assert torch.equal(module.mask, mask) and not hasattr(gm, "bn")
    gm.graph.lint()
    with torch.no_grad():
        assert relative_error(gm(x), expected) <= REL_TOL


@needs_kernel
def test_pass_fuses_dense_convs_only_when_asked():
    g = torch.Generator().manual_seed(3)
    gm = fx.symbolic_trace(randomize_batchnorm_(Block(), g).eval())
    x = torch.randn(2, 16, 12, 12, generator=g)
    mark_stripe_conv(gm, "conv", torch.ones(16, 3, 3, dtype=torch.bool), example_input=x)
    expected = gm(x)
    assert not fuse_stripe_convs(gm, make_fused_conv).modified  # a conv keeping every stripe is left alone
    result = fuse_stripe_convs(gm, make_fused_conv, include_dense=True)
    module = gm.get_submodule("conv")
    assert result.fused == {"conv": ["bn", "add", "relu"]} and isinstance(module, FusedStripeConv2d)
    assert bool(module.mask.all())
    gm.graph.lint()
    with torch.no_grad():
        assert relative_error(gm(x), expected) <= REL_TOL


def test_pass_leaves_convs_the_factory_refuses():
    gm, mask, x = block_graph()
    expected = gm(x)
    result = fuse_stripe_convs(gm, lambda *a, **k: None)
    assert not result.modified and result.refused == ["conv"]
    assert isinstance(gm.get_submodule("conv"), nn.Conv2d) and torch.equal(gm(x), expected)


def test_residual_is_placed_after_its_producer():
    class Downsampled(nn.Module):  # the residual's producer is traced after the conv, as in torchvision's ResNet
        def __init__(self):
            super().__init__()
            self.conv, self.down = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 1)

        def forward(self, x):
            y = self.conv(x)
            return torch.add(y, self.down(x))

    g = torch.Generator().manual_seed(1)
    gm = fx.symbolic_trace(Downsampled().eval())
    x = torch.randn(1, 8, 9, 9, generator=g)
    mark_stripe_conv(gm, "conv", structured_stripe_mask(16, 3, 3, dead=0.0, generator=g), example_input=x)
    expected = gm(x)
    fuse_stripe_convs(gm, make_fused_conv)
    gm.graph.lint()
    order = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert order == ["down", "conv"]
    with torch.no_grad():
        assert relative_error(gm(x), expected) <= REL_TOL


@needs_kernel
@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    ((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((3, 3), 1, 0, 1), ((3, 3), 1, 2, 2), ((1, 3), 1, (0, 1), 1),
    ((5, 5), 2, 2, 1), ((3, 3), (2, 1), (1, 2), (1, 2)),
])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, True)])
def test_module_equals_the_masked_conv(kernel, stride, padding, dilation, relu, residual):
    g = torch.Generator().manual_seed(hash((kernel, stride, str(padding), str(dilation))) % 1000)
    conv = nn.Conv2d(12, 20, kernel, stride=stride, padding=padding, dilation=dilation)
    mask = random_stripe_mask(20, *kernel, generator=g)
    scale, shift = torch.rand(20, generator=g) + 0.5, torch.randn(20, generator=g)
    fused = FusedStripeConv2d.from_conv(conv, mask, relu=relu, residual=residual, scale=scale, shift=shift)
    x = torch.randn(2, 12, 15, 13, generator=g)
    with torch.no_grad():
        y = F.conv2d(x, conv.weight * mask[:, None], conv.bias, conv.stride, conv.padding, conv.dilation)
        y = y * scale[:, None, None] + shift[:, None, None]
        r = torch.randn(y.shape, generator=g) if residual else None
        expected = y + r if residual else y
        expected = torch.relu(expected) if relu else expected
        assert fused_conv.kernel_applies(x)
        got = fused(x, r) if residual else fused(x)
    assert relative_error(got, expected) <= REL_TOL


def test_module_refuses_what_the_kernel_does_not_do():
    mask = torch.ones(8, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="groups=2"):
        FusedStripeConv2d.from_conv(nn.Conv2d(8, 8, 3, groups=2), mask)
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        FusedStripeConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), mask)
    fused = FusedStripeConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), mask, residual=True)
    with pytest.raises(ValueError, match="residual=True, called without"):
        fused(torch.randn(1, 8, 5, 5))


@needs_kernel
def test_kernel_call_checks_the_residual_and_casts_the_bias():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    mask = random_stripe_mask(8, 3, 3, dead=0.0, generator=torch.Generator().manual_seed(6))
    fused = FusedStripeConv2d.from_conv(conv, mask, residual=True)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad(), pytest.raises(ValueError, match="residual must be float32 on the CPU of shape \\(1, 8, 5, 5\\)"):
        fused(x, torch.randn(1, 8, 5, 4))  # a wrong residual never reaches the kernel's raw pointers
    args = (fused.weight, fused.mask, fused.bias, None, [1, 1], [1, 1], [1, 1], False, 1)
    with pytest.raises(ValueError, match="takes float32 CPU input, got torch.float64"):
        torch.ops.swpfx.stripe_conv2d(x.double(), *args)  # the registered op, called directly
    fused.bias = nn.Parameter(fused.bias.double(), requires_grad=False)  # cast, not read as float32 bytes
    residual = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight * mask[:, None], conv.bias, padding=1) + residual
        assert relative_error(fused(x, residual), expected) <= REL_TOL


@needs_kernel
def test_packing_is_kept_until_the_weight_changes(monkeypatch):
    calls = []
    pack = stripe_conv.pack_weights
    monkeypatch.setattr(stripe_conv, "pack_weights", lambda *a, **k: calls.append(1) or pack(*a, **k))
    g = torch.Generator().manual_seed(2)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    fused = FusedStripeConv2d.from_conv(conv, random_stripe_mask(16, 3, 3, generator=g))
    x = torch.randn(1, 8, 10, 10, generator=g)
    with torch.no_grad():
        first = fused(x)
        assert torch.equal(fused(x), first) and len(calls) == 1
        fused.weight.mul_(2.0)  # in place: the packing must follow
        doubled = fused(x)
    assert len(calls) == 2
    assert relative_error(doubled - fused.bias[:, None, None], 2 * (first - fused.bias[:, None, None])) <= REL_TOL


@needs_kernel
def test_module_call_follows_every_change_to_what_it_was_resolved_from():
    """The module resolves its kernel call once (weights packed, bias cast) and keeps it: every change to the
    input shape, threads, weight, mask or bias -- in place, by storage swap or by a new tensor -- must show."""
    g = torch.Generator().manual_seed(12)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    fused = FusedStripeConv2d.from_conv(conv, random_stripe_mask(10, 3, 3, generator=g), relu=True)

    def check(x):
        expected = torch.relu(F.conv2d(x, fused.weight * fused.mask[:, None], fused.bias, padding=1))
        assert relative_error(fused(x), expected) <= REL_TOL

    x = torch.randn(2, 6, 9, 11, generator=g)
    with torch.no_grad():
        check(x)
        check(torch.randn(1, 6, 7, 5, generator=g))  # another input shape
        fused.threads = 1
        check(x)
        fused.weight.copy_(torch.randn(fused.weight.shape, generator=g))  # in place; pruned stripes now nonzero
        check(x)
        fused.mask[0].logical_not_()  # in place: the mask alone decides which stripes count
        check(x)
        fused.bias.add_(1.0)
        check(x)
        fused.weight.data = torch.randn(fused.weight.shape, generator=g)  # same tensor, new storage
        check(x)
        fused.mask = torch.ones_like(fused.mask)  # a new buffer
        check(x)
        twin = copy.deepcopy(fused)
        twin.bias.zero_()  # the copy resolves its own call; the original keeps its bias
        check(x)
        assert relative_error(twin(x), torch.relu(F.conv2d(x, twin.weight * twin.mask[:, None], None, padding=1))) \
            <= REL_TOL


def test_traced_module_records_standard_ops():
    """Under ``torch.jit`` tracing (the TorchScript ONNX exporter) the module runs plain ops, so they are recorded."""
    conv = nn.Conv2d(4, 8, 3, padding=1)
    fused = FusedStripeConv2d.from_conv(conv, random_stripe_mask(8, 3, 3, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        traced = torch.jit.trace(fused, (x,))
        assert "aten::_convolution" in str(traced.inlined_graph)
        assert relative_error(traced(x), fused(x)) <= REL_TOL


def test_autograd_and_missing_kernel_use_standard_ops(monkeypatch):
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    mask = random_stripe_mask(16, 3, 3, generator=g)
    fused = FusedStripeConv2d.from_conv(conv, mask, relu=True)
    x = torch.randn(1, 8, 10, 10, generator=g, requires_grad=True)
    assert not fused_conv.kernel_applies(x)
    fused(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    monkeypatch.setattr(stripe_conv, "is_available", lambda pool="own": False)
    with torch.no_grad():
        expected = torch.relu(F.conv2d(x, conv.weight * mask[:, None], conv.bias, padding=1))
        assert not fused_conv.kernel_applies(x.detach())
        assert relative_error(fused(x.detach()), expected) <= REL_TOL


def resnet18_prepared(seed: int = 0, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), g)
    x = torch.randn(1, 3, size, size, generator=g)
    prepared = swpfx.prepare(model, (x,))
    with torch.no_grad():
        for name, s in swpfx.skeletons(prepared).items():
            if s.shape[1:] == (3, 3):
                s.mul_(random_stripe_mask(s.shape[0], 3, 3, generator=g).to(s.dtype))
    return prepared, x


@needs_kernel
def test_convert_fused_is_exact_on_resnet18_and_fuses_every_conv():
    prepared, x = resnet18_prepared()
    reference = swpfx.convert(prepared, threshold=0.0, lowering="never")
    deployed = swpfx.convert(prepared, threshold=0.0, lowering="fused", runtime_model=RUNTIME_MODEL)
    fused = [m for m in deployed.modules() if isinstance(m, FusedStripeConv2d)]
    # the 16 stripe-pruned 3×3 convs, and densely the 7×7 stem (it keeps all stripes here) and 3 downsample 1×1s
    assert len(fused) == 20 and sum(bool(m.mask.all()) for m in fused) == 4
    # every block's conv1 takes its BN + ReLU; a conv2 takes BN + add + ReLU, or, where remove_channels added
    # a dead-channel constant map (conv + ones-map conv), that sum as its residual (either conv may take the other)
    assert sum(m.residual for m in fused) >= 8 and sum(m.relu for m in fused) >= 9
    modules = dict(deployed.named_modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in modules.values())  # each folded into its conv
    assert isinstance(deployed.get_submodule("maxpool"), CompiledMaxPool2d)
    deployed.graph.lint()
    xb = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert relative_error(deployed(xb), reference(xb)) <= REL_TOL


@needs_kernel
@pytest.mark.parametrize("name", ["mobilenet_v2", "googlenet", "squeezenet1_0"])
def test_convert_fused_is_exact_on_1x1_grouped_and_concat_networks(name):
    """Dense 1×1 convs fused with their BN, depthwise convs left to the standard forms, concats of fused outputs."""
    g = torch.Generator().manual_seed(7)
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = randomize_batchnorm_(getattr(torchvision.models, name)(num_classes=10, **extra), g)
    x = torch.randn(2, 3, 64, 64, generator=g)
    prepared = swpfx.prepare(model, (x[:1],))
    synthetic_skeletons_(prepared, protocol="random", threshold=0.05, seed=3)
    reference = swpfx.convert(prepared, threshold=0.05, lowering="never")
    deployed = swpfx.convert(prepared, threshold=0.05, lowering="fused", runtime_model=RUNTIME_MODEL)
    fused = [m for m in deployed.modules() if isinstance(m, FusedStripeConv2d)]
    grouped = [m for m in deployed.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert fused and not any(m.kernel_size == (1, 1) for m in deployed.modules() if isinstance(m, nn.Conv2d)
                             and m.groups == 1 and m.in_channels > 1)  # every ungrouped 1×1 is fused
    assert (name == "mobilenet_v2") == bool(grouped)
    deployed.graph.lint()
    with torch.no_grad():
        assert relative_error(deployed(x), reference(x)) <= REL_TOL


@needs_kernel
def test_convert_fused_lowers_grouped_convs_with_the_standard_forms():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.bn = nn.BatchNorm2d(16)

        def forward(self, x):
            return self.bn(self.b(torch.relu(self.a(x)))).mean((2, 3))

    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 16, 16, generator=g)
    prepared = swpfx.prepare(randomize_batchnorm_(Grouped(), g), (x,))
    with torch.no_grad():
        for s in swpfx.skeletons(prepared).values():
            s.mul_(random_stripe_mask(s.shape[0], 3, 3, generator=g, dead=0.0).to(s.dtype))
    reference = swpfx.convert(prepared, threshold=0.0, lowering="never", channel_multiple=1)
    deployed = swpfx.convert(prepared, threshold=0.0, lowering="fused", channel_multiple=1, runtime_model=RUNTIME_MODEL)
    assert isinstance(deployed.get_submodule("a"), FusedStripeConv2d)
    assert not isinstance(getattr(deployed, "b", None), FusedStripeConv2d)
    with torch.no_grad():
        assert relative_error(deployed(x), reference(x)) <= REL_TOL


@needs_kernel
def test_fused_model_exports_to_verified_onnx_and_saves(tmp_path):
    prepared, x = resnet18_prepared(seed=5, size=32)
    deployed = swpfx.convert(prepared, threshold=0.0, lowering="fused", runtime_model=RUNTIME_MODEL)
    swpfx.export_onnx(deployed, (x,), tmp_path / "fused.onnx")  # verified against the model in ORT
    path = swpfx.save(deployed, tmp_path / "fused.swpfx")
    loaded = swpfx.load(path)
    assert sum(isinstance(m, FusedStripeConv2d) for m in loaded.modules()) == 20
    assert isinstance(loaded.get_submodule("maxpool"), CompiledMaxPool2d)
    with torch.no_grad():
        assert torch.equal(loaded(x), deployed(x))


@needs_kernel
def test_cost_counts_only_the_kept_stripes():
    gm, mask, x = block_graph()
    expected = swpfx.cost(gm, (x,))
    fuse_stripe_convs(gm, make_fused_conv)
    report = swpfx.cost(gm, (x,))
    row = next(r for r in report.rows if r.op == "FusedStripeConv2d")
    assert row.macs == row.effective_macs == 2 * 12 * 12 * 16 * int(mask.sum())
    assert row.params == 16 * 16 * 9 + 16  # weight and (folded BatchNorm) bias are the model's parameters
    assert report.params == expected.params - 16  # the BatchNorm's weight and bias (2 x 16) became one bias
    assert report.effective_macs == expected.effective_macs


def test_convert_fused_refuses_a_missing_kernel(monkeypatch):
    prepared, _ = resnet18_prepared(size=32)
    monkeypatch.setattr(stripe_conv, "is_available", lambda pool="own": False)
    monkeypatch.setattr(stripe_conv, "unavailable_reason", lambda pool="own": "no C++ compiler found")
    with pytest.raises(RuntimeError, match="unavailable here \\(no C\\+\\+ compiler found\\)"):
        swpfx.convert(prepared, threshold=0.0, lowering="fused")


def test_add_functions_cover_traced_residuals():
    traced = fx.symbolic_trace(Block())
    assert any(n.target is operator.add for n in traced.graph.nodes)


@needs_kernel
def test_registered_operator_matches_the_module_and_passes_opcheck():
    g = torch.Generator().manual_seed(6)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    fused = FusedStripeConv2d.from_conv(conv, random_stripe_mask(16, 3, 3, generator=g), relu=True, residual=True)
    x, r = torch.randn(2, 8, 11, 11, generator=g), torch.randn(2, 16, 6, 6, generator=g)
    args = (x, fused.weight, fused.mask, fused.bias, r, [2, 2], [1, 1], [1, 1], True, 2)
    with torch.no_grad():
        assert torch.equal(torch.ops.swpfx.stripe_conv2d(*args), fused(x, r))
    torch.library.opcheck(torch.ops.swpfx.stripe_conv2d.default, args,
                          test_utils=("test_schema", "test_faketensor"))

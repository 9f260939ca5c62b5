"""Tests for passes/replace_max_pools.py and swpfx/kernels/max_pool.py (``CompiledMaxPool2d``).

A max is exact, so the compiled pool must equal ``nn.MaxPool2d`` bit for bit on every geometry it takes
(kernel, stride, padding, ceil mode, odd sizes, batches), and fall back to it for what it does not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from swpfx.kernels import max_pool, stripe_conv
from swpfx.kernels.max_pool import CompiledMaxPool2d
from swpfx.passes.replace_max_pools import replace_max_pools
from swpfx.pipeline import make_compiled_max_pool

needs_kernel = pytest.mark.skipif(not stripe_conv.is_available(), reason=f"no stripe kernel: {stripe_conv.unavailable_reason()}")


class TwoPools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(3, 2, 1)
        self.shared = nn.MaxPool2d(2)

    def forward(self, x):
        y = self.pool(torch.relu(self.conv(x)))
        return self.shared(y) + self.shared(-y)  # one pool module called from two nodes


@needs_kernel
@pytest.mark.parametrize("kernel, stride, padding, ceil_mode", [
    (3, 2, 1, False), (3, 2, 1, True), (2, None, 0, False), (2, 2, 0, True), (3, 1, 1, False), (5, 3, 2, True),
    ((3, 2), (2, 1), (1, 0), False),
])
def test_compiled_pool_equals_max_pool2d_bit_for_bit(kernel, stride, padding, ceil_mode):
    reference = nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)
    pool = CompiledMaxPool2d.from_pool(reference)
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 64, 112, 112), (3, 5, 17, 14), (2, 16, 9, 31), (1, 2, 3, 3)]:
        x = torch.randn(*shape, generator=g)
        x.view(-1)[torch.randint(x.numel(), (3,), generator=g)] = float("nan")  # NaN propagates, as in PyTorch
        assert max_pool.kernel_applies(pool, x)
        with torch.no_grad():
            got, expected = pool(x), reference(x)
        assert got.shape == expected.shape and torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(0.5), expected.nan_to_num(0.5))


def test_compiled_pool_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    x = torch.randn(2, 4, 10, 10, generator=torch.Generator().manual_seed(1))
    dilated = CompiledMaxPool2d(3, 1, 1, dilation=2)
    assert not max_pool.kernel_applies(dilated, x)
    assert torch.equal(dilated(x), F.max_pool2d(x, 3, 1, 1, dilation=2))
    indexed = CompiledMaxPool2d(2, return_indices=True)
    values, indices = indexed(x)
    assert torch.equal(indices, F.max_pool2d(x, 2, return_indices=True)[1])
    pool = CompiledMaxPool2d(2)
    assert not max_pool.kernel_applies(pool, x.double()) and not max_pool.kernel_applies(pool, x[0])
    leaf = x.clone().requires_grad_()
    assert not max_pool.kernel_applies(pool, leaf)
    pool(leaf).sum().backward()  # autograd runs through nn.MaxPool2d
    assert leaf.grad is not None and leaf.grad.sum() == leaf.numel() / 4
    monkeypatch.setattr(stripe_conv, "is_available", lambda pool="own": False)
    assert not max_pool.kernel_applies(pool, x) and torch.equal(pool(x), F.max_pool2d(x, 2))


def test_compiled_pool_exports_as_a_plain_max_pool(tmp_path):
    import swpfx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), CompiledMaxPool2d(2)).eval()
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    path = swpfx.export_onnx(model, (x,), tmp_path / "pool.onnx").path  # verified against the model in ORT
    import onnx

    assert "MaxPool" in {n.op_type for n in onnx.load(path).graph.node}


def test_pass_gives_every_max_pool_call_its_own_new_module():
    g = torch.Generator().manual_seed(3)
    gm = fx.symbolic_trace(TwoPools().eval())
    x = torch.randn(2, 3, 16, 16, generator=g)
    expected = gm(x)
    before = {name: id(m) for name, m in gm.named_modules()}
    result = replace_max_pools(gm, make_compiled_max_pool)
    assert result.modified and result.replaced == ["pool", "shared", "shared_1"] and not result.refused
    pools = [(n.target, gm.get_submodule(n.target)) for n in gm.graph.nodes
             if n.op == "call_module" and "pool" in type(gm.get_submodule(n.target)).__name__.lower()]
    # the shared module's first caller gets a new name; its last, then the only caller, keeps the old one
    assert [t for t, _ in pools] == ["pool", "shared_replaced", "shared"]
    assert all(type(m) is CompiledMaxPool2d for _, m in pools) and len({id(m) for _, m in pools}) == 3
    assert pools[1][1].extra_repr() == pools[2][1].extra_repr() == nn.MaxPool2d(2).extra_repr()
    assert id(gm.conv) == before["conv"]  # other modules untouched
    gm.graph.lint()
    with torch.no_grad():
        assert torch.equal(gm(x), expected)


def test_pass_leaves_refused_pools_and_checks_the_factory():
    gm = fx.symbolic_trace(TwoPools().eval())
    result = replace_max_pools(gm, lambda pool: None if pool.kernel_size == 2 else CompiledMaxPool2d.from_pool(pool))
    assert result.replaced == ["pool"] and result.refused == ["shared", "shared_1"]
    assert type(gm.shared) is nn.MaxPool2d
    with pytest.raises(TypeError, match="swpfx.replace_max_pools: make_pool returned int.*at node"):
        replace_max_pools(fx.symbolic_trace(TwoPools().eval()), lambda pool: 3)

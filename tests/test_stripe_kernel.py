"""Tests for swpfx/kernels/stripe_conv.py: the fused stripe kernel equals F.conv2d on the masked weight.

No timing here (benchmarks/stripe_kernel.py does that). Skipped, with the reason, only when the kernel
cannot be built on this machine (no C++ compiler).
"""

from __future__ import annotations

import doctest
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swpfx.kernels import stripe_conv
from swpfx.masks import random_stripe_mask, structured_stripe_mask

pytestmark = pytest.mark.skipif(not stripe_conv.is_available(),
                                reason=f"fused stripe kernel unavailable: {stripe_conv.unavailable_reason()}")

REL_TOL = 1e-4


def relative_error(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def make_mask(kind: str, o: int, kh: int, kw: int, g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return random_stripe_mask(o, kh, kw, keep=0.4, dead=0.2, generator=g)
    if kind == "structured":
        return structured_stripe_mask(o, kh, kw, dead=0.2, generator=g)
    if kind == "single_tap":  # every filter keeps exactly one tap, anywhere (often not the centre)
        mask = torch.zeros(o, kh * kw, dtype=torch.bool)
        mask[torch.arange(o), torch.randint(0, kh * kw, (o,), generator=g)] = True
        return mask.reshape(o, kh, kw)
    if kind == "all_dead":
        return torch.zeros(o, kh, kw, dtype=torch.bool)
    if kind == "full":
        return torch.ones(o, kh, kw, dtype=torch.bool)
    if kind == "mixed":  # dead filters, single taps, full filters and random ones side by side
        mask = random_stripe_mask(o, kh, kw, keep=0.3, dead=0.0, generator=g)
        mask[0::4] = False
        mask[1::4] = False
        mask[1::4, 0, kw - 1] = True
        mask[2::4] = True
        return mask
    raise ValueError(kind)


def reference(x, weight, mask, bias, stride, padding, residual=None, relu=False):
    y = F.conv2d(x, weight * mask[:, None], bias, stride=stride, padding=padding)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


CASES = [
    # (C, O, H, W, K, stride, mask)
    (8, 16, 10, 10, 3, 1, "random"),
    (8, 16, 10, 10, 3, 2, "random"),
    (7, 13, 13, 9, 3, 1, "mixed"),
    (7, 13, 13, 9, 3, 2, "mixed"),
    (5, 6, 11, 11, 3, 2, "single_tap"),
    (16, 24, 9, 7, 3, 1, "single_tap"),
    (6, 5, 8, 8, 3, 1, "all_dead"),
    (6, 5, 9, 8, 3, 2, "full"),
    (64, 64, 14, 14, 3, 1, "structured"),
    (32, 48, 15, 15, 3, 2, "structured"),
    (3, 8, 12, 12, 5, 1, "random"),
    (4, 9, 13, 11, 5, 2, "mixed"),
    (3, 6, 10, 10, 7, 2, "random"),
    (130, 20, 7, 7, 3, 1, "random"),  # channels not a multiple of the chunk
    (9, 40, 1, 1, 3, 1, "random"),  # a 1x1 map: only the centre tap sees data
    (2, 3, 2, 17, 3, 2, "mixed"),
    (3, 4, 1, 1, 3, 2, "full"),
    (3, 4, 2, 3, 3, 3, "random"),
]


@pytest.mark.parametrize("c, o, h, w, k, stride, kind", CASES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_masked_conv2d(c, o, h, w, k, stride, kind, with_bias, generator):
    weight = torch.randn(o, c, k, k, generator=generator)
    mask = make_mask(kind, o, k, k, generator)
    bias = torch.randn(o, generator=generator) if with_bias else None
    x = torch.randn(1, c, h, w, generator=generator)
    y = stripe_conv_result = stripe_conv.stripe_conv2d(x, stripe_conv.pack_weights(weight, mask), bias, stride=stride)
    expected = reference(x, weight, mask, bias, stride, k // 2)
    assert isinstance(stripe_conv_result, torch.Tensor)
    assert y.shape == expected.shape
    if kind == "all_dead":
        assert torch.equal(y, torch.zeros_like(y) if bias is None else bias[None, :, None, None].expand_as(y))
    else:
        assert relative_error(y, expected) <= REL_TOL


@pytest.mark.parametrize("block, pv, groups, chunk, tiles", [
    (1, 1, 1, 1, 1), (3, 2, 2, 7, 3), (6, 4, 3, 64, 1), (None, None, 5, 16, 2), (None, 3, 64, None, 8),
])
def test_tuning_knobs_do_not_change_the_result(block, pv, groups, chunk, tiles, generator):
    info = stripe_conv.kernel_info()
    if block is not None and block > info["max_f"] or pv is not None and pv > info["max_pv"]:
        pytest.skip("knob outside this build's range")
    weight = torch.randn(40, 24, 3, 3, generator=generator)
    mask = make_mask("random", 40, 3, 3, generator)
    x = torch.randn(1, 24, 19, 17, generator=generator)
    bias = torch.randn(40, generator=generator)
    packed = stripe_conv.pack_weights(weight, mask, block=block)
    for stride in (1, 2):
        y = stripe_conv.stripe_conv2d(x, packed, bias, stride=stride, pv=pv, groups=groups, channel_chunk=chunk,
                                      tiles_per_item=tiles)
        assert relative_error(y, reference(x, weight, mask, bias, stride, 1)) <= REL_TOL


def test_threads_batch_residual_relu_and_numpy(generator):
    weight = torch.randn(32, 16, 3, 3, generator=generator)
    mask = make_mask("mixed", 32, 3, 3, generator)
    bias = torch.randn(32, generator=generator)
    x = torch.randn(3, 16, 12, 12, generator=generator)
    residual = torch.randn(3, 32, 12, 12, generator=generator)
    packed = stripe_conv.pack_weights(weight, mask)
    expected = reference(x, weight, mask, bias, 1, 1, residual=residual, relu=True)
    results = [stripe_conv.stripe_conv2d(x, packed, bias, residual=residual, relu=True, threads=t) for t in (1, 2, 3)]
    for y in results:
        assert relative_error(y, expected) <= REL_TOL
        assert torch.equal(y, results[0])  # the summation order does not depend on the thread count
    y_np = stripe_conv.stripe_conv2d(x.numpy(), packed, bias.numpy(), residual=residual.numpy(), relu=True)
    assert isinstance(y_np, np.ndarray) and np.array_equal(y_np, results[0].numpy())
    out = np.empty((3, 32, 12, 12), np.float32)
    assert stripe_conv.stripe_conv2d(x.numpy(), packed, bias.numpy(), out=out, residual=residual.numpy(),
                                     relu=True) is out
    y3 = stripe_conv.stripe_conv2d(x[0], packed, bias, residual=residual[0], relu=True)  # (C, H, W) input
    assert y3.shape == (32, 12, 12) and torch.equal(y3, results[0][0])


@pytest.mark.parametrize("padding", [0, 2, (0, 1), (2, 0)])
@pytest.mark.parametrize("stride", [1, 2, (1, 2), 3])
@pytest.mark.parametrize("size", [(11, 10), (3, 4)])
def test_other_paddings_and_strides(padding, stride, size, generator):
    weight = torch.randn(10, 6, 3, 3, generator=generator)
    mask = make_mask("random", 10, 3, 3, generator)
    x = torch.randn(1, 6, *size, generator=generator)
    y = stripe_conv.stripe_conv2d(x, stripe_conv.pack_weights(weight, mask), stride=stride, padding=padding)
    assert relative_error(y, reference(x, weight, mask, None, stride, padding)) <= REL_TOL


def test_rectangular_kernel(generator):
    weight = torch.randn(12, 5, 3, 5, generator=generator)
    mask = make_mask("mixed", 12, 3, 5, generator)
    x = torch.randn(1, 5, 9, 12, generator=generator)
    for stride in (1, 2):
        y = stripe_conv.stripe_conv2d(x, stripe_conv.pack_weights(weight, mask), stride=stride)
        assert relative_error(y, reference(x, weight, mask, None, stride, (1, 2))) <= REL_TOL


def test_packing_counts(generator):
    mask = make_mask("mixed", 16, 3, 3, generator)
    packed = stripe_conv.pack_weights(torch.randn(16, 4, 3, 3, generator=generator), mask)
    assert packed.kept_stripes == int(mask.sum())
    assert packed.flop_ratio == pytest.approx(mask.numel() / int(mask.sum()))
    t = packed.tables(2)
    assert t["wpack"].size == 4 * int(mask.sum())  # pruned stripes are neither stored nor multiplied
    assert int(t["blk_nf"][: t["grp_blk"][-1]].sum()) == int(mask.sum())


def test_bad_arguments_are_refused(generator):
    packed = stripe_conv.pack_weights(torch.randn(4, 3, 3, 3), torch.ones(4, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="channels"):
        stripe_conv.stripe_conv2d(torch.randn(1, 5, 8, 8), packed)
    with pytest.raises(ValueError, match="mask"):
        stripe_conv.pack_weights(torch.randn(4, 3, 3, 3), torch.ones(4, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bias"):
        stripe_conv.stripe_conv2d(torch.randn(1, 3, 8, 8), packed, bias=torch.zeros(5))
    with pytest.raises(ValueError, match="too small"):
        stripe_conv.stripe_conv2d(torch.randn(1, 3, 1, 1), packed, padding=0)


def test_docstring_examples():
    result = doctest.testmod(stripe_conv, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("env, reason", [({"SWPFX_NO_KERNELS": "1"}, "SWPFX_NO_KERNELS"),
                                         ({"CXX": "/nonexistent/g++"}, "no C++ compiler")])
def test_unavailable_kernel_reports_a_reason(env, reason, tmp_path):
    code = ("from swpfx.kernels import stripe_conv as s; "
            "assert not s.is_available(); print(s.unavailable_reason())")
    env = dict(os.environ, SWPFX_KERNEL_CACHE=str(tmp_path), **env)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert reason in proc.stdout

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


@pytest.mark.parametrize("block, pv, groups, chunk, bands", [
    (1, 1, 1, 1, 1), (3, 2, 2, 7, 3), (6, 4, 3, 64, 1), (None, None, 5, 16, 2), (None, 3, 64, None, 8),
    (None, None, 2, None, 19),  # one band per output row
])
@pytest.mark.parametrize("threads", [1, 2])
def test_tuning_knobs_do_not_change_the_result(block, pv, groups, chunk, bands, threads, generator):
    info = stripe_conv.kernel_info()
    if block is not None and block > info["max_f"] or pv is not None and pv > info["max_pv"]:
        pytest.skip("knob outside this build's range")
    weight = torch.randn(40, 24, 3, 3, generator=generator)
    mask = make_mask("random", 40, 3, 3, generator)
    x = torch.randn(1, 24, 19, 17, generator=generator)
    bias = torch.randn(40, generator=generator)
    packed = stripe_conv.pack_weights(weight, mask, block=block)
    default = stripe_conv.stripe_conv2d(x, packed, bias, threads=threads)
    for stride in (1, 2):
        y = stripe_conv.stripe_conv2d(x, packed, bias, stride=stride, pv=pv, groups=groups, channel_chunk=chunk,
                                      bands=bands, threads=threads)
        assert relative_error(y, reference(x, weight, mask, bias, stride, 1)) <= REL_TOL
    y = stripe_conv.stripe_conv2d(x, packed, bias, pv=pv, groups=groups, bands=bands, threads=threads)
    assert torch.equal(y, default)  # the partition never changes the summation order


@pytest.mark.parametrize("stride, threads, bands, groups", [(1, 2, 4, 1), (2, 2, 1, 3), (1, 1, None, None)])
def test_openmp_build_equals_the_own_pool_build(stride, threads, bands, groups, generator):
    """The build for use inside torch (work items on the process's OpenMP threads) gives the very same output."""
    if not stripe_conv.is_available("openmp"):
        pytest.skip(f"OpenMP build unavailable: {stripe_conv.unavailable_reason('openmp')}")
    assert stripe_conv.kernel_info("openmp")["pool"] == "openmp" and stripe_conv.kernel_info()["pool"] == "own"
    weight = torch.randn(48, 20, 3, 3, generator=generator)
    mask = make_mask("structured", 48, 3, 3, generator)
    x = torch.randn(2, 20, 17, 15, generator=generator).numpy()
    bias, residual = torch.randn(48, generator=generator).numpy(), None
    packed = stripe_conv.pack_weights(weight, mask)
    outs = []
    for pool in stripe_conv.POOLS:
        call = stripe_conv.bind(packed, x.shape, stride=stride, relu=True, threads=threads, bands=bands, groups=groups,
                                pool=pool)
        outs.append(call(x, bias, residual))
    assert np.array_equal(outs[0], outs[1])
    expected = torch.relu(reference(torch.from_numpy(x), weight, mask, torch.from_numpy(bias), stride, 1))
    assert relative_error(outs[1], expected) <= REL_TOL
    with pytest.raises(ValueError, match="pool must be one of"):
        stripe_conv.bind(packed, x.shape, pool="tbb")


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


@pytest.mark.parametrize("dilation, stride, padding", [
    (2, 1, 2), (2, 2, 2), (3, 1, 3), ((2, 1), 1, (2, 1)), ((1, 3), 2, (0, 3)), (2, 1, 0), (2, 3, 1), (4, 2, 4),
])
@pytest.mark.parametrize("kind", ["random", "mixed"])
@pytest.mark.parametrize("threads", [1, 2])
def test_dilation(dilation, stride, padding, kind, threads, generator):
    weight = torch.randn(20, 9, 3, 3, generator=generator)
    mask = make_mask(kind, 20, 3, 3, generator)
    bias = torch.randn(20, generator=generator)
    x = torch.randn(1, 9, 17, 15, generator=generator)
    y = stripe_conv.stripe_conv2d(x, stripe_conv.pack_weights(weight, mask), bias, stride=stride, padding=padding,
                                  dilation=dilation, threads=threads)
    expected = F.conv2d(x, weight * mask[:, None], bias, stride=stride, padding=padding, dilation=dilation)
    assert y.shape == expected.shape
    assert relative_error(y, expected) <= REL_TOL


def test_random_geometries(generator):
    """Seeded random shapes x stride x padding x dilation x kernel size x threads, all against F.conv2d."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        sh, sw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        dh, dw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        ph, pw = int(rng.integers(0, 4)), int(rng.integers(0, 4))
        h = int(rng.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 40))
        w = int(rng.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 40))
        c, o = int(rng.integers(1, 20)), int(rng.integers(1, 40))
        weight = torch.randn(o, c, kh, kw, generator=generator)
        mask = make_mask(["random", "mixed", "single_tap", "full"][int(rng.integers(0, 4))], o, kh, kw, generator)
        bias = torch.randn(o, generator=generator)
        x = torch.randn(1, c, h, w, generator=generator)
        expected = F.conv2d(x, weight * mask[:, None], bias, stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw))
        y = stripe_conv.stripe_conv2d(x, stripe_conv.pack_weights(weight, mask), bias, stride=(sh, sw),
                                      padding=(ph, pw), dilation=(dh, dw), threads=int(rng.integers(1, 4)))
        assert y.shape == expected.shape
        assert relative_error(y, expected) <= REL_TOL, (c, o, h, w, kh, kw, sh, sw, ph, pw, dh, dw)


def test_default_padding_follows_dilation(generator):
    weight = torch.randn(8, 4, 3, 5, generator=generator)
    mask = make_mask("random", 8, 3, 5, generator)
    x = torch.randn(1, 4, 12, 13, generator=generator)
    y = stripe_conv.stripe_conv2d(x, stripe_conv.pack_weights(weight, mask), dilation=2)
    expected = F.conv2d(x, weight * mask[:, None], padding=(2, 4), dilation=2)
    assert relative_error(y, expected) <= REL_TOL


@pytest.mark.parametrize("c, o, size, stride", [(64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1),
                                                (512, 512, 7, 1), (128, 256, 28, 2)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_resnet_shapes_and_partitions(c, o, size, stride, threads, generator):
    """The benchmark's shapes, on the partitions the cost model picks for 1-3 threads, and forced ones."""
    weight = torch.randn(o, c, 3, 3, generator=generator) * 0.05
    mask = make_mask("random", o, 3, 3, generator)
    bias = torch.randn(o, generator=generator)
    x = torch.randn(1, c, size, size, generator=generator)
    packed = stripe_conv.pack_weights(weight, mask)
    expected = reference(x, weight, mask, bias, stride, 1)
    y = stripe_conv.stripe_conv2d(x, packed, bias, stride=stride, threads=threads)
    assert relative_error(y, expected) <= REL_TOL
    ho = expected.shape[-1]
    y2 = stripe_conv.stripe_conv2d(x, packed, bias, stride=stride, threads=threads, bands=min(ho, 2 * threads + 1),
                                   groups=3)
    assert torch.equal(y, y2)


@pytest.mark.parametrize("threads", [1, 2])
def test_dense_and_padded_rows_agree(threads, generator, monkeypatch):
    """Same-padding convs pack dense rows (edge taps masked); forcing padded rows gives identical outputs."""
    weight = torch.randn(24, 12, 3, 3, generator=generator)
    mask = make_mask("mixed", 24, 3, 3, generator)
    bias = torch.randn(24, generator=generator)
    x = torch.randn(1, 12, 13, 11, generator=generator)
    results = {}
    for padded in ("0", "1"):
        monkeypatch.setenv("SWPFX_KERNEL_PADDED_ROWS", padded)
        packed = stripe_conv.pack_weights(weight, mask)  # fresh plans
        for stride, dilation in ((1, 1), (2, 1), (1, 2), (2, 2)):
            pad = dilation
            results[padded, stride, dilation] = stripe_conv.stripe_conv2d(
                x, packed, bias, stride=stride, padding=pad, dilation=dilation, threads=threads)
            plan = next(iter(p for k, p in packed._plans.items() if k[5] == stride and k[9] == dilation))
            assert plan.dense_rows == (padded == "0" and stripe_conv.kernel_info()["vector_width"] >= 8)
    for (padded, stride, dilation), y in results.items():
        expected = reference_dilated(x, weight, mask, bias, stride, dilation, dilation)
        assert relative_error(y, expected) <= REL_TOL
        assert torch.equal(y, results["0", stride, dilation])
    packed = stripe_conv.pack_weights(weight, mask)
    stripe_conv.stripe_conv2d(x, packed, bias, padding=0)  # "valid": real columns do not fit in Wo
    assert not next(iter(packed._plans.values())).dense_rows


@pytest.mark.parametrize("threads", [1, 2])
def test_reading_the_input_in_place_agrees_with_packing_it(threads, generator, monkeypatch):
    """Stride-1 "same" convs read the NCHW input itself, padding lanes masked: bit-identical to packing each band
    (forced by SWPFX_KERNEL_PACK_ALL), on bands that reach into the padding above, below and beside the input."""
    cases = [  # (C, O, H, W, kernel, padding, dilation, bands)
        (12, 24, 13, 11, (3, 3), 1, 1, 5), (8, 16, 9, 9, (3, 3), 2, 2, 4), (6, 10, 12, 10, (3, 5), (1, 2), 1, 6),
        (16, 16, 6, 6, (3, 3), 1, 1, 3), (5, 7, 10, 19, (1, 1), 0, 1, 4), (32, 32, 28, 28, (3, 3), 1, 1, 2),
        (3, 8, 7, 7, (5, 5), 2, 1, 1), (4, 4, 1, 1, (3, 3), 1, 1, 1),
    ]
    in_place = stripe_conv.kernel_info()["vector_width"] >= 8  # dense rows (the portable build packs padded rows)
    for c, o, h, w, kernel, padding, dilation, bands in cases:
        weight = torch.randn(o, c, *kernel, generator=generator)
        mask = make_mask("mixed", o, *kernel, generator)
        bias = torch.randn(o, generator=generator)
        x = torch.randn(2, c, h, w, generator=generator)
        results = {}
        for pack_all in ("1", "0"):
            monkeypatch.setenv("SWPFX_KERNEL_PACK_ALL", pack_all)
            packed = stripe_conv.pack_weights(weight, mask)  # fresh plans
            results[pack_all] = stripe_conv.stripe_conv2d(x, packed, bias, padding=padding, dilation=dilation,
                                                          threads=threads, bands=bands, relu=True)
            assert next(iter(packed._plans.values())).in_place == (in_place and pack_all == "0")
        expected = F.relu(reference_dilated(x, weight, mask, bias, 1, padding, dilation))
        assert relative_error(results["0"], expected) <= REL_TOL
        assert torch.equal(results["0"], results["1"])
    packed = stripe_conv.pack_weights(weight, mask)
    stripe_conv.stripe_conv2d(x, packed, bias, stride=2, padding=1)
    assert not next(iter(packed._plans.values())).in_place  # stride 2: phase planes, packed


def reference_dilated(x, weight, mask, bias, stride, padding, dilation):
    return F.conv2d(x, weight * mask[:, None], bias, stride=stride, padding=padding, dilation=dilation)


def test_partition_covers_rows_and_filters(generator):
    mask = make_mask("random", 64, 3, 3, generator)
    packed = stripe_conv.pack_weights(torch.randn(64, 32, 3, 3, generator=generator), mask)
    info = stripe_conv.kernel_info()
    for size in (56, 14, 7, 1):
        for threads in (1, 2, 4):
            part = stripe_conv.partition(packed, (32, size, size, 3, 3, 1, 1, 1, 1, 1, 1), threads, 2,
                                         info["vector_width"])
            assert part.band_rows[0] == 0 and part.band_rows[-1] == size
            assert all(b > a for a, b in zip(part.band_rows, part.band_rows[1:]))
            assert 1 <= part.groups <= 64 and len(part.channel_chunks) == part.groups
            bounds = packed.group_bounds(part.groups, part.align)
            assert bounds[0] == 0 and bounds[-1] == 64 and np.all(np.diff(bounds) > 0)


def test_rectangular_kernel(generator):
    weight = torch.randn(12, 5, 3, 5, generator=generator)
    mask = make_mask("mixed", 12, 3, 5, generator)
    x = torch.randn(1, 5, 9, 12, generator=generator)
    for stride in (1, 2):
        y = stripe_conv.stripe_conv2d(x, stripe_conv.pack_weights(weight, mask), stride=stride)
        assert relative_error(y, reference(x, weight, mask, None, stride, (1, 2))) <= REL_TOL


def test_concurrent_callers_and_many_calls(generator):
    """Two Python threads calling at once (one gets the pool, the other runs alone), many short calls."""
    import threading

    weight = torch.randn(24, 16, 3, 3, generator=generator)
    mask = make_mask("random", 24, 3, 3, generator)
    packed = stripe_conv.pack_weights(weight, mask)
    xs = [torch.randn(1, 16, s, s, generator=generator) for s in (5, 9, 14)]
    expected = [stripe_conv.stripe_conv2d(x, packed, threads=1) for x in xs]
    failures = []

    def worker(seed):
        for i in range(150):
            k = (i + seed) % len(xs)
            y = stripe_conv.stripe_conv2d(xs[k], packed, threads=2)
            if not torch.equal(y, expected[k]):
                failures.append((seed, i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


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
    with pytest.raises(ValueError, match="too small"):
        stripe_conv.stripe_conv2d(torch.randn(1, 3, 4, 4), packed, padding=0, dilation=2)
    with pytest.raises(ValueError, match="dilation"):
        stripe_conv.stripe_conv2d(torch.randn(1, 3, 8, 8), packed, dilation=0)


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

"""Hypothesis strategies for random CNNs: the architectures nobody hand-picked.

A drawn :class:`NetSpec` is plain data (readable ``repr``, shrinks well);
:func:`build` turns it into an ``nn.Module`` made of a few small module types.
Every spatial size is tracked while drawing, so each spec is a valid network.

Covered: chains, residual adds (identity and projection shortcuts, stride 2),
concats (with or without the block input, DenseNet style), depthwise (channel
multiplier 1-2) and grouped convs; stride 1/2, dilation 1/2, int / tuple /
'same' padding (same only with stride 1), padding modes zeros/reflect/
replicate/circular, kernels 1-5 including even and non-square ones, bias on/off;
BatchNorm (random running stats and affine params via ``randomize``); ReLU,
Hardswish, functional relu, identity; max/avg pooling (also 3×3 with padding);
squeeze-excite (channel-wise product), ShuffleNet split/concat/shuffle (pinned
channels), layer scale with a constant shift, one conv applied twice (shared
weights and skeleton), one conv unit called on two inputs (the halves of a split,
siamese, or the block input and another unit's output) merged by add or concat,
channel slicing and nearest upsampling; a pooled (module or ``mean``) Linear head or
flatten -> Linear over the remaining spatial extent. Channel counts are random
(1-16), so the group count is whichever divisor the counts allow;
:func:`grouped_net_specs` draws nets whose convs alternate between dense and
grouped ones with a fixed group count (1×1 -> grouped K×K blocks, ResNeXt style,
plain and residual); :func:`shared_net_specs` nets that all call one conv twice.

Example:
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=3, derandomize=True, deadline=None)
    ... @given(net_specs())
    ... def check(spec):
    ...     model = build(spec)
    ...     assert model(example_input(spec)).shape == (2, spec.classes)
    >>> check()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
ACTIVATIONS = ("relu", "hardswish", "relu_fn", "none")
MAX_CHANNELS = 16


# ---------------------------------------------------------------- specs (plain data)


@dataclass(frozen=True)
class ConvSpec:
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: int
    padding: object  # int, (ph, pw) or "same"
    dilation: object  # int or (dh, dw)
    groups: int
    bias: bool
    padding_mode: str

    def module(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel, stride=self.stride, padding=self.padding,
                         dilation=self.dilation, groups=self.groups, bias=self.bias, padding_mode=self.padding_mode)


@dataclass(frozen=True)
class UnitSpec:
    """conv -> (BatchNorm) -> activation."""

    conv: ConvSpec
    bn: bool
    act: str


@dataclass(frozen=True)
class ChainSpec:
    units: tuple[UnitSpec, ...]


@dataclass(frozen=True)
class ResidualSpec:
    """act(body(x) + shortcut(x)); shortcut None is the identity."""

    body: tuple[UnitSpec, ...]
    shortcut: UnitSpec | None
    act: str


@dataclass(frozen=True)
class ConcatSpec:
    """cat([x] if with_input else [] + [branch(x) for branch in branches], dim=1)."""

    branches: tuple[tuple[UnitSpec, ...], ...]
    with_input: bool


@dataclass(frozen=True)
class PoolSpec:
    kind: str  # "max", "avg" (2x2, stride 2), "avg3" (3x3, stride 1, zero padding counted), "max3" (3x3, stride 2, pad 1)


@dataclass(frozen=True)
class SqueezeExciteSpec:
    """x * sigmoid(up(relu(down(mean(x))))): 1×1 convs on a 1×1 map, a channel-wise product."""

    channels: int
    hidden: int
    bias: bool


@dataclass(frozen=True)
class ShuffleSpec:
    """ShuffleNet unit: split channels in two, convolve one half, concat, channel shuffle (pins channels)."""

    unit: UnitSpec


@dataclass(frozen=True)
class ScaleSpec:
    """Layer scale and a constant shift: x * gamma[:, None, None] + shift (channel-wise ops on get_attr)."""

    channels: int
    shift: float


@dataclass(frozen=True)
class SharedSpec:
    """The same conv unit (same weights, same skeleton) applied twice: u(u(x))."""

    unit: UnitSpec


@dataclass(frozen=True)
class ReusedSpec:
    """One conv unit (one module, one skeleton) called on two inputs, merged by ``merge`` ("add" or "cat"):
    the two halves of x (siamese; ``pre`` is None) or x and ``pre(x)``."""

    unit: UnitSpec
    pre: UnitSpec | None
    merge: str


@dataclass(frozen=True)
class SliceSpec:
    """x[:, start:] (a channel-dim getitem) and, optionally, nearest 2× upsampling."""

    start: int
    upsample: bool


@dataclass(frozen=True)
class NetSpec:
    in_channels: int
    height: int
    width: int
    blocks: tuple
    head: str  # "pool" (AdaptiveAvgPool2d -> Linear), "mean" (x.mean((2, 3)) -> Linear), "flatten" (-> Linear)
    classes: int


# ---------------------------------------------------------------- geometry


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def same_pads(kernel: tuple[int, int], dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-side pads (before, after) per dim that PyTorch uses for padding='same'."""
    pads = []
    for k, d in zip(kernel, _pair(dilation)):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def conv_pads(spec: ConvSpec) -> tuple[tuple[int, int], tuple[int, int]]:
    if spec.padding == "same":
        return same_pads(spec.kernel, spec.dilation)
    ph, pw = _pair(spec.padding)
    return (ph, ph), (pw, pw)


def conv_output_size(spec: ConvSpec, height: int, width: int) -> tuple[int, int] | None:
    """Output (H, W), or None if the conv is invalid on that input (too small, bad non-zero padding)."""
    out = []
    for size, k, d, (lo, hi) in zip((height, width), spec.kernel, _pair(spec.dilation), conv_pads(spec)):
        if spec.padding_mode == "reflect" and max(lo, hi) >= size:
            return None
        if spec.padding_mode == "circular" and max(lo, hi) > size:
            return None
        n = (size + lo + hi - d * (k - 1) - 1) // spec.stride + 1
        if n < 1:
            return None
        out.append(n)
    return tuple(out)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ---------------------------------------------------------------- strategies


@st.composite
def conv_specs(draw, in_channels: int, height: int, width: int, out_channels: int | None = None,
               keep_size: bool = False, stride: int | None = None, kind: str | None = None):
    """A conv valid on (in_channels, height, width); ``keep_size`` forces an output of the same size.

    ``kind``: "dense", "grouped" or "depthwise" (drawn if None). Returns (ConvSpec, (H', W')).
    """
    kind = kind or draw(st.sampled_from(("dense", "dense", "grouped", "depthwise")))
    if kind == "depthwise":
        out_channels = out_channels or in_channels * draw(st.sampled_from((1, 1, 2)))
        if out_channels % in_channels:
            kind = "dense"
    if out_channels is None and kind == "grouped" and in_channels > 1:
        g = draw(st.sampled_from([d for d in divisors(in_channels) if 1 < d <= MAX_CHANNELS]))
        out_channels = g * draw(st.integers(1, MAX_CHANNELS // g))
    if out_channels is None:
        out_channels = draw(st.integers(1, MAX_CHANNELS))
    if kind == "depthwise":
        groups = in_channels
    elif kind == "grouped":
        common = [g for g in divisors(math.gcd(in_channels, out_channels)) if g > 1]
        groups = draw(st.sampled_from(common)) if common else 1
    else:
        groups = 1
    for _ in range(8):  # redraw geometry until it fits the input; fall back to a 1x1 conv
        kernel = (draw(st.sampled_from((1, 2, 3, 3, 5))), draw(st.sampled_from((1, 2, 3, 3, 5))))
        if draw(st.booleans()):
            kernel = (kernel[0], kernel[0])
        dilation = draw(st.sampled_from((1, 1, 2, (1, 2), (2, 1))))
        s = stride if stride is not None else (1 if keep_size else draw(st.sampled_from((1, 1, 2))))
        padding_mode = draw(st.sampled_from(PADDING_MODES))
        if keep_size:
            padding = "same"
            if all((d * (k - 1)) % 2 == 0 for k, d in zip(kernel, _pair(dilation))) and draw(st.booleans()):
                padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, _pair(dilation)))
        elif s == 1 and draw(st.booleans()):
            padding = "same"
        else:
            padding = draw(st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2))))
        if padding == 0 or padding == (0, 0):
            padding_mode = "zeros"  # nothing to pad: the mode is irrelevant
        spec = ConvSpec(in_channels, out_channels, kernel, s, padding, dilation, groups, draw(st.booleans()),
                        padding_mode)
        size = conv_output_size(spec, height, width)
        if size is not None and (not keep_size or size == (height, width)):
            if stride == 2 or keep_size or size[0] >= 2 or height < 2:
                return spec, size
    s = stride if stride is not None else 1
    spec = ConvSpec(in_channels, out_channels, (1, 1), s, 0, 1, groups, draw(st.booleans()), "zeros")
    return spec, conv_output_size(spec, height, width)


@st.composite
def unit_specs(draw, in_channels, height, width, out_channels=None, keep_size=False, stride=None, kind=None):
    conv, size = draw(conv_specs(in_channels, height, width, out_channels, keep_size, stride, kind))
    return UnitSpec(conv, draw(st.booleans()) or draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS))), size


@st.composite
def chain_specs(draw, channels, height, width):
    units = []
    for _ in range(draw(st.integers(1, 2))):
        unit, (height, width) = draw(unit_specs(channels, height, width))
        units.append(unit)
        channels = unit.conv.out_channels
    return ChainSpec(tuple(units)), channels, (height, width)


@st.composite
def residual_specs(draw, channels, height, width):
    """Identity shortcut (body keeps size and channels) or a 1×1 projection (may change both, stride 2)."""
    project = draw(st.booleans())
    out_channels = draw(st.integers(1, MAX_CHANNELS)) if project else channels
    stride = 2 if project and height >= 4 and width >= 4 and draw(st.booleans()) else 1
    body = []
    c, body_size = channels, (height, width)
    n = draw(st.integers(1, 2))
    for i in range(n):
        last = i == n - 1
        if i == 0 and stride == 2:
            # stride 2 with "half" padding on an odd effective kernel: same grid as the strided 1×1 shortcut
            k = draw(st.sampled_from((1, 3, 3, 5)))
            conv = ConvSpec(c, out_channels if last else draw(st.integers(1, MAX_CHANNELS)), (k, k), 2, k // 2, 1,
                            1, draw(st.booleans()), draw(st.sampled_from(PADDING_MODES)) if k > 1 else "zeros")
            unit = UnitSpec(conv, draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS)))
            body_size = conv_output_size(conv, height, width)
        else:
            unit, _ = draw(unit_specs(c, *body_size, out_channels if last else None, keep_size=True))
        body.append(unit)
        c = unit.conv.out_channels
    size = (height, width)
    shortcut = None
    if project:
        conv = ConvSpec(channels, out_channels, (1, 1), stride, 0, 1, 1, draw(st.booleans()), "zeros")
        shortcut = UnitSpec(conv, draw(st.booleans()), "none")
        size = conv_output_size(conv, height, width)
    spec = ResidualSpec(tuple(body), shortcut, draw(st.sampled_from(ACTIVATIONS)))
    return spec, out_channels, size


@st.composite
def concat_specs(draw, channels, height, width):
    branches = []
    total = 0
    with_input = draw(st.booleans())
    for _ in range(draw(st.integers(1 if with_input else 2, 3))):
        units, c = [], channels
        for _ in range(draw(st.integers(1, 2))):
            unit, _ = draw(unit_specs(c, height, width, draw(st.integers(1, 8)), keep_size=True))
            units.append(unit)
            c = unit.conv.out_channels
        branches.append(tuple(units))
        total += c
    return ConcatSpec(tuple(branches), with_input), total + (channels if with_input else 0), (height, width)


@st.composite
def reused_specs(draw, channels, height, width):
    """One unit called on the halves of x (if ``channels`` is even, drawn) or on x and ``pre(x)``; keeps the size."""
    pre = None
    if channels % 2 or not draw(st.booleans()):
        pre, _ = draw(unit_specs(channels, height, width, channels, keep_size=True))
    unit, _ = draw(unit_specs(channels if pre else channels // 2, height, width, keep_size=True))
    merge = draw(st.sampled_from(("add", "cat")))
    return ReusedSpec(unit, pre, merge), unit.conv.out_channels * (2 if merge == "cat" else 1)


@st.composite
def shared_net_specs(draw):
    """A stem unit, a block calling one conv unit twice (:class:`ReusedSpec` or :class:`SharedSpec`),
    maybe a chain, and a head: every net has a shared conv."""
    height, width = draw(st.integers(8, 12)), draw(st.integers(8, 12))
    in_channels = draw(st.integers(1, 3))
    stem, size = draw(unit_specs(in_channels, height, width, draw(st.integers(2, MAX_CHANNELS)), kind="dense"))
    blocks, c = [ChainSpec((stem,))], stem.conv.out_channels
    if draw(st.booleans()):
        block, c = draw(reused_specs(c, *size))
    else:
        unit, _ = draw(unit_specs(c, *size, c, keep_size=True))
        block = SharedSpec(unit)
    blocks.append(block)
    if draw(st.booleans()):
        chain, c, size = draw(chain_specs(c, *size))
        blocks.append(chain)
    head = "flatten" if c * size[0] * size[1] <= 1024 and draw(st.booleans()) else draw(st.sampled_from(("pool", "mean")))
    return NetSpec(in_channels, height, width, tuple(blocks), head, draw(st.integers(1, 4)))


@st.composite
def net_specs(draw, max_blocks: int = 4):
    """A random CNN (see the module docstring); inputs are 8-16 px, channels at most 16 (48 after concats)."""
    in_channels = draw(st.integers(1, 4))
    kinds = ("chain", "chain", "residual", "concat", "pool", "se", "shuffle", "scale", "shared", "reused", "slice")
    height, width = draw(st.integers(8, 16)), draw(st.integers(8, 16))
    if draw(st.booleans()):
        width = height
    c, size = in_channels, (height, width)
    blocks = []
    for i in range(draw(st.integers(1, max_blocks))):
        kind = draw(st.sampled_from(kinds))
        if kind == "pool" and min(size) >= 4 and i > 0:
            pool = draw(st.sampled_from(("max", "avg", "avg3", "max3")))
            blocks.append(PoolSpec(pool))
            if pool != "avg3":
                size = ((size[0] - 1) // 2 + 1, (size[1] - 1) // 2 + 1) if pool == "max3" else (size[0] // 2, size[1] // 2)
            continue
        if kind == "se" and i > 0:
            blocks.append(SqueezeExciteSpec(c, draw(st.integers(1, 8)), draw(st.booleans())))
            continue
        if kind == "shuffle" and c % 2 == 0 and c >= 2:
            unit, _ = draw(unit_specs(c // 2, *size, c // 2, keep_size=True))
            blocks.append(ShuffleSpec(unit))
            continue
        if kind == "shared":
            unit, _ = draw(unit_specs(c, *size, c, keep_size=True))
            blocks.append(SharedSpec(unit))
            continue
        if kind == "reused":
            block, c = draw(reused_specs(c, *size))
            blocks.append(block)
            continue
        if kind == "slice" and c >= 2:
            upsample = max(size) <= 8 and draw(st.booleans())
            blocks.append(SliceSpec(draw(st.integers(1, c - 1)), upsample))
            c -= blocks[-1].start
            size = (2 * size[0], 2 * size[1]) if upsample else size
            continue
        if kind == "scale" and i > 0:
            blocks.append(ScaleSpec(c, draw(st.sampled_from((0.0, 0.5, -1.0)))))
            continue
        if kind == "residual":
            block, c, size = draw(residual_specs(c, *size))
        elif kind == "concat" and c <= MAX_CHANNELS:
            block, c, size = draw(concat_specs(c, *size))
        else:
            block, c, size = draw(chain_specs(c, *size))
        blocks.append(block)
    head = "flatten" if c * size[0] * size[1] <= 1024 and draw(st.booleans()) else draw(st.sampled_from(("pool", "mean")))
    return NetSpec(in_channels, height, width, tuple(blocks), head, draw(st.integers(1, 5)))


@st.composite
def grouped_conv_specs(draw, in_channels, height, width, groups, out_channels=None, keep_size=False):
    """A conv with exactly ``groups`` groups (``in_channels`` a multiple of it); returns (ConvSpec, (H', W'))."""
    out_channels = out_channels or groups * draw(st.integers(1, max(1, MAX_CHANNELS // groups)))
    for _ in range(8):
        kernel = draw(st.sampled_from(((3, 3), (3, 3), (1, 1), (1, 3), (5, 5), (2, 2))))
        dilation = draw(st.sampled_from((1, 1, 2)))
        stride = 1 if keep_size else draw(st.sampled_from((1, 1, 2)))
        padding = "same" if keep_size else draw(st.integers(0, 2))
        mode = draw(st.sampled_from(PADDING_MODES)) if padding not in (0, "same") else "zeros"
        spec = ConvSpec(in_channels, out_channels, kernel, stride, padding, dilation, groups, draw(st.booleans()), mode)
        size = conv_output_size(spec, height, width)
        if size is not None and min(size) >= 2 and (not keep_size or size == (height, width)):
            return spec, size
    spec = ConvSpec(in_channels, out_channels, (1, 1), 1, 0, 1, groups, True, "zeros")
    return spec, (height, width)


@st.composite
def grouped_net_specs(draw, groups: int, max_blocks: int = 3):
    """Stem 1×1 conv, then blocks of 1×1 (dense) -> grouped K×K [-> 1×1], plain or residual."""
    height, width = draw(st.integers(8, 14)), draw(st.integers(8, 14))
    in_channels = draw(st.integers(1, 3))
    stem = ConvSpec(in_channels, groups * draw(st.integers(1, 2)), (1, 1), 1, 0, 1, 1, True, "zeros")
    blocks = [ChainSpec((UnitSpec(stem, True, "relu"),))]
    c, size = stem.out_channels, (height, width)
    for _ in range(draw(st.integers(1, max_blocks))):
        inner = groups * draw(st.integers(1, max(1, MAX_CHANNELS // groups)))
        expand = UnitSpec(ConvSpec(c, inner, (1, 1), 1, 0, 1, 1, draw(st.booleans()), "zeros"),
                          True, draw(st.sampled_from(ACTIVATIONS)))
        residual = draw(st.booleans())
        conv, new_size = draw(grouped_conv_specs(inner, *size, groups, keep_size=residual))
        grouped = UnitSpec(conv, True, draw(st.sampled_from(ACTIVATIONS)))
        out = c if residual else draw(st.sampled_from((conv.out_channels, groups * draw(st.integers(1, 2)))))
        project = UnitSpec(ConvSpec(conv.out_channels, out, (1, 1), 1, 0, 1, 1, draw(st.booleans()), "zeros"),
                           True, "none")
        units = (expand, grouped, project)
        blocks.append(ResidualSpec(units, None, draw(st.sampled_from(ACTIVATIONS))) if residual else ChainSpec(units))
        c, size = out, new_size
    return NetSpec(in_channels, height, width, tuple(blocks), draw(st.sampled_from(("pool", "mean"))),
                   draw(st.integers(1, 4)))


# ---------------------------------------------------------------- modules


def activation(kind: str) -> nn.Module:
    return {"relu": nn.ReLU(), "hardswish": nn.Hardswish(), "relu_fn": FunctionalReLU(), "none": nn.Identity()}[kind]


class FunctionalReLU(nn.Module):
    """``torch.relu`` as a call_function node in the traced graph (the others are call_module)."""

    def forward(self, x):
        return torch.relu(x)


class Unit(nn.Module):
    def __init__(self, spec: UnitSpec):
        super().__init__()
        self.conv = spec.conv.module()
        self.bn = nn.BatchNorm2d(spec.conv.out_channels) if spec.bn else nn.Identity()
        self.act = activation(spec.act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, spec: ResidualSpec):
        super().__init__()
        self.body = nn.Sequential(*[Unit(u) for u in spec.body])
        self.shortcut = Unit(spec.shortcut) if spec.shortcut else nn.Identity()
        self.act = activation(spec.act)

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class Concat(nn.Module):
    def __init__(self, spec: ConcatSpec):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(*[Unit(u) for u in b]) for b in spec.branches])
        self.with_input = spec.with_input

    def forward(self, x):
        parts = [x] if self.with_input else []
        return torch.cat(parts + [branch(x) for branch in self.branches], 1)


class SqueezeExcite(nn.Module):
    def __init__(self, spec: SqueezeExciteSpec):
        super().__init__()
        self.down = nn.Conv2d(spec.channels, spec.hidden, 1, bias=spec.bias)
        self.up = nn.Conv2d(spec.hidden, spec.channels, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.up(torch.relu(self.down(s))))


class Shuffle(nn.Module):
    def __init__(self, spec: ShuffleSpec):
        super().__init__()
        self.branch = Unit(spec.unit)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Scale(nn.Module):
    def __init__(self, spec: ScaleSpec):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, spec.channels))
        self.shift = spec.shift

    def forward(self, x):
        return x * self.gamma[:, None, None] + self.shift


class Shared(nn.Module):
    def __init__(self, spec: SharedSpec):
        super().__init__()
        self.unit = Unit(spec.unit)

    def forward(self, x):
        return self.unit(self.unit(x))


class Reused(nn.Module):
    def __init__(self, spec: ReusedSpec):
        super().__init__()
        self.unit = Unit(spec.unit)
        self.pre = Unit(spec.pre) if spec.pre else None
        self.merge = spec.merge

    def forward(self, x):
        a, b = x.chunk(2, dim=1) if self.pre is None else (x, self.pre(x))
        a, b = self.unit(a), self.unit(b)
        return a + b if self.merge == "add" else torch.cat([a, b], 1)


class Slice(nn.Module):
    def __init__(self, spec: SliceSpec):
        super().__init__()
        self.start = spec.start
        self.upsample = spec.upsample

    def forward(self, x):
        x = x[:, self.start:]
        return nn.functional.interpolate(x, scale_factor=2.0, mode="nearest") if self.upsample else x


def block_module(spec) -> nn.Module:
    if isinstance(spec, ChainSpec):
        return nn.Sequential(*[Unit(u) for u in spec.units])
    if isinstance(spec, ResidualSpec):
        return Residual(spec)
    if isinstance(spec, ConcatSpec):
        return Concat(spec)
    if isinstance(spec, PoolSpec):
        return {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "avg3": nn.AvgPool2d(3, 1, 1),
                "max3": nn.MaxPool2d(3, 2, 1)}[spec.kind]
    if isinstance(spec, SqueezeExciteSpec):
        return SqueezeExcite(spec)
    if isinstance(spec, ShuffleSpec):
        return Shuffle(spec)
    if isinstance(spec, ScaleSpec):
        return Scale(spec)
    if isinstance(spec, SharedSpec):
        return Shared(spec)
    if isinstance(spec, ReusedSpec):
        return Reused(spec)
    if isinstance(spec, SliceSpec):
        return Slice(spec)
    raise TypeError(f"unknown block spec {spec!r}")


class RandomCNN(nn.Module):
    def __init__(self, spec: NetSpec):
        super().__init__()
        self.features = nn.Sequential(*[block_module(b) for b in spec.blocks])
        with torch.no_grad():
            c, h, w = self.features(torch.zeros(1, spec.in_channels, spec.height, spec.width)).shape[1:]
        self.pool = nn.AdaptiveAvgPool2d(1) if spec.head == "pool" else nn.Identity()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c * h * w if spec.head == "flatten" else c, spec.classes)
        self.head = spec.head

    def forward(self, x):
        x = self.features(x)
        if self.head == "mean":
            return self.fc(x.mean((2, 3)))
        return self.fc(self.flatten(self.pool(x)))


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Seeded non-trivial BatchNorm statistics and affine parameters (in place); returns ``model``."""
    from helpers import randomize_batchnorm_

    return randomize_batchnorm_(model, torch.Generator().manual_seed(seed))


def build(spec: NetSpec, seed: int = 0) -> RandomCNN:
    """The eval-mode model of ``spec`` with seeded weights and BatchNorm statistics."""
    torch.manual_seed(seed)
    return randomize(RandomCNN(spec), seed).eval()


def example_input(spec: NetSpec, batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.in_channels, spec.height, spec.width, generator=g).to(dtype)

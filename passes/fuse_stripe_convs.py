"""Replace stripe-pruned convolutions by one fused module each (with their BatchNorm, residual add and ReLU).

After ``convert`` has folded the skeletons and removed dead filters, every
stripe-pruned conv is an ``nn.Conv2d`` call whose weight has the pruned stripes
zeroed and whose ``node.meta["swpfx"]["mask"]`` says which stripes are kept (the
contract of ``lower_stripe_convs``). This pass replaces each such conv that has
a partially pruned filter by a single ``call_module`` of a module built by
``make_fused`` -- in ``swpfx`` the compiled stripe kernel,
``swpfx.kernels.fused_conv.FusedStripeConv2d`` -- that also absorbs, when each
alone consumes the previous:

- an eval-mode ``BatchNorm2d`` (folded into the weight and bias: exact up to rounding),
- one residual add (``operator.add`` / ``torch.add`` of the conv and another tensor of the same shape),
- a ReLU (after the conv, the BatchNorm or the add).

The fused node is placed where the last absorbed node was, so the residual's
producer (e.g. a downsample branch traced after the conv) is already computed.
Convs ``make_fused`` refuses (it returns None: grouped convs, say) are left as
they are, for ``lower_stripe_convs`` to handle. With ``include_dense`` convs
that keep every stripe (1×1 convs among them) are fused too: the kernel runs
them densely, still absorbing what follows (``convert(lowering="fused")`` does
this; a ResNet-18's downsample conv + BN took 0.19-0.22 ms fused against
0.26-0.28 ms in PyTorch, RESULTS.md).

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> from swpfx.passes.fuse_stripe_convs import fuse_stripe_convs
    >>> from swpfx.passes.lower_stripe_convs import mark_stripe_conv
    >>> class Scaled(nn.Module):  # a stand-in for the compiled kernel
    ...     def __init__(self, conv, mask, relu, residual, scale, shift):
    ...         super().__init__()
    ...         self.conv, self.relu = conv, relu
    ...         self.scale = torch.ones(conv.out_channels) if scale is None else scale
    ...         self.shift = torch.zeros(conv.out_channels) if shift is None else shift
    ...     def forward(self, x):
    ...         y = self.conv(x) * self.scale[:, None, None] + self.shift[:, None, None]
    ...         return torch.relu(y) if self.relu else y
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval())
    >>> mask = torch.ones(8, 3, 3, dtype=torch.bool); mask[:, 0] = False
    >>> mark_stripe_conv(gm, "0", mask, example_input=torch.randn(1, 4, 6, 6))
    >>> x = torch.randn(2, 4, 6, 6); expected = gm(x)
    >>> fuse_stripe_convs(gm, lambda conv, mask, **kw: Scaled(conv, mask, **kw)).fused
    {'0': ['_1', '_2']}
    >>> torch.allclose(gm(x), expected, atol=1e-5), [n.op for n in gm.graph.nodes]
    (True, ['placeholder', 'call_module', 'output'])
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from .fold_batchnorm_into_sums import batchnorm_affine
from .graph_utils import META_KEY, erase_replaced, swpfx_meta, tensor_shape, unique_attr_name
from .lower_stripe_convs import RELU_FUNCTIONS, check_stripe_conv, is_lowerable, is_stripe_conv, used_once
from .pass_result import PassResult

PASS = "fuse_stripe_convs"
ADD_FUNCTIONS = (operator.add, torch.add)

# make_fused(conv, mask, *, relu, residual, scale, shift) -> module, or None to leave the conv alone
FusedFactory = Callable[..., nn.Module | None]


def _sole_user(node: fx.Node) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    return user if node in user.args else None


def _is_eval_batchnorm(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    if node.op != "call_module" or node.args != (source,) or node.kwargs:
        return False
    bn = gm.get_submodule(node.target)
    return (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
            and used_once(gm, node.target))


def _is_relu(gm: fx.GraphModule, node: fx.Node, source: fx.Node) -> bool:
    """An out-of-place ReLU of ``source`` (an in-place one of a value with no other user is as good)."""
    if node.args != (source,) or set(node.kwargs) - {"inplace"}:
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    return node.op == "call_function" and node.target in RELU_FUNCTIONS


def _residual_of(node: fx.Node, source: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` adds ``source`` and a tensor node of the same shape, else None."""
    if node.op != "call_function" or node.target not in ADD_FUNCTIONS or len(node.args) != 2 or node.kwargs:
        return None
    other = node.args[1] if node.args[0] is source else node.args[0]
    if other is source or not isinstance(other, fx.Node) or source not in node.args:
        return None
    shape = tensor_shape(source)
    return other if shape is not None and tensor_shape(other) == shape else None


@dataclass
class Absorbed:
    """What a fused conv takes over from the nodes after it."""

    batchnorm: fx.Node | None = None
    add: fx.Node | None = None  # the residual add
    residual: fx.Node | None = None  # the other operand of the add
    nodes: list[fx.Node] = field(default_factory=list)  # absorbed nodes in order (BN, add, ReLU)
    relu: bool = False


def absorbed_followers(gm: fx.GraphModule, conv: fx.Node) -> Absorbed:
    """The BatchNorm, residual add and ReLU after ``conv`` that a fused conv can take over, in this order."""
    found, current = Absorbed(), conv
    user = _sole_user(current)
    if user is not None and _is_eval_batchnorm(gm, user, current):
        found.batchnorm, current = user, user
        found.nodes.append(user)
        user = _sole_user(current)
    if user is not None and (residual := _residual_of(user, current)) is not None:
        found.add, found.residual, current = user, residual, user
        found.nodes.append(user)
        user = _sole_user(current)
    if user is not None and _is_relu(gm, user, current):
        found.relu = True
        found.nodes.append(user)
    return found


@dataclass
class FuseStripeConvsResult(PassResult):
    fused: dict[str, list[str]] = field(default_factory=dict)  # new module name -> absorbed node names
    refused: list[str] = field(default_factory=list)  # stripe convs make_fused left alone


def fuse_conv(gm: fx.GraphModule, node: fx.Node, make_fused: FusedFactory) -> tuple[str, list[str]] | None:
    """Replace the stripe conv ``node`` (and what it absorbs) by one fused module; None if refused."""
    conv, mask = check_stripe_conv(gm, node, PASS)
    found = absorbed_followers(gm, node)
    scale = shift = None
    if found.batchnorm is not None:
        scale, shift = batchnorm_affine(gm.get_submodule(found.batchnorm.target))
    module = make_fused(conv, mask, relu=found.relu, residual=found.residual is not None, scale=scale, shift=shift)
    if module is None:
        return None
    # the fused module takes the conv's place (and name) unless another node shares that conv
    name = node.target if used_once(gm, node.target) else unique_attr_name(gm, node.target + "_fused")
    gm.add_submodule(name, module)
    last = found.nodes[-1] if found.nodes else node
    args = (node.args[0],) if found.residual is None else (node.args[0], found.residual)
    with gm.graph.inserting_before(last):
        fused = gm.graph.call_module(name, args)
    fused.meta = dict(last.meta)
    fused.meta[META_KEY] = {**swpfx_meta(node), "role": "fused_conv", "conv": node.name, "lowering": "fused",
                            "kept_stripes": int(mask.sum()), "absorbed": [n.name for n in found.nodes]}
    last.replace_all_uses_with(fused)
    erase_replaced(gm, [*reversed(found.nodes), node], keep=name)
    return name, [n.name for n in found.nodes]


def fuse_stripe_convs(gm: fx.GraphModule, make_fused: FusedFactory, include_dense: bool = False
                      ) -> FuseStripeConvsResult:
    """Fuse every stripe conv of ``gm`` with a partially pruned filter (in place); see the module docstring.

    ``make_fused(conv, mask, *, relu, residual, scale, shift)`` builds the module
    computing ``act(scale * conv_masked(x) + shift (+ residual))``, called as
    ``module(x)`` or ``module(x, residual)``; it returns None to leave a conv alone.
    Convs that keep every stripe, and 1×1 convs, are left alone unless
    ``include_dense`` (then ``make_fused`` gets them too, with an all-true mask).
    """
    result = FuseStripeConvsResult(gm, modified=False)
    for node in [n for n in gm.graph.nodes if is_stripe_conv(gm, n)]:
        conv, mask = check_stripe_conv(gm, node, PASS)
        if not (include_dense or is_lowerable(conv, mask)):
            continue
        done = fuse_conv(gm, node, make_fused)
        if done is None:
            result.refused.append(node.name)
            continue
        result.fused[done[0]] = done[1]
        result.modified = True
    gm.graph.lint()
    gm.recompile()
    return result

"""Fold a BatchNorm that follows ``conv + ones-map conv`` into both convs.

When ``remove_channels`` removes the input channels of a zero-padded conv whose
removed inputs were constants, it adds their position-dependent effect as
``conv(x) + dead_conv(ones)``. A BatchNorm after that sum no longer directly
follows a conv, so ONNX Runtime runs it as a separate pass over the tensor (and
the ReLU after it too). BatchNorm in eval mode is affine per channel,
``s·y + t``, so ``BN(conv(x) + dead(ones)) = conv'(x) + dead'(ones)`` with both
weights scaled by ``s`` and ``t`` added to ``conv``'s bias: exact, and the
BatchNorm is gone.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> class Sum(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv, self.dead, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
    ...     def forward(self, x):
    ...         return self.bn(torch.add(self.conv(x), self.dead(torch.ones_like(x[:, :1]))))
    >>> gm = fx.symbolic_trace(Sum().eval())
    >>> add = next(n for n in gm.graph.nodes if n.target is torch.add)
    >>> add.meta["swpfx"] = {"role": "dead_channel_constant"}
    >>> x = torch.randn(2, 4, 6, 6); expected = gm(x)
    >>> fold_batchnorm_into_sums(gm).folded
    1
    >>> torch.allclose(gm(x), expected, atol=1e-5), any(n.target == "bn" for n in gm.graph.nodes)
    (True, False)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from .graph_utils import META_KEY
from .pass_result import PassResult
from .lower_stripe_convs import used_once

PASS = "fold_batchnorm_into_sums"
SUM_ROLE = "dead_channel_constant"  # remove_channels' tag on the add of a conv and its ones-map conv


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` of an eval-mode BatchNorm: ``bn(y) = scale·y + shift`` per channel."""
    var, mean = bn.running_var, bn.running_mean
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = bn.weight * scale
    shift = -mean * scale + (bn.bias if bn.affine else 0)
    return scale.detach(), shift.detach()


def foldable_sum(gm: fx.GraphModule, add: fx.Node) -> tuple[nn.Conv2d, nn.Conv2d, fx.Node] | None:
    """``(conv, ones-map conv, batchnorm node)`` if ``add`` is such a sum feeding only an eval BatchNorm2d."""
    if add.meta.get(META_KEY, {}).get("role") != SUM_ROLE or add.op != "call_function" or len(add.users) != 1:
        return None
    bn_node = next(iter(add.users))
    if bn_node.op != "call_module" or bn_node.args != (add,) or bn_node.kwargs:
        return None
    bn = gm.get_submodule(bn_node.target)
    if not (isinstance(bn, nn.BatchNorm2d) and not bn.training and bn.track_running_stats
            and used_once(gm, bn_node.target)):
        return None
    convs = []
    for arg in add.args[:2]:
        if not (isinstance(arg, fx.Node) and arg.op == "call_module" and len(arg.users) == 1
                and isinstance(gm.get_submodule(arg.target), nn.Conv2d) and used_once(gm, arg.target)):
            return None
        convs.append(gm.get_submodule(arg.target))
    return convs[0], convs[1], bn_node


def _scale_conv(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor | None) -> None:
    with torch.no_grad():
        conv.weight.mul_(scale.to(conv.weight.dtype)[:, None, None, None])
        if shift is None:
            if conv.bias is not None:
                conv.bias.mul_(scale.to(conv.bias.dtype))
            return
        bias = conv.bias.detach() * scale if conv.bias is not None else torch.zeros_like(shift)
        conv.bias = nn.Parameter((bias + shift).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


@dataclass
class FoldBatchnormIntoSumsResult(PassResult):
    folded: int = 0  # BatchNorms folded away


def fold_batchnorm_into_sums(gm: fx.GraphModule) -> FoldBatchnormIntoSumsResult:
    """Fold every BatchNorm after a ``conv + ones-map conv`` sum into the two convs (in place)."""
    folded = 0
    for add in list(gm.graph.nodes):
        found = foldable_sum(gm, add)
        if found is None:
            continue
        conv, dead, bn_node = found
        scale, shift = batchnorm_affine(gm.get_submodule(bn_node.target))
        _scale_conv(conv, scale, shift)
        _scale_conv(dead, scale, None)
        bn_node.replace_all_uses_with(add)
        target = bn_node.target
        gm.graph.erase_node(bn_node)
        gm.delete_submodule(target)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.recompile()
    return FoldBatchnormIntoSumsResult(gm, modified=bool(folded), folded=folded)

"""Fold each conv's skeleton into its weight and zero the pruned stripes.

After this pass every 2-D conv whose weight and bias come from parameters is a
plain ``nn.Conv2d`` call_module node (``padding_mode='zeros'``; other modes stay
as the explicit ``F.pad`` node ``prepare`` made), with weight ``W ⊙ I ⊙ mask``
and ``node.meta["swpfx"] = {"role": "conv", "conv": name, "mask": (O, Kh, Kw) bool}``.
Convs without a skeleton get an all-True mask. The skeleton parameters are gone.
A conv called more than once (one skeleton, the same weight at every call) stays
one module that every call node targets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .graph_utils import (
    META_KEY,
    Conv2dArgs,
    depends_only_on_attributes,
    erase_unused_attributes,
    evaluate_attribute_expression,
    is_conv2d_call,
    modules_equal,
    new_conv,
    pass_error,
    swpfx_meta,
)
from .pass_result import PassResult

PASS = "fold_skeletons"


# ---------------------------------------------------------------- math


def stripe_masks(skeletons: Mapping[str, torch.Tensor], threshold: float) -> dict[str, torch.Tensor]:
    """Keep stripe (o, i, j) iff ``|I[o, i, j]| > threshold``.

    Example:
        >>> stripe_masks({"c": torch.tensor([[[0.2, 0.01]]])}, 0.05)["c"]
        tensor([[[ True, False]]])
    """
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
        raise ValueError(f"swpfx.{PASS}: threshold must be a number >= 0, got {threshold!r}")
    return {name: s.detach().abs() > threshold for name, s in skeletons.items()}


def masked_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` (O, C/g, Kh, Kw) with the stripes where ``mask`` (O, Kh, Kw) is False zeroed."""
    return weight * mask[:, None].to(weight.dtype)


def conv_module_like(args: Conv2dArgs, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` computing ``conv2d(x, weight, bias, ...)`` with ``args``' options."""
    return new_conv(weight, bias, args.stride, args.padding, args.dilation, args.groups)


# ---------------------------------------------------------------- predicates


def can_fold(node: fx.Node) -> bool:
    """A functional conv whose weight (and bias) come from attributes alone."""
    if not is_conv2d_call(node):
        return False
    args = Conv2dArgs.of(node)
    weight_ok = isinstance(args.weight, fx.Node) and depends_only_on_attributes(args.weight)
    bias_ok = args.bias is None or (isinstance(args.bias, fx.Node) and depends_only_on_attributes(args.bias))
    return weight_ok and bias_ok


# ---------------------------------------------------------------- graph surgery


def _evaluate(gm: fx.GraphModule, value):
    if value is None:
        return None
    return evaluate_attribute_expression(gm, value).detach().clone()


@dataclass
class FoldSkeletonsResult(PassResult):
    convs: dict[str, str] = field(default_factory=dict)  # conv name -> module path of its folded nn.Conv2d


def fold_skeletons(gm: fx.GraphModule, masks: Mapping[str, torch.Tensor]) -> FoldSkeletonsResult:
    """Turn every foldable conv of ``gm`` (in place) into a masked ``nn.Conv2d`` module.

    ``masks`` maps a conv name (as in ``swpfx.skeletons``) to its (O, Kh, Kw) keep mask.

    Example:
        >>> import torch, torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18())
        >>> masks = stripe_masks(swpfx.skeletons(prepared), 0.05)
        >>> gm = fold_skeletons(prepared, masks).graph_module
        >>> type(gm.get_submodule("layer1.0.conv1")).__name__
        'Conv2d'
    """
    folded: list[tuple[fx.Node, str, str]] = []  # (node, conv name, module path)
    for node in list(gm.graph.nodes):
        if not can_fold(node):
            continue
        args = Conv2dArgs.of(node)
        meta = swpfx_meta(node)
        name = meta.get("conv", node.name)
        weight = _evaluate(gm, args.weight)
        if meta.get("role") == "conv":
            if name not in masks:
                raise pass_error(PASS, node, f"no stripe mask given for conv '{name}'")
            mask = masks[name].to(device=weight.device, dtype=torch.bool)
            if mask.shape != (weight.shape[0], *weight.shape[2:]):
                raise pass_error(PASS, node, f"mask for '{name}' has shape {tuple(mask.shape)}, expected {(weight.shape[0], *weight.shape[2:])}; were the skeletons replaced by tensors of another shape?")
            weight = masked_weight(weight, mask)
        else:
            mask = torch.ones(weight.shape[0], *weight.shape[2:], dtype=torch.bool, device=weight.device)
        conv = conv_module_like(args, weight, _evaluate(gm, args.bias))
        # a conv called more than once (one skeleton) stays one module
        temp = next((t for _, other, t in folded if other == name and modules_equal(gm.get_submodule(t), conv)), None)
        if temp is None:
            temp = f"_swpfx_folded_{len(folded)}"
            gm.add_submodule(temp, conv)
        node.op, node.target, node.args, node.kwargs = "call_module", temp, (args.input,), {}
        node.meta[META_KEY] = {"role": "conv", "conv": name, "mask": mask.cpu()}
        folded.append((node, name, temp))
    gm.graph.eliminate_dead_code()
    erase_unused_attributes(gm)
    _move_to_readable_paths(gm, folded)
    gm.graph.lint()
    gm.recompile()
    convs = {n.meta[META_KEY]["conv"]: n.target for n in gm.graph.nodes
             if n.meta.get(META_KEY, {}).get("role") == "conv"}
    return FoldSkeletonsResult(gm, modified=bool(folded), convs=convs)


def _module_path_free(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        owner, _, leaf = path.rpartition(".")
        try:
            parent = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            return True
        return not hasattr(parent, leaf)
    return False


def _move_to_readable_paths(gm: fx.GraphModule, folded: list[tuple[fx.Node, str, str]]) -> None:
    """Install folded convs where the source conv lived (``layer1.0.conv1``), suffixing duplicates;
    the calls of one shared module keep sharing it."""
    moved: dict[str, str] = {}
    for node, name, temp in folded:
        if temp not in moved:
            path, i = name, 0
            while not _module_path_free(gm, path):
                i += 1
                path = f"{name}_{i}"
            gm.add_submodule(path, gm.get_submodule(temp))
            delattr(gm, temp)
            moved[temp] = path
        node.target = moved[temp]

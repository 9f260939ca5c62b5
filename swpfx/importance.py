"""Stripe importance that means the same with and without BatchNorm, and one total order on stripes.

Why not ``|I|``: when BatchNorm follows a conv, scaling filter o's skeleton by s
scales its pre-BN output z_o by s, the running statistics follow (mean → s·mean,
var → s²·var) and the network computes the same function (DESIGN.md §9). So
``|I|`` says nothing about importance in BN networks, and a threshold on it cuts
whole layers at once.

The scale-free importance of stripe p = (i, j) of filter o is its contribution
to the conv's *normalised* output. Stripe p adds ``I[o,p] · W[o,:,p] · x_p`` to
z_o (x_p: the input shifted by p), so its size is ``|I[o,p]| · ‖W[o,:,p]‖₂``
times the input's scale. BatchNorm then multiplies z_o by
``|γ_o| / √(var_o + ε)``; under the rescaling above ``|I|`` gains s and
``√var`` gains s, so

    importance[o, p] = |I[o, p]| · ‖W[o, :, p]‖₂ · |γ_o| / √(running_var_o + ε)

is invariant, and without a following BatchNorm it is ``|I[o,p]| · ‖W[o,:,p]‖₂``
(linear in the skeleton, as the output is). A conv counts as followed by
BatchNorm when its output's only user is a ``BatchNorm2d`` module.

Example:
    >>> import torch, torchvision, swpfx
    >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10))
    >>> scores = swpfx.stripe_importance(prepared)
    >>> scores["layer1.0.conv1"].shape
    torch.Size([64, 3, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from swpfx.passes.graph_utils import META_KEY as META, evaluate_attribute_expression
from swpfx.prepare import _require_prepared, skeletons

RULES = ("scale_free", "skeleton")
# How training and budgets rank stripes: by importance over their layer's mean ("layer") or all layers together
# ("global"). Measured in benchmarks/results/bn_training.md: equal or better at 50 % of stripes pruned on both BN
# nets, and only "layer" stays accurate at 75-82 % on ResNet-18 (global ranking empties whole layers there).
DEFAULT_SCOPE = "layer"


@dataclass(frozen=True)
class StripeSite:
    """What the importance of one prepared conv's stripes depends on."""

    weight_node: fx.Node  # the conv's weight expression (without the skeleton)
    batchnorm: nn.modules.batchnorm._BatchNorm | None


# ---------------------------------------------------------------- math (pure)


def batchnorm_scale(bn: nn.modules.batchnorm._BatchNorm | None, out_channels: int, like: torch.Tensor) -> torch.Tensor:
    """``|γ| / √(running_var + ε)`` per channel; ones without BatchNorm (or without running statistics)."""
    if bn is None or bn.running_var is None:
        gamma = bn.weight.abs() if bn is not None and bn.affine else torch.ones(out_channels)
        return gamma.to(like)
    gamma = bn.weight.abs() if bn.affine else torch.ones_like(bn.running_var)
    return (gamma / torch.sqrt(bn.running_var + bn.eps)).to(like)


def scale_free_importance(skeleton: torch.Tensor, weight: torch.Tensor, out_scale: torch.Tensor) -> torch.Tensor:
    """``|I[o,p]| · ‖W[o,:,p]‖₂ · out_scale[o]`` for skeleton (O, Kh, Kw) and weight (O, C/g, Kh, Kw).

    Example:
        >>> w = torch.zeros(1, 2, 1, 2); w[0, :, 0, 0] = torch.tensor([3.0, 4.0]); w[0, 0, 0, 1] = 1.0
        >>> scale_free_importance(torch.tensor([[[2.0, 1.0]]]), w, torch.tensor([0.5])).tolist()
        [[[5.0, 0.5]]]
    """
    return skeleton.abs() * weight.norm(dim=1) * out_scale[:, None, None]


def stripe_ranks(scores: dict[str, torch.Tensor], tiebreak: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every stripe's position (0 = least important) in one total order over all layers.

    Ordered by score, equal scores by ``tiebreak`` (e.g. weight magnitude), then by
    position, so pruning the k lowest-ranked stripes removes exactly k stripes for
    every k — a budget never jumps from "keep all" to "keep nothing" on ties.

    Example:
        >>> ranks = stripe_ranks({"a": torch.tensor([[[1.0, 1.0]]])}, {"a": torch.tensor([[[2.0, 1.0]]])})
        >>> ranks["a"].tolist()
        [[[1, 0]]]
    """
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten().double().cpu() for n in names]) if names else torch.zeros(0)
    order = torch.arange(len(flat))
    if tiebreak is not None and len(flat):
        secondary = torch.cat([tiebreak[n].detach().flatten().double().cpu() for n in names])
        order = order[torch.argsort(secondary[order], stable=True)]
    order = order[torch.argsort(flat[order], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    out, start = {}, 0
    for name in names:
        size = scores[name].numel()
        out[name] = rank[start:start + size].reshape(scores[name].shape)
        start += size
    return out


def normalize_per_layer(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's scores divided by their mean (an all-zero layer scores 0).

    Example:
        >>> s = normalize_per_layer({"a": torch.tensor([[[1.0, 3.0]]]), "b": torch.tensor([[[10.0, 30.0]]])})
        >>> s["a"].tolist() == s["b"].tolist() == [[[0.5, 1.5]]]
        True
    """
    out = {}
    for name, score in scores.items():
        magnitude = score.detach().abs().double().cpu()
        mean = magnitude.mean()
        out[name] = magnitude / mean if mean > 0 else torch.zeros_like(magnitude)
    return out


# ---------------------------------------------------------------- graph reading


def stripe_sites(prepared: fx.GraphModule) -> dict[str, StripeSite]:
    """Per prepared conv: its weight expression and the BatchNorm that directly follows it, if any."""
    weights, bns = {}, {}
    for node in prepared.graph.nodes:
        meta = node.meta.get(META, {})
        if meta.get("role") == "skeleton_weight":
            weights[meta["conv"]] = node.args[0]
        elif meta.get("role") == "conv" and len(node.users) == 1:
            (user,) = node.users
            if user.op == "call_module":
                module = prepared.get_submodule(user.target)
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    bns[meta["conv"]] = module
    return {name: StripeSite(node, bns.get(name)) for name, node in weights.items()}


def stripe_importance(prepared: fx.GraphModule, rule: str = "scale_free", *, differentiable: bool = False) -> dict[str, torch.Tensor]:
    """``{conv name: (O, Kh, Kw) tensor}``: how much each stripe contributes (see the module docstring).

    ``rule="scale_free"`` (default) is invariant to the skeleton's scale under
    BatchNorm; ``rule="skeleton"`` is the paper's ``|I|``. With ``differentiable``
    the result carries gradients to skeletons, weights and BatchNorm γ (running
    statistics are constants); otherwise it is detached.

    Example:
        >>> import torch, torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10))
        >>> before = swpfx.stripe_importance(prepared)["conv1"][0]
        >>> with torch.no_grad():                       # the same function: filter 0 scaled ten times,
        ...     swpfx.skeletons(prepared)["conv1"][0] *= 10.0
        ...     prepared.bn1.running_var[0] *= 100.0    # and the BN statistics that follow it
        ...     prepared.bn1.running_mean[0] *= 10.0
        >>> torch.allclose(swpfx.stripe_importance(prepared)["conv1"][0], before)
        True
        >>> swpfx.stripe_importance(prepared, rule="skeleton")["conv1"][0, 0, 0].item()   # |I| is not scale-free
        10.0
    """
    _require_prepared(prepared, "stripe_importance")
    if rule not in RULES:
        raise ValueError(f"swpfx.stripe_importance: rule must be one of {RULES}, got {rule!r}")
    skels = skeletons(prepared)
    if rule == "skeleton":
        return {name: s.abs() if differentiable else s.detach().abs() for name, s in skels.items()}
    sites = stripe_sites(prepared)
    out = {}
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for name, skel in skels.items():
            site = sites[name]
            weight = evaluate_attribute_expression(prepared, site.weight_node)
            scale = batchnorm_scale(site.batchnorm, skel.shape[0], skel)
            if not differentiable:
                scale = scale.detach()
            out[name] = scale_free_importance(skel if differentiable else skel.detach(), weight, scale)
    return out

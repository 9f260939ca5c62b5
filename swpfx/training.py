"""Training helpers for filter skeletons: the L1 penalty, the reference per-step rule, optimizer groups."""

from __future__ import annotations

import math

import torch
from torch import fx

from swpfx.prepare import skeletons


def _check_alpha(alpha: float, caller: str) -> None:
    if not isinstance(alpha, (int, float)) or math.isnan(alpha) or alpha < 0:
        raise ValueError(f"swpfx.{caller}: alpha must be a non-negative number, got {alpha!r}")


def skeleton_penalty(prepared: fx.GraphModule, alpha: float) -> torch.Tensor:
    """Differentiable ``alpha * Σ|I|`` over all skeletons; add it to the task loss.

    Example:
        >>> import torch, torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18())
        >>> penalty = swpfx.skeleton_penalty(prepared, alpha=1e-5)  # 1e-5 × (number of stripes) at init
        >>> round(penalty.item(), 5)
        0.38592
    """
    _check_alpha(alpha, "skeleton_penalty")
    terms = [s.abs().sum() for s in skeletons(prepared).values()]
    if not terms:
        return torch.zeros(())
    return alpha * torch.stack(terms).sum()


@torch.no_grad()
def regularize_skeletons_(prepared: fx.GraphModule, alpha: float, threshold: float) -> int:
    """The reference's per-step rule; call after ``backward()`` and before ``optimizer.step()``.

    Adds the L1 subgradient ``alpha * sign(I)`` to every skeleton gradient, then
    hard-zeros each stripe with ``|I| <= threshold`` (value and gradient). Returns
    the number of zeroed stripes. With momentum SGD a zeroed stripe can move
    again by its momentum buffer, exactly as in the reference.

    Example:
        >>> import torch, torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10))
        >>> prepared(torch.randn(2, 3, 32, 32)).sum().backward()
        >>> swpfx.regularize_skeletons_(prepared, alpha=1e-4, threshold=0.01)
        0
    """
    _check_alpha(alpha, "regularize_skeletons_")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"swpfx.regularize_skeletons_: threshold must be >= 0, got {threshold!r}")
    zeroed = 0
    for skel in skeletons(prepared).values():
        if skel.grad is None:
            skel.grad = torch.zeros_like(skel)
        skel.grad.add_(torch.sign(skel), alpha=alpha)
        dead = skel.abs() <= threshold
        skel.masked_fill_(dead, 0.0)
        skel.grad.masked_fill_(dead, 0.0)
        zeroed += int(dead.sum())
    return zeroed


def param_groups(prepared: fx.GraphModule, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: ``weight_decay`` on ordinary parameters, none on skeletons.

    Example:
        >>> import torch, torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18())
        >>> opt = torch.optim.SGD(swpfx.param_groups(prepared, 1e-4), lr=0.1, momentum=0.9)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.0001, 0.0]
    """
    skeleton_ids = {id(p) for p in skeletons(prepared).values()}
    others = [p for p in prepared.parameters() if id(p) not in skeleton_ids]
    skels = [p for p in prepared.parameters() if id(p) in skeleton_ids]
    return [{"params": others, "weight_decay": weight_decay}, {"params": skels, "weight_decay": 0.0}]

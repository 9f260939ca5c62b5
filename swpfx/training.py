"""Training rules for filter skeletons: gradual stripe pruning, the reference per-step rule, penalties, optimizer groups.

Two per-step rules (``regularize_skeletons_``):

- ``rule="gradual"`` (the default, recommended): hard-zero the stripes of lowest
  scale-free importance (:mod:`swpfx.importance`), the zeroed fraction rising
  linearly from 0 to ``sparsity`` over the first ``ramp`` of training, while the
  network keeps training and adapts. Its one knob is the fraction of stripes
  pruned, so its effect is smooth by construction, on BatchNorm networks too,
  and conversion at the end removes only stripes that were already zero.
- ``rule="reference"``: the paper's L1 subgradient on ``|I|`` plus hard-zeroing
  at a threshold. On BatchNorm networks it has a cliff (DESIGN.md §2).
"""

from __future__ import annotations

import math

import torch
from torch import fx

from swpfx.importance import DEFAULT_SCOPE, normalize_per_layer, stripe_importance, stripe_ranks
from swpfx.prepare import skeletons

RULES = ("gradual", "reference")
PENALTY_RULES = ("reference", "scale_free")
DEFAULT_RAMP = 2 / 3


def _check_alpha(alpha: float, caller: str) -> None:
    if not isinstance(alpha, (int, float)) or math.isnan(alpha) or alpha < 0:
        raise ValueError(f"swpfx.{caller}: alpha must be a non-negative number, got {alpha!r}")


def skeleton_penalty(prepared: fx.GraphModule, alpha: float, rule: str = "reference") -> torch.Tensor:
    """Differentiable ``alpha * Σ|I|`` over all skeletons; add it to the task loss.

    ``rule="scale_free"`` penalises ``alpha * Σ importance`` instead (the scale-free
    stripe importance of :func:`swpfx.stripe_importance`, differentiable in the
    skeleton, the weight and BatchNorm's γ).

    Example:
        >>> import torch, torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18())
        >>> penalty = swpfx.skeleton_penalty(prepared, alpha=1e-5)  # 1e-5 × (number of stripes) at init
        >>> round(penalty.item(), 5)
        0.38592
    """
    _check_alpha(alpha, "skeleton_penalty")
    if rule not in PENALTY_RULES:
        raise ValueError(f"swpfx.skeleton_penalty: rule must be one of {PENALTY_RULES}, got {rule!r}")
    if rule == "scale_free":
        terms = [s.sum() for s in stripe_importance(prepared, differentiable=True).values()]
    else:
        terms = [s.abs().sum() for s in skeletons(prepared).values()]
    if not terms:
        return torch.zeros(())
    return alpha * torch.stack(terms).sum()


def scheduled_sparsity(sparsity: float, progress: float, ramp: float = DEFAULT_RAMP) -> float:
    """The gradual rule's pruned fraction at ``progress`` (0 = start, 1 = end of training).

    Example:
        >>> [round(scheduled_sparsity(0.6, p), 3) for p in (0.0, 1 / 3, 2 / 3, 1.0)]
        [0.0, 0.3, 0.6, 0.6]
    """
    return sparsity * min(1.0, max(0.0, progress) / ramp) if ramp > 0 else sparsity


@torch.no_grad()
def zero_least_important_stripes_(prepared: fx.GraphModule, fraction: float, scope: str = DEFAULT_SCOPE) -> int:
    """Hard-zero the ``fraction`` of all stripes with the lowest scale-free importance; returns how many are zero.

    ``scope="layer"`` (default) ranks by importance over its layer's mean, so every
    layer keeps its most important stripes; ``"global"`` ranks stripes of all
    layers together. Stripes already zero rank lowest, so the pruned set only grows.
    """
    skels = skeletons(prepared)
    scores = stripe_importance(prepared)
    if scope == "layer":
        scores = normalize_per_layer(scores)
    elif scope != "global":
        raise ValueError(f"swpfx.regularize_skeletons_: scope must be 'global' or 'layer', got {scope!r}")
    total = sum(s.numel() for s in skels.values())
    count = int(math.floor(fraction * total + 1e-9))
    ranks = stripe_ranks(scores, tiebreak=stripe_importance(prepared, rule="skeleton"))
    zero = 0
    for name, skel in skels.items():
        dead = (ranks[name] < count).to(skel.device) | (skel == 0)
        skel.masked_fill_(dead, 0.0)
        if skel.grad is not None:
            skel.grad.masked_fill_(dead, 0.0)
        zero += int(dead.sum())
    return zero


def regularize_skeletons_(prepared: fx.GraphModule, alpha: float | None = None, threshold: float | None = None, *,
                          rule: str | None = None, sparsity: float | None = None, progress: float = 1.0,
                          ramp: float = DEFAULT_RAMP, scope: str = DEFAULT_SCOPE) -> int:
    """One step of a skeleton training rule; returns the number of stripes that are zero.

    ``rule="gradual"`` (default when ``sparsity`` is given; call it *after*
    ``optimizer.step()``, with ``progress = step / total_steps``): zero the stripes
    of lowest scale-free importance until :func:`scheduled_sparsity` of all
    stripes are zero. Stateless, so it works unchanged under DDP and on resume.

    ``rule="reference"`` (default when ``alpha`` is given; call it after
    ``backward()`` and before ``optimizer.step()``): the paper's rule. Adds the L1
    subgradient ``alpha * sign(I)`` to every skeleton gradient, then hard-zeros each
    stripe with ``|I| <= threshold`` (value and gradient). With momentum SGD a
    zeroed stripe can move again by its momentum buffer, exactly as in the reference.

    Example:
        >>> import torch, torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10))
        >>> swpfx.regularize_skeletons_(prepared, sparsity=0.5, progress=1 / 3)   # a quarter of 38,592 stripes
        9648
        >>> prepared(torch.randn(2, 3, 32, 32)).sum().backward()
        >>> swpfx.regularize_skeletons_(prepared, alpha=1e-4, threshold=0.01)     # the reference rule
        9648
    """
    reference_args = alpha is not None or threshold is not None
    if rule is None:
        if reference_args and sparsity is not None:
            raise ValueError("swpfx.regularize_skeletons_: give sparsity (the gradual rule) or alpha and threshold "
                             "(the reference rule), not both")
        rule = "reference" if reference_args else "gradual"
    if rule not in RULES:
        raise ValueError(f"swpfx.regularize_skeletons_: rule must be one of {RULES}, got {rule!r}")
    if rule == "gradual":
        if reference_args:
            raise ValueError("swpfx.regularize_skeletons_: rule='gradual' takes sparsity and progress, not alpha/threshold")
        for value, what in ((sparsity, "sparsity"), (progress, "progress")):
            if not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
                raise ValueError(f"swpfx.regularize_skeletons_: {what} must be a fraction in [0, 1], got {value!r}")
        if not isinstance(ramp, (int, float)) or math.isnan(ramp) or not 0 <= ramp <= 1:
            raise ValueError(f"swpfx.regularize_skeletons_: ramp must be a fraction in [0, 1], got {ramp!r}")
        return zero_least_important_stripes_(prepared, scheduled_sparsity(sparsity, progress, ramp), scope)
    if sparsity is not None:
        raise ValueError("swpfx.regularize_skeletons_: rule='reference' takes alpha and threshold, not sparsity")
    return _reference_step_(prepared, 0.0 if alpha is None else alpha, 0.0 if threshold is None else threshold)


@torch.no_grad()
def _reference_step_(prepared: fx.GraphModule, alpha: float, threshold: float) -> int:
    _check_alpha(alpha, "regularize_skeletons_")
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
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

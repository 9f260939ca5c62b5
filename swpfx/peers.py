"""The channel-pruning peer every swpfx result is compared with: Torch-Pruning, given its best setting.

:func:`torch_pruning_prune` is Torch-Pruning's ``MetaPruner`` with group L2
magnitude importance, the classifier (the last ``nn.Linear``) left alone, and
``round_to`` as given — the runtime's channel block is its best setting on ONNX
Runtime (ORT computes channel counts off the block padded up to it, and odd
counts leave its fast conv path, :func:`swpfx.runtime_model.runs_nchwc`). :func:`predicted_ratio` prices any
pruned model with the runtime model the way :mod:`swpfx.estimate` prices
swpfx's graphs, and :func:`mildest_meeting` finds the mildest pruning knob whose
predicted latency meets a target. Torch-Pruning is an optional dependency
(``pip install swpfx[bench]``); ``benchmarks/`` and ``swpfx bench`` use this module.

Example:
    >>> import torch, torchvision
    >>> from swpfx.runtime_model import RuntimeModel
    >>> model = torchvision.models.resnet18(num_classes=10).eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> pruned = torch_pruning_prune(model, (x,), 0.5, round_to=16)
    >>> pruned.layer1[0].conv1.out_channels
    32
    >>> predicted_ratio(pruned, model, x, RuntimeModel()) < 1
    True
"""

from __future__ import annotations

import copy
import math

from torch import fx, nn

GRID = 64  # the knob grid of mildest_meeting: 1/64


def torch_pruning_prune(model: nn.Module, example: tuple, ratio: float, round_to: int | None = None) -> nn.Module:
    """A pruned copy of ``model``: Torch-Pruning ``MetaPruner``, group L2 magnitude, the last Linear ignored."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    if ratio > 0:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        pruner = tp.pruner.MetaPruner(model, example[0], importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=linears[-1:], round_to=round_to)
        pruner.step()
    return model


def predicted_seconds(model: nn.Module, x, runtime_model) -> float:
    """The runtime model's ORT seconds of ``model`` on ``x``: traced (unless a GraphModule), ShapeProp'd, priced."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    from swpfx.estimate import predict_graph
    from swpfx.tracing import trace

    gm = copy.deepcopy(model) if isinstance(model, fx.GraphModule) else trace(model)
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    return predict_graph(gm, runtime_model)


def predicted_ratio(model: nn.Module, dense: nn.Module, x, runtime_model) -> float:
    """``model``'s predicted ORT latency over ``dense``'s on ``x``."""
    return predicted_seconds(model, x, runtime_model) / predicted_seconds(dense, x, runtime_model)


def mildest_meeting(prune, ratio_of, target: float, coarse: int = 8) -> dict:
    """The smallest knob k/64 (k = 0 … 63) whose pruned model's predicted ratio is ≤ ``target``.

    ``prune(knob)`` returns a model or None (knob not allowed). Predicted latency
    falls with the knob only roughly (channel rounding makes steps), so a coarse
    scan (every ``coarse``-th knob and the last) finds the first interval that
    meets the target and bisection refines it. If no scanned knob meets the
    target, the scanned model of least predicted latency is returned, flagged
    ``meets_target: False``.
    Returns ``{"model", "knob", "predicted_ratio", "meets_target"}``.
    """
    seen: dict[int, tuple] = {}

    def at(i: int):
        if i not in seen:
            model = prune(i / GRID)
            seen[i] = (model, ratio_of(model) if model is not None else math.inf)
        return seen[i]

    def ok(i: int) -> bool:
        return at(i)[1] <= target

    scan = sorted(set(range(0, GRID, coarse)) | {GRID - 1})
    first = next((i for i in scan if ok(i)), None)
    if first is None:
        best = min((i for i in seen if seen[i][0] is not None), key=lambda i: (seen[i][1], i))
        model, ratio = seen[best]
        return {"model": model, "knob": best / GRID, "predicted_ratio": ratio, "meets_target": False}
    lo, hi = (scan[scan.index(first) - 1] + 1 if first else 0), first
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    model, ratio = at(hi)
    return {"model": model, "knob": hi / GRID, "predicted_ratio": ratio, "meets_target": True}

"""Pruning to a FLOPs budget: the stripe cut that meets ``flops_target`` × the dense FLOPs.

After BatchNorm a filter's skeleton scale is arbitrary (DESIGN.md §2: the L1
penalty shrinks whole layers uniformly), so one global threshold on raw ``|I|``
prunes layers all at once. Here each stripe is scored by its magnitude divided by
its layer's mean magnitude, and one global cut on that score is searched so that
the converted graph's FLOPs — as :func:`swpfx.cost` counts them for the lowering
mode in use, lowering ops included — are at most the target.

The search runs in two phases: a binary search on an analytic FLOPs estimate
(the channel analysis is done once; a cut only changes which filters are dead and
how many stripes each keeps), then exact checks with the real pipeline and
:func:`swpfx.cost`, stepping the cut up until the real count meets the budget.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from swpfx.passes.analyze_channels import ChannelAnalysis, analyze_channels
from swpfx.passes.fold_skeletons import fold_skeletons
from swpfx.passes.graph_utils import swpfx_meta
from swpfx.passes.remove_channels import keep_indices, plan_removal
from swpfx.prepare import skeletons


def normalized_stripe_scores(skels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|I| / mean(|I|)`` per layer (a layer whose skeleton is all zero scores 0).

    Example:
        >>> s = normalized_stripe_scores({"a": torch.tensor([[[1.0, 3.0]]]), "b": torch.tensor([[[10.0, 30.0]]])})
        >>> s["a"].tolist() == s["b"].tolist() == [[[0.5, 1.5]]]
        True
    """
    scores = {}
    for name, skel in skels.items():
        magnitude = skel.detach().abs().double().cpu()
        mean = magnitude.mean()
        scores[name] = magnitude / mean if mean > 0 else torch.zeros_like(magnitude)
    return scores


def normalized_filter_scores(skels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every stripe scored by its *filter's* ``Σ|I|`` over the layer's mean filter mass.

    All stripes of a filter share the score, so a cut removes whole filters (the
    channel pruning ONNX Runtime turns into speed); stripes that are exactly zero
    (hard-zeroed in training) score 0 and go at any cut.

    Example:
        >>> s = normalized_filter_scores({"a": torch.tensor([[[1.0, 0.0]], [[1.5, 1.5]]])})
        >>> s["a"].tolist()   # filter masses 1 and 3, mean 2
        [[[0.5, 0.0]], [[1.5, 1.5]]]
    """
    scores = {}
    for name, skel in skels.items():
        magnitude = skel.detach().abs().double().cpu()
        mass = magnitude.flatten(1).sum(1)
        mean = mass.mean()
        per_filter = mass / mean if mean > 0 else torch.zeros_like(mass)
        scores[name] = torch.where(magnitude > 0, per_filter[:, None, None].expand_as(magnitude), 0.0)
    return scores


def masks_at_cut(scores: dict[str, torch.Tensor], cut: float) -> dict[str, torch.Tensor]:
    """Keep the stripes scoring strictly above ``cut``."""
    return {name: s > cut for name, s in scores.items()}


def candidate_cuts(scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every distinct score, ascending, preceded by -1 (keep everything)."""
    values = torch.cat([s.flatten() for s in scores.values()]) if scores else torch.zeros(0, dtype=torch.float64)
    return torch.cat([torch.tensor([-1.0], dtype=torch.float64), torch.unique(values)])


@dataclass
class _ConvSite:
    node: fx.Node
    name: str  # skeleton key ('' for convs without a skeleton)
    module: nn.Conv2d
    out_pixels: int


class FlopsEstimator:
    """Conv + Linear FLOPs of the converted graph for given masks, without building it."""

    def __init__(self, prepared: fx.GraphModule, probe: tuple, lowered: bool, channel_multiple: int = 1):
        self.channel_multiple = channel_multiple
        gm = copy.deepcopy(prepared).eval()
        full = {name: torch.ones_like(s, dtype=torch.bool) for name, s in skeletons(prepared).items()}
        fold_skeletons(gm, full)
        self.analysis: ChannelAnalysis = analyze_channels(gm, probe)
        self.lowered = lowered
        self.convs, self.linears = [], []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Conv2d):
                shape = node.meta["tensor_meta"].shape
                self.convs.append(_ConvSite(node, swpfx_meta(node).get("conv", ""), module, shape[0] * shape[2] * shape[3]))
            elif isinstance(module, nn.Linear):
                self.linears.append((node, module))

    def dead_requests(self, masks: dict[str, torch.Tensor]) -> dict[fx.Node, list[int]]:
        requests = {}
        for site in self.convs:
            if site.name in masks and site.node in self.analysis.producers:
                dead = (~masks[site.name].flatten(1).any(1)).nonzero().flatten().tolist()
                if dead:
                    requests[site.node] = dead
        return requests

    def flops(self, masks: dict[str, torch.Tensor]) -> int:
        removed = plan_removal(self.analysis, self.dead_requests(masks), channel_multiple=self.channel_multiple)
        keep = keep_indices(self.analysis, removed)
        total = 0
        for site in self.convs:
            conv = site.module
            src = site.node.args[0]
            in_kept = len(keep[src]) if src in keep else conv.in_channels
            depthwise = conv.groups > 1 and conv.groups == conv.in_channels
            in_per_group = 1 if depthwise else conv.in_channels // conv.groups if conv.groups > 1 else in_kept
            rows = keep.get(site.node, torch.arange(conv.out_channels))
            if site.name in masks and self.lowered:
                stripes = int(masks[site.name][rows].flatten(1).sum(1).clamp_min(1).sum())
            else:
                stripes = len(rows) * conv.kernel_size[0] * conv.kernel_size[1]
            total += 2 * site.out_pixels * in_per_group * stripes
        for node, linear in self.linears:
            src = node.args[0]
            cols = linear.in_features
            if src in keep:
                cols = len(keep[src]) * self.analysis.channels[src].expansion
            batch = node.meta["tensor_meta"].shape[0]
            total += 2 * batch * cols * linear.out_features
        return total


def masks_for_flops_target(prepared: fx.GraphModule, flops_target: float, lowering: str, probe: tuple,
                           channel_multiple: int = 1, granularity: str = "stripe"):
    """The smallest cut whose converted FLOPs are ≤ ``flops_target`` × dense.

    FLOPs fall (weakly) as the cut rises, so the smallest such cut prunes the
    least and lands as close to the target as the stripe granularity allows.
    Returns ``(masks, report)`` where ``report`` describes the chosen cut.
    """
    from swpfx.convert import convert_with_masks
    from swpfx.cost import cost

    score = {"stripe": normalized_stripe_scores, "filter": normalized_filter_scores}[granularity]
    scores = score(skeletons(prepared))
    cuts = candidate_cuts(scores)
    dense_flops = cost(prepared, probe).flops
    budget = flops_target * dense_flops
    estimator = FlopsEstimator(prepared, probe, lowered=lowering != "never", channel_multiple=channel_multiple)
    # the estimate covers convs and Linears; other matmuls are unchanged by pruning
    rest = dense_flops - estimator.flops(masks_at_cut(scores, -1.0))

    def estimate(index: int) -> int:
        return rest + estimator.flops(masks_at_cut(scores, float(cuts[index])))

    def real(index: int) -> int:
        gm, _ = convert_with_masks(prepared, masks_at_cut(scores, float(cuts[index])), lowering, probe, channel_multiple)
        return cost(gm, probe).flops

    index = _first_index_within(estimate, budget, 0, len(cuts) - 1)
    flops = real(index)
    if flops > budget:  # the estimate was optimistic (lowering overheads): gallop up, then bisect
        below, step = index, 1
        while flops > budget:
            if index == len(cuts) - 1:
                raise ValueError(
                    f"swpfx.convert: flops_target={flops_target} is not reachable; pruning every stripe of every "
                    f"prepared conv leaves {flops / dense_flops:.3f} of the dense FLOPs (unprepared layers, "
                    "channels pinned by the graph, and one channel kept per tensor)"
                )
            below, index = index, min(index + step, len(cuts) - 1)
            step *= 2
            flops = real(index)
        found = _first_index_within(lambda i: real(i) if i != index else flops, budget, below + 1, index)
        index, flops = found, (flops if found == index else real(found))
    cut = float(cuts[index])
    report = {
        "flops_target": flops_target,
        "granularity": granularity,
        "normalized_cut": cut,
        "flops_ratio": flops / dense_flops,
        "kept_stripes": int(sum(int((s > cut).sum()) for s in scores.values())),
        "total_stripes": int(sum(s.numel() for s in scores.values())),
    }
    return masks_at_cut(scores, cut), report


def _first_index_within(estimate, budget: float, lo: int, hi: int) -> int:
    """Smallest index in [lo, hi] whose estimate is ≤ budget (hi if none is)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo

"""Pruning to a FLOPs budget: the fewest pruned stripes (or filters) that meet ``flops_target`` × the dense FLOPs.

After BatchNorm a filter's skeleton scale is arbitrary (DESIGN.md §2, §9), so
``|I|`` alone cannot rank stripes. Here stripes are put in one total order by
their scale-free importance (:func:`swpfx.stripe_importance`; ties broken by
weight magnitude, then position), and the budget prunes the k lowest for the
smallest k whose converted graph's FLOPs — as :func:`swpfx.cost` counts them for
the lowering mode in use, lowering ops included — are at most the target. One
more k prunes one more unit, so a budget never jumps from "keep all" to "keep
nothing", even on a freshly prepared model whose skeletons are all 1.

The search runs in two phases: a binary search on an analytic FLOPs estimate
(the channel analysis is done once; k only changes which filters are dead and
how many stripes each keeps), then exact checks with the real pipeline and
:func:`swpfx.cost`, stepping k up until the real count meets the budget.
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
from swpfx.importance import DEFAULT_SCOPE, normalize_per_layer, stripe_importance, stripe_ranks
from swpfx.pipeline import convert_with_masks
from swpfx.prepare import skeletons


def pruning_order(prepared: fx.GraphModule, granularity: str = "stripe", scope: str = DEFAULT_SCOPE):
    """``(ranks, always, units)``: the order in which a budget prunes, strongest last.

    ``ranks[name]`` (O, Kh, Kw) holds each stripe's position in one total order —
    its own with ``granularity="stripe"``, its filter's with ``"filter"`` (filters
    ranked by summed stripe importance) — by scale-free importance
    (:func:`swpfx.stripe_importance`), ties broken by weight magnitude and then
    position, so every step of a budget search prunes one more unit. ``scope``: as in
    the gradual training rule, importance over its layer's mean (``"layer"``) or raw
    (``"global"``). ``always`` marks stripes that are exactly
    zero (hard-zeroed in training): they go at any budget. ``units`` is how many
    units the order has.
    """
    scores = stripe_importance(prepared)
    if scope == "layer":
        scores = normalize_per_layer(scores)
    skels = skeletons(prepared)
    always = {name: (s.detach() == 0).cpu() for name, s in skels.items()}
    weight_size = stripe_importance(prepared, rule="skeleton")  # |I| breaks ties of equal importance
    if granularity == "stripe":
        ranks = stripe_ranks(scores, tiebreak=weight_size)
        return ranks, always, sum(r.numel() for r in ranks.values())
    filter_ranks = stripe_ranks({n: s.flatten(1).sum(1) for n, s in scores.items()},
                                tiebreak={n: s.flatten(1).sum(1) for n, s in weight_size.items()})
    ranks = {n: r[:, None, None].expand_as(always[n]) for n, r in filter_ranks.items()}
    return ranks, always, sum(r.numel() for r in filter_ranks.values())


def masks_pruning(ranks: dict[str, torch.Tensor], always: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Keep masks that prune the ``count`` lowest-ranked units and every stripe in ``always``.

    Example:
        >>> ranks = {"a": torch.tensor([[[2, 0]], [[1, 3]]])}
        >>> masks_pruning(ranks, {"a": torch.zeros(2, 1, 2, dtype=torch.bool)}, 2)["a"].flatten().tolist()
        [True, False, False, True]
    """
    return {name: (r >= count) & ~always[name] for name, r in ranks.items()}


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
                           channel_multiple: int = 1, granularity: str = "stripe", scope: str = DEFAULT_SCOPE):
    """The fewest pruned units (of :func:`pruning_order`) whose converted FLOPs are ≤ ``flops_target`` × dense.

    FLOPs fall (weakly) as more units are pruned, so the smallest such count
    prunes the least and lands as close to the target as one unit allows.
    Returns ``(masks, report)`` where ``report`` describes the chosen cut.
    """
    from swpfx.cost import cost

    ranks, always, units = pruning_order(prepared, granularity, scope)
    dense_flops = cost(prepared, probe).flops
    budget = flops_target * dense_flops
    estimator = FlopsEstimator(prepared, probe, lowered=lowering != "never", channel_multiple=channel_multiple)
    # the estimate covers convs and Linears; other matmuls are unchanged by pruning
    rest = dense_flops - estimator.flops({name: torch.ones_like(r, dtype=torch.bool) for name, r in ranks.items()})

    def estimate(count: int) -> int:
        return rest + estimator.flops(masks_pruning(ranks, always, count))

    def real(count: int) -> int:
        gm, _ = convert_with_masks(prepared, masks_pruning(ranks, always, count), lowering, probe, channel_multiple)
        return cost(gm, probe).flops

    count = _first_index_within(estimate, budget, 0, units)
    flops = real(count)
    if flops > budget:  # the estimate was optimistic (lowering overheads): gallop up, then bisect
        below, step = count, 1
        while flops > budget:
            if count == units:
                raise ValueError(
                    f"swpfx.convert: flops_target={flops_target} is not reachable; pruning every stripe of every "
                    f"prepared conv leaves {flops / dense_flops:.3f} of the dense FLOPs (unprepared layers, "
                    "channels pinned by the graph, and one channel kept per tensor)"
                )
            below, count = count, min(count + step, units)
            step *= 2
            flops = real(count)
        found = _first_index_within(lambda i: real(i) if i != count else flops, budget, below + 1, count)
        count, flops = found, (flops if found == count else real(found))
    masks = masks_pruning(ranks, always, count)
    report = {
        "flops_target": flops_target,
        "granularity": granularity,
        "importance": f"scale_free/{scope}",
        "pruned_units": count,
        "flops_ratio": flops / dense_flops,
        "kept_stripes": int(sum(int(m.sum()) for m in masks.values())),
        "total_stripes": int(sum(m.numel() for m in masks.values())),
    }
    return masks, report


def _first_index_within(estimate, budget: float, lo: int, hi: int) -> int:
    """Smallest index in [lo, hi] whose estimate is ≤ budget (hi if none is)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo

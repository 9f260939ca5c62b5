"""Pruning to a budget: the cut that meets ``flops_target`` or ``latency_target`` × the dense model's cost.

After BatchNorm a filter's skeleton scale is arbitrary (DESIGN.md §2, §9), so
``|I|`` alone cannot rank stripes. Here units are put in one total order by the
scale-free importance (:func:`swpfx.stripe_importance`, over its layer's mean;
ties broken by weight magnitude, then position), so one more step of a budget
prunes one more unit and a budget never jumps from "keep all" to "keep nothing",
even on a freshly prepared model whose skeletons are all 1. Three orders:

``"stripe"``   single stripes;
``"filter"``   whole filters (summed importance): removes channels;
``"snapped"``  each filter steps down a ladder of lowering-friendly shapes —
               full kernel, its best centre row or centre column, its centre
               stripe, nothing — so pruned filters become 1×k, k×1 or 1×1 convs
               that the ``boxes`` lowering turns into speed.

A cut is priced by :class:`swpfx.estimate.ConversionEstimate`: the FLOPs (exactly
what :func:`swpfx.cost` counts for the built graph) and the predicted ONNX
Runtime latency (the runtime model, with the same form choice the lowering
makes) of the converted graph, without building it. ``flops_target`` bisects on
the count of the chosen order; ``latency_target`` does so for every order — each
also with importance counted per predicted second of its layer (``"filter/ms"``,
...) — walks channel blocks down one layer group at a time (``"blocks"``, as a
channel pruner with ``round_to`` does), tries blocks-then-stripes mixes, and
keeps the cut that keeps the most importance: it can always fall back to
removing filters, so it is never worse than filter pruning by that measure.
Its single-unit orders stop at a floor (:func:`collapse_floor`): every conv on
all paths from input to output keeps a channel block of filters with one
stripe each, so no cut severs the network. :class:`swpfx.BudgetPruner` trains
towards the same cut.
Either way, stripes whose pruning buys nothing — in convs that stay dense, or
in pruned filters the graph must keep — are given back
(:func:`revive_free_stripes`) before a cut is priced.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from swpfx.estimate import ConversionEstimate
from swpfx.importance import DEFAULT_SCOPE, normalize_per_layer, stripe_importance, stripe_ranks
from swpfx.passes.graph_utils import on_every_path
from swpfx.prepare import skeletons

GRANULARITIES = ("stripe", "filter", "snapped")
LATENCY_ORDERS = ("filter", "snapped", "stripe", "filter/ms", "snapped/ms", "stripe/ms")
DEFAULT_MIXES = 3  # filter-then-stripe cuts tried by the latency budget


class UnreachableTarget(ValueError):
    """A budget no cut meets; ``closest`` is the lowest ratio any cut reached."""

    def __init__(self, message: str, closest: float):
        super().__init__(message)
        self.closest = closest

    def __reduce__(self):  # picklable, for errors raised in worker processes
        return type(self), (str(self), self.closest)


def importance_scores(prepared: fx.GraphModule, scope: str = DEFAULT_SCOPE) -> dict[str, torch.Tensor]:
    """Scale-free stripe importance, over its layer's mean (``scope="layer"``) or raw (``"global"``)."""
    scores = stripe_importance(prepared)
    return normalize_per_layer(scores) if scope == "layer" else scores


def snapped_ladders(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per filter of one conv, the steps of its shape ladder: ``(step of each stripe (O, kh, kw), step scores)``.

    Step 0 removes what lies outside the filter's best centre row or column (by
    summed score), step 1 the rest of that line but the centre, step 2 the
    centre. ``step_scores`` (O, 3) is the importance each step removes per stripe,
    made non-decreasing along the ladder so a global order keeps each filter's
    steps in sequence. A 1×1 kernel has only the last step.

    >>> step, score = snapped_ladders(torch.tensor([[[1., 5., 1.], [0., 9., 0.], [1., 5., 1.]]]))
    >>> step[0].tolist(), [round(v, 3) for v in score[0].tolist()]
    ([[0, 1, 0], [0, 2, 0], [0, 1, 0]], [0.667, 5.0, 9.0])
    """
    o, kh, kw = scores.shape
    ci, cj = kh // 2, kw // 2
    row, col = torch.zeros(kh, kw, dtype=torch.bool), torch.zeros(kh, kw, dtype=torch.bool)
    row[ci, :], col[:, cj] = True, True
    centre = torch.zeros(kh, kw, dtype=torch.bool)
    centre[ci, cj] = True
    use_row = (scores * row).flatten(1).sum(1) >= (scores * col).flatten(1).sum(1)
    line = torch.where(use_row[:, None, None], row, col)
    step = torch.full((o, kh, kw), 1, dtype=torch.long)
    step[~line] = 0
    step[:, ci, cj] = 2
    totals = torch.stack([(scores * (step == s)).flatten(1).sum(1) for s in range(3)], 1)
    counts = torch.stack([(step == s).flatten(1).sum(1) for s in range(3)], 1).clamp_min(1)
    step_scores = torch.cummax(totals / counts, dim=1).values
    return step, step_scores


def hard_zeros(prepared: fx.GraphModule, sticky_zeros: bool = True) -> dict[str, torch.Tensor]:
    """Per conv, the stripes that are exactly zero (hard-zeroed in training): every cut prunes them.

    None are, unless ``sticky_zeros``.
    """
    return {name: (s.detach() == 0).cpu() & sticky_zeros for name, s in skeletons(prepared).items()}


def pruning_order(prepared: fx.GraphModule, granularity: str = "stripe", scope: str = DEFAULT_SCOPE,
                  sticky_zeros: bool = True, stripe_seconds: dict[str, float] | None = None):
    """``(ranks, always, units)``: the order in which a budget prunes, strongest last.

    ``ranks[name]`` (O, Kh, Kw) holds each stripe's position in one total order of
    units — the stripe's own (``"stripe"``), its filter's (``"filter"``) or its
    ladder step's (``"snapped"``, see :func:`snapped_ladders`) — by scale-free
    importance (:func:`importance_scores`), ties broken by weight magnitude and
    position. ``always`` marks stripes that are exactly zero (hard-zeroed in
    training): they go at any budget, unless ``sticky_zeros=False`` (then they
    only rank first, by their zero importance, and may be given back).
    ``units`` is how many units the order has. With ``stripe_seconds`` (per conv,
    its predicted dense seconds per stripe) importance is counted per second:
    a unit of an expensive layer goes before an equally important one of a cheap layer.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"swpfx.convert: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    scores = importance_scores(prepared, scope)
    if stripe_seconds is not None:
        scores = {n: s / stripe_seconds[n] if stripe_seconds.get(n) else s for n, s in scores.items()}
    always = hard_zeros(prepared, sticky_zeros)
    weight_size = stripe_importance(prepared, rule="skeleton")  # |I| breaks ties of equal importance
    if granularity == "stripe":
        ranks = stripe_ranks(scores, tiebreak=weight_size)
        return ranks, always, sum(r.numel() for r in ranks.values())
    if granularity == "filter":
        unit_scores = {n: s.flatten(1).sum(1) for n, s in scores.items()}
        ties = {n: s.flatten(1).sum(1) for n, s in weight_size.items()}
        filter_ranks = stripe_ranks(unit_scores, tiebreak=ties)
        ranks = {n: r[:, None, None].expand_as(always[n]) for n, r in filter_ranks.items()}
        return ranks, always, sum(r.numel() for r in filter_ranks.values())
    ladders = {n: snapped_ladders(s.detach().double().cpu()) for n, s in scores.items()}
    # the step index breaks ties first, so a filter's steps always come in ladder order
    step_ranks = stripe_ranks({n: score for n, (_, score) in ladders.items()},
                              tiebreak={n: torch.arange(3.0).expand_as(score) for n, (_, score) in ladders.items()})
    ranks = {n: step_ranks[n].gather(1, step.flatten(1)).view_as(step) for n, (step, _) in ladders.items()}
    return ranks, always, sum(r.numel() for r in step_ranks.values())


def collapse_floor(scores: dict[str, torch.Tensor], always: dict[str, torch.Tensor], filters: int,
                   essential: set[str]) -> dict[str, torch.Tensor]:
    """Per conv, the stripes no latency cut removes: in an ``essential`` conv, the best stripe of each of
    its ``filters`` best filters; none elsewhere.

    A global order can prune every stripe of a cheap layer; for a conv on every
    path from input to output (:func:`on_every_path`) that severs the network,
    and a net trained towards such a cut learns nothing (10 % on the no-BN demo
    net at 0.35 of dense latency, benchmarks/RESULTS.md). A channel block of
    filters with one stripe each keeps the path open at the cost of a 1×1-like
    conv; conversion keeps a block of channels anyway. A conv off that path (a
    residual branch) may go entirely. Hard zeros (``always``) are never part of the floor.

    >>> scores = {"a": torch.tensor([[[1., 4.]], [[3., 2.5]], [[0., 1.]]]), "b": torch.ones(1, 1, 2)}
    >>> always = {n: torch.zeros_like(s, dtype=torch.bool) for n, s in scores.items()}
    >>> floor = collapse_floor(scores, always, 2, {"a"})
    >>> floor["a"].flatten(1).tolist(), bool(floor["b"].any())
    ([[False, True], [True, False], [False, False]], False)
    """
    floors = {name: torch.zeros_like(always[name]) for name in scores}
    for name, score in ((n, s) for n, s in scores.items() if n in essential):
        flat = score.detach().double().cpu().flatten(1).masked_fill(always[name].flatten(1), -math.inf)
        best_filters = flat.clamp_min(0).sum(1).topk(min(filters, len(flat))).indices
        floor = torch.zeros_like(flat, dtype=torch.bool)
        floor[best_filters, flat[best_filters].argmax(1)] = True
        floors[name] = (floor & ~always[name].flatten(1)).view_as(always[name])
    return floors


def masks_pruning(ranks: dict[str, torch.Tensor], always: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    """Keep masks that prune the ``count`` lowest-ranked units and every stripe in ``always``.

    Example:
        >>> ranks = {"a": torch.tensor([[[2, 0]], [[1, 3]]])}
        >>> masks_pruning(ranks, {"a": torch.zeros(2, 1, 2, dtype=torch.bool)}, 2)["a"].flatten().tolist()
        [True, False, False, True]
    """
    return {name: (r >= count) & ~always[name] for name, r in ranks.items()}


def revive_free_stripes(estimator: ConversionEstimate, masks: dict[str, torch.Tensor],
                        always: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``masks`` with every pruned stripe that would buy nothing given back.

    A conv that stays a dense conv runs all its kept filters' stripes anyway, and
    a pruned filter that the graph keeps (coupled, pinned, or kept to round the
    channel count) is computed anyway: their pruned stripes only cost accuracy.
    Only stripes zeroed in training (``always``) stay pruned there. FLOPs and
    predicted latency are unchanged (the graph keeps its shape; dense convs stay
    dense).
    """
    keep = estimator.keep(masks)
    decisions = estimator.estimate(masks).decisions
    revived = dict(masks)
    for site, decision in zip(estimator.convs, decisions):
        if site.name not in masks or not decision.form.startswith("dense"):
            continue
        rows = keep.get(site.node) if site.node in estimator.analysis.producers else None
        mask = masks[site.name].clone()
        allowed = ~always[site.name]
        if rows is None:
            mask = allowed.clone()
        else:
            mask[rows] = allowed[rows]
        revived[site.name] = mask
    return revived


def kept_importance(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]) -> float:
    """Summed importance of the kept stripes (what a cut preserves)."""
    return float(sum((scores[n].detach().double().cpu() * masks[n]).sum() for n in masks))


def first_index_within(value, budget: float, lo: int, hi: int) -> int:
    """Smallest index in [lo, hi] whose ``value`` is ≤ budget, by bisection (hi if none is).

    Costs fall as more units are pruned, up to a lowering that a runtime model
    finds slower at one count and faster at the next, so this is the boundary
    bisection lands on, within a few units of the smallest.
    """
    while lo < hi:
        mid = (lo + hi) // 2
        if value(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def fewest_units(cost, raw, revived, budget: float, units: int) -> int:
    """The fewest pruned units whose ``cost(masks)`` is ≤ ``budget``, by bisection on ``raw(count)`` masks.

    Revival (:func:`revive_free_stripes`) keeps every conv's form, so it almost
    never changes the cost and bisection can skip it; the count found is checked
    on ``revived(count)`` and, if revival did change the cost, searched again with it.
    """
    count = first_index_within(lambda c: cost(raw(c)), budget, 0, units)
    if cost(revived(count)) > budget:
        count = first_index_within(lambda c: cost(revived(c)), budget, 0, units)
    return count


def channel_groups(estimator: ConversionEstimate) -> list[list[list[tuple[str, int]]]]:
    """The removable channels, grouped by the convs that produce them: per group, per channel, its filters.

    A channel (a class of the channel analysis) is removed only when every filter
    producing it is pruned, so a group's channels are removed together across
    its convs (a residual stage's convs form one group). Each filter is
    ``(conv name, filter index)``; channels that are pinned, or produced by an
    unprepared conv, are left out.
    """
    names = {site.node: site.name for site in estimator.convs if site.name in estimator.full}
    blocked = estimator.analysis.blocked_classes() | set(estimator.unfoldable)
    groups: dict[frozenset, list[list[tuple[str, int]]]] = {}
    for cls, producers in estimator.analysis.producer_elements_by_class().items():
        if cls in blocked or any(node not in names for node, _ in producers):
            continue
        filters = [(names[node], c) for node, c in producers]
        groups.setdefault(frozenset(n for n, _ in filters), []).append(filters)
    return list(groups.values())


def block_removals(estimator: ConversionEstimate, scores: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                   budget: float, block: int) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Greedy block removal from ``start`` until the predicted seconds are ≤ ``budget``: (masks, seconds) per step.

    A step prunes the ``block`` least important live filters (or as many as
    align the live count to ``block``; two blocks if one saves nothing) of one
    of :func:`channel_groups`' groups — a channel block, across the group's
    convs; each group keeps one block — or of one conv of a group of several
    (its filters stop computing; the channels stay, fed by the other convs).
    Of the steps that reach the budget it takes the one losing least
    importance, else the one losing least per second saved. Global importance
    orders prune filters one at a time across layers, so the first count that
    meets a target can overshoot it by a whole expensive block; this walks the
    blocks one layer at a time, as a channel pruner with ``round_to`` does.
    """
    masks = {n: m.clone() for n, m in start.items()}
    seconds = estimator.estimate(masks).seconds
    steps = [(masks, seconds)]
    units = []  # (per element of the unit, the filters pruned together; the channel group it belongs to)
    for group in channel_groups(estimator):
        units.append((group, group))
        convs = sorted({n for filters in group for n, _ in filters})
        if len(convs) > 1:
            units += [([[(n, f) for n, f in filters if n == conv] for filters in group], group) for conv in convs]
    stale = {}  # unit -> (importance lost, seconds saved) when last evaluated
    while seconds > budget:
        if not stale or any(saved >= seconds - budget for _, saved in stale.values()):
            # near the budget (or at the start): evaluate every unit; prefer the cheapest step that reaches it
            state = _filter_state(scores, masks)
            moves = {i: move for i, unit in enumerate(units)
                     if (move := _prune_block(estimator, state, masks, unit, block, seconds))}
            if not moves:
                break
            stale = {i: (loss, seconds - after) for i, (loss, after, _) in moves.items()}
            reaching = [m for m in moves.values() if m[1] <= budget]
            best = min(reaching, key=lambda m: m[0]) if reaching else \
                min(moves.values(), key=lambda m: m[0] / (seconds - m[1]))
        else:
            best = _lazy_best(estimator, scores, masks, units, block, seconds, stale)
            if best is None:
                break
        _, seconds, masks = best
        steps.append((masks, seconds))
    return steps


def _lazy_best(estimator, scores, masks, units, block: int, seconds: float, stale: dict):
    """The step losing least importance per second saved, re-evaluating units lazily (best stale ratio first).

    A unit's ratio rarely improves when other layers shrink, so once a freshly
    evaluated unit is at least as good as every other unit's last ratio it is
    taken (lazy greedy); far from the budget this evaluates a few units per
    step instead of all.
    """
    state = _filter_state(scores, masks)
    while stale:
        i = min(stale, key=lambda k: stale[k][0] / stale[k][1])
        move = _prune_block(estimator, state, masks, units[i], block, seconds)
        if move is None:
            del stale[i]
            continue
        stale[i] = (move[0], seconds - move[1])
        ratio = move[0] / (seconds - move[1])
        if all(ratio <= loss / saved for k, (loss, saved) in stale.items() if k != i):
            return move
    return None


def _filter_state(scores, masks) -> tuple[dict, dict]:
    """Per conv, as lists over its filters: whether each is live, and the importance of its kept stripes."""
    alive = {n: m.flatten(1).any(1).tolist() for n, m in masks.items()}
    kept = {n: (scores[n].detach().double().cpu() * m).flatten(1).sum(1).tolist() for n, m in masks.items()}
    return alive, kept


def _prune_block(estimator, state, masks, unit, block: int, seconds: float):
    """``(importance lost, seconds, masks)`` after pruning ``unit``'s next block, or None if nothing is saved.

    A channel group keeps one block of live channels (removing the rest would
    cut the network's path through them); one conv of a coupled group may lose
    all its filters while the others still produce that block.
    """
    elements, group = unit
    alive, kept = state
    live = [filters for filters in elements if any(alive[n][f] for n, f in filters)]
    losses = [sum(kept[n][f] for n, f in filters) for filters in live]
    order = sorted(range(len(live)), key=losses.__getitem__)
    first = len(live) % block or block
    for take in (first, first + block):  # a second block when one alone leaves the runtime's channel block
        if take > len(live):
            return None
        pruned = {pair for i in order[:take] for pair in live[i]}
        if sum(any(alive[n][f] and (n, f) not in pruned for n, f in filters) for filters in group) < \
                min(block, len(group)):
            return None
        moved = {n: m.clone() for n, m in masks.items()}
        for n, f in pruned:
            moved[n][f] = False
        after = estimator.estimate(moved).seconds
        if after < seconds:
            return sum(losses[i] for i in order[:take]), after, moved
    return None


def check_fraction(name: str, value, caller: str = "convert") -> None:
    """Raise a ValueError naming ``caller`` unless ``value`` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value <= 1:
        raise ValueError(f"swpfx.{caller}: {name} must be a fraction in (0, 1], got {value!r}")


def _cut_report(estimate, masks, count: int, order: str, scope: str) -> dict:
    return {
        "granularity": order,
        "importance": f"scale_free/{scope}",
        "pruned_units": count,
        "kept_stripes": int(sum(int(m.sum()) for m in masks.values())),
        "total_stripes": int(sum(m.numel() for m in masks.values())),
        "decisions": [vars(d) for d in estimate.decisions],
    }


def masks_for_flops_target(prepared: fx.GraphModule, flops_target: float, lowering: str, probe: tuple,
                           channel_multiple: int = 1, granularity: str = "stripe", scope: str = DEFAULT_SCOPE,
                           runtime_model=None, sticky_zeros: bool = True):
    """The fewest pruned units (of :func:`pruning_order`) whose converted FLOPs are ≤ ``flops_target`` × dense.

    Returns ``(masks, report)``; ``report["flops_ratio"]`` is the converted graph's
    FLOPs over the prepared model's, exactly as :func:`swpfx.cost` counts them.
    """
    from swpfx.cost import cost

    check_fraction("flops_target", flops_target)
    ranks, always, units = pruning_order(prepared, granularity, scope, sticky_zeros)
    dense_flops = cost(prepared, probe).flops
    estimator = ConversionEstimate(prepared, probe, lowering, channel_multiple, runtime_model)
    rest = dense_flops - estimator.estimate({n: torch.ones_like(r, dtype=torch.bool) for n, r in ranks.items()}).flops

    def cut(count: int) -> dict[str, torch.Tensor]:
        return revive_free_stripes(estimator, masks_pruning(ranks, always, count), always)

    budget = flops_target * dense_flops
    count = fewest_units(lambda masks: rest + estimator.estimate(masks).flops,
                         lambda c: masks_pruning(ranks, always, c), cut, budget, units)
    masks = cut(count)
    estimate = estimator.estimate(masks)
    reached = (rest + estimate.flops) / dense_flops
    if reached > flops_target:
        raise ValueError(
            f"swpfx.convert: flops_target={flops_target} is not reachable; the closest reachable value is "
            f"{reached:.3f} (pruning every stripe of every prepared conv; unprepared layers, channels pinned by "
            "the graph and one channel kept per tensor remain)")
    return masks, {"flops_target": flops_target, "flops_ratio": reached,
                   **_cut_report(estimate, masks, count, granularity, scope)}


def masks_for_latency_target(prepared: fx.GraphModule, latency_target: float, lowering: str, probe: tuple,
                             runtime_model, channel_multiple: int, scope: str = DEFAULT_SCOPE,
                             orders=LATENCY_ORDERS, batch: int = 1, sticky_zeros: bool = True,
                             mixes: int = DEFAULT_MIXES, blocks: bool = True):
    """The cut of greatest kept importance whose predicted latency is ≤ ``latency_target`` × dense.

    Latency is ``runtime_model``'s (ONNX Runtime's, or PyTorch's with the fused
    kernel for ``lowering="fused"``), predicted for runs of ``batch`` samples. For each order of
    ``orders`` the smallest count meeting the target is found by bisection on
    the runtime model's prediction of the converted graph. With ``blocks``,
    channel blocks are also removed greedily, one layer group at a time
    (:func:`block_removals`, ``"blocks"``). Filter removal moves latency in
    coarse steps (whole channel blocks), so ``mixes`` mixed cuts are tried too:
    block removal (or, without ``blocks``, the filter order) stopped at
    ``mixes`` points between dense and the target, the rest of the way in the
    ``"snapped"`` and ``"stripe"`` orders (``"blocks+snapped/ms"``, ...). An
    order named ``".../ms"`` ranks importance per predicted second
    (:func:`pruning_order`'s ``stripe_seconds``). The winner keeps the most
    importance (:func:`kept_importance`). Returns
    ``(masks, report)`` with every order's best result under ``"candidates"``.
    """
    check_fraction("latency_target", latency_target)
    if lowering == "never":
        raise ValueError("swpfx.convert: latency_target needs lowering='auto' or 'fused' (the runtime model picks the forms)")
    estimator = ConversionEstimate(prepared, probe, lowering, channel_multiple, runtime_model, batch=batch)
    scores = importance_scores(prepared, scope)
    dense_estimate = estimator.estimate({n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()})
    dense = dense_estimate.seconds
    budget = latency_target * dense
    seconds = {d.conv: d.seconds / d.total_stripes for d in dense_estimate.decisions if d.conv}
    built = {order: pruning_order(prepared, order.split("/")[0], scope, sticky_zeros,
                                  seconds if order.endswith("/ms") else None) for order in orders}
    block = channel_multiple if channel_multiple > 1 else runtime_model.block
    essential = on_every_path(estimator.gm.graph)
    zeros = hard_zeros(prepared, sticky_zeros)
    floor = collapse_floor(scores, zeros, block, {site.name for site in estimator.convs if site.node in essential})

    def cutter(order: str, prefix: dict | None = None):
        ranks, always, units = built[order]

        def raw(count: int) -> dict[str, torch.Tensor]:
            masks = {n: m | floor[n] for n, m in masks_pruning(ranks, always, count).items()}
            return masks if prefix is None else {n: m & prefix[n] for n, m in masks.items()}
        return raw, always, units

    def smallest(raw, always, units: int, limit: float) -> int:
        return fewest_units(lambda masks: estimator.estimate(masks).seconds, raw,
                            lambda c: revive_free_stripes(estimator, raw(c), always), limit, units)

    searches = [(order, *cutter(order), None) for order in orders]
    prefix_order = "filter/ms" if "filter/ms" in built else "filter"
    rest = [o for o in orders if o.endswith("/ms") and not o.startswith("filter")] or \
        [o for o in orders if not o.startswith("filter")]
    stop_budgets = [dense * (1 - (1 - latency_target) * j / (mixes + 1)) for j in range(1, mixes + 1)]
    if blocks:  # channel blocks removed layer by layer: alone, and as the prefix of the mixes
        steps = block_removals(estimator, scores, {n: ~a for n, a in zeros.items()}, budget, block)
        searches.append(("blocks", lambda count: steps[min(count, len(steps) - 1)][0], zeros, len(steps) - 1, None))
        stops = sorted({next((i for i, (_, s) in enumerate(steps) if s <= limit), len(steps) - 1)
                        for limit in stop_budgets} - {0}) if rest else []
        for stop in stops:
            searches += [(f"blocks+{order}", *cutter(order, steps[stop][0]), stop) for order in rest]
    elif prefix_order in built and rest and mixes > 0:
        stops = sorted({smallest(*cutter(prefix_order), limit) for limit in stop_budgets})
        for stop in stops:
            prefix = masks_pruning(*built[prefix_order][:2], stop)
            searches += [(f"{prefix_order}+{order}", *cutter(order, prefix), stop) for order in rest]
    candidates, best, closest = {}, None, 1.0
    for name, raw, always, units, stop in searches:
        count = smallest(raw, always, units, budget)
        masks = revive_free_stripes(estimator, raw(count), always)
        estimate = estimator.estimate(masks)
        ratio = estimate.seconds / dense
        closest = min(closest, ratio)
        kept = kept_importance(masks, scores)
        pruned = count if stop is None else [stop, count]
        found = {"pruned_units": pruned, "latency_ratio": ratio, "kept_importance": kept,
                 "meets_target": ratio <= latency_target}
        if name not in candidates or (found["meets_target"], kept) > (candidates[name]["meets_target"],
                                                                        candidates[name]["kept_importance"]):
            candidates[name] = found
        if ratio <= latency_target and (best is None or kept > best[0]):
            best = (kept, name, pruned, masks, estimate, ratio)
    if best is None:
        raise UnreachableTarget(
            f"swpfx.convert: latency_target={latency_target} is not reachable on this model; the closest "
            f"reachable value is {closest:.3f} of the dense latency (runtime model: {runtime_model.source}; every "
            f"conv on all paths keeps {block} filters with one stripe each)", closest)
    kept, order, count, masks, estimate, ratio = best
    total = kept_importance({n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}, scores)
    report = {"latency_target": latency_target, "latency_ratio": ratio, "predicted_ms": 1e3 * estimate.seconds,
              "dense_predicted_ms": 1e3 * dense, "kept_importance": kept / total if total else 1.0,
              "batch": batch, "runtime_model": runtime_model.source, "channel_multiple": channel_multiple,
              **_cut_report(estimate, masks, count, order, scope),
              "candidates": candidates}
    return masks, report

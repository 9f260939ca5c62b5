"""Central Filter pruning and the L1-norm filter-pruning baseline, on any traceable CNN.

Central Filter (CF, "Network Compression via Central Filter", arXiv 2112.05493):
channels whose post-activation feature maps are highly correlated are linked
into a graph; in each connected component one *central* channel is kept, the
others are removed, and the next layer's input weights of every removed channel
are added onto its central channel's (``W_next[:, c] += W_next[:, p]``), so a
removed map that equals its central map is compensated exactly.

The selection math lives in pure functions (numpy / scipy in, lists and
dicts out): :func:`removal_count`, :func:`similarity_threshold`,
:func:`closeness`, :func:`select_central_filters`, :func:`select_smallest`.
The graph work is done by the channel analysis (``swpfx.passes.analyze_channels``),
the similarity measurement (``swpfx.passes.measure_channel_similarity``) and the
channel removal (``swpfx.passes.remove_channels``).

Differences from the reference implementation, on purpose:
- every removed channel is assigned to a channel that is *kept* (the
  reference can assign it to another removed channel and lose the compensation);
- the threshold search is exact (no ``eps`` steps): the number of removable
  channels only changes at similarity values, so the search runs over them;
- closeness centrality is networkx's definition on the thresholded graph with distance
  ``1 − similarity`` (the reference uses the local proxy ``deg / Σ(1024 − s)``);
- which convs are prunable comes from the channel-dependency analysis, not
  from architecture names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components
from scipy.sparse.csgraph import shortest_path
from torch import fx, nn

from swpfx.passes.graph_utils import META_KEY
from swpfx.passes.measure_channel_similarity import measure_channel_similarity
from swpfx.passes.modes import eval_mode
from swpfx.tracing import normalize_example_inputs, trace

META = META_KEY  # the node.meta / model.meta key of swpfx's entries
# Distance floor for identical maps (similarity 1): a zero distance would read as "no path" (closeness 0).
MIN_DISTANCE = 1e-9


# ================================================================ pure selection math


def removal_count(channels: int, rate: float) -> int:
    """``ceil(channels · rate)``, at most ``channels − 1`` (a layer always keeps a channel).

    The product is rounded to 9 decimals first so that e.g. ``10 · 0.3`` gives 3, not 4.

    Example:
        >>> removal_count(64, 0.4), removal_count(10, 0.3), removal_count(3, 0.99), removal_count(8, 0.0)
        (26, 3, 2, 0)
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
    return min(math.ceil(round(channels * rate, 9)), max(channels - 1, 0))


def connected_components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes for the undirected edges ``(rows[e], cols[e])``.

    Example:
        >>> connected_components(4, np.array([0, 2]), np.array([1, 3])).tolist()
        [0, 0, 1, 1]
    """
    adjacency = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    return scipy_components(adjacency, directed=False)[1]


@dataclass(frozen=True)
class Threshold:
    """The similarity threshold ``m``: the graph has an edge ``(i, j)`` iff ``similarity[i, j] > m``.

    ``edges`` is an ``(E, 2)`` array of ``i < j`` pairs. ``removable`` = (nodes
    touching an edge) − (their connected components), the number of channels
    one-per-component pruning removes. It equals the requested count unless ties
    in the similarity values make that impossible; then it is the smallest
    achievable count above it.
    """

    value: float
    edges: np.ndarray
    removable: int


def _check_similarity(similarity) -> np.ndarray:
    s = np.asarray(similarity, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square matrix, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("similarity contains NaN or infinite values")
    return (s + s.T) / 2


def similarity_threshold(similarity, k: int) -> Threshold:
    """The largest threshold ``m`` at which pruning one channel per component removes at least ``k``.

    ``removable(m) = N − components(edges s > m)`` is a non-increasing step
    function of ``m`` that only changes at the similarity values, so the binary
    search runs over the sorted distinct values instead of over floats with an
    ``eps`` (the reference's search can miss a step). ``m`` is the first value
    below the chosen level, so ``edges = {(i, j): s_ij > m}`` exactly. The matrix
    is symmetrised first.

    Example:
        >>> s = np.array([[1, .9, .1, .2], [.9, 1, .3, .1], [.1, .3, 1, .8], [.2, .1, .8, 1]])
        >>> t = similarity_threshold(s, 2)
        >>> t.value, t.edges.tolist(), t.removable
        (0.3, [[0, 1], [2, 3]], 2)
    """
    s = _check_similarity(similarity)
    n = s.shape[0]
    if not 0 <= k <= max(n - 1, 0):
        raise ValueError(f"cannot remove {k} of {n} channels one per component (at most {max(n - 1, 0)})")
    rows, cols = np.triu_indices(n, 1)
    values = s[rows, cols]
    levels = np.unique(values)[::-1]  # distinct similarity values, descending
    if k == 0:
        return Threshold(float(levels[0]) if len(levels) else math.inf, np.zeros((0, 2), dtype=np.int64), 0)

    def removable(level: float) -> int:
        keep = values >= level
        return n - int(connected_components(n, rows[keep], cols[keep]).max()) - 1

    lo, hi = 0, len(levels) - 1  # removable(levels[hi]) = n − 1 ≥ k: the complete graph
    while lo < hi:
        mid = (lo + hi) // 2
        if removable(levels[mid]) >= k:
            hi = mid
        else:
            lo = mid + 1
    keep = values >= levels[lo]
    m = float(levels[lo + 1]) if lo + 1 < len(levels) else -math.inf
    return Threshold(m, np.stack([rows[keep], cols[keep]], axis=1), removable(levels[lo]))


def closeness(similarity, edges) -> np.ndarray:
    """Closeness centrality of each channel on the graph ``edges``, distance ``1 − similarity``.

    The value is networkx's ``closeness_centrality`` (Wasserman–Faust scaling for
    graphs that are not connected); isolated channels get 0. Distances are floored
    at ``MIN_DISTANCE`` so identical maps (similarity 1) count as very close rather
    than as no path. Shortest paths come from scipy's C implementation
    (networkx's pure-Python Dijkstra takes minutes on the dense graphs of
    1000-channel layers); the tests check the values against networkx.

    Example:
        >>> s = np.array([[1, .9, .8], [.9, 1, .1], [.8, .1, 1]])
        >>> c = closeness(s, [(0, 1), (0, 2)])
        >>> int(c.argmax())
        0
    """
    s = _check_similarity(similarity)
    n = s.shape[0]
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if n < 2 or len(edges) == 0:
        return np.zeros(n)
    i, j = edges[:, 0], edges[:, 1]
    distance = np.maximum(1.0 - s[i, j], MIN_DISTANCE)
    graph = coo_matrix((np.concatenate([distance, distance]), (np.concatenate([i, j]), np.concatenate([j, i]))),
                       shape=(n, n)).tocsr()
    labels = connected_components(n, i, j)
    result = np.zeros(n)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        if len(idx) < 2:
            continue
        total = shortest_path(graph[idx][:, idx], method="auto", directed=False).sum(axis=1)
        reach = len(idx) - 1
        result[idx] = np.where(total > 0, reach / np.where(total > 0, total, 1.0) * reach / (n - 1), 0.0)
    return result


@dataclass(frozen=True)
class Selection:
    """Which output channels of one layer (or coupled group) to remove.

    ``assignment`` maps every removed channel to the kept channel that absorbs
    its outgoing weights (empty for criteria without compensation).
    """

    pruned: tuple[int, ...]
    kept: tuple[int, ...]
    assignment: dict[int, int] = field(default_factory=dict)
    threshold: float | None = None


def select_central_filters(similarity, k: int) -> Selection:
    """Remove exactly ``k`` channels, each assigned to the kept central channel of its component.

    Channels are visited by descending closeness (ties: lower index first). The
    first visited channel of a component becomes its central filter; every
    visited channel's not-yet-removed neighbours (other than the central, in
    index order) are removed and assigned to the component's central filter,
    until ``k`` are removed. A component therefore loses all but its central
    channel, and the threshold makes that total exactly ``k`` (with ties, the
    visit stops at ``k``).

    Example:
        >>> s = np.eye(4); s[0, 3] = s[3, 0] = 0.95; s[1, 2] = s[2, 1] = 0.5
        >>> sel = select_central_filters(s, 1)
        >>> sel.pruned, sel.kept, sel.assignment
        ((3,), (0, 1, 2), {3: 0})
    """
    s = _check_similarity(similarity)
    n = s.shape[0]
    t = similarity_threshold(s, k)
    if k == 0:
        return Selection((), tuple(range(n)), {}, t.value)
    centrality = closeness(s, t.edges)
    adjacency = np.zeros((n, n), dtype=bool)
    adjacency[t.edges[:, 0], t.edges[:, 1]] = True
    adjacency |= adjacency.T
    labels = connected_components(n, t.edges[:, 0], t.edges[:, 1])
    has_edge = adjacency.any(axis=1)
    order = sorted(np.flatnonzero(has_edge).tolist(), key=lambda u: (-centrality[u], u))

    central_of: dict[int, int] = {}
    assignment: dict[int, int] = {}
    removed = np.zeros(n, dtype=bool)
    for u in order:
        centre = central_of.setdefault(int(labels[u]), u)  # a component's first visit is never removed
        candidates = adjacency[u] & ~removed
        candidates[centre] = False
        newly = np.flatnonzero(candidates)[: k - len(assignment)]
        removed[newly] = True
        assignment.update((int(v), centre) for v in newly)
        if len(assignment) == k:
            break
    if len(assignment) != k:  # cannot happen: each component loses all but its central channel
        raise AssertionError(f"central filter selection removed {len(assignment)} channels, expected {k}")
    pruned = tuple(sorted(assignment))
    kept = tuple(np.flatnonzero(~removed).tolist())
    return Selection(pruned, kept, dict(sorted(assignment.items())), t.value)


def select_smallest(scores, k: int) -> Selection:
    """Remove the ``k`` channels with the smallest scores (ties: lower index first); no compensation.

    Example:
        >>> select_smallest([3.0, 1.0, 2.0, 1.0], 2).pruned
        (1, 3)
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    if not 0 <= k <= max(n - 1, 0):
        raise ValueError(f"cannot remove {k} of {n} channels")
    pruned = tuple(sorted(int(i) for i in np.argsort(scores, kind="stable")[:k]))
    return Selection(pruned, tuple(sorted(set(range(n)) - set(pruned))))


def filter_l1_norms(weight: torch.Tensor) -> np.ndarray:
    """L1 norm of each output filter of a conv weight ``(O, C/g, Kh, Kw)``."""
    return weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1).double().cpu().numpy()


# ================================================================ which convs to prune


@dataclass
class FilterPruneConfig:
    """Options shared by ``central_filter`` and ``l1_filter_prune``.

    prune_coupled: also prune groups of convs whose output channels are coupled
        1:1 (e.g. through residual adds), with one decision for the whole group.
    exclude: conv qualified names never to prune.
    leaf_modules: submodule qualified names or types that tracing must not enter.
    """

    prune_coupled: bool = False
    exclude: list = field(default_factory=list)
    leaf_modules: list = field(default_factory=list)

    @classmethod
    def coerce(cls, config, who: str) -> FilterPruneConfig:
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            unknown = set(config) - {"prune_coupled", "exclude", "leaf_modules"}
            if unknown:
                raise ValueError(f"swpfx.{who}: unknown config keys {sorted(unknown)}; use prune_coupled, exclude, leaf_modules")
            return cls(**dict(config))
        raise TypeError(f"swpfx.{who}: config must be a dict or FilterPruneConfig, got {type(config).__name__}")


@dataclass(frozen=True)
class PruneTarget:
    """Convs (node names) whose output channels are pruned together, the rate, and their channel count."""

    convs: tuple[str, ...]
    names: tuple[str, ...]  # qualified names of the conv modules, same order
    rate: float
    channels: int
    measured: tuple[str, ...] = ()  # convs whose feature maps define similarity (default: all of ``convs``)


def _conv_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {
        n.name: n
        for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    }


def _check_rate(rate, who: str, where: str = "") -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"swpfx.{who}: rate{where} must be a float, got {type(rate).__name__}")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"swpfx.{who}: rate{where} must be in [0, 1), got {rate}")
    return float(rate)


def prune_targets(gm: fx.GraphModule, analysis, rate, cfg: FilterPruneConfig, who: str) -> list[PruneTarget]:
    """The convs to prune and their rates, from the channel analysis and the user's ``rate``."""
    convs = _conv_nodes(gm)
    qualified = {name: node.target for name, node in convs.items()}
    by_qualified: dict[str, list[str]] = {}
    for name, target in qualified.items():
        by_qualified.setdefault(target, []).append(name)

    units = [(c,) for c in analysis.independent_convs()]
    coupled = [tuple(g) for g in analysis.coupled_groups()]
    chains = [g for g in coupled if _depthwise_chain(gm, convs, g)]
    units += chains
    coupled = [g for g in coupled if g not in chains]
    if cfg.prune_coupled:
        units += coupled
    unit_of = {c: u for u in units for c in u}

    for name in cfg.exclude:
        if name not in by_qualified:
            raise ValueError(f"swpfx.{who}: config['exclude'] names '{name}', which is not a Conv2d of the model")
    excluded = {c for name in cfg.exclude for c in by_qualified[name]}

    if isinstance(rate, Mapping):
        requested: dict[tuple[str, ...], float] = {}
        for name, r in rate.items():
            if name not in by_qualified:
                import difflib

                close = difflib.get_close_matches(str(name), sorted(by_qualified), n=3)
                hint = f" Did you mean {close}?" if close else ""
                raise ValueError(f"swpfx.{who}: rate names '{name}', which is not a Conv2d of the model.{hint}")
            r = _check_rate(r, who, f"['{name}']")
            for node_name in by_qualified[name]:
                unit = unit_of.get(node_name)
                if unit is None:
                    group = next((g for g in coupled if node_name in g), None)
                    if group is not None:
                        raise ValueError(
                            f"swpfx.{who}: conv '{name}' has its output channels coupled to "
                            f"{[qualified[c] for c in group if c != node_name]} (e.g. through a residual add); "
                            f"pass config={{'prune_coupled': True}} to prune the group together"
                        )
                    raise ValueError(f"swpfx.{who}: conv '{name}' cannot be pruned: its output channels are pinned "
                                     f"(e.g. they reach the model output or an op the analysis does not handle)")
                if unit in requested and requested[unit] != r:
                    raise ValueError(f"swpfx.{who}: coupled convs {[qualified[c] for c in unit]} got different "
                                     f"rates; a coupled group is pruned with one rate")
                requested[unit] = r
        chosen = list(requested.items())
    else:
        r = _check_rate(rate, who)
        chosen = [(u, r) for u in units]

    targets = []
    for unit, r in chosen:
        if r == 0.0 or any(c in excluded for c in unit):
            continue
        channels = {gm.get_submodule(qualified[c]).out_channels for c in unit}
        if len(channels) != 1:
            raise ValueError(f"swpfx.{who}: coupled convs {[qualified[c] for c in unit]} have different channel counts")
        depthwise = tuple(c for c in unit if _is_depthwise(gm.get_submodule(qualified[c])))
        measured = depthwise if unit in chains else unit
        targets.append(PruneTarget(unit, tuple(qualified[c] for c in unit), r, channels.pop(), measured))
    return targets


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _depthwise_chain(gm: fx.GraphModule, convs: dict[str, fx.Node], group: tuple[str, ...]) -> bool:
    """A conv plus depthwise convs that only carry its channels (MobileNet's expand → depthwise).

    Removing a channel of the first conv removes the same channel of the
    depthwise convs and nothing else, so the group is as prunable as an
    independent conv; its consumers see the depthwise conv's map.
    """
    kinds = [_is_depthwise(gm.get_submodule(convs[c].target)) for c in group]
    return kinds.count(False) == 1


# ================================================================ the passes


Chooser = Callable[[fx.GraphModule, PruneTarget], Selection]


def prune_filters(model: nn.Module, rate, example_inputs, choose: Chooser, config=None,
                  compensate: bool = False, who: str = "prune_filters",
                  before_choose: Callable[[fx.GraphModule, list[PruneTarget]], None] | None = None) -> fx.GraphModule:
    """Remove output channels chosen by ``choose(gm, target)`` from every prunable conv; return a new GraphModule.

    The building block of :func:`central_filter` and :func:`l1_filter_prune`,
    usable with any criterion (e.g. random selection for comparisons). With
    ``compensate=True`` each selection's ``assignment`` is merged into consumers.

    Example:
        >>> import torch, torchvision
        >>> m = torchvision.models.resnet18(num_classes=10).eval()
        >>> pick_last = lambda gm, t: select_smallest(-np.arange(t.channels), removal_count(t.channels, 0.5))
        >>> gm = prune_filters(m, 0.5, (torch.randn(1, 3, 64, 64),), pick_last)
        >>> gm.get_submodule("layer1.0.conv1").out_channels
        32
    """
    example_inputs = normalize_example_inputs(example_inputs)
    if not example_inputs:
        raise ValueError(f"swpfx.{who}: example_inputs is required (a tuple of positional input tensors)")
    cfg = FilterPruneConfig.coerce(config, who)
    gm = trace(model, cfg.leaf_modules)
    with eval_mode(gm):  # the analyses run the model; in train mode BatchNorm would update its statistics
        _prune_traced(gm, example_inputs, rate, choose, cfg, compensate, who, before_choose)
    return gm


def _prune_traced(gm, example_inputs, rate, choose, cfg, compensate, who, before_choose) -> None:
    from swpfx.passes.analyze_channels import analyze_channels
    from swpfx.passes.remove_channels import remove_channels

    analysis = analyze_channels(gm, example_inputs)
    targets = prune_targets(gm, analysis, rate, cfg, who)
    if before_choose is not None:
        before_choose(gm, targets)

    remove: dict[str, list[int]] = {}
    merge: dict[str, dict[int, int]] = {}
    record = {}
    for target in targets:
        selection = choose(gm, target)
        if not selection.pruned:
            continue
        for conv, name in zip(target.convs, target.names):
            remove[conv] = list(selection.pruned)
            if compensate and selection.assignment:
                merge[conv] = dict(selection.assignment)
            record[name] = {
                "pruned": list(selection.pruned),
                "kept": list(selection.kept),
                "assignment": dict(selection.assignment),
                "threshold": selection.threshold,
            }
    if remove:
        remove_channels(gm, example_inputs, remove=remove, merge_into=merge if compensate else None)
    gm.meta.setdefault(META, {})[who] = record


def central_filter(model: nn.Module, calibration_batches, rate, example_inputs, compensate: bool = True,
                   config=None) -> fx.GraphModule:
    """Central Filter pruning: remove ``ceil(N·rate)`` redundant filters per prunable conv, compensating.

    ``calibration_batches`` is an iterable of input tensors or of tuples/lists
    whose first item is the input (a DataLoader works); the reference uses 128
    training images. ``rate`` is a float for every prunable conv, or
    ``{conv qualified name: rate}`` (other convs are left alone). Prunable convs
    are those whose output channels are coupled to no other conv (inner convs of
    residual blocks, plain chains, inception branches); coupled groups too when
    ``config={'prune_coupled': True}``, one decision per group on the average of
    the members' similarities. A conv followed by depthwise convs that only carry
    its channels (MobileNet's expand → depthwise) is pruned as one unit by
    default, judged on the depthwise conv's map, which is what its consumers see.
    The caller's model is not modified; the result is a compact GraphModule
    whose ``meta['swpfx']['central_filter']`` records, per conv, the removed and
    kept channels and each removed channel's central one.

    Example:
        >>> import torch, torchvision, swpfx
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> pruned = swpfx.central_filter(model, [torch.randn(8, 3, 64, 64)], rate=0.25, example_inputs=(x,))
        >>> pruned.get_submodule("layer1.0.conv1").out_channels, model.layer1[0].conv1.out_channels
        (48, 64)
        >>> pruned(x).shape
        torch.Size([1, 10])
    """
    who = "central_filter"
    similarity: dict[str, torch.Tensor] = {}

    def measure(gm: fx.GraphModule, targets: list[PruneTarget]) -> None:
        convs = [c for t in targets for c in t.measured]
        if convs:
            example = normalize_example_inputs(example_inputs)
            similarity.update(measure_channel_similarity(gm, convs, calibration_batches, example).similarity)

    def choose(gm: fx.GraphModule, target: PruneTarget) -> Selection:
        s = torch.stack([similarity[c] for c in target.measured]).mean(dim=0).cpu().numpy()
        return select_central_filters(s, removal_count(target.channels, target.rate))

    return prune_filters(model, rate, example_inputs, choose, config, compensate=compensate, who=who,
                         before_choose=measure)


def l1_filter_prune(model: nn.Module, rate, example_inputs, config=None) -> fx.GraphModule:
    """Classic L1-norm filter pruning ("Pruning Filters for Efficient ConvNets"): drop the smallest filters.

    Same conv selection, ``rate`` and ``config`` as :func:`central_filter`; a
    coupled group is ranked by the sum of its members' filter norms. No data needed.

    Example:
        >>> import torch, torchvision, swpfx
        >>> model = torchvision.models.resnet18(num_classes=10).eval()
        >>> pruned = swpfx.l1_filter_prune(model, 0.5, (torch.randn(1, 3, 64, 64),))
        >>> pruned.get_submodule("layer2.0.conv1").out_channels
        64
    """

    def choose(gm: fx.GraphModule, target: PruneTarget) -> Selection:
        norms = sum(filter_l1_norms(gm.get_submodule(name).weight) for name in target.names)
        return select_smallest(norms, removal_count(target.channels, target.rate))

    return prune_filters(model, rate, example_inputs, choose, config, who="l1_filter_prune")

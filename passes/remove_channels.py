"""Remove conv output channels, and every use of them, across the whole graph.

Given ``(conv node, output channel)`` pairs to remove, the channel classes of
:mod:`passes.analyze_channels` decide what can go: a class is removed only if
every conv that produces it is asked to drop that channel and nothing pins it.
Removal slices the producing convs, every channel-wise op on the way (BatchNorm,
PReLU, functional batch_norm) and the input channels of every consumer (convs,
depthwise and grouped convs, a Linear after flatten). A grouped conv keeps equal
groups: the same number of input (and of output) channels is removed from every
group, or a whole group (all its inputs and outputs) goes.

What a removed channel contributed to its consumers is, depending on the caller:

- ``fold_constants=True`` (dead SWP filters): the channel is a per-channel
  constant c, so its contribution is folded into the consumer's bias, or, where
  zero padding makes it depend on the position, computed at run time by a small
  conv over a ones map shaped like the consumer's input (weights
  ``Σ_c c·W[:, c]``, the consumer's stride/padding/dilation): exact at every input
  resolution. A constant that a zero pad or a padded average pool has already
  made position-dependent is replayed through those (linear) ops on the ones map;
  a channel whose map cannot be rebuilt that way at any resolution is kept;
- ``merge_into={conv: {p: c}}`` (Central Filter compensation): each consumer's
  input weights for p are added onto those for c before p is dropped;
- neither: the contribution is dropped (plain filter pruning).

How each op is cut is its rule's ``slice`` in :mod:`.channel_rules`, the registry
the analysis reads too. A module called more than once (a block applied to two
branches) is cut once, to the channels every call keeps (the analysis makes that
decision jointly); where the folded constant differs between its calls, each
call gets its own constant add instead of a bias change. Calls that still need
different modules get copies, listed in ``RemoveChannelsResult.duplicated``.
"""

from __future__ import annotations

import copy
import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .analyze_channels import ChannelAnalysis, analyze_channels, propagate_shapes
from .channel_rules import Kept, expand_columns, grouped_weight, rule_for  # noqa: F401  (grouped_weight re-exported)
from .graph_utils import META_KEY, modules_equal, new_conv, pass_error, swpfx_meta, unique_attr_name
from .pass_result import PassResult

PASS = "remove_channels"


# ---------------------------------------------------------------- planning (pure)


def plan_removal(
    analysis: ChannelAnalysis,
    remove: Mapping[fx.Node, Iterable[int]],
    strict: bool = False,
    channel_multiple: int = 1,
    keep_classes: Iterable[int] = (),
) -> set[int]:
    """The channel classes that can be removed, given the requested producer channels.

    A class is removable when all of its producers are requested and nothing
    opaque or pinned touches it (nor ``keep_classes``); no node may lose all its
    channels (the class of its first channel is then kept); every grouped conv
    keeps equal groups. With ``strict`` a requested channel that cannot be removed
    is an error. ``channel_multiple`` keeps enough removable channels that each
    conv's output count is a multiple of it (or its full width).
    """
    requested: set[tuple[fx.Node, int]] = {(n, int(c)) for n, cs in remove.items() for c in cs}
    blocked = analysis.blocked_classes() | set(keep_classes)
    candidates: set[int] = set()
    for cls, producers in analysis.producer_elements_by_class().items():
        if cls not in blocked and all(p in requested for p in producers):
            candidates.add(cls)
    if strict:
        for node, c in sorted(requested, key=lambda p: (p[0].name, p[1])):
            cls = int(analysis.classes_of(node)[c])
            if cls not in candidates:
                why = analysis.reasons.get(cls, "it is coupled to channels of other convs that are not removed")
                raise pass_error(PASS, node, f"output channel {c} cannot be removed: {why}")
    # Each rule only ever keeps (un-removes) classes, so the loop ends; at its fixpoint all hold.
    changed = True
    while changed:
        changed = _keep_one_channel_per_node(analysis, candidates)
        changed |= _equalize_groups(analysis, candidates)
        if channel_multiple > 1:
            changed |= _round_kept_channels(analysis, candidates, channel_multiple)
    return candidates


def _keep_one_channel_per_node(analysis: ChannelAnalysis, candidates: set[int]) -> bool:
    changed = False
    for info in analysis.channels.values():
        classes = analysis.class_of[info.first : info.first + info.width]
        if info.width and all(int(k) in candidates for k in classes):
            candidates.discard(int(classes[0]))
            changed = True
    return changed


def group_removal_targets(removed_in: np.ndarray, removed_out: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Equal groups from per-group removal masks (G, Cg) and (G, Og).

    Returns (whole groups, inputs and outputs to remove from each other group).
    A group goes whole only if all its inputs and outputs are removed; at least
    one group stays, and every remaining group keeps at least one input and output.
    """
    whole = removed_in.all(1) & removed_out.all(1)
    if whole.all():
        whole[0] = False
    rest = ~whole
    n_in = min(int(removed_in[rest].sum(1).min()), removed_in.shape[1] - 1)
    n_out = min(int(removed_out[rest].sum(1).min()), removed_out.shape[1] - 1)
    return whole, n_in, n_out


def _equalize_groups(analysis: ChannelAnalysis, candidates: set[int]) -> bool:
    """Keep removable channels of grouped convs until every group loses the same count."""
    changed = False
    for grouped in analysis.grouped.values():
        sides = [analysis.class_of[info.first : info.first + info.width].reshape(grouped.groups, -1)
                 for info in (grouped.inputs, grouped.outputs)]
        masks = [np.isin(cls, np.fromiter(candidates, dtype=np.int64, count=len(candidates))) for cls in sides]
        whole, *targets = group_removal_targets(*masks)
        for cls, mask, target in zip(sides, masks, targets):
            for g in np.nonzero(~whole)[0]:
                extra = cls[g][mask[g]][target:]  # the removed ones beyond the target stay
                for k in extra.tolist():
                    if k in candidates:
                        candidates.discard(k)
                        changed = True
    return changed


def _round_kept_channels(analysis: ChannelAnalysis, candidates: set[int], multiple: int) -> bool:
    """Keep some removable channels so every conv keeps a multiple of ``multiple`` outputs.

    ONNX Runtime's CPU convs use their blocked (SIMD-width) layout only for such
    channel counts: a 64->58-channel conv measured slower than the 64-channel one.
    A conv whose width is no such multiple keeps at most its width. Keeping a
    removable channel is always exact; un-removing only grows other convs' counts,
    so the loop ends.
    """
    changed_any = False
    changed = True
    while changed:
        changed = False
        for node in analysis.producers:
            classes = [int(k) for k in analysis.classes_of(node)]
            removed = [k for k in classes if k in candidates]
            kept = len(classes) - len(removed)
            target = min(-(-kept // multiple) * multiple, len(classes))
            for k in removed[: target - kept]:
                candidates.discard(k)
                changed = changed_any = True
    return changed_any


def keep_indices(analysis: ChannelAnalysis, removed: set[int]) -> dict[fx.Node, torch.Tensor]:
    keep = {}
    removed_arr = np.fromiter(removed, dtype=np.int64, count=len(removed))
    for node, info in analysis.channels.items():
        classes = analysis.class_of[info.first : info.first + info.width]
        mask = ~np.isin(classes, removed_arr)
        if not mask.all():
            keep[node] = torch.from_numpy(np.nonzero(mask)[0])
    return keep


# ---------------------------------------------------------------- contributions of removed channels


class _CaptureValues(fx.Interpreter):
    """Runs the graph, keeping the first sample of the value of selected nodes."""

    def __init__(self, gm: fx.GraphModule, targets: set[fx.Node]):
        super().__init__(gm)
        self.targets = targets
        self.captured: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n in self.targets:
            self.captured[n] = result[:1].detach().clone()
        return result


def dense_input_weight(conv: nn.Conv2d, cols: torch.Tensor) -> torch.Tensor:
    """The (O, len(cols), Kh, Kw) float64 weight of input channels ``cols``, as if ``groups`` were 1.

    A grouped conv's output o reads only the inputs of its own group; the others get zeros.
    """
    weight = conv.weight.detach().to(torch.float64)
    if conv.groups == 1:
        return weight[:, cols]
    per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    same_group = (torch.arange(conv.out_channels)[:, None] // per_out) == (cols[None, :] // per_in)
    return weight[:, cols % per_in] * same_group.to(weight.device, weight.dtype)[:, :, None, None]


def _conv_like(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x`` convolved with ``weight`` (groups=1) with the geometry and padding mode of ``conv``."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return F.conv2d(x, weight, None, conv.stride, padding, conv.dilation)


def removed_contribution(module: nn.Module, x: torch.Tensor, removed_in: torch.Tensor, expansion: int = 1) -> torch.Tensor:
    """What the removed input channels of ``module`` (a Conv2d or Linear) add to its output.

    ``x`` is one sample of the module's input (data-independent in the removed
    channels); the result is (O,) for a Linear or (O, H', W') for a conv. Only the
    removed channels take part, in float64, so the fold adds no rounding of its own.
    """
    cols = expand_columns(removed_in, expansion)
    only_removed = x[:, cols].to(torch.float64)
    if isinstance(module, nn.Linear):
        return F.linear(only_removed, module.weight.detach()[:, cols].to(torch.float64))[0]
    return _conv_like(module, only_removed, dense_input_weight(module, removed_in))[0]


def dead_channel_weight(conv: nn.Conv2d, constants: torch.Tensor, removed_in: torch.Tensor) -> torch.Tensor:
    """(O, 1, Kh, Kw): ``Σ_c constants[c] · W[:, c]`` over the removed inputs, so that convolving a
    ones map with it equals convolving the removed channels' constant maps with ``W``."""
    weight = dense_input_weight(conv, removed_in)
    return torch.einsum("orhw,r->ohw", weight, constants.to(weight)).unsqueeze(1)


def has_zero_padding(conv: nn.Conv2d) -> bool:
    """Whether the conv pads with zeros (a constant input then gives a position-dependent output)."""
    if conv.padding_mode != "zeros":
        return False  # reflect/replicate/circular padding of a constant map is that constant
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(d * (k - 1) > 0 for k, d in zip(conv.kernel_size, conv.dilation))
    return any(p > 0 for p in conv.padding)


# Uniformity: a dead filter emits a per-channel constant; which ops keep the removed channels' maps
# constant at every resolution, and which linear ones make them position-dependent (but replayable),
# says each op's rule (channel_rules: ``keeps_uniform``, ``linear_spatial``).


def _rule_and_module(gm: fx.GraphModule, node: fx.Node):
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    return rule_for(node, module), module


def breaks_uniformity(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An op that turns a constant map into a position-dependent one (zero padding, padded average pools)."""
    rule, module = _rule_and_module(gm, node)
    return rule is not None and not rule.keeps_uniform(node, module)


def uniform_nodes(gm: fx.GraphModule, analysis: ChannelAnalysis) -> set[fx.Node]:
    """Nodes whose removed channels are spatially constant at every input resolution.

    Removed channels start as dead filters (constant maps: a conv's output); the
    channel-wise, elementwise and concat ops the analysis lets them pass keep them
    constant, except those of :func:`breaks_uniformity`.
    """
    uniform: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d):
            uniform.add(node)
        elif not breaks_uniformity(gm, node) and all(
            a in uniform for a in node.all_input_nodes if a in analysis.channels
        ):
            uniform.add(node)
    return uniform


def is_linear_spatial(gm: fx.GraphModule, node: fx.Node, analysis: ChannelAnalysis) -> bool:
    """A parameterless op, the same linear map on every channel, of its single tensor input."""
    src = node.args[0] if node.args else None
    if not (isinstance(src, fx.Node) and node.all_input_nodes == [src] and src in analysis.channels
            and analysis.channels.get(node) is analysis.channels[src]):
        return False
    rule, module = _rule_and_module(gm, node)
    if module is not None and any(True for _ in module.parameters()):
        return False
    return rule is not None and rule.linear_spatial(node, module)


def constant_source(gm: fx.GraphModule, src: fx.Node, uniform: set[fx.Node], analysis: ChannelAnalysis):
    """``(base, chain)``: ``src`` is ``chain`` (linear spatial ops, first to last) applied to ``base``, whose
    removed channels are constant at every resolution; None if there is no such chain."""
    chain = []
    node = src
    while node not in uniform:
        if not is_linear_spatial(gm, node, analysis):
            return None
        chain.append(node)
        node = node.args[0]
    return node, chain[::-1]


def replay_chain(gm: fx.GraphModule, chain: list[fx.Node], x: torch.Tensor) -> torch.Tensor:
    """Apply the ops of ``chain`` to ``x`` eagerly (their only tensor argument is the first)."""
    for node in chain:
        fn = gm.get_submodule(node.target) if node.op == "call_module" else node.target
        x = fn(x, *node.args[1:], **node.kwargs)
    return x


# ---------------------------------------------------------------- surgery


def _merge_input_weights(weight: torch.Tensor, pairs: list[tuple[int, int]], expansion: int) -> None:
    """``weight[:, c] += weight[:, p]`` for each (p, c) (column blocks after a flatten), in one op.

    Sources are removed channels and destinations kept ones, so they never overlap.
    """
    if not pairs:
        return
    src = expand_columns(torch.tensor([p for p, _ in pairs]), expansion).to(weight.device)
    dst = expand_columns(torch.tensor([c for _, c in pairs]), expansion).to(weight.device)
    with torch.no_grad():
        weight.index_add_(1, dst, weight[:, src])


def _add_bias(module: nn.Module, delta: torch.Tensor) -> None:
    with torch.no_grad():
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype,
                                                   device=module.weight.device))
        module.bias += delta.to(module.bias.dtype)


@dataclass
class DeadChannelConv:
    """A position-dependent constant for a consumer conv: ``conv(chain(ones_map(base)), weight)``, where the ones
    map is ``base.new_ones((N, 1, H, W))`` with ``base``'s N, H, W (see ``_insert_dead_channel_conv``)."""

    weight: torch.Tensor  # (O, 1, Kh, Kw), float64
    base: fx.Node
    chain: list[fx.Node]


def _insert_dead_channel_conv(gm: fx.GraphModule, node: fx.Node, consumer: nn.Conv2d, plan: DeadChannelConv) -> None:
    """``node + conv(chain(ones_map(base)))``: the removed channels' effect, at any input size.

    The ones map is built from ``base``'s shape alone (``base.new_ones((N, 1, H, W))``), never by slicing
    ``base``: ONNX Runtime keeps conv outputs in its channel-blocked layout, and a channel slice of one made it
    reorder the whole activation out of that layout first (11 % of a pruned net's time, benchmarks/RESULTS.md).
    """
    weight = plan.weight.to(consumer.weight.device, consumer.weight.dtype)
    conv = new_conv(weight, None, groups=1, like=consumer)
    conv.requires_grad_(False)  # a constant of the removed channels, not a trainable weight
    path = unique_attr_name(gm, f"{node.target}_dead_channels")
    gm.add_submodule(path, conv)
    graph = gm.graph
    with graph.inserting_before(node):
        shape = graph.call_function(getattr, (plan.base, "shape"))
        n, h, w = (graph.call_function(operator.getitem, (shape, i)) for i in (0, 2, 3))
        x = first = graph.call_method("new_ones", (plan.base, (n, 1, h, w)))
        for op in plan.chain:
            x = graph.create_node(op.op, op.target, (x, *op.args[1:]), dict(op.kwargs))
        dead = graph.call_module(path, (x,))
    with graph.inserting_after(node):
        add = graph.call_function(torch.add, (node, dead))
    node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
    conv_name = swpfx_meta(node).get("conv", node.name)
    for new in (shape, n, h, w, first, x, add):
        swpfx_meta(new).setdefault("role", "dead_channel_constant")
        swpfx_meta(new).setdefault("conv", conv_name)
    swpfx_meta(dead).update(role="dead_channel_conv", conv=conv_name)


@dataclass
class RemoveChannelsResult(PassResult):
    removed: dict[str, int]  # producer conv node name -> output channels removed
    # consumer convs whose removed inputs' constant depends on the position (added by a ones-map conv)
    bias_maps: list[str]
    # module paths called more than once whose calls needed different modules: "path -> copy path"
    duplicated: list[str] = field(default_factory=list)


@dataclass
class _Edit:
    """One node's part of the surgery, planned before any module is replaced."""

    node: fx.Node
    rule: object  # its ChannelRule
    module: nn.Module | None  # the module to cut (a private copy for a module called more than once)
    kept: Kept
    bias: torch.Tensor | None = None  # removed inputs' constant contribution, per output
    plan: DeadChannelConv | None = None  # ... or, where it depends on the position, its ones-map conv
    shift: bool = False  # add ``bias`` after this call instead of into the shared module's bias


def _insert_constant_shift(gm: fx.GraphModule, node: fx.Node, delta: torch.Tensor, like: torch.Tensor) -> None:
    """``node + delta`` (per output channel): a removed-inputs constant one call of a shared module needs."""
    rank = len(node.meta["tensor_meta"].shape)
    value = delta.to(like.device, like.dtype).reshape(1, -1, *[1] * (rank - 2))
    path = unique_attr_name(gm, f"{node.target}_dead_channels_shift")
    owner, _, leaf = path.rpartition(".")
    (gm.get_submodule(owner) if owner else gm).register_buffer(leaf, value)
    graph = gm.graph
    with graph.inserting_after(node):
        shift = graph.get_attr(path)
    with graph.inserting_after(shift):
        add = graph.call_function(torch.add, (node, shift))
    node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
    conv_name = swpfx_meta(node).get("conv", node.name)
    for new in (shift, add):
        swpfx_meta(new).update(role="dead_channel_constant", conv=conv_name)


def _install_shared(gm: fx.GraphModule, target: str, calls: list[fx.Node], finals: dict[fx.Node, nn.Module],
                    original: nn.Module) -> list[str]:
    """Install the cut module of every call of ``target``: one module for calls whose results are equal,
    a copy (``target_1`` ...) for each call that needs another; returns the copies as "target -> copy"."""
    variants: list[tuple[nn.Module, str]] = []
    copies = []
    for node in calls:
        module = finals.get(node, original)
        path = next((p for m, p in variants if modules_equal(m, module)), None)
        if path is None:
            path = target if not variants else unique_attr_name(gm, target)
            gm.add_submodule(path, module)
            variants.append((module, path))
            if path != target:
                copies.append(f"{target} -> {path}")
        node.target = path
    return copies


def remove_channels(
    gm: fx.GraphModule,
    example_inputs: tuple,
    remove: Mapping[str | fx.Node, Iterable[int]],
    *,
    merge_into: Mapping[str, Mapping[int, int]] | None = None,
    fold_constants: bool = False,
    strict: bool = False,
    channel_multiple: int = 1,
    analysis: ChannelAnalysis | None = None,
) -> RemoveChannelsResult:
    """Remove the requested conv output channels from ``gm`` (in place) wherever they are used.

    ``remove`` maps conv node names to output channel indices. ``strict=True``
    raises if a requested channel cannot be removed (coupled or pinned);
    otherwise such channels are silently kept (they stay exact either way).
    ``channel_multiple`` rounds each conv's kept outputs up to a multiple (see
    :func:`plan_removal`). With ``fold_constants`` the result is exact at every
    input resolution, not only the example's.

    Example:
        >>> import torch, torchvision
        >>> from swpfx.tracing import trace
        >>> gm = trace(torchvision.models.resnet18().eval())
        >>> x = torch.randn(1, 3, 64, 64)
        >>> result = remove_channels(gm, (x,), {"layer1_0_conv1": [0, 1, 2]})
        >>> gm.get_submodule("layer1.0.conv1").out_channels, gm.get_submodule("layer1.0.conv2").in_channels
        (61, 61)
    """
    if fold_constants and merge_into:
        raise pass_error(PASS, None, "fold_constants and merge_into are exclusive")
    by_name = {n.name: n for n in gm.graph.nodes}
    requests = {}
    for key, channels in remove.items():
        node = key if isinstance(key, fx.Node) else by_name.get(key)
        if node is None:
            raise pass_error(PASS, None, f"no node named '{key}' in the graph", KeyError)
        requests[node] = list(channels)
    analysis = analysis or analyze_channels(gm, example_inputs)
    for node in list(requests):
        if node not in analysis.producers:
            if strict:
                raise pass_error(PASS, node, "is not a conv whose output channels can be removed")
            del requests[node]  # e.g. a conv whose input channels are not tracked: its channels stay
    sources, unfoldable = constant_sources(gm, analysis) if fold_constants else ({}, set())
    removed = plan_removal(analysis, requests, strict=strict, channel_multiple=channel_multiple,
                           keep_classes=unfoldable)
    keep = keep_indices(analysis, removed)
    merge_classes = _merge_classes(analysis, merge_into or {}, by_name, removed)
    consumers = _consumers_losing_inputs(gm, analysis, keep)
    captured = {}
    if fold_constants and consumers:
        targets = {n.args[0] for n in consumers} | {sources[n][0] for n in consumers if n in sources}
        capture = _CaptureValues(gm, targets)
        with torch.no_grad():
            capture.run(*example_inputs)
        captured = capture.captured
    edits = _plan_edits(gm, analysis, keep, captured, merge_classes, sources)
    removed_counts = {e.node.name: analysis.channels[e.node].width - len(e.kept.out) for e in edits
                      if e.node in analysis.producers and e.kept.out is not None}
    calls: dict[str, list[fx.Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    originals = {target: gm.get_submodule(target) for target in calls}
    finals: dict[str, dict[fx.Node, nn.Module]] = defaultdict(dict)
    dead_channel_convs: list[tuple[fx.Node, nn.Conv2d, DeadChannelConv]] = []
    for e in edits:
        if e.bias is not None and not e.shift:
            _add_bias(e.module, e.bias)
        new = e.rule.slice(e.module, e.kept)
        if e.node.op == "call_module":
            if len(calls[e.node.target]) > 1:
                finals[e.node.target][e.node] = new if new is not None else e.module
            elif new is not None:
                gm.add_submodule(e.node.target, new)
        if e.plan is not None:
            if e.kept.out is not None:
                e.plan.weight = e.plan.weight[e.kept.out]
            dead_channel_convs.append((e.node, new, e.plan))
        _slice_mask(e.node, e.kept.out)
    duplicated = []
    for target, cut in finals.items():
        duplicated += _install_shared(gm, target, calls[target], cut, originals[target])
    # after all slicing: the inserted adds take over their consumer's uses, which the loop keys on
    for node, consumer, plan in dead_channel_convs:
        _insert_dead_channel_conv(gm, node, consumer, plan)
    for e in edits:
        if e.shift:
            bias = e.bias if e.kept.out is None else e.bias[e.kept.out]
            _insert_constant_shift(gm, e.node, bias, e.module.weight)
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, example_inputs)
    bias_maps = [node.name for node, _, _ in dead_channel_convs]
    return RemoveChannelsResult(gm, bool(keep or merge_classes or duplicated), removed_counts, bias_maps, duplicated)


def _plan_edits(gm, analysis, keep, captured, merge_classes, sources) -> list[_Edit]:
    """What every node losing channels needs: its rule, the module to cut, the removed inputs' constant.

    Each call of a module called more than once is planned on a private copy of the
    original; their constants go into the module's bias only if they are equal at
    every call, else each call gets its own constant add.
    """
    edits = []
    calls: dict[str, int] = defaultdict(int)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        rule = rule_for(node, module)
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        kept = Kept(gm, node, keep.get(node), keep.get(src) if src is not None else None,
                    analysis.channels[node].expansion if node in analysis.channels else 1,
                    analysis.channels[src].expansion if src in analysis.channels else 1)
        if rule is None or (kept.out is None and kept.inputs is None):
            continue
        if module is not None and calls[node.target] > 1 and _has_tensors(module):
            module = copy.deepcopy(module)
        edit = _Edit(node, rule, module, kept)
        if module is not None:
            edit.bias, edit.plan = _fix_consumer(module, node, src, analysis, keep, captured, merge_classes, sources)
        edits.append(edit)
    by_target: dict[str, list[_Edit]] = defaultdict(list)
    for e in edits:
        if e.node.op == "call_module":
            by_target[e.node.target].append(e)
    for target, group in by_target.items():
        if calls[target] > 1 and any(e.bias is not None for e in group):
            same = len(group) == calls[target] and all(
                e.bias is not None and torch.equal(e.bias, group[0].bias) for e in group)
            for e in group:
                e.shift = e.bias is not None and not same
    return edits


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _slice_mask(node: fx.Node, out_keep: torch.Tensor | None) -> None:
    meta = node.meta.get(META_KEY, {})
    if out_keep is not None and "mask" in meta:
        meta["mask"] = meta["mask"][out_keep]


def _is_folding_consumer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Conv (not depthwise) and Linear call_module nodes: removed inputs feed kept outputs."""
    if node.op != "call_module" or not node.args:
        return False
    module = gm.get_submodule(node.target)
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and not (module.groups > 1 and module.groups == module.in_channels))


def _consumers_losing_inputs(gm: fx.GraphModule, analysis: ChannelAnalysis, keep) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if _is_folding_consumer(gm, n) and n.args[0] in keep]


def constant_sources(gm: fx.GraphModule, analysis: ChannelAnalysis):
    """Per folding consumer, where its removed inputs' constants come from; and the classes that must stay.

    A conv's removed inputs must be constant maps, or constants made position-dependent
    by linear spatial ops only (replayed on a ones map). A Linear after a spatial
    reduction needs constants; after a flatten of a fixed-size map any value works.
    """
    uniform = uniform_nodes(gm, analysis)
    sources: dict[fx.Node, tuple[fx.Node, list[fx.Node]]] = {}
    unfoldable: set[int] = set()
    for node in gm.graph.nodes:
        src = node.args[0] if node.args else None
        if not _is_folding_consumer(gm, node) or src not in analysis.channels:
            continue
        if isinstance(gm.get_submodule(node.target), nn.Linear):
            found = (src, []) if src in uniform or analysis.channels[src].expansion > 1 else None
        else:
            found = constant_source(gm, src, uniform, analysis)
        if found is None:
            unfoldable.update(analysis.classes_of(src).tolist())
        else:
            sources[node] = found
    return sources, unfoldable


def _merge_classes(analysis, merge_into, by_name, removed) -> dict[int, int]:
    merge = {}
    for name, pairs in merge_into.items():
        node = by_name.get(name)
        if node is None or node not in analysis.producers:
            raise pass_error(PASS, node, f"merge_into names '{name}', which is not a conv producer")
        classes = analysis.classes_of(node)
        for p, c in pairs.items():
            src, dst = int(classes[p]), int(classes[c])
            if dst in removed:
                raise pass_error(PASS, node, f"channel {p} is merged into channel {c}, which is itself removed")
            if src in removed:
                merge[src] = dst
    return merge


def _check_fold(node: fx.Node, expected: torch.Tensor, actual: torch.Tensor) -> None:
    """The folded form must reproduce the removed channels' contribution at the example size."""
    scale = max(float(expected.abs().max()), float(actual.abs().max()), 1e-30)
    err = float((expected - actual).abs().max()) / scale
    if err > 1e-5:
        raise pass_error(PASS, node, f"the folded constant of the removed input channels differs from their "
                                     f"contribution by {err:.1e} (relative) at the example input")


def _fix_consumer(module, node, src, analysis, keep, captured, merge_classes, sources):
    """Account for removed input channels of a consumer before they are sliced away.

    Merges (``merge_into``) are applied to ``module``. Returns ``(bias, plan)``: the
    removed channels' constant contribution per output, or a :class:`DeadChannelConv`
    if it depends on the position (at most one of them; both None if nothing to add).
    """
    if not _is_folding_consumer(analysis.gm, node) or src not in keep:
        return None, None
    info = analysis.channels[src]
    classes = analysis.classes_of(src)
    kept = torch.zeros(info.width, dtype=torch.bool)
    kept[keep[src]] = True
    removed_in = (~kept).nonzero().flatten()
    if merge_classes:
        position = {int(cls): c for c, cls in enumerate(classes.tolist())}
        pairs = [(c, position[merge_classes[int(classes[c])]]) for c in removed_in.tolist()
                 if int(classes[c]) in merge_classes and merge_classes[int(classes[c])] in position]
        if pairs and isinstance(module, nn.Conv2d) and module.groups > 1:
            raise pass_error(PASS, node, "merging removed input channels into kept ones of a grouped conv "
                                         "is not supported", NotImplementedError)
        _merge_input_weights(module.weight, pairs, info.expansion)
        return None, None
    if src not in captured:
        return None, None
    expected = removed_contribution(module, captured[src], removed_in, info.expansion)
    if isinstance(module, nn.Linear):
        return expected, None
    base, chain = sources[node]
    constants = captured[base][0, removed_in].to(torch.float64).flatten(1).mean(1)  # uniform maps
    weight = dead_channel_weight(module, constants, removed_in)
    if not bool(weight.any()):
        return None, None  # every removed constant is zero (e.g. a negative BN shift through ReLU)
    ones = torch.ones((1, 1, *captured[base].shape[2:]), dtype=torch.float64, device=weight.device)
    with torch.no_grad():
        actual = _conv_like(module, replay_chain(analysis.gm, chain, ones), weight)[0]
    _check_fold(node, expected, actual)
    if not chain and not has_zero_padding(module):
        return weight.sum((1, 2, 3)), None  # a constant input gives a constant output
    return None, DeadChannelConv(weight, base, chain)

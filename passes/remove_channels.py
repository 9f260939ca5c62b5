"""Remove conv output channels, and every use of them, across the whole graph.

Given ``(conv node, output channel)`` pairs to remove, the channel classes of
:mod:`passes.analyze_channels` decide what can go: a class is removed only if
every conv that produces it is asked to drop that channel and nothing pins it.
Removal slices the producing convs, every channel-wise op on the way (BatchNorm,
PReLU, functional batch_norm) and the input channels of every consumer (convs,
depthwise convs, a Linear after flatten).

What a removed channel contributed to its consumers is, depending on the caller:

- ``fold_constants=True`` (dead SWP filters): the channel is data-independent, so
  its contribution is computed once and folded into the consumer's bias, or into
  a bias map added after the consumer where zero padding makes it depend on the
  position (fixed to the example input's resolution);
- ``merge_into={conv: {p: c}}`` (Central Filter compensation): each consumer's
  input weights for p are added onto those for c before p is dropped;
- neither: the contribution is dropped (plain filter pruning).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import skip_init

from .analyze_channels import ChannelAnalysis, analyze_channels, propagate_shapes
from .graph_utils import batchnorm_channels, get_attr_path, pass_error, swpfx_meta, unique_attr_name

PASS = "remove_channels"


# ---------------------------------------------------------------- planning (pure)


def plan_removal(
    analysis: ChannelAnalysis,
    remove: Mapping[fx.Node, Iterable[int]],
    strict: bool = False,
    channel_multiple: int = 1,
) -> set[int]:
    """The channel classes that can be removed, given the requested producer channels.

    A class is removable when all of its producers are requested and nothing
    opaque or pinned touches it; no node may lose all its channels (the class of
    its first channel is then kept). With ``strict`` a requested channel that
    cannot be removed is an error. ``channel_multiple`` keeps enough removable
    channels that each conv's output count is a multiple of it (or its full width).
    """
    requested: set[tuple[fx.Node, int]] = {(n, int(c)) for n, cs in remove.items() for c in cs}
    blocked = analysis.blocked_classes()
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
    changed = True
    while changed:
        changed = False
        for node, info in analysis.channels.items():
            classes = analysis.class_of[info.first : info.first + info.width]
            if info.width and all(int(k) in candidates for k in classes):
                candidates.discard(int(classes[0]))
                changed = True
    if channel_multiple > 1:
        _round_kept_channels(analysis, candidates, channel_multiple)
    return candidates


def _round_kept_channels(analysis: ChannelAnalysis, candidates: set[int], multiple: int) -> None:
    """Keep some removable channels so every conv keeps a multiple of ``multiple`` outputs.

    ONNX Runtime's CPU convs use their blocked (SIMD-width) layout only for such
    channel counts: a 64->58-channel conv measured slower than the 64-channel one.
    A conv whose width is no such multiple keeps at most its width. Keeping a
    removable channel is always exact; un-removing only grows other convs' counts,
    so the loop ends.
    """
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
                changed = True


def keep_indices(analysis: ChannelAnalysis, removed: set[int]) -> dict[fx.Node, torch.Tensor]:
    keep = {}
    removed_arr = np.fromiter(removed, dtype=np.int64, count=len(removed))
    for node, info in analysis.channels.items():
        classes = analysis.class_of[info.first : info.first + info.width]
        mask = ~np.isin(classes, removed_arr)
        if not mask.all():
            keep[node] = torch.from_numpy(np.nonzero(mask)[0])
    return keep


def expand_columns(channels: torch.Tensor, expansion: int) -> torch.Tensor:
    """Channel indices -> column indices of a flatten with ``expansion`` columns per channel."""
    if expansion == 1:
        return channels
    return (channels[:, None] * expansion + torch.arange(expansion)).reshape(-1)


# ---------------------------------------------------------------- contributions of removed channels


class _CaptureInputs(fx.Interpreter):
    """Runs the graph, keeping the first sample of the input of selected nodes."""

    def __init__(self, gm: fx.GraphModule, targets: set[fx.Node]):
        super().__init__(gm)
        self.targets = targets
        self.captured: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        if n in self.targets:
            self.captured[n] = self.env[n.args[0]][:1].detach().clone()
        return super().run_node(n)


def removed_contribution(module: nn.Module, x: torch.Tensor, removed_in: torch.Tensor, expansion: int = 1) -> torch.Tensor:
    """What the removed input channels of ``module`` (a Conv2d or Linear) add to its output.

    ``x`` is one sample of the module's input (data-independent in the removed
    channels); the result is (O,) for a Linear or (O, H', W') for a conv. Only the
    removed channels take part, in float64, so the fold adds no rounding of its own.
    """
    cols = expand_columns(removed_in, expansion)
    only_removed = x[:, cols].to(torch.float64)
    weight = module.weight.detach()[:, cols].to(torch.float64)
    if isinstance(module, nn.Linear):
        return F.linear(only_removed, weight)[0]
    if module.padding_mode != "zeros":
        only_removed = F.pad(only_removed, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    else:
        padding = module.padding
    return F.conv2d(only_removed, weight, None, module.stride, padding, module.dilation, module.groups)[0]


def is_spatially_constant(contribution: torch.Tensor) -> bool:
    if contribution.dim() == 1:
        return True
    flat = contribution.flatten(1)
    spread = (flat - flat[:, :1]).abs().max()
    return bool(spread <= 1e-9 * max(float(flat.abs().max()), 1e-30))


# ---------------------------------------------------------------- surgery


def _sliced_conv(conv: nn.Conv2d, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None) -> nn.Conv2d:
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    if out_keep is not None:
        weight = weight[out_keep]
        bias = None if bias is None else bias[out_keep]
    if in_keep is not None and not depthwise:
        weight = weight[:, in_keep]
    groups = len(in_keep) if (depthwise and in_keep is not None) else conv.groups
    in_channels = weight.shape[1] * groups
    new = skip_init(nn.Conv2d, in_channels, weight.shape[0], conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, groups, bias is not None, conv.padding_mode, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(conv.training)
    return new


def _sliced_linear(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    new = skip_init(nn.Linear, len(cols), linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, cols])
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    return new


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


def _insert_bias_map(gm: fx.GraphModule, node: fx.Node, bias_map: torch.Tensor) -> None:
    path = unique_attr_name(gm, f"{node.target}_dead_channel_bias")
    owner, _, leaf = path.rpartition(".")
    (gm.get_submodule(owner) if owner else gm).register_buffer(leaf, bias_map[None].contiguous())
    with gm.graph.inserting_after(node):
        attr = gm.graph.create_node("get_attr", path, name=f"{node.name}_dead_channel_bias")
    with gm.graph.inserting_after(attr):
        add = gm.graph.create_node("call_function", torch.add, (node, attr), name=f"{node.name}_plus_dead_channels")
    node.replace_all_uses_with(add, delete_user_cb=lambda user: user is not add)
    swpfx_meta(add).update(role="dead_channel_bias", conv=swpfx_meta(node).get("conv", node.name))


def _slice_functional_batchnorm(gm: fx.GraphModule, node: fx.Node, keep: torch.Tensor) -> None:
    for arg in node.all_input_nodes[1:]:
        if arg.op != "get_attr":
            continue
        value = get_attr_path(gm, arg.target)
        path = unique_attr_name(gm, f"{arg.target}_pruned")
        owner, _, leaf = path.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        sliced = value.detach()[keep].clone()
        if isinstance(value, nn.Parameter):
            module.register_parameter(leaf, nn.Parameter(sliced, requires_grad=value.requires_grad))
        else:
            module.register_buffer(leaf, sliced)
        arg.target = path


@dataclass
class RemoveChannelsResult:
    graph_module: fx.GraphModule
    removed: dict[str, int]  # producer conv node name -> output channels removed
    bias_maps: list[str]  # consumer nodes that got a position-dependent bias map


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
    :func:`plan_removal`).

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
            del requests[node]  # e.g. a grouped conv: its channels stay
    removed = plan_removal(analysis, requests, strict=strict, channel_multiple=channel_multiple)
    keep = keep_indices(analysis, removed)
    merge_classes = _merge_classes(analysis, merge_into or {}, by_name, removed)
    consumers = _consumers_losing_inputs(gm, analysis, keep)
    captured = {}
    if fold_constants and consumers:
        capture = _CaptureInputs(gm, set(consumers))
        with torch.no_grad():
            capture.run(*example_inputs)
        captured = capture.captured
    bias_maps = []
    removed_counts = {}
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            src = node.args[0] if node.args else None
            out_keep, in_keep = keep.get(node), keep.get(src) if isinstance(src, fx.Node) else None
            if isinstance(module, nn.Conv2d) and (out_keep is not None or in_keep is not None):
                if node in analysis.producers and out_keep is not None:
                    removed_counts[node.name] = module.out_channels - len(out_keep)
                bias_map = _fix_consumer(module, node, src, analysis, keep, captured, merge_classes)
                new = _sliced_conv(module, out_keep, in_keep)
                gm.add_submodule(node.target, new)
                if bias_map is not None:
                    _insert_bias_map(gm, node, bias_map if out_keep is None else bias_map[out_keep])
                    bias_maps.append(node.name)
                _slice_mask(node, out_keep)
            elif isinstance(module, nn.Linear) and in_keep is not None:
                _fix_consumer(module, node, src, analysis, keep, captured, merge_classes)
                cols = expand_columns(in_keep, analysis.channels[src].expansion)
                gm.add_submodule(node.target, _sliced_linear(module, cols))
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and out_keep is not None:
                gm.add_submodule(node.target, batchnorm_channels(module, out_keep))
            elif isinstance(module, nn.PReLU) and module.num_parameters > 1 and out_keep is not None:
                new = nn.PReLU(len(out_keep))
                with torch.no_grad():
                    new.weight.copy_(module.weight[out_keep])
                gm.add_submodule(node.target, new)
        elif node.op == "call_function" and node.target is F.batch_norm and node in keep:
            _slice_functional_batchnorm(gm, node, keep[node])
    gm.graph.lint()
    gm.recompile()
    propagate_shapes(gm, example_inputs)
    return RemoveChannelsResult(gm, removed_counts, bias_maps)


def _slice_mask(node: fx.Node, out_keep: torch.Tensor | None) -> None:
    meta = swpfx_meta(node)
    if out_keep is not None and "mask" in meta:
        meta["mask"] = meta["mask"][out_keep]


def _consumers_losing_inputs(gm: fx.GraphModule, analysis: ChannelAnalysis, keep) -> list[fx.Node]:
    """Conv (groups=1) and Linear nodes whose input loses channels."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or node.args[0] not in keep:
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            out.append(node)
    return out


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


def _fix_consumer(module, node, src, analysis, keep, captured, merge_classes):
    """Account for removed input channels of a consumer before they are sliced away.

    Returns a position-dependent bias map if one is needed, else None.
    """
    if not (isinstance(module, nn.Linear) or module.groups == 1) or src not in keep:
        return None
    info = analysis.channels[src]
    classes = analysis.classes_of(src)
    kept = torch.zeros(info.width, dtype=torch.bool)
    kept[keep[src]] = True
    removed_in = (~kept).nonzero().flatten()
    if merge_classes:
        position = {int(cls): c for c, cls in enumerate(classes.tolist())}
        pairs = [(c, position[merge_classes[int(classes[c])]]) for c in removed_in.tolist()
                 if int(classes[c]) in merge_classes and merge_classes[int(classes[c])] in position]
        _merge_input_weights(module.weight, pairs, info.expansion)
        return None
    if node not in captured:
        return None
    contribution = removed_contribution(module, captured[node], removed_in, info.expansion)
    if is_spatially_constant(contribution):
        delta = contribution if contribution.dim() == 1 else contribution[:, 0, 0]
        _add_bias(module, delta)
        return None
    return contribution.to(module.weight.dtype)

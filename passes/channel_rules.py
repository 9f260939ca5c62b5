"""Channel rules: how each op couples, passes or pins channels, and how it is cut when channels go.

One registry read by both channel passes, as ``count_costs`` reads its formula
registry: :mod:`.analyze_channels` asks an op's rule how the op relates the
channels of its inputs and output (:meth:`ChannelRule.relate`), and
:mod:`.remove_channels` asks the same rule for the op cut down to the channels
that stay (:meth:`ChannelRule.slice`) and, when dead filters' constants are
folded, whether the op keeps a spatially constant channel constant
(:meth:`ChannelRule.keeps_uniform`) or is a linear spatial map, the same on every
channel, that can be replayed on a map of ones (:meth:`ChannelRule.linear_spatial`).

A rule is found by module type (along the type's MRO, so subclasses share their
base's rule), by function, or by method name (a string). An op without a rule
pins the channels it reads and its output is opaque: nothing it touches is
removed, so an unknown op is never wrong, only in the way.

Supporting a new op is one entry. A leaf module of your own that acts per
channel, such as a learnable per-channel scale, needs :class:`Channelwise`
(output channel c is input channel c) and a ``slice`` keeping its parameters of
the kept channels:

    >>> import torch
    >>> from torch import nn
    >>> from swpfx.tracing import trace
    >>> from swpfx.passes.remove_channels import remove_channels
    >>> class ChannelScale(nn.Module):
    ...     def __init__(self, channels):
    ...         super().__init__()
    ...         self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))
    ...     def forward(self, x):
    ...         return x * self.scale[:, None, None]
    >>> @register(ChannelScale)
    ... class ChannelScaleRule(Channelwise):
    ...     def slice(self, module, kept):
    ...         new = ChannelScale(len(kept.out))
    ...         new.scale.data.copy_(module.scale.detach()[kept.out])
    ...         return new
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), ChannelScale(8), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(144, 2))
    >>> x = torch.randn(1, 3, 10, 10)
    >>> gm = trace(model.eval(), leaf_modules=[ChannelScale])
    >>> result = remove_channels(gm, (x,), {"_0": [1, 2, 5]})
    >>> result.removed, gm.get_submodule("1").scale.shape, gm.get_submodule("2").in_channels
    ({'_0': 3}, torch.Size([5]), 5)

Without the rule the scale module would pin conv ``_0``'s channels (``removed == {}``).
A rule whose output does not carry its input's channels one to one must pin
its inputs (``graph.unknown(node)``), since only ``Conv2d`` and ``Linear``
consumers get the contribution of removed input channels folded.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import skip_init
from torchvision.ops import stochastic_depth

from .graph_utils import batchnorm_channels, get_attr_path, new_conv, pass_error, tensor_shape, unique_attr_name

if TYPE_CHECKING:  # the builder of analyze_channels; rules only call its methods
    from .analyze_channels import ChannelGraph

PASS = "remove_channels"  # slicing errors are raised while removing channels


# ---------------------------------------------------------------- what rules read and write


@dataclass
class NodeChannels:
    """Where a node's channels live: ``first`` element id, ``width`` channels, ``expansion``
    columns per channel (H·W after a flatten feeding a Linear, else 1)."""

    first: int
    width: int
    expansion: int = 1

    def elements(self) -> range:
        return range(self.first, self.first + self.width)


@dataclass
class GroupedConv:
    """A grouped (non-depthwise) conv: ``groups`` equal groups over its input and output channels."""

    groups: int
    inputs: NodeChannels
    outputs: NodeChannels


def expand_columns(channels: torch.Tensor, expansion: int) -> torch.Tensor:
    """Channel indices -> column indices of a flatten with ``expansion`` columns per channel."""
    if expansion == 1:
        return channels
    return (channels[:, None] * expansion + torch.arange(expansion)).reshape(-1)


@dataclass
class Kept:
    """What one node keeps once channels go: index tensors (sorted), None where nothing goes."""

    gm: fx.GraphModule
    node: fx.Node
    out: torch.Tensor | None  # kept channels of the node's output
    inputs: torch.Tensor | None  # kept channels of its first input
    out_expansion: int = 1
    input_expansion: int = 1

    def out_columns(self) -> torch.Tensor | None:
        """Kept output positions along dim 1 (channels, or flatten columns)."""
        return None if self.out is None else expand_columns(self.out, self.out_expansion)

    def input_columns(self) -> torch.Tensor | None:
        return None if self.inputs is None else expand_columns(self.inputs, self.input_expansion)


# ---------------------------------------------------------------- the registry


class ChannelRule:
    """How one kind of op treats channels. Subclass it (or a built-in rule) and :func:`register` it.

    ``relate(graph, node, module)`` records the node's channels on ``graph`` (the
    analysis builder): ``graph.same_as(node, src)`` (the same channels),
    ``graph.new(node, width)`` (new ones), ``graph.union(elements_a, elements_b)``
    (pairwise the same channel), ``graph.opaque(node, reason)`` (unremovable),
    ``graph.pin_inputs(node, reason)`` (inputs must stay), ``graph.unknown(node)``
    (both); ``graph.channels[n]`` are the :class:`NodeChannels` of visited nodes.
    ``module`` is the called module (None for functions and methods).
    """

    def relate(self, graph: ChannelGraph, node: fx.Node, module: nn.Module | None) -> None:
        graph.unknown(node)

    def slice(self, module: nn.Module | None, kept: Kept) -> nn.Module | None:
        """The module cut down to ``kept`` channels (a new module), or None if nothing needs cutting.

        Function and method rules may edit ``kept.gm`` instead (and return None).
        """
        return None

    def keeps_uniform(self, node: fx.Node, module: nn.Module | None) -> bool:
        """Whether a channel constant over the positions stays constant (False: zero padding)."""
        return True

    def linear_spatial(self, node: fx.Node, module: nn.Module | None) -> bool:
        """Whether the op is the same linear spatial map on every channel (pads, average pools, upsampling)."""
        return False


RULES: dict[Any, ChannelRule] = {}


def register(*keys: Any) -> Callable:
    """Register a rule (a :class:`ChannelRule` subclass, instantiated, or an instance) for module types,
    functions, or method names (strings); a later registration of a key replaces the earlier one."""

    def wrap(rule):
        instance = rule() if isinstance(rule, type) else rule
        for key in keys:
            RULES[key] = instance
        return rule

    return wrap


def rule_for(node: fx.Node, module: nn.Module | None = None) -> ChannelRule | None:
    """The rule of ``node`` (``module``: the module a call_module node calls), or None."""
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in RULES:
                return RULES[cls]
        return None
    if node.op in ("call_function", "call_method"):
        return RULES.get(node.target)
    return None


# ---------------------------------------------------------------- channel-wise ops


def keeps_input_channels(graph: ChannelGraph, node: fx.Node) -> bool:
    """The first argument is a tracked tensor with the output's rank, batch and channel sizes."""
    first = node.args[0] if node.args else None
    in_shape, out_shape = tensor_shape(first), tensor_shape(node)
    return (isinstance(first, fx.Node) and in_shape is not None and len(in_shape) == len(out_shape)
            and in_shape[:2] == out_shape[:2] and first in graph.channels)


class Channelwise(ChannelRule):
    """Output channel c is input channel c (activations, norms, pooling, padding, copies)."""

    def relate(self, graph, node, module):
        if keeps_input_channels(graph, node) and not getattr(module, "return_indices", False):
            graph.same_as(node, node.args[0])
        else:
            graph.unknown(node)


register(
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU,
    nn.Mish, nn.Hardtanh, nn.Softplus, nn.AlphaDropout, nn.MaxPool2d, nn.AdaptiveMaxPool2d,
    F.relu, torch.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.gelu, F.elu, F.leaky_relu, F.hardtanh, F.mish, F.softplus, F.dropout, F.dropout2d, F.max_pool2d,
    F.adaptive_max_pool2d, torch.clamp, F.relu_, torch.relu_,
    stochastic_depth,  # torchvision's StochasticDepth is an fx.wrap'ped function; identity at inference
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "clamp", "clamp_", "detach",
    "float", "to", "type_as",
)(Channelwise)


@register(nn.Identity, nn.Dropout, nn.Dropout2d, nn.AdaptiveAvgPool2d, nn.Upsample, nn.UpsamplingNearest2d,
          nn.UpsamplingBilinear2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d,
          F.adaptive_avg_pool2d, F.interpolate)
class LinearSpatial(Channelwise):
    """Channel-wise and the same linear map of the positions on every channel (a constant may stay one)."""

    def linear_spatial(self, node, module):
        return True


@register(nn.ZeroPad2d, nn.ConstantPad2d)
class ConstantPad(Channelwise):
    """Zero (constant) padding: a constant channel becomes position-dependent; linear if the value is 0."""

    def keeps_uniform(self, node, module):
        return False

    def linear_spatial(self, node, module):
        return module.value == 0


def call_args(node: fx.Node, names: tuple[str, ...], defaults: tuple) -> dict:
    """A call node's arguments by name, with ``defaults`` for those not given."""
    values = dict(zip(names, defaults))
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return values


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def avg_pool_keeps_uniform(padding, count_include_pad, divisor_override) -> bool:
    """A constant stays constant unless zero padding is averaged in or the divisor is forced."""
    return divisor_override is None and not (bool(count_include_pad) and any(p > 0 for p in _pair(padding)))


@register(nn.AvgPool2d)
class AvgPool(LinearSpatial):
    def keeps_uniform(self, node, module):
        return avg_pool_keeps_uniform(module.padding, module.count_include_pad, module.divisor_override)


@register(F.avg_pool2d)
class AvgPoolFunction(LinearSpatial):
    def keeps_uniform(self, node, module):
        a = call_args(node, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                             "divisor_override"), (None, None, None, 0, False, True, None))
        return avg_pool_keeps_uniform(a["padding"], a["count_include_pad"], a["divisor_override"])


@register(F.pad)
class PadFunction(Channelwise):
    _NAMES, _DEFAULTS = ("input", "pad", "mode", "value"), (None, None, "constant", None)

    def keeps_uniform(self, node, module):
        return call_args(node, self._NAMES, self._DEFAULTS)["mode"] != "constant"

    def linear_spatial(self, node, module):
        return call_args(node, self._NAMES, self._DEFAULTS)["value"] in (None, 0)


@register(nn.BatchNorm2d, nn.BatchNorm1d)
class BatchNorm(Channelwise):
    def slice(self, module, kept):
        return None if kept.out is None else batchnorm_channels(module, kept.out_columns())


@register(nn.PReLU)
class PReLU(Channelwise):
    """One slope, or one per channel (sliced with them)."""

    def relate(self, graph, node, module):
        if module.num_parameters in (1, tensor_shape(node)[1]):
            super().relate(graph, node, module)
        else:
            graph.unknown(node)

    def slice(self, module, kept):
        if kept.out is None or module.num_parameters == 1:
            return None
        weight = module.weight.detach()[kept.out_columns()]
        new = nn.PReLU(len(weight), device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
        return new


@register(F.batch_norm)
class FunctionalBatchNorm(Channelwise):
    """``F.batch_norm`` whose per-channel tensors are plain attributes read only here (so they can be sliced)."""

    def relate(self, graph, node, module):
        extras = list(node.args[1:5]) + [node.kwargs.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
        if all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1) for a in extras):
            super().relate(graph, node, module)
        else:
            graph.unknown(node)

    def slice(self, module, kept):
        if kept.out is None:
            return None
        gm, keep = kept.gm, kept.out_columns()
        for arg in kept.node.all_input_nodes[1:]:
            if arg.op != "get_attr":
                continue
            value = get_attr_path(gm, arg.target)
            path = unique_attr_name(gm, f"{arg.target}_pruned")
            owner, _, leaf = path.rpartition(".")
            holder = gm.get_submodule(owner) if owner else gm
            sliced = value.detach()[keep].clone()
            if isinstance(value, nn.Parameter):
                holder.register_parameter(leaf, nn.Parameter(sliced, requires_grad=value.requires_grad))
            else:
                holder.register_buffer(leaf, sliced)
            arg.target = path
        return None


# ---------------------------------------------------------------- ops that join, offset or reshape channels


@register(operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
          torch.add, torch.sub, torch.mul, torch.div, "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")
class Elementwise(ChannelRule):
    """Same-shape elementwise ops (residual adds, SE scaling): channel c of every operand is one channel."""

    def relate(self, graph, node, module):
        out_shape = tensor_shape(node)
        if any(k != "alpha" for k in node.kwargs):
            return graph.unknown(node)
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        aligned = [a for a in tensors if a in graph.channels and tensor_shape(a) is not None
                   and len(tensor_shape(a)) == len(out_shape) and tensor_shape(a)[1] == out_shape[1]
                   and graph.channels[a].expansion == 1]
        if len(aligned) != len(tensors) or not aligned:
            # broadcasting across channels (an (N,1,H,W) map, a (C,1,1) parameter): not channel-wise
            return graph.unknown(node, "an elementwise op broadcasting across channels")
        graph.same_as(node, aligned[0])
        for other in aligned[1:]:
            graph.union(graph.channels[aligned[0]].elements(), graph.channels[other].elements())


@register(torch.cat, torch.concat)
class Concat(ChannelRule):
    """A concat along channels: the output's channels are its inputs', offset."""

    def relate(self, graph, node, module):
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out_shape = tensor_shape(node)
        if dim < 0:
            dim += len(out_shape)
        if dim != 1 or not all(isinstance(t, fx.Node) and t in graph.channels and graph.channels[t].expansion == 1
                               for t in tensors):
            return graph.unknown(node, "a concat along a non-channel dimension")
        out = graph.new(node, out_shape[1])
        offset = out.first
        for t in tensors:
            info = graph.channels[t]
            graph.union(info.elements(), range(offset, offset + info.width))
            offset += info.width


def flatten_channels(graph: ChannelGraph, node: fx.Node, start_dim: int, end_dim: int) -> None:
    """``flatten(x, 1, -1)``: the same channels, each now ``H·W`` columns wide."""
    src = node.args[0]
    in_shape = tensor_shape(src)
    if src not in graph.channels or start_dim != 1 or end_dim not in (-1, len(in_shape) - 1):
        return graph.unknown(node, "a flatten that does not keep the batch dimension")
    info = graph.channels[src]
    spatial = int(np.prod(in_shape[2:])) if len(in_shape) > 2 else 1
    graph.channels[node] = NodeChannels(info.first, info.width, info.expansion * spatial)


@register(nn.Flatten, torch.flatten, "flatten")
class Flatten(ChannelRule):
    def relate(self, graph, node, module):
        if module is not None:
            return flatten_channels(graph, node, module.start_dim, module.end_dim)
        args = list(node.args) + [None, None]
        flatten_channels(graph, node, node.kwargs.get("start_dim", args[1] if args[1] is not None else 0),
                         node.kwargs.get("end_dim", args[2] if args[2] is not None else -1))


def is_batch_flatten(node: fx.Node) -> bool:
    """``x.view(x.size(0), -1)`` / ``reshape`` of the same form."""
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    if len(sizes) != 2 or sizes[1] != -1:
        return False
    batch = sizes[0]
    return isinstance(batch, fx.Node) and batch.op == "call_method" and batch.target == "size" and batch.args[1:] == (0,)


@register("view", "reshape")
class BatchFlatten(ChannelRule):
    """``view``/``reshape`` to (N, -1) flattens; any other view may reorder channels."""

    def relate(self, graph, node, module):
        if is_batch_flatten(node):
            flatten_channels(graph, node, 1, -1)
        else:
            graph.unknown(node)


@register(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
class SpatialReduction(ChannelRule):
    """A reduction over spatial dims only (``x.mean((2, 3))``) keeps the channels."""

    def relate(self, graph, node, module):
        src = node.args[0]
        in_shape = tensor_shape(src)
        if src not in graph.channels or in_shape is None or graph.channels[src].expansion != 1:
            return graph.unknown(node)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None:
            return graph.unknown(node)
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d + len(in_shape) if d < 0 else d for d in dims]
        out_shape = tensor_shape(node)
        if 0 not in dims and 1 not in dims and len(out_shape) >= 2 and out_shape[1] == in_shape[1]:
            graph.same_as(node, src)
        else:
            graph.unknown(node)


# ---------------------------------------------------------------- producers and consumers


def kept_groups(groups: int, in_channels: int, out_channels: int, out_keep: torch.Tensor | None,
                in_keep: torch.Tensor | None) -> torch.Tensor:
    """The groups of a grouped conv that keep an input or an output once ``out_keep`` / ``in_keep`` (None: all) stay.

    A depthwise conv keeps one group per kept channel.

    >>> kept_groups(4, 8, 8, torch.tensor([0, 1, 6, 7]), torch.tensor([0, 1, 6, 7])).tolist()
    [0, 3]
    """
    out_idx = torch.arange(out_channels) if out_keep is None else out_keep
    in_idx = torch.arange(in_channels) if in_keep is None else in_keep
    return torch.unique(torch.cat([in_idx // (in_channels // groups), out_idx // (out_channels // groups)]))


def grouped_weight(weight: torch.Tensor, groups: int, out_keep: torch.Tensor, in_keep: torch.Tensor,
                   in_channels: int, node: fx.Node | None = None) -> tuple[torch.Tensor, int]:
    """The weight of a grouped conv restricted to ``out_keep`` / ``in_keep`` (global indices); new group count.

    Every remaining group must keep the same number of inputs and outputs (the planner ensures it).
    """
    per_in, per_out = in_channels // groups, weight.shape[0] // groups
    in_groups, out_groups = in_keep // per_in, out_keep // per_out
    kept = kept_groups(groups, in_channels, weight.shape[0], out_keep, in_keep)
    in_counts = torch.bincount(in_groups, minlength=groups)[kept]
    out_counts = torch.bincount(out_groups, minlength=groups)[kept]
    if not (in_counts == in_counts[0]).all() or not (out_counts == out_counts[0]).all() or in_counts[0] == 0 \
            or out_counts[0] == 0:
        raise pass_error(PASS, node, f"unequal groups after removal (inputs per group {in_counts.tolist()}, "
                                     f"outputs per group {out_counts.tolist()})")
    local_in = (in_keep % per_in).reshape(len(kept), -1)  # (G', Cg'), sorted within each group
    rank = torch.searchsorted(kept, out_groups)  # output row -> its group among the kept ones
    cols = local_in[rank].to(weight.device)  # (O', Cg')
    rows = weight[out_keep]
    index = cols[:, :, None, None].expand(-1, -1, *weight.shape[2:])
    return torch.gather(rows, 1, index), len(kept)


def sliced_conv(conv: nn.Conv2d, out_keep: torch.Tensor | None, in_keep: torch.Tensor | None,
                node: fx.Node | None = None) -> nn.Conv2d:
    """``conv`` with only output channels ``out_keep`` and input channels ``in_keep`` (None: all)."""
    weight, bias = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels
    groups = conv.groups
    if conv.groups > 1 and not depthwise:
        out_keep = torch.arange(conv.out_channels) if out_keep is None else out_keep
        in_keep = torch.arange(conv.in_channels) if in_keep is None else in_keep
        bias = None if bias is None else bias[out_keep]
        weight, groups = grouped_weight(weight, conv.groups, out_keep, in_keep, conv.in_channels, node)
    else:
        if out_keep is not None:
            weight = weight[out_keep]
            bias = None if bias is None else bias[out_keep]
        if in_keep is not None and not depthwise:
            weight = weight[:, in_keep]
        if depthwise and in_keep is not None:
            groups = len(in_keep)
    return new_conv(weight, bias, groups=groups, like=conv)


@register(nn.Conv2d)
class Conv(ChannelRule):
    """Every conv starts new channels; a depthwise conv's are tied to its input's (c -> c·m … c·m+m-1);
    a grouped conv records its groups, which must stay equal."""

    def relate(self, graph, node, module):
        src = node.args[0] if node.args else None
        out_ch = tensor_shape(node)[1]
        if not isinstance(src, fx.Node) or src not in graph.channels or graph.channels[src].expansion != 1:
            return graph.unknown(node, "a conv whose input channels are not tracked")
        out = graph.new(node, out_ch)
        graph.producers[node] = out
        if module.groups == module.in_channels and module.groups > 1:
            mult = out_ch // module.in_channels
            graph.union(np.repeat(np.asarray(graph.channels[src].elements()), mult), out.elements())
        elif module.groups > 1:  # equal counts per group are planned by remove_channels
            graph.grouped[node] = GroupedConv(module.groups, graph.channels[src], out)

    def slice(self, module, kept):
        return sliced_conv(module, kept.out, kept.inputs, kept.node)


@register(nn.Linear)
class Linear(ChannelRule):
    """A Linear on a (N, features) tensor: its input columns can go, its outputs are opaque."""

    def relate(self, graph, node, module):
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src not in graph.channels or len(tensor_shape(src)) != 2:
            return graph.unknown(node, "a Linear applied to a tensor with more than two dims")
        graph.opaque(node, "a Linear output")

    def slice(self, module, kept):
        cols = kept.input_columns()
        if cols is None:
            return None
        new = skip_init(nn.Linear, len(cols), module.out_features, module.bias is not None,
                        device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(module.weight[:, cols])
            if module.bias is not None:
                new.bias.copy_(module.bias)
        return new

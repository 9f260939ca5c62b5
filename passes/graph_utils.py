"""Small helpers shared by the passes: errors, attribute paths, conv argument access, module constructors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata
from torch.nn.utils import skip_init

CONV2D_FUNCTIONS = (torch.conv2d, F.conv2d)
# Tensor methods that build a new tensor from their tensor's dtype and device only, never its values
# (remove_channels' ones maps call new_ones).
NEW_TENSOR_METHODS = frozenset({"new_ones", "new_zeros", "new_empty", "new_full"})
META_KEY = "swpfx"


class PassError(ValueError):
    """A pass could not handle a node; the message names the pass and the node."""


def pass_error(pass_name: str, node: fx.Node | None, message: str, cls: type[Exception] = PassError) -> Exception:
    where = f" at node {node.format_node()}" if node is not None else ""
    return cls(f"swpfx.{pass_name}: {message}{where}")


def swpfx_meta(node: fx.Node) -> dict:
    """The node's ``meta['swpfx']`` dict, created on first use."""
    return node.meta.setdefault(META_KEY, {})


def get_attr_path(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def split_path(target: str) -> tuple[str, str]:
    owner, _, leaf = target.rpartition(".")
    return owner, leaf


def erase_replaced(gm: fx.GraphModule, nodes, keep: str | None = None) -> None:
    """Erase ``nodes`` (users before producers) and every submodule they called that no node calls any more,
    except ``keep`` (a replacement that took a removed module's name)."""
    for node in nodes:
        target = node.target if node.op == "call_module" else None
        gm.graph.erase_node(node)
        if target not in (None, keep) and not any(n.op == "call_module" and n.target == target for n in gm.graph.nodes):
            gm.delete_submodule(target)


def unique_attr_name(root: nn.Module, base: str) -> str:
    """``base`` (a dotted path) if it is free on ``root``, else ``base_1``, ``base_2``..."""
    candidate, i = base, 0
    while True:
        try:
            get_attr_path(root, candidate)
        except AttributeError:
            return candidate
        i += 1
        candidate = f"{base}_{i}"


def tensor_shape(node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for ``node`` (None for non-nodes and non-tensor results)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.device == b.device and torch.equal(a, b))
    return type(a) is type(b) and a == b


def modules_equal(a: nn.Module, b: nn.Module) -> bool:
    """Same type, attributes, mode and (bitwise) parameters and buffers, also of submodules:
    one may stand in for the other."""
    if a is b:
        return True
    pairs = list(zip(a.modules(), b.modules()))
    if len(pairs) != len(list(b.modules())) or len(pairs) != len(list(a.modules())):
        return False
    for x, y in pairs:
        if type(x) is not type(y) or x.training != y.training:
            return False
        for own_x, own_y in ((x._parameters, y._parameters), (x._buffers, y._buffers),
                             ({k: v for k, v in vars(x).items() if not k.startswith("_")},
                              {k: v for k, v in vars(y).items() if not k.startswith("_")})):
            if own_x.keys() != own_y.keys() or not all(_values_equal(own_x[k], own_y[k]) for k in own_x):
                return False
    return True


def is_conv2d_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CONV2D_FUNCTIONS


@dataclass
class Conv2dArgs:
    """The arguments of a functional ``conv2d`` call, with defaults filled in."""

    input: fx.Node
    weight: Any
    bias: Any = None
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1

    @classmethod
    def of(cls, node: fx.Node) -> Conv2dArgs:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        values = dict(zip(names, node.args))
        values.update(node.kwargs)
        return cls(**values)

    def as_args(self) -> tuple:
        return (self.input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def ancestors(node: fx.Node) -> Iterator[fx.Node]:
    """All nodes ``node`` depends on (not including itself)."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        stack.extend(n.all_input_nodes)


def on_every_path(graph: fx.Graph) -> set[fx.Node]:
    """The nodes every path from the graph's inputs to its output runs through (the output's dominators).

    Example:
        >>> class Branchy(torch.nn.Module):
        ...     def forward(self, x):
        ...         y = x.relu()
        ...         return y + y.sigmoid()
        >>> sorted(n.name for n in on_every_path(fx.symbolic_trace(Branchy()).graph))
        ['add', 'output', 'relu', 'x']
    """
    import networkx as nx

    flow, source = nx.DiGraph(), "<inputs>"
    for node in graph.nodes:
        if node.op == "placeholder":
            flow.add_edge(source, node)
        flow.add_edges_from((node, user) for user in node.users)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    if source not in flow or output not in nx.descendants(flow, source):
        return set()
    dominator = nx.immediate_dominators(flow, source)
    chain, node = set(), output
    while node != source:
        chain.add(node)
        node = dominator[node]
    return chain


def depends_only_on_attributes(node: fx.Node) -> bool:
    """True if ``node`` is computed from module attributes alone (no inputs, no submodule calls)."""
    if node.op == "get_attr":
        return True
    if node.op in ("placeholder", "call_module", "output"):
        return False
    return all(a.op not in ("placeholder", "call_module") for a in ancestors(node))


def evaluate_attribute_expression(gm: nn.Module, node: fx.Node) -> Any:
    """Evaluate a node that depends only on module attributes (e.g. a conv's effective weight)."""
    cache: dict[fx.Node, Any] = {}

    def run(n: fx.Node) -> Any:
        if n in cache:
            return cache[n]
        args = fx.node.map_arg(n.args, run)
        kwargs = fx.node.map_arg(n.kwargs, run)
        if n.op == "get_attr":
            value = get_attr_path(gm, n.target)
        elif n.op == "call_function":
            value = n.target(*args, **kwargs)
        elif n.op == "call_method":
            value = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {n.op} node {n.name} without inputs")
        cache[n] = value
        return value

    return run(node)


def erase_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop get_attr nodes nobody uses and submodules no node references."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def batchnorm_channels(bn: nn.modules.batchnorm._BatchNorm, keep) -> nn.Module:
    """A new BatchNorm of the same type holding only channels ``keep`` (indices) of ``bn``."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    new = skip_init(type(bn), len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    device=bn.weight.device if bn.affine else None,
                    dtype=bn.weight.dtype if bn.affine else None)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def new_conv(weight: torch.Tensor, bias: torch.Tensor | None = None, stride=None, padding=None, dilation=None,
             groups: int | None = None, *, like: nn.Conv2d | None = None, padding_mode: str | None = None) -> nn.Conv2d:
    """A ``nn.Conv2d`` holding copies of ``weight`` (O, C/groups, Kh, Kw) and ``bias`` (no random init: ``skip_init``).

    Options not given come from ``like`` (a conv whose geometry, padding mode and
    training flag to copy), else from ``nn.Conv2d``'s defaults; the kernel size and
    channel counts follow from ``weight`` and ``groups``.

    Example:
        >>> conv = new_conv(torch.ones(4, 3, 3, 3), torch.zeros(4), padding=1, groups=2)
        >>> conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding
        (6, 4, (3, 3), (1, 1))
        >>> new_conv(torch.ones(4, 1, 1, 1), like=conv, groups=1).padding
        (1, 1)
    """
    def option(value, name: str, default):
        if value is not None:
            return value
        return getattr(like, name) if like is not None else default

    groups = option(groups, "groups", 1)
    out_ch, in_per_group, kh, kw = weight.shape
    conv = skip_init(nn.Conv2d, in_per_group * groups, out_ch, (kh, kw), stride=option(stride, "stride", 1),
                     padding=option(padding, "padding", 0), dilation=option(dilation, "dilation", 1), groups=groups,
                     bias=bias is not None, padding_mode=option(padding_mode, "padding_mode", "zeros"),
                     device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    if like is not None:
        conv.train(like.training)
    return conv

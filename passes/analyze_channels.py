"""Channel-dependency analysis: which output channels of which convs are coupled.

Every channel-carrying tensor in the graph (dim 1 of an (N, C, ...) tensor) is
split into per-channel *elements*. Ops relate elements of their inputs and
output: channel-wise ops (BatchNorm, activations, pooling, padding) and
same-shape elementwise ops (residual adds, SE scaling) identify them, a concat
offsets them, a depthwise conv ties input c to outputs c·m … c·m+m-1. Elements
joined this way form a *channel class*: one channel that must be kept or removed
everywhere at once. A class also records

- its producers: ``(conv node, output channel)`` pairs (every conv starts new
  channels, except that a depthwise conv's are tied to its input's; each one can
  be removed);
- whether something opaque feeds it (model inputs, Linear outputs, constant maps,
  ops this analysis does not understand): such a class can never be removed;
- whether it is pinned: it reaches the graph output or an op that mixes or
  reorders channels (split, chunk, view, channel shuffle, LayerNorm ...).

A grouped (non-depthwise) conv does not tie its input and output channels
together, but it needs the same number of channels in every group: its input
and output channels are recorded in ``grouped`` so that ``remove_channels`` can
plan equal counts per group (or whole groups).

This is an analysis only; ``remove_channels`` does the surgery.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .graph_utils import pass_error

PASS = "analyze_channels"

CHANNELWISE_MODULES = (
    nn.BatchNorm2d, nn.BatchNorm1d, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid,
    nn.Tanh, nn.GELU, nn.ELU, nn.LeakyReLU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.AlphaDropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d,
    nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d, nn.PReLU,
)
CHANNELWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, torch.sigmoid, F.sigmoid, torch.tanh,
    F.tanh, F.gelu, F.elu, F.leaky_relu, F.hardtanh, F.mish, F.softplus, F.dropout, F.dropout2d, F.max_pool2d,
    F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, F.pad, F.batch_norm,
    torch.clamp, torch.nn.functional.relu_, torch.relu_,
}
CHANNELWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "contiguous", "clone", "clamp", "clamp_",
    "detach", "float", "to", "type_as",
}
BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                    operator.imul, torch.add, torch.sub, torch.mul, torch.div}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
CONCAT_FUNCTIONS = {torch.cat, torch.concat}
# Read only the shape of their input (e.g. the ones map of a removed channel's constant).
SHAPE_ONLY_FUNCTIONS = {torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like}
FLATTEN_FUNCTIONS = {torch.flatten}

try:  # torchvision's StochasticDepth is an fx.wrap'ped function; identity at inference
    from torchvision.ops import stochastic_depth as _stochastic_depth

    CHANNELWISE_FUNCTIONS.add(_stochastic_depth)
except ImportError:  # pragma: no cover
    pass


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


class _UnionFind:
    """Union-find over integer ids with path halving; grows on demand."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> np.ndarray:
        return np.fromiter((self.find(i) for i in range(len(self.parent))), dtype=np.int64, count=len(self.parent))


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


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze_channels`."""

    gm: fx.GraphModule
    channels: dict[fx.Node, NodeChannels]
    class_of: np.ndarray  # element id -> class id (root element)
    producers: dict[fx.Node, NodeChannels]  # conv nodes whose output channels are producers
    opaque: np.ndarray  # per element: fed by something unremovable
    pinned: np.ndarray  # per element: must not be removed
    reasons: dict[int, str] = field(default_factory=dict)  # class -> why pinned/opaque (first seen)
    grouped: dict[fx.Node, GroupedConv] = field(default_factory=dict)

    def classes_of(self, node: fx.Node) -> np.ndarray:
        info = self.channels[node]
        return self.class_of[info.first : info.first + info.width]

    def blocked_classes(self) -> set[int]:
        return self._blocked

    @cached_property
    def _blocked(self) -> set[int]:
        return set(self.class_of[self.opaque | self.pinned].tolist())

    def producer_elements_by_class(self) -> dict[int, list[tuple[fx.Node, int]]]:
        return self._producers_by_class

    @cached_property
    def _producers_by_class(self) -> dict[int, list[tuple[fx.Node, int]]]:
        out: dict[int, list[tuple[fx.Node, int]]] = defaultdict(list)
        for node, info in self.producers.items():
            for c, cls in enumerate(self.classes_of(node).tolist()):
                out[cls].append((node, c))
        return dict(out)

    @cached_property
    def group_constrained_classes(self) -> set[int]:
        """Classes that a grouped conv reads or writes: removable only in equal counts per group."""
        out: set[int] = set()
        for g in self.grouped.values():
            for info in (g.inputs, g.outputs):
                out.update(self.class_of[info.first : info.first + info.width].tolist())
        return out

    def independent_convs(self) -> list[str]:
        """Conv nodes each of whose output channels is its own freely removable class.

        Channels a grouped conv reads or writes are not free (equal counts per group).
        """
        blocked = self.blocked_classes() | self.group_constrained_classes
        by_class = self.producer_elements_by_class()
        names = []
        for node in self.producers:
            classes = self.classes_of(node).tolist()
            if len(set(classes)) == len(classes) and all(
                cls not in blocked and len(by_class[cls]) == 1 for cls in classes
            ):
                names.append(node.name)
        return names

    def coupled_groups(self) -> list[list[str]]:
        """Groups (≥ 2) of conv nodes whose output channels share freely removable classes."""
        blocked = self.blocked_classes() | self.group_constrained_classes
        uf, index = _UnionFind(), {}
        for node in self.producers:
            index[node] = uf.add(1)
        for cls, elems in self.producer_elements_by_class().items():
            if cls in blocked:
                continue
            for (a, _), (b, _) in zip(elems, elems[1:]):
                uf.union(index[a], index[b])
        groups: dict[int, list[str]] = defaultdict(list)
        for node, i in index.items():
            groups[uf.find(i)].append(node.name)
        independent = set(self.independent_convs())
        return [g for g in groups.values() if len(g) > 1 or (g[0] not in independent and self._removable_alone(g[0], blocked))]

    def _removable_alone(self, name: str, blocked: set[int]) -> bool:
        node = next(n for n in self.producers if n.name == name)
        return any(cls not in blocked for cls in self.classes_of(node).tolist())


class _Builder:
    """Walks the graph once, assigning elements and recording relations."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.uf = _UnionFind()
        self.channels: dict[fx.Node, NodeChannels] = {}
        self.producers: dict[fx.Node, NodeChannels] = {}
        self.opaque_elements: list[tuple[range, str]] = []
        self.pinned_elements: list[tuple[range, str]] = []
        self.grouped: dict[fx.Node, GroupedConv] = {}
        self.module_calls = defaultdict(int)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.module_calls[node.target] += 1

    # -- element bookkeeping
    def new(self, node: fx.Node, width: int, expansion: int = 1) -> NodeChannels:
        info = NodeChannels(self.uf.add(width), width, expansion)
        self.channels[node] = info
        return info

    def same_as(self, node: fx.Node, src: fx.Node) -> None:
        self.channels[node] = self.channels[src]

    def opaque(self, node: fx.Node, reason: str) -> None:
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            info = self.new(node, shape[1])
            self.opaque_elements.append((info.elements(), reason))

    def pin_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            if arg in self.channels:
                self.pinned_elements.append((self.channels[arg].elements(), f"{reason} ({node.format_node()})"))

    def unknown(self, node: fx.Node, reason: str = "an op this analysis does not know mixes or reorders channels") -> None:
        self.pin_inputs(node, reason)
        self.opaque(node, reason)

    # -- per-op rules
    def visit(self, node: fx.Node) -> None:
        if node.op == "output":
            self.pin_inputs(node, "the graph output")
            return
        shape = _shape(node)
        if shape is None and self.is_shape_query(node):
            return  # x.size(0), x.shape: the answer follows the pruned shapes
        if shape is None:
            # non-tensor or tuple outputs (split results): treat inputs as pinned
            self.pin_inputs(node, "an op with a non-tensor or multi-tensor result")
            return
        if node.op in ("placeholder", "get_attr"):
            self.opaque(node, "a model input or attribute")
            return
        if self.is_shape_only(node):
            self.opaque(node, "a constant map (only its input's shape is read)")
            return
        if len(shape) < 2:
            self.pin_inputs(node, "an op producing a tensor without a channel dimension")
            return
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        if module is not None and self.module_calls[node.target] > 1 and any(True for _ in module.parameters()):
            self.unknown(node, "a module with parameters called more than once")
        elif isinstance(module, nn.Conv2d):
            self.conv(node, module)
        elif isinstance(module, nn.Linear):
            self.linear(node)
        elif isinstance(module, nn.Flatten):
            self.flatten(node, module.start_dim, module.end_dim)
        elif self.is_channelwise(node, module):
            self.channelwise(node)
        elif self.is_binary(node):
            self.binary(node)
        elif node.op == "call_function" and node.target in CONCAT_FUNCTIONS:
            self.concat(node)
        elif node.op == "call_function" and node.target in FLATTEN_FUNCTIONS:
            args = list(node.args) + [None, None]
            self.flatten(node, node.kwargs.get("start_dim", args[1] if args[1] is not None else 0),
                         node.kwargs.get("end_dim", args[2] if args[2] is not None else -1))
        elif node.op == "call_method" and node.target == "flatten":
            args = list(node.args) + [None, None]
            self.flatten(node, node.kwargs.get("start_dim", args[1] if args[1] is not None else 0),
                         node.kwargs.get("end_dim", args[2] if args[2] is not None else -1))
        elif node.op == "call_method" and node.target in ("view", "reshape") and self.is_batch_flatten(node):
            self.flatten(node, 1, -1)
        elif self.is_spatial_reduction(node):
            self.channelwise(node)
        else:
            self.unknown(node)

    @staticmethod
    def is_shape_query(node: fx.Node) -> bool:
        if node.op == "call_method" and node.target in ("size", "dim"):
            return True
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
            return True
        return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and _Builder.is_shape_query(node.args[0])

    @staticmethod
    def is_shape_only(node: fx.Node) -> bool:
        """``torch.ones_like(x)``, and a ``x[...]`` slice read only by such ops: its values never matter."""
        if node.op == "call_function" and node.target in SHAPE_ONLY_FUNCTIONS:
            return True
        return (node.op == "call_function" and node.target is operator.getitem and bool(node.users)
                and all(u.op == "call_function" and u.target in SHAPE_ONLY_FUNCTIONS for u in node.users))

    def is_channelwise(self, node: fx.Node, module) -> bool:
        if module is not None:
            if isinstance(module, nn.PReLU) and module.num_parameters not in (1, _shape(node)[1]):
                return False
            return isinstance(module, CHANNELWISE_MODULES) and not getattr(module, "return_indices", False)
        if node.op == "call_function" and node.target in CHANNELWISE_FUNCTIONS:
            return self.first_input_keeps_shape(node) and (node.target is not F.batch_norm or self.functional_bn_ok(node))
        if node.op == "call_method" and node.target in CHANNELWISE_METHODS:
            return self.first_input_keeps_shape(node)
        return False

    def first_input_keeps_shape(self, node: fx.Node) -> bool:
        first = node.args[0] if node.args else None
        in_shape, out_shape = _shape(first), _shape(node)
        return (isinstance(first, fx.Node) and in_shape is not None and len(in_shape) == len(out_shape)
                and in_shape[:2] == out_shape[:2] and first in self.channels)

    def functional_bn_ok(self, node: fx.Node) -> bool:
        """F.batch_norm whose per-channel tensors are plain attributes (so they can be sliced)."""
        extras = list(node.args[1:5]) + [node.kwargs.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
        return all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr" and len(a.users) == 1) for a in extras)

    def channelwise(self, node: fx.Node) -> None:
        self.same_as(node, node.args[0])

    def is_binary(self, node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target in BINARY_FUNCTIONS) or (
            node.op == "call_method" and node.target in BINARY_METHODS
        )

    def binary(self, node: fx.Node) -> None:
        out_shape = _shape(node)
        tensors = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if any(k not in ("alpha",) for k in node.kwargs):
            return self.unknown(node)
        aligned = [a for a in tensors if a in self.channels and _shape(a) is not None
                   and len(_shape(a)) == len(out_shape) and _shape(a)[1] == out_shape[1]
                   and self.channels[a].expansion == 1]
        if len(aligned) != len(tensors) or not aligned:
            # broadcasting across channels (an (N,1,H,W) map, a (C,1,1) parameter): not channel-wise
            return self.unknown(node, "an elementwise op broadcasting across channels")
        self.same_as(node, aligned[0])
        first = self.channels[aligned[0]]
        for other in aligned[1:]:
            for a, b in zip(first.elements(), self.channels[other].elements()):
                self.uf.union(a, b)

    def concat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out_shape = _shape(node)
        if dim < 0:
            dim += len(out_shape)
        if dim != 1 or not all(isinstance(t, fx.Node) and t in self.channels and self.channels[t].expansion == 1 for t in tensors):
            return self.unknown(node, "a concat along a non-channel dimension")
        out = self.new(node, out_shape[1])
        offset = 0
        for t in tensors:
            info = self.channels[t]
            for c, e in enumerate(info.elements()):
                self.uf.union(e, out.first + offset + c)
            offset += info.width

    def flatten(self, node: fx.Node, start_dim: int, end_dim: int) -> None:
        src = node.args[0]
        in_shape = _shape(src)
        if src not in self.channels or start_dim != 1 or end_dim not in (-1, len(in_shape) - 1):
            return self.unknown(node, "a flatten that does not keep the batch dimension")
        info = self.channels[src]
        spatial = int(np.prod(in_shape[2:])) if len(in_shape) > 2 else 1
        self.channels[node] = NodeChannels(info.first, info.width, info.expansion * spatial)

    def is_batch_flatten(self, node: fx.Node) -> bool:
        """``x.view(x.size(0), -1)`` / ``reshape`` of the same form."""
        sizes = node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = sizes[0]
        if len(sizes) != 2 or sizes[1] != -1:
            return False
        batch = sizes[0]
        return isinstance(batch, fx.Node) and batch.op == "call_method" and batch.target == "size" and batch.args[1:] == (0,)

    def is_spatial_reduction(self, node: fx.Node) -> bool:
        if not (node.op == "call_method" and node.target in REDUCE_METHODS) and not (
            node.op == "call_function" and node.target in (torch.mean, torch.sum, torch.amax, torch.amin)
        ):
            return False
        src = node.args[0]
        in_shape = _shape(src)
        if src not in self.channels or in_shape is None or self.channels[src].expansion != 1:
            return False
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None:
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        dims = [d + len(in_shape) if d < 0 else d for d in dims]
        out_shape = _shape(node)
        return 0 not in dims and 1 not in dims and len(out_shape) >= 2 and out_shape[1] == in_shape[1]

    def conv(self, node: fx.Node, conv: nn.Conv2d) -> None:
        src = node.args[0] if node.args else None
        out_ch = _shape(node)[1]
        if not isinstance(src, fx.Node) or src not in self.channels or self.channels[src].expansion != 1:
            self.unknown(node, "a conv whose input channels are not tracked")
            return
        if conv.groups == 1:
            self.producers[node] = self.new(node, out_ch)
        elif conv.groups == conv.in_channels:
            out = self.new(node, out_ch)
            self.producers[node] = out
            mult = out_ch // conv.in_channels
            for c, e in enumerate(self.channels[src].elements()):
                for j in range(mult):
                    self.uf.union(e, out.first + c * mult + j)
        else:  # grouped: outputs are new channels; equal counts per group are planned by remove_channels
            out = self.new(node, out_ch)
            self.producers[node] = out
            self.grouped[node] = GroupedConv(conv.groups, self.channels[src], out)

    def linear(self, node: fx.Node) -> None:
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src not in self.channels or len(_shape(src)) != 2:
            self.unknown(node, "a Linear applied to a tensor with more than two dims")
            return
        self.opaque(node, "a Linear output")

    def build(self) -> ChannelAnalysis:
        for node in self.gm.graph.nodes:
            self.visit(node)
        n = len(self.uf.parent)
        class_of = self.uf.roots()
        opaque = np.zeros(n, dtype=bool)
        pinned = np.zeros(n, dtype=bool)
        reasons: dict[int, str] = {}
        for flags, entries in ((opaque, self.opaque_elements), (pinned, self.pinned_elements)):
            for elements, reason in entries:
                idx = np.arange(elements.start, elements.stop)
                flags[idx] = True
                for cls in set(class_of[idx].tolist()):
                    reasons.setdefault(cls, reason)
        return ChannelAnalysis(self.gm, self.channels, class_of, self.producers, opaque, pinned, reasons, self.grouped)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record ``node.meta['tensor_meta']`` by running ``gm`` once on ``example_inputs``."""
    # eval mode: a training-mode forward would update BatchNorm running statistics
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            try:  # fake tensors: shapes without the arithmetic (10x faster on big inputs)
                ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
            except Exception:  # an op fake tensors cannot run: do the real forward
                ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise pass_error(PASS, None, f"running the model on the example inputs failed: {exc}") from exc
    finally:
        for module, training in modes.items():
            module.training = training


def analyze_channels(gm: fx.GraphModule, example_inputs: tuple | None = None) -> ChannelAnalysis:
    """Find the channel classes of ``gm`` (convs as ``nn.Conv2d`` call_module nodes).

    With ``example_inputs`` shapes are propagated first; otherwise they must
    already be in ``node.meta['tensor_meta']``.

    Example:
        >>> import torch, torchvision
        >>> from swpfx.tracing import trace
        >>> gm = trace(torchvision.models.resnet18().eval())
        >>> analysis = analyze_channels(gm, (torch.randn(1, 3, 64, 64),))
        >>> "layer1_0_conv1" in analysis.independent_convs(), "layer1_0_conv2" in analysis.independent_convs()
        (True, False)
    """
    if example_inputs is not None:
        propagate_shapes(gm, tuple(example_inputs))
    return _Builder(gm).build()

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

How each op relates channels is its rule in :mod:`.channel_rules` (the registry
``remove_channels`` reads to slice the op); ops without a rule pin their inputs.
A module with parameters or buffers called more than once (a block applied to
two branches) holds one set of per-channel tensors: its input channels at every
call are one set of classes, and so are its output channels, so a channel goes
at every call or at none and the module is sliced once.

This is an analysis only; ``remove_channels`` does the surgery.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp

from .channel_rules import GroupedConv, NodeChannels, rule_for
from .graph_utils import NEW_TENSOR_METHODS, pass_error, tensor_shape

__all__ = ["ChannelAnalysis", "ChannelGraph", "GroupedConv", "NodeChannels", "analyze_channels", "propagate_shapes"]

PASS = "analyze_channels"

# Read only the shape of their input (e.g. the ones map of a removed channel's constant).
SHAPE_ONLY_FUNCTIONS = {torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like}


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per id in ``range(n)``: the smallest id connected to it by the pairs ``(a[k], b[k])``."""
    edges = coo_matrix((np.ones(len(a), dtype=np.int32), (a, b)), shape=(n, n))
    _, labels = connected_components(edges, directed=False)
    _, first = np.unique(labels, return_index=True)  # a component's first id is its smallest
    return first[labels]


@dataclass
class ChannelAnalysis:
    """Result of :func:`analyze_channels`: an analysis, so it never modifies ``gm`` (see :class:`PassResult`)."""

    gm: fx.GraphModule
    channels: dict[fx.Node, NodeChannels]
    class_of: np.ndarray  # element id -> class id (root element)
    producers: dict[fx.Node, NodeChannels]  # conv nodes whose output channels are producers
    opaque: np.ndarray  # per element: fed by something unremovable
    pinned: np.ndarray  # per element: must not be removed
    reasons: dict[int, str] = field(default_factory=dict)  # class -> why pinned/opaque (first seen)
    grouped: dict[fx.Node, GroupedConv] = field(default_factory=dict)

    modified = False

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.gm

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
        index = {node: i for i, node in enumerate(self.producers)}
        pairs = [(index[a], index[b]) for cls, elems in self.producer_elements_by_class().items() if cls not in blocked
                 for (a, _), (b, _) in zip(elems, elems[1:])]
        a, b = (np.array(side, dtype=np.int64) for side in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
        roots = components(len(index), a, b)
        groups: dict[int, list[str]] = defaultdict(list)
        for node, i in index.items():
            groups[int(roots[i])].append(node.name)
        independent = set(self.independent_convs())
        return [g for g in groups.values() if len(g) > 1 or (g[0] not in independent and self._removable_alone(g[0], blocked))]

    def _removable_alone(self, name: str, blocked: set[int]) -> bool:
        node = next(n for n in self.producers if n.name == name)
        return any(cls not in blocked for cls in self.classes_of(node).tolist())


class ChannelGraph:
    """Walks the graph once, assigning channel elements and recording how each op relates them.

    The op-specific part is the op's rule (:mod:`.channel_rules`); this class holds the
    bookkeeping the rules call and what holds for every op (graph inputs and output,
    shape queries, tensors without a channel dimension, modules called more than once).
    """

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.size = 0  # element ids handed out
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []  # elements that are the same channel
        self.channels: dict[fx.Node, NodeChannels] = {}
        self.producers: dict[fx.Node, NodeChannels] = {}
        self.opaque_elements: list[tuple[range, str]] = []
        self.pinned_elements: list[tuple[range, str]] = []
        self.grouped: dict[fx.Node, GroupedConv] = {}
        self.calls: dict[str, list[fx.Node]] = defaultdict(list)
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target].append(node)

    # -- element bookkeeping
    def new(self, node: fx.Node, width: int, expansion: int = 1) -> NodeChannels:
        info = NodeChannels(self.size, width, expansion)
        self.size += width
        self.channels[node] = info
        return info

    def same_as(self, node: fx.Node, src: fx.Node) -> None:
        self.channels[node] = self.channels[src]

    def union(self, a, b) -> None:
        """Element ``a[k]`` and ``b[k]`` are one channel, for every k (ranges or integer arrays)."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        if len(a) != len(b):
            raise ValueError(f"swpfx.{PASS}: union of {len(a)} with {len(b)} elements")
        self.pairs.append((a, b))

    def opaque(self, node: fx.Node, reason: str) -> None:
        shape = tensor_shape(node)
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

    # -- what holds for every op; the rest is the op's rule
    def visit(self, node: fx.Node) -> None:
        if node.op == "output":
            self.pin_inputs(node, "the graph output")
            return
        shape = tensor_shape(node)
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
        rule = rule_for(node, module)
        if rule is None:
            self.unknown(node)
        else:
            rule.relate(self, node, module)

    @staticmethod
    def is_shape_query(node: fx.Node) -> bool:
        if node.op == "call_method" and node.target in ("size", "dim"):
            return True
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
            return True
        return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
            and ChannelGraph.is_shape_query(node.args[0])

    @staticmethod
    def is_shape_only(node: fx.Node) -> bool:
        """``torch.ones_like(x)``, ``x.new_ones(size)``, and a ``x[...]`` slice read only by such ops: its values
        never matter."""
        if node.op == "call_function" and node.target in SHAPE_ONLY_FUNCTIONS:
            return True
        if node.op == "call_method" and node.target in NEW_TENSOR_METHODS:
            return True
        return (node.op == "call_function" and node.target is operator.getitem and bool(node.users)
                and all(u.op == "call_function" and u.target in SHAPE_ONLY_FUNCTIONS for u in node.users))

    def join_shared_modules(self) -> None:
        """A module called more than once holds one set of per-channel tensors: a channel of its input
        (of its output) is the same channel at every call, so it can go only where it can go at all."""
        for target, nodes in self.calls.items():
            module = self.gm.get_submodule(target)
            if len(nodes) < 2 or not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
                continue
            for side in ([n.args[0] if n.args else None for n in nodes], nodes):
                infos = [self.channels.get(n) if isinstance(n, fx.Node) else None for n in side]
                first = infos[0]
                if any(i is None or (i.width, i.expansion) != (first.width, first.expansion) for i in infos):
                    for info, node in zip(infos, nodes):
                        if info is not None:
                            self.pinned_elements.append(
                                (info.elements(), f"a module called more than once on different channels "
                                                  f"({node.format_node()})"))
                    continue
                for info in infos[1:]:
                    if info is not first:
                        self.union(first.elements(), info.elements())

    def build(self) -> ChannelAnalysis:
        for node in self.gm.graph.nodes:
            self.visit(node)
        self.join_shared_modules()
        n = self.size
        if self.pairs:
            a, b = (np.concatenate(side) for side in zip(*self.pairs))
        else:
            a = b = np.zeros(0, dtype=np.int64)
        class_of = components(n, a, b)
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
    return ChannelGraph(gm).build()

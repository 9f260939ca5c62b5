"""Plan the output memory of a graph's kernel calls: outputs never alive at once share one reused buffer.

Some calls in a graph (in ``swpfx``, the compiled kernels of
``convert(lowering="fused")``) can write their output into memory they are
given instead of a fresh tensor. Allocating a fresh output for every call costs
time (the new memory is not in cache when it is written), so this pass plans
reused memory for the outputs that only such calls read:

- a candidate is a ``call_module`` node for which ``takes_buffer(gm, node)``
  holds: its module accepts the keywords ``buffers`` and ``slot`` and returns a
  tensor aliasing none of its inputs (it writes into ``buffers.take(slot, shape)``);
- a candidate's output is *planned* when the graph shows every op that can
  read it: its readers are candidates, ops known to return new tensors (an
  out-of-place add, a Conv2d module, ``ones_like``...) and ops known to return a
  view of it or to change it in place (``getitem``, ``flatten``, an in-place
  ReLU...), whose results are followed to their own readers in turn. It is not
  planned when such a view reaches the graph's output or any op not in these
  tables (which might keep it);
- planned outputs get slots by their lifetimes in graph order (from the node to
  its last reader, views included): two outputs share a slot only when one is
  dead before the other is written, and a call never writes the slot of an
  input it is reading.

The graph gets one node at its start, ``kernel_buffers = self.kernel_buffers()``
(the module ``make_buffers(slots)`` builds), and each planned call the keywords
``buffers=kernel_buffers, slot=k``; ``node.meta["swpfx"]["buffer_slot"]`` is ``k``
and the buffers node's role is ``"kernel_buffers"``. Nothing else changes.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> from swpfx.passes.plan_kernel_buffers import plan_kernel_buffers
    >>> class Slots(nn.Module):  # a stand-in for swpfx.kernels.buffers.KernelBuffers
    ...     def __init__(self, slots): super().__init__(); self.slots = slots
    ...     def forward(self): return None
    >>> class Twice(nn.Module):  # a stand-in for a kernel call
    ...     def forward(self, x, *, buffers=None, slot=None): return 2 * x
    >>> class Leaves(fx.Tracer):  # keep the stand-ins as call_module nodes
    ...     def is_leaf_module(self, module, name): return True
    >>> model = nn.Sequential(Twice(), Twice(), Twice(), nn.ReLU())
    >>> gm = fx.GraphModule(model, Leaves().trace(model))
    >>> result = plan_kernel_buffers(gm, lambda gm, n: isinstance(gm.get_submodule(n.target), Twice), Slots)
    >>> result.slots, result.planned
    ({'_0': 0, '_1': 1}, 2)
    >>> for line in gm.code.strip().splitlines()[2:6]:
    ...     print(line.split(";")[0].strip())
    kernel_buffers = self.kernel_buffers()
    _0 = getattr(self, "0")(input_1, buffers = kernel_buffers, slot = 0)
    _1 = getattr(self, "1")(_0, buffers = kernel_buffers, slot = 1)
    _2 = getattr(self, "2")(_1)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .graph_utils import NEW_TENSOR_METHODS, pass_error, swpfx_meta, unique_attr_name
from .pass_result import PassResult

PASS = "plan_kernel_buffers"
ROLE = "kernel_buffers"
KEYWORDS = ("buffers", "slot")  # what a planned call is given

# takes_buffer(gm, node) -> whether the call_module node writes into given memory (see the module docstring)
BufferPredicate = Callable[[fx.GraphModule, fx.Node], bool]


# Ops whose result is a new tensor: reading a value through them ends with them.
FRESH_FUNCTIONS = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                             torch.mul, torch.cat, torch.stack, torch.ones_like, torch.zeros_like, torch.empty_like,
                             torch.mean, torch.sum, torch.relu, torch.sigmoid, torch.tanh, F.adaptive_avg_pool2d,
                             F.avg_pool2d, F.max_pool2d, F.conv2d, F.linear})
FRESH_METHODS = frozenset({"add", "sub", "mul", "mean", "sum", "clone", "sigmoid", "tanh", "size", "dim",
                           *NEW_TENSOR_METHODS})
SHAPE_ATTRIBUTES = frozenset({"shape", "dtype", "device"})  # getattr of these returns no tensor view
FRESH_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)
# Ops whose result may be the value itself or a view of it (or that change it in place): followed to their readers.
VIEW_FUNCTIONS = frozenset({operator.getitem, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                            torch.transpose, torch.permute, torch.relu_})
VIEW_METHODS = frozenset({"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "transpose",
                          "permute", "expand", "relu_", "add_", "mul_"})
VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Dropout, nn.ReLU)


def aliasing(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """How ``node``'s result relates to its tensor inputs: ``"fresh"`` (a new tensor), ``"view"`` (it may be one
    of them, a view of one, or change one in place) or None (unknown: it might keep one)."""
    if node.op == "call_function":
        if node.target is F.relu:  # in place when asked
            return "view" if node.kwargs.get("inplace") or (len(node.args) > 1 and node.args[1]) else "fresh"
        if node.target is getattr:
            return "fresh" if node.args[1] in SHAPE_ATTRIBUTES else None
        return "fresh" if node.target in FRESH_FUNCTIONS else "view" if node.target in VIEW_FUNCTIONS else None
    if node.op == "call_method":
        return "fresh" if node.target in FRESH_METHODS else "view" if node.target in VIEW_METHODS else None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, VIEW_MODULES):
            return "view"
        return "fresh" if isinstance(module, FRESH_MODULES) else None
    return None


def last_reader(gm: fx.GraphModule, node: fx.Node, candidates: set[fx.Node],
                position: dict[fx.Node, int]) -> int | None:
    """Position of the last node that may read ``node``'s output (through views too), or None when the output
    may outlive the graph's known readers (a view reaches the output or an op of unknown aliasing)."""
    last, pending, seen = -1, [node], {node}
    while pending:
        value = pending.pop()
        for user in value.users:
            last = max(last, position[user])
            kind = "fresh" if user in candidates else aliasing(gm, user)
            if kind is None:
                return None
            if kind == "view" and user not in seen:
                seen.add(user)
                pending.append(user)
    return last


@dataclass
class PlanKernelBuffersResult(PassResult):
    slots: dict[str, int] = field(default_factory=dict)  # planned node name -> its slot
    fresh: list[str] = field(default_factory=list)  # candidates whose output may outlive its known readers

    @property
    def planned(self) -> int:
        """How many slots the plan uses."""
        return len(set(self.slots.values()))


def assign_slots(order: list[fx.Node], lifetimes: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """Slots for the outputs of the nodes in ``lifetimes`` (node -> position of its last reader in ``order``,
    the graph's node order), first fit: a slot is free for a node once its last value's last reader comes
    before that node, so a node never writes a slot one of its own inputs occupies, and the plan uses as
    many slots as outputs alive at once."""
    slot_free_after: list[int] = []  # slot -> position of its current value's last reader
    slots = {}
    for here, node in enumerate(order):
        if node not in lifetimes:
            continue
        slot = next((s for s, free_after in enumerate(slot_free_after) if free_after < here), len(slot_free_after))
        if slot == len(slot_free_after):
            slot_free_after.append(lifetimes[node])
        else:
            slot_free_after[slot] = lifetimes[node]
        slots[node] = slot
    return slots


def plan_kernel_buffers(gm: fx.GraphModule, takes_buffer: BufferPredicate,
                        make_buffers: Callable[[int], nn.Module], name: str = "kernel_buffers"
                        ) -> PlanKernelBuffersResult:
    """Give the outputs of ``gm``'s buffer-taking calls planned, reused slots (in place); see the module docstring.

    ``make_buffers(slots)`` builds the module whose call (no arguments) returns
    the buffers the planned calls write into. Raises if ``gm`` was planned
    already (a call's keywords ``buffers``/``slot`` are taken).
    """
    result = PlanKernelBuffersResult(gm, modified=False)
    candidates = {n for n in gm.graph.nodes if n.op == "call_module" and takes_buffer(gm, n)}
    for node in candidates:
        if set(KEYWORDS) & set(node.kwargs):
            raise pass_error(PASS, node, "the call already has keyword 'buffers' or 'slot' (planned twice?)")
    order = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(order)}
    lifetimes = {n: last_reader(gm, n, candidates, position) for n in candidates if n.users}
    result.fresh = sorted(n.name for n in candidates if lifetimes.get(n) is None)
    slots = assign_slots(order, {n: last for n, last in lifetimes.items() if last is not None})
    if not slots:
        return result
    target = unique_attr_name(gm, name)
    gm.add_submodule(target, make_buffers(max(slots.values()) + 1))
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        buffers = gm.graph.call_module(target)
    swpfx_meta(buffers)["role"] = ROLE
    for node, slot in slots.items():
        node.kwargs = {**node.kwargs, "buffers": buffers, "slot": slot}
        swpfx_meta(node)["buffer_slot"] = slot
        result.slots[node.name] = slot
    result.modified = True
    gm.graph.lint()
    gm.recompile()
    return result


def unplan_kernel_buffers(gm: fx.GraphModule) -> PassResult:
    """Undo :func:`plan_kernel_buffers` (in place): drop the ``buffers``/``slot`` keywords and the buffers node,
    so every kernel call writes a fresh output again (for comparisons, and for callers that keep outputs)."""
    modified = False
    for node in gm.graph.nodes:
        if set(KEYWORDS) & set(node.kwargs):
            node.kwargs = {k: v for k, v in node.kwargs.items() if k not in KEYWORDS}
            swpfx_meta(node).pop("buffer_slot", None)
            modified = True
    for node in [n for n in gm.graph.nodes if swpfx_meta(n).get("role") == ROLE and not n.users]:
        target = node.target
        gm.graph.erase_node(node)
        gm.delete_submodule(target)
        modified = True
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, modified=modified)


"""Count the cost of every node of a GraphModule: MACs, FLOPs, parameters and memory.

An analysis pass in the style of ``torch.fx.passes.shape_prop.ShapeProp``: a
``torch.fx.Interpreter`` runs the graph once on example inputs (no grad) and, for
every node, a formula from a small per-op registry (as in
``torch/utils/flop_counter.py``) turns the node's real argument and result tensors
into counts. The result is written to ``node.meta["swpfx"]["cost"]`` (a
:class:`NodeCost`) and returned as a :class:`CountCostsResult`.

Conventions:

* ``macs``/``flops`` cover convolutions, linear layers and matrix products only,
  with ``flops = 2 * macs`` and bias additions ignored, exactly as
  ``torch.utils.flop_counter.FlopCounterMode`` counts them. (Unlike
  FlopCounterMode, ``mv``/``dot``-shaped matmuls are counted too.)
* ``other_flops`` is everything else that computes: elementwise ops and
  activations (1 per output element), conv/linear bias (1 per output element),
  eval-mode batch norm (2 per element: scale and shift), layer/group/instance
  norm (5 per element), softmax (3 per element), pooling (one op per window
  element and output element), reductions (1 per input element).
* Data-movement ops (pad, slice, cat, gather, index_select, a reshape that had to
  copy) have no FLOPs but are counted in ``bytes_read``/``bytes_written``; a view
  that did not copy (checked at run time by storage identity) moves no bytes.
* *Weight-side* nodes compute only from parameters (``weight * skeleton.unsqueeze(1)``
  in a prepared model): they run once per weight update, not per pixel, so the
  report keeps them out of the totals (``weight_side=True`` rows).
* Parameters (and buffers) are counted once even when shared, on the first
  activation-side node that consumes them (a conv, not its ``get_attr``).
* Peak activation memory is a liveness analysis in execution order: a storage is
  live from the node that allocates it until the last user of any value aliasing
  it; graph outputs stay live to the end; parameters and weight-side values are
  not activations.
* Composite ops whose matmul work FlopCounterMode knows (einsum, attention,
  bilinear) are run under FlopCounterMode and take its count.
* Ops with no formula (a user's leaf module, a wrapped function) are also run
  under FlopCounterMode, so conv/matmul work inside them is still counted; they
  get no ``other_flops``, default memory traffic (read the inputs, write the
  output), and are listed in ``CountCostsResult.unknown``.

Executed vs effective MACs:

* ``macs``/``flops`` are *executed*: what the graph runs, zeroed stripes of a
  dense conv and the helper convs of a lowered one included.
* ``effective_macs``/``effective_flops`` count only kept stripes of kept filters
  over kept channels (the SWP paper's count). A conv whose node carries a stripe
  mask (``node.meta["swpfx"]["mask"]``, set by ``fold_skeletons``) costs
  ``out_pixels × in_channels/groups × kept stripes``; a lowered conv (its nodes
  tagged ``role="lowered_conv"`` with ``kept_stripes``) costs the same for the
  masked conv it replaced, on the row of its first conv and 0 on its helper
  ops; the conv ``remove_channels`` adds for removed channels' constants costs 0.
  Every other node has effective == executed, so the two agree on dense models.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops import StochasticDepth, stochastic_depth

from .graph_utils import META_KEY, NEW_TENSOR_METHODS, get_attr_path, swpfx_meta
from .pass_result import PassResult

PASS = "count_costs"
COMPUTE_OPS = ("call_module", "call_function", "call_method")

# ---------------------------------------------------------------- records


@dataclass
class NodeCost:
    """The cost of one FX node (one row of a cost report)."""

    name: str
    op: str  # readable target: "Conv2d", "conv2d", "Tensor.unsqueeze", "input", ...
    kind: str  # node.op
    category: str  # conv, linear, matmul, elementwise, norm, pool, reduce, memory, view, ...
    shape: tuple | list | None  # output shape (a list of shapes for tuple outputs)
    dtype: str | None
    macs: int = 0
    flops: int = 0
    effective_macs: int = 0  # kept stripes only (see the module docstring); == macs off stripe-pruned convs
    effective_flops: int = 0
    other_flops: int = 0
    params: int = 0
    param_bytes: int = 0
    buffers: int = 0
    buffer_bytes: int = 0
    activation_bytes: int = 0  # bytes of the output value(s)
    bytes_read: int = 0
    bytes_written: int = 0
    live_bytes: int = 0  # activation bytes live while this node runs
    weight_side: bool = False
    known: bool = True
    group: str = ""  # key for matching layers across reports (conv name, module path or node name)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CountCostsResult(PassResult):
    """An analysis: ``modified`` is False; ``rows`` are also in every node's ``meta["swpfx"]["cost"]``."""

    rows: list[NodeCost]
    peak_activation_bytes: int
    peak_node: str | None
    unknown: list[str] = field(default_factory=list)  # "node_name (op)"


@dataclass
class OpCount:
    """What a formula returns. ``traffic``: how bytes are counted (see ``memory_traffic``)."""

    macs: int = 0
    other_flops: int = 0
    category: str = "elementwise"
    traffic: str = "compute"  # compute | view | gather | none


@dataclass
class OpCall:
    """A node as executed: its module (for call_module), real arguments and result."""

    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    out: Any
    measured_flops: int = 0  # FlopCounterMode's count, for ops run under it (see ``measured``)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[index] if len(self.args) > index else default

    @property
    def out_numel(self) -> int:
        return sum(t.numel() for t in tensors_in(self.out))

    @property
    def in_numel(self) -> int:
        first = next(iter(tensors_in(self.args)), None)
        return first.numel() if first is not None else 0


# ---------------------------------------------------------------- formula registry

Formula = Callable[[OpCall], OpCount]
FORMULAS: dict[Any, Formula] = {}


def register(*keys: Any) -> Callable[[Formula], Formula]:
    """Register a formula for module types, functions, or method names (strings)."""

    def wrap(fn: Formula) -> Formula:
        for key in keys:
            FORMULAS[key] = fn
        return fn

    return wrap


def find_formula(node: fx.Node, module: nn.Module | None) -> Formula | None:
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in FORMULAS:
                return FORMULAS[cls]
        return None
    if node.op == "call_method":
        return FORMULAS.get(node.target)
    return FORMULAS.get(node.target)


def conv_macs(spatial_numel: int, weight: torch.Tensor) -> int:
    """MACs of a conv: every output (input, if transposed) element meets one filter's worth of weights."""
    return spatial_numel * (weight.numel() // weight.shape[0])


def bias_flops(call: OpCall, bias: Any) -> int:
    return call.out_numel if isinstance(bias, torch.Tensor) else 0


CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register(*CONV_MODULES)
def conv_module(call: OpCall) -> OpCount:
    m = call.module
    return OpCount(conv_macs(call.out.numel(), m.weight), bias_flops(call, m.bias), "conv")


@register(*TRANSPOSED_CONV_MODULES)
def conv_transpose_module(call: OpCall) -> OpCount:
    m = call.module
    return OpCount(conv_macs(call.args[0].numel(), m.weight), bias_flops(call, m.bias), "conv")


@register(torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d)
def conv_function(call: OpCall) -> OpCount:
    weight, bias = call.arg(1, "weight"), call.arg(2, "bias")
    return OpCount(conv_macs(call.out.numel(), weight), bias_flops(call, bias), "conv")


@register(torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d,
          F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def conv_transpose_function(call: OpCall) -> OpCount:
    x, weight, bias = call.arg(0, "input"), call.arg(1, "weight"), call.arg(2, "bias")
    return OpCount(conv_macs(x.numel(), weight), bias_flops(call, bias), "conv")


@register(nn.Linear)
def linear_module(call: OpCall) -> OpCount:
    m = call.module
    return OpCount(call.out.numel() * m.in_features, bias_flops(call, m.bias), "linear")


@register(F.linear)
def linear_function(call: OpCall) -> OpCount:
    weight, bias = call.arg(1, "weight"), call.arg(2, "bias")
    in_features = weight.shape[-1]
    return OpCount(call.out.numel() * in_features, bias_flops(call, bias), "linear")


@register(torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", "__matmul__")
def matmul(call: OpCall) -> OpCount:
    a = call.args[0]
    return OpCount(max(call.out_numel, 1) * a.shape[-1], 0, "matmul")


@register(torch.addmm, torch.baddbmm, "addmm", "baddbmm")
def addmm(call: OpCall) -> OpCount:
    a = call.arg(1, "mat1" if call.node.target in (torch.addmm, "addmm") else "batch1")
    return OpCount(call.out_numel * a.shape[-1], call.out_numel, "matmul")


@register(torch.einsum, F.scaled_dot_product_attention, F.multi_head_attention_forward, nn.MultiheadAttention,
          F.bilinear, nn.Bilinear)
def measured(call: OpCall) -> OpCount:
    """Composite ops whose matmul work FlopCounterMode already knows: run them under it."""
    return OpCount(call.measured_flops // 2, 0, "matmul")


def per_output_element(factor: int, category: str) -> Formula:
    def formula(call: OpCall) -> OpCount:
        return OpCount(0, factor * call.out_numel, category)

    return formula


ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.pow,
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.mod,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.maximum, torch.minimum, torch.where,
    torch.abs, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.erf, torch.clamp, torch.clip,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.square, torch.reciprocal, torch.sign,
    F.relu, F.relu_, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.sigmoid,
    F.tanh, F.hardswish, F.hardsigmoid, F.softplus, F.prelu, F.logsigmoid,
)
ELEMENTWISE_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "pow", "abs", "exp", "log", "sqrt",
    "rsqrt", "clamp", "clamp_", "clip", "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "square",
    "reciprocal", "masked_fill", "masked_fill_", "__add__", "__mul__", "__sub__", "__truediv__",
)
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.PReLU, nn.LogSigmoid,
)
register(*ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS, *ELEMENTWISE_MODULES)(per_output_element(1, "elementwise"))
register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm)(per_output_element(2, "norm"))
register(nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
         F.layer_norm, F.group_norm, F.instance_norm)(per_output_element(5, "norm"))
register(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
         "softmax", "log_softmax")(per_output_element(3, "softmax"))


def window_size(kernel_size: Any, dims: int) -> int:
    if isinstance(kernel_size, int):
        return kernel_size**dims
    return math.prod(kernel_size)


def pooling(dims: int) -> Formula:
    def formula(call: OpCall) -> OpCount:
        if call.module is not None:
            kernel = call.module.kernel_size
        else:
            kernel = call.arg(1, "kernel_size")
        out = tensors_in(call.out)[0]  # max_pool with return_indices returns (values, indices)
        return OpCount(0, out.numel() * window_size(kernel, dims), "pool")

    return formula


for _dims, _modules, _functions in (
    (1, (nn.MaxPool1d, nn.AvgPool1d), (F.max_pool1d, F.avg_pool1d)),
    (2, (nn.MaxPool2d, nn.AvgPool2d), (F.max_pool2d, F.avg_pool2d)),
    (3, (nn.MaxPool3d, nn.AvgPool3d), (F.max_pool3d, F.avg_pool3d)),
):
    register(*_modules, *_functions)(pooling(_dims))


@register(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
          nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
          F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)
def adaptive_pool(call: OpCall) -> OpCount:
    return OpCount(0, call.in_numel, "pool")


@register(torch.sum, torch.mean, torch.amax, torch.amin, torch.max, torch.min, torch.prod, torch.norm,
          "sum", "mean", "amax", "amin", "max", "min", "prod", "norm", "std", "var")
def reduction(call: OpCall) -> OpCount:
    return OpCount(0, call.in_numel, "reduce")


VIEW_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.t,
    torch.narrow, torch.split, torch.chunk, torch.unbind, torch.movedim, torch.swapaxes, torch.swapdims,
    operator.getitem, getattr,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.detach,
)
VIEW_METHODS = (
    "view", "view_as", "reshape", "reshape_as", "flatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "contiguous", "expand", "expand_as", "narrow", "split", "chunk", "unbind", "movedim", "detach", "size",
    "dim", "numel", "swapaxes", "swapdims",
)
VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout)
register(*VIEW_FUNCTIONS, *VIEW_METHODS, *VIEW_MODULES)(lambda call: OpCount(0, 0, "view", "view"))
# torchvision's fx-wrapped stochastic depth is the identity in eval mode
register(StochasticDepth, stochastic_depth)(lambda call: OpCount(0, 0, "view", "view"))

MEMORY_FUNCTIONS = (F.pad, torch.cat, torch.concat, torch.concatenate, torch.stack, torch.roll, torch.flip,
                    torch.tile, torch.constant_pad_nd, torch.clone, torch.zeros_like, torch.ones_like)
MEMORY_METHODS = ("repeat", "tile", "flip", "roll", "clone", "to", "float", "half", "double", "type", "copy_",
                  *sorted(NEW_TENSOR_METHODS))
register(*MEMORY_FUNCTIONS, *MEMORY_METHODS, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
         nn.ReplicationPad2d, nn.CircularPad2d)(lambda call: OpCount(0, 0, "memory"))
register(torch.index_select, torch.gather, torch.take, torch.take_along_dim, "index_select", "gather",
         "take", "take_along_dim")(lambda call: OpCount(0, 0, "memory", "gather"))


# ---------------------------------------------------------------- effective MACs (kept stripes only)

LOWERED_ROLE = "lowered_conv"  # lower_stripe_convs' tag on every node of a lowered conv
# remove_channels' conv of a removed channel's constant over a map of ones: not kept channels, so 0
ZERO_EFFECTIVE_ROLES = ("dead_channel_conv",)


def stripe_macs(out_pixels: int, in_per_group: int, kept_stripes: int) -> int:
    """MACs of a stripe-pruned conv: each kept stripe (a 1×1 filter over C/groups channels) at every output pixel.

    ``out_pixels`` is N·Ho·Wo (per filter), ``kept_stripes`` is summed over all filters.

    >>> stripe_macs(out_pixels=2 * 8 * 8, in_per_group=16, kept_stripes=40)
    81920
    """
    return out_pixels * in_per_group * kept_stripes


def lowered_instance(node: fx.Node) -> str | None:
    """The name of the conv node a lowered node replaced; None for nodes that are not part of a lowering.

    lower_stripe_convs names each node of a lowered conv ``f"{conv node}_{part}"`` and
    records ``part`` in its meta, so two lowerings of one shared module stay apart.
    """
    meta = node.meta.get(META_KEY)
    if not isinstance(meta, dict) or meta.get("role") != LOWERED_ROLE:
        return None
    part = meta.get("part", "")
    if part and node.name.endswith("_" + part):
        return node.name[: -len(part) - 1]
    return meta.get("conv", node.name)  # renamed by FX on a name clash: fall back to the conv's name


def masked_conv_macs(call: OpCall, executed: int) -> int:
    """Effective MACs of a conv node carrying a stripe mask (O, *kernel); ``executed`` for any other node."""
    if call.node.meta.get(META_KEY, {}).get("role") in ZERO_EFFECTIVE_ROLES:
        return 0
    mask = call.node.meta.get(META_KEY, {}).get("mask")
    weight = getattr(call.module, "weight", None)
    if not (isinstance(call.module, CONV_MODULES) and isinstance(mask, torch.Tensor)
            and tuple(mask.shape) == (weight.shape[0], *weight.shape[2:])):
        return executed
    return stripe_macs(call.out.numel() // weight.shape[0], weight.shape[1], int(mask.sum()))


def lowered_conv_macs(gm: fx.GraphModule, nodes: list[fx.Node], rows: dict[fx.Node, NodeCost]) -> tuple[fx.Node, int] | None:
    """(node to hold it, effective MACs) of one lowered conv, given its nodes in graph order.

    Every form (boxes, onehot, shift) starts with a conv over the original input,
    whose ``weight.shape[1]`` is the original in_channels/groups, and ends with the
    (N, O, Ho, Wo) output of the conv it replaced.
    """
    convs = [n for n in nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), CONV_MODULES)]
    last = [n for n in nodes if n.op != "get_attr"][-1]  # buffers (gather indices) are not the output
    out_shape, kept = rows[last].shape, last.meta[META_KEY].get("kept_stripes")
    if not convs or kept is None or not isinstance(out_shape, tuple) or len(out_shape) < 3:
        return None
    in_per_group = gm.get_submodule(convs[0].target).weight.shape[1]
    return convs[0], stripe_macs(math.prod(out_shape) // out_shape[1], in_per_group, int(kept))


def assign_lowered_macs(gm: fx.GraphModule, rows: dict[fx.Node, NodeCost]) -> None:
    """Give every lowered conv the effective MACs of the masked conv it replaced, once, on its first conv."""
    instances: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        key = lowered_instance(node)
        if key is not None and node in rows:
            instances.setdefault(key, []).append(node)
    for nodes in instances.values():
        found = lowered_conv_macs(gm, nodes, rows)
        if found is not None:
            node, macs = found
            rows[node].effective_macs, rows[node].effective_flops = macs, 2 * macs


# ---------------------------------------------------------------- tensors and memory


def tensors_in(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors (the same view passed twice is read once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    return total


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def aliases_input(out: list[torch.Tensor], inputs: list[torch.Tensor]) -> bool:
    ptrs = {storage_ptr(t) for t in inputs if t.numel()}
    return bool(out) and all(storage_ptr(t) in ptrs for t in out if t.numel())


def memory_traffic(call: OpCall, count: OpCount, state: list[torch.Tensor]) -> tuple[int, int]:
    """(bytes read, bytes written) of one executed node.

    compute: read every distinct input and state tensor, write the output.
    view: nothing if the result aliases an input, else a copy of the output.
    gather: read what lands in the output plus the indices, write the output.
    """
    out = tensors_in(call.out)
    inputs = tensors_in((call.args, call.kwargs))
    written = sum(nbytes(t) for t in out)
    if count.traffic == "none":
        return 0, 0
    if count.traffic == "view":
        return (0, 0) if aliases_input(out, inputs) else (written, written)
    if count.traffic == "gather":
        indices = [t for t in inputs if not t.is_floating_point() and not t.is_complex()]
        return written + distinct_bytes(indices), written
    return distinct_bytes(inputs + state), written


class Liveness:
    """Tracks activation storages over execution order to find the peak live bytes.

    Storage identity is checked at run time (``untyped_storage().data_ptr()``), so
    views, in-place ops and identity modules share their input's storage.
    """

    def __init__(self, last_use: dict[fx.Node, int]):
        self.last_use = last_use
        self.ptr_to_sid: dict[int, int] = {}
        self.sid_bytes: dict[int, int] = {}
        self.sid_holders: dict[int, set[fx.Node]] = {}
        self.sid_ptr: dict[int, int] = {}
        self.node_sids: dict[fx.Node, set[int]] = {}
        self.releases: dict[int, list[fx.Node]] = {}
        self.live = 0
        self.peak = 0
        self.peak_node: fx.Node | None = None

    def produce(self, node: fx.Node, step: int, out: list[torch.Tensor]) -> int:
        """Register ``node``'s output storages; return the live bytes while it runs."""
        for t in out:
            if not t.numel():
                continue
            ptr = storage_ptr(t)
            sid = self.ptr_to_sid.get(ptr)
            if sid is None:
                sid = len(self.sid_bytes)
                self.ptr_to_sid[ptr], self.sid_ptr[sid] = sid, ptr
                # an input may be a view into a larger caller tensor (x[:1]): count only what it shows
                self.sid_bytes[sid] = nbytes(t) if node.op == "placeholder" else t.untyped_storage().nbytes()
                self.sid_holders[sid] = set()
                self.live += self.sid_bytes[sid]
            self.sid_holders[sid].add(node)
            self.node_sids.setdefault(node, set()).add(sid)
        self.releases.setdefault(self.last_use.get(node, step), []).append(node)
        current = self.live
        if current > self.peak:
            self.peak, self.peak_node = current, node
        return current

    def finish_step(self, step: int) -> None:
        """Drop values whose last user was this step; free storages nobody holds."""
        for node in self.releases.pop(step, []):
            for sid in self.node_sids.pop(node, ()):
                holders = self.sid_holders[sid]
                holders.discard(node)
                if not holders:
                    self.live -= self.sid_bytes[sid]
                    del self.ptr_to_sid[self.sid_ptr[sid]], self.sid_holders[sid]


# ---------------------------------------------------------------- graph helpers


def weight_side_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes computed from attributes (parameters, buffers, constants) alone."""
    side: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr" or (
            node.op in ("call_function", "call_method") and all(a in side for a in node.all_input_nodes)
        ):
            side.add(node)
    return side


def last_uses(graph: fx.Graph) -> dict[fx.Node, int]:
    """Execution index of each node's last user (its own index if unused; the end for outputs)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    return {n: max((order[u] for u in n.users), default=order[n]) for n in graph.nodes}


def state_consumer(node: fx.Node, weight_side: set[fx.Node], order: dict[fx.Node, int]) -> fx.Node:
    """The first activation-side node a get_attr feeds (through weight-side nodes), else itself."""
    consumers, stack, seen = [], [node], set()
    while stack:
        n = stack.pop()
        for user in n.users:
            if user in seen:
                continue
            seen.add(user)
            (stack if user in weight_side else consumers).append(user)
    return min(consumers, key=order.__getitem__) if consumers else node


def op_label(node: fx.Node, module: nn.Module | None) -> str:
    if node.op == "call_module":
        return type(module).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return {"placeholder": "input", "output": "output"}.get(node.op, node.op)


def group_key(node: fx.Node) -> str:
    """How layers are matched across reports: the conv a node belongs to, a module path, or the node name."""
    conv = node.meta.get(META_KEY, {}).get("conv")
    if conv:
        return conv
    if node.op == "call_module":
        return node.target
    return node.name


def shape_of(value: Any) -> tuple | list | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    ts = tensors_in(value)
    return [tuple(t.shape) for t in ts] if ts else None


def dtype_of(value: Any) -> str | None:
    ts = tensors_in(value)
    return str(ts[0].dtype).replace("torch.", "") if ts else None


# ---------------------------------------------------------------- the pass


class CostInterpreter(fx.Interpreter):
    """Runs the graph and writes a :class:`NodeCost` into every node's ``meta['swpfx']['cost']``."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        graph = gm.graph
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.weight_side = weight_side_nodes(graph)
        self.liveness = Liveness(last_uses(graph))
        self.seen_state: set[int] = set()
        self.owned_attrs: dict[fx.Node, list[fx.Node]] = {}
        for n in graph.nodes:
            if n.op == "get_attr":
                self.owned_attrs.setdefault(state_consumer(n, self.weight_side, self.order), []).append(n)
        self.rows: list[NodeCost] = []
        self.row_of: dict[fx.Node, NodeCost] = {}
        self.unknown: list[str] = []

    def state_tensors(self, node: fx.Node, module: nn.Module | None) -> list[tuple[torch.Tensor, bool]]:
        """(tensor, is_parameter) pairs this node owns: its module's, plus get_attrs attributed to it."""
        state = []
        if module is not None:
            state += [(p, True) for p in module.parameters()] + [(b, False) for b in module.buffers()]
        for attr in self.owned_attrs.get(node, ()):
            value = get_attr_path(self.module, attr.target)
            if isinstance(value, torch.Tensor):
                state.append((value, isinstance(value, nn.Parameter)))
        return state

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        formula = find_formula(n, module) if n.op in COMPUTE_OPS else None
        measured_flops = 0
        if n.op in COMPUTE_OPS and formula in (None, measured):
            # no formula (or a composite op): let FlopCounterMode see the conv/matmul work inside it
            with FlopCounterMode(display=False) as counter:
                out = getattr(self, n.op)(n.target, args, kwargs)
            measured_flops = counter.get_total_flops()
        else:
            out = getattr(self, n.op)(n.target, args, kwargs)
        call = OpCall(n, module, tuple(args), kwargs, out, measured_flops)
        row = self.count(call, formula)
        swpfx_meta(n)["cost"] = row
        self.rows.append(row)
        self.row_of[n] = row
        self.liveness.finish_step(self.order[n])
        return out

    def count(self, call: OpCall, formula: Formula | None) -> NodeCost:
        node, module = call.node, call.module
        out_tensors = tensors_in(call.out)
        row = NodeCost(
            name=node.name, op=op_label(node, module), kind=node.op, category=node.op, shape=shape_of(call.out),
            dtype=dtype_of(call.out), activation_bytes=sum(nbytes(t) for t in out_tensors),
            weight_side=node in self.weight_side, group=group_key(node),
        )
        owned = self.state_tensors(node, module)
        for t, is_param in owned:
            if id(t) in self.seen_state:
                continue
            self.seen_state.add(id(t))
            if is_param:
                row.params, row.param_bytes = row.params + t.numel(), row.param_bytes + nbytes(t)
            else:
                row.buffers, row.buffer_bytes = row.buffers + t.numel(), row.buffer_bytes + nbytes(t)
        if node.op in COMPUTE_OPS:
            self.apply_formula(call, formula, row, [t for t, _ in owned] if module is not None else [])
        if node.op == "get_attr" or row.weight_side:
            row.category = "weight" if row.weight_side and node.op != "get_attr" else "state"
        else:
            row.live_bytes = self.liveness.produce(node, self.order[node], out_tensors if node.op != "output" else [])
        return row

    def apply_formula(self, call: OpCall, formula: Formula | None, row: NodeCost, state: list[torch.Tensor]) -> None:
        """Fill the row's counts. Ops without a formula keep FlopCounterMode's conv/matmul
        FLOPs (usually 0), count no other FLOPs, and are listed as unknown."""
        count, problem = None, ""
        if formula is not None:
            try:
                count = formula(call)
            except Exception as exc:  # a formula bug must not stop the analysis of a valid graph
                problem = f": formula failed, {type(exc).__name__}: {exc}"
        if count is None:
            count = OpCount(call.measured_flops // 2, 0, "unknown")
            if tensors_in(call.out) or tensors_in((call.args, call.kwargs)):
                row.known = False
                self.unknown.append(f"{row.name} ({row.op}{problem})")
        row.macs, row.flops, row.other_flops = count.macs, 2 * count.macs, count.other_flops
        # a lowered conv's parts get 0 here; assign_lowered_macs gives its first conv the whole count
        row.effective_macs = 0 if lowered_instance(call.node) else masked_conv_macs(call, count.macs)
        row.effective_flops = 2 * row.effective_macs
        row.category = count.category
        row.bytes_read, row.bytes_written = memory_traffic(call, count, state)


def count_costs(gm: fx.GraphModule, example_inputs: tuple) -> CountCostsResult:
    """Run ``gm`` on ``example_inputs`` (no grad) and count every node's cost.

    Writes ``node.meta["swpfx"]["cost"]`` on ``gm``'s nodes (in place); runs the
    modules in whatever train/eval mode they are in (``swpfx.cost`` puts them in eval).

    Example:
        >>> import torch, torchvision
        >>> from swpfx.tracing import trace
        >>> gm = trace(torchvision.models.resnet18()).eval()
        >>> result = count_costs(gm, (torch.randn(1, 3, 224, 224),))
        >>> sum(r.flops for r in result.rows if not r.weight_side)
        3628146688
    """
    interpreter = CostInterpreter(gm)
    with torch.no_grad():
        interpreter.run(*example_inputs)
    assign_lowered_macs(gm, interpreter.row_of)
    peak_node = interpreter.liveness.peak_node
    return CountCostsResult(
        graph_module=gm,
        modified=False,
        rows=interpreter.rows,
        peak_activation_bytes=interpreter.liveness.peak,
        peak_node=peak_node.name if peak_node is not None else None,
        unknown=interpreter.unknown,
    )

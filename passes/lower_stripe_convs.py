"""Lower stripe-pruned convolutions into compact subgraphs of standard ops.

After ``convert`` has folded the skeletons and removed dead filters, every
stripe-pruned conv is an ``nn.Conv2d`` call whose weight has the pruned stripes
zeroed and whose ``node.meta["swpfx"]["mask"]`` (``BoolTensor(O, kh, kw)``) says
which stripes are kept. This pass rewrites each such conv into one of these
forms (all exact, all plain convs / pads / slices / concat / gather / sum, no
run-time loops, exportable to ONNX):

``boxes``
    Filters grouped by the bounding box of their kept stripes; one dense conv per
    group whose kernel is that box (the input is padded or cropped so the output
    grid is unchanged), outputs concatenated, then one channel gather restores the
    filter order. A filter keeping only its centre stripe costs a 1×1 conv, a
    centre row a 1×3 conv. Groups smaller than ``min_group`` filters are merged
    into the cheapest group whose box covers theirs; with ``align`` (ungrouped
    convs) each group but the full box keeps a multiple of ``align`` filters, so
    a runtime with that channel block keeps the concat in its blocked layout.
    Handles any groups.
``onehot``
    Output side: per bucket of filters with the same number ``k`` of kept
    stripes, a 1×1 conv computes every kept stripe, then a grouped conv with
    one-hot kernels (``groups`` = filters in the bucket) shifts, strides, pads,
    dilates and sums them. ``groups == 1`` only.
``shift``
    Input side: for every kernel position the (padded) input is sliced at that
    offset with the conv's stride, a 1×1 conv computes the stripes of the filters
    keeping that position, the results are concatenated and, per bucket of
    stripe count, gathered and summed. ``groups == 1`` only.

In a graph, a BatchNorm2d and/or ReLU that alone consume a ``boxes``/``onehot``
conv are applied to every part before the concat (ONNX Runtime then fuses them
into each part's conv), and when only plain ``groups=1`` convs consume the
result, their weights take the channel permutation instead of a gather.

``lowering="never"`` leaves the dense conv (with zeroed stripes), ``"always"``
lowers every conv with a partially pruned filter using the form ``choose_form``
picks, ``"auto"`` lowers only where ``choose_form`` finds a gain. The pass's
default chooser (:func:`choose_by_macs`) counts MACs; ``swpfx.convert`` passes the
runtime model's (predicted ONNX Runtime latency, see ``swpfx.runtime_model``).
Geometry (boxes, buckets, ``ConvGeometry``) lives in ``stripe_geometry``.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> from swpfx.passes.lower_stripe_convs import lower_stripe_convs, mark_stripe_conv
    >>> conv = nn.Conv2d(8, 16, 3, padding=1)
    >>> gm = fx.symbolic_trace(nn.Sequential(conv))
    >>> mask = torch.zeros(16, 3, 3, dtype=torch.bool); mask[:, 1, 1] = True; mask[:8, 1, :] = True
    >>> mark_stripe_conv(gm, "0", mask, example_input=torch.randn(1, 8, 10, 10))
    >>> x = torch.randn(2, 8, 10, 10); expected = gm(x)
    >>> _ = lower_stripe_convs(gm, lowering="always")
    >>> torch.allclose(gm(x), expected, atol=1e-5)
    True
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .form_work import executed_macs, form_work
from .graph_utils import (META_KEY, batchnorm_channels, erase_replaced, new_conv as _new_conv, pass_error, split_path,
                          swpfx_meta, unique_attr_name)
from .pass_result import PassResult
from .stripe_geometry import FORMS  # noqa: F401  (re-exported)
from .stripe_geometry import (DEFAULT_MIN_GROUP, ConvGeometry, box_groups, group_units, inverse_order,
                              stripe_count_buckets, supported_forms)

PASS = "lower_stripe_convs"
LOWERINGS = ("never", "always", "auto")


# ---------------------------------------------------------------- graph building


class _Builder:
    """Emits the nodes of one lowered conv before ``node``, named after it."""

    def __init__(self, gm: fx.GraphModule, node: fx.Node, form: str):
        self.gm, self.graph, self.node, self.form = gm, gm.graph, node, form
        self.conv: nn.Conv2d = gm.get_submodule(node.target)
        self.base = node.name
        self.source = swpfx_meta(node).get("conv", node.target)
        owner, leaf = split_path(node.target)
        self.owner_path = owner
        self.container_path = unique_attr_name(gm, f"{node.target}_{form}")
        self.container = nn.Module()
        owner_module = gm.get_submodule(owner) if owner else gm
        owner_module.add_module(split_path(self.container_path)[1], self.container)
        self._inputs: dict[tuple, fx.Node] = {}
        self.created: list[fx.Node] = []

    def _emit(self, op: str, target, args, kwargs=None, suffix: str = "") -> fx.Node:
        with self.graph.inserting_before(self.node):
            new = self.graph.create_node(op, target, args, kwargs or {}, name=f"{self.base}_{suffix}")
        self.created.append(new)
        return new

    def module(self, name: str, module: nn.Module, x: fx.Node) -> fx.Node:
        self.container.add_module(name, module)
        return self._emit("call_module", f"{self.container_path}.{name}", (x,), suffix=name)

    def buffer(self, name: str, value: torch.Tensor) -> fx.Node:
        self.container.register_buffer(name, value)
        return self._emit("get_attr", f"{self.container_path}.{name}", (), suffix=name)

    def function(self, fn, args, suffix: str, kwargs=None) -> fx.Node:
        return self._emit("call_function", fn, args, kwargs, suffix=suffix)

    def method(self, name: str, args, suffix: str) -> fx.Node:
        return self._emit("call_method", name, args, suffix=suffix)

    def padded(self, x: fx.Node, pads: tuple[int, int, int, int]) -> tuple[fx.Node, tuple[int, int]]:
        """Input for a conv needing ``pads`` (top, bottom, left, right; negative = crop).

        Symmetric non-negative pads stay in the conv; anything else is an explicit
        zero pad and/or slice, emitted once per distinct pad set.
        """
        pt, pb, pl, pr = pads
        if pt == pb >= 0 and pl == pr >= 0:
            return x, (pt, pl)
        if pads in self._inputs:
            return self._inputs[pads], (0, 0)
        tag = "pad_" + "_".join(str(p).replace("-", "m") for p in pads)
        y = x
        if any(p > 0 for p in pads):
            y = self.function(F.pad, (y, (max(pl, 0), max(pr, 0), max(pt, 0), max(pb, 0))), tag)
        if any(p < 0 for p in pads):
            rows = slice(-pt if pt < 0 else None, pb if pb < 0 else None)
            cols = slice(-pl if pl < 0 else None, pr if pr < 0 else None)
            y = self.function(operator.getitem, (y, (slice(None), slice(None), rows, cols)), tag.replace("pad", "crop"))
        self._inputs[pads] = y
        return y, (0, 0)

    def restore_order(self, parts: list[fx.Node], order: list[int]) -> fx.Node:
        """Concatenate ``parts`` (filters in ``order``) and gather back to filter order 0..O-1."""
        y = parts[0] if len(parts) == 1 else self.function(torch.cat, (parts, 1), "cat")
        if order != sorted(order):
            index = torch.tensor(inverse_order(order), dtype=torch.long, device=self.conv.weight.device)
            y = self.function(torch.index_select, (y, 1, self.buffer("order", index)), "reorder")
        return y


def _box_name(box, geometry: ConvGeometry) -> str:
    kh, kw = geometry.kernel
    if box == (0, kh - 1, 0, kw - 1):
        return "full"
    return f"box{box[1] - box[0] + 1}x{box[3] - box[2] + 1}_at{box[0]}{box[2]}"


def build_boxes(b: _Builder, x: fx.Node, geometry: ConvGeometry, mask: torch.Tensor, min_group: int,
                align: int = 1) -> fx.Node:
    w, bias = b.conv.weight.detach(), b.conv.bias
    out_per_group = geometry.out_channels // geometry.groups
    in_per_group = geometry.in_channels // geometry.groups
    parts, groups_filters = [], []
    for box, filters in box_groups(mask, min_group, align):
        r0, r1, c0, c1 = box
        xin, padding = b.padded(x, geometry.box_pads(box))
        groups = 1
        if geometry.groups > 1:
            unit_groups, per_unit = group_units(filters, out_per_group)
            filters = sorted(filters, key=lambda o: (o // out_per_group, o)) if per_unit > 1 else filters
            channels = [g * in_per_group + c for g in unit_groups for c in range(in_per_group)]
            groups = len(unit_groups)
            if channels != list(range(geometry.in_channels)):
                index = torch.tensor(channels, dtype=torch.long, device=w.device)
                name = _box_name(box, geometry)
                xin = b.function(torch.index_select, (xin, 1, b.buffer(f"{name}_channels", index)), f"{name}_input")
        sub = w[filters][:, :, r0:r1 + 1, c0:c1 + 1]
        conv = _new_conv(sub, None if bias is None else bias.detach()[filters], geometry.stride, padding,
                         geometry.dilation, groups)
        parts.append(b.module(_box_name(box, geometry), conv, xin))
        groups_filters.append(filters)
    return list(zip(parts, groups_filters))


def build_onehot(b: _Builder, x: fx.Node, geometry: ConvGeometry, mask: torch.Tensor) -> fx.Node:
    w, bias = b.conv.weight.detach(), b.conv.bias
    kh, kw = geometry.kernel
    parts = []
    for k, filters in stripe_count_buckets(mask):
        positions = mask[filters].flatten(1).nonzero()[:, 1].view(len(filters), k)  # (n, k) flat kernel positions
        rows = w[filters].flatten(2).gather(2, positions[:, None, :].expand(-1, w.shape[1], -1))  # (n, C, k)
        stripes = rows.permute(0, 2, 1).reshape(len(filters) * k, w.shape[1], 1, 1)
        z = b.module(f"stripes{k}", _new_conv(stripes, None, 1, 0, 1, 1), x)
        onehot = torch.zeros(len(filters) * k, kh * kw, dtype=w.dtype, device=w.device)
        onehot[torch.arange(len(filters) * k), positions.flatten()] = 1
        onehot = onehot.view(len(filters), k, kh, kw)
        zin, padding = b.padded(z, geometry.pads)
        acc = _new_conv(onehot, None if bias is None else bias.detach()[filters], geometry.stride, padding,
                        geometry.dilation, len(filters))
        parts.append((b.module(f"sum{k}", acc, zin), filters))
    return parts


def build_shift(b: _Builder, x: fx.Node, geometry: ConvGeometry, mask: torch.Tensor) -> fx.Node:
    w, bias = b.conv.weight.detach(), b.conv.bias
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.stride, geometry.dilation
    pt, pb, pl, pr = geometry.pads
    xp = b.function(F.pad, (x, (pl, pr, pt, pb)), "pad") if any(geometry.pads) else x  # every position slices it
    first_position = mask.flatten(1).float().argmax(1)  # each filter's bias rides on its first kept position
    parts = []
    for p in range(kh * kw):
        filters = mask.flatten(1)[:, p].nonzero().flatten().tolist()
        if not filters:
            continue
        i, j = divmod(p, kw)
        rows = slice(i * dh, -(kh - 1 - i) * dh or None, sh)
        cols = slice(j * dw, -(kw - 1 - j) * dw or None, sw)
        xs = xp
        if (rows, cols) != (slice(0, None, 1), slice(0, None, 1)):
            xs = b.function(operator.getitem, (xp, (slice(None), slice(None), rows, cols)), f"at{i}{j}")
        pos_bias = None
        if bias is not None:
            own = bias.detach()[filters]
            pos_bias = torch.where(first_position[filters] == p, own, torch.zeros_like(own))
        parts.append(b.module(f"stripes_at{i}{j}", _new_conv(w[filters][:, :, i:i + 1, j:j + 1], pos_bias, 1, 0, 1, 1), xs))
    # Row index of stripe (o, p) in the concatenation: positions in order, filters ascending within one.
    offset, row_of = 0, {}
    for p in range(kh * kw):
        filters = mask.flatten(1)[:, p].nonzero().flatten().tolist()
        for r, o in enumerate(filters):
            row_of.setdefault(o, []).append(offset + r)
        offset += len(filters)
    z = parts[0] if len(parts) == 1 else b.function(torch.cat, (parts, 1), "stripes")
    sums = []
    for k, filters in stripe_count_buckets(mask):
        index = torch.tensor([r for o in filters for r in row_of[o]], dtype=torch.long, device=w.device)
        if k == 1 and index.tolist() == list(range(offset)) and len(filters) == offset:
            sums.append((z, filters))
        else:
            picked = b.function(torch.index_select, (z, 1, b.buffer(f"rows{k}", index)), f"gather{k}")
            if k == 1:
                sums.append((picked, filters))
            else:
                grouped = b.method("unflatten", (picked, 1, (len(filters), k)), f"split{k}")
                sums.append((b.method("sum", (grouped, 2), f"sum{k}"), filters))
    return sums


# ---------------------------------------------------------------- the pass


def is_stripe_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    return (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Conv2d)
            and isinstance(node.meta.get(META_KEY, {}).get("mask"), torch.Tensor))


def is_lowerable(conv: nn.Conv2d, mask: torch.Tensor) -> bool:
    """A conv with a partially pruned filter and a kernel larger than 1×1."""
    return conv.kernel_size != (1, 1) and not bool(mask.all())


def check_stripe_conv(gm: fx.GraphModule, node: fx.Node, pass_name: str = PASS) -> tuple[nn.Conv2d, torch.Tensor]:
    """The conv and its kept-stripe mask (bool), checked against this pass's input contract (errors name ``pass_name``)."""
    conv = gm.get_submodule(node.target)
    mask = node.meta[META_KEY]["mask"].to(torch.bool).cpu()
    if conv.padding_mode != "zeros":
        raise pass_error(pass_name, node, f"padding_mode {conv.padding_mode!r} must be made an explicit pad first")
    if tuple(mask.shape) != (conv.out_channels, *conv.kernel_size):
        raise pass_error(pass_name, node, f"mask shape {tuple(mask.shape)} does not match the conv's "
                                     f"(out_channels, kh, kw) = {(conv.out_channels, *conv.kernel_size)}")
    if not bool(mask.flatten(1).any(1).all()):
        raise pass_error(pass_name, node, "a filter has no kept stripe; dead filters must be removed before lowering")
    return conv, mask


def input_shape(gm: fx.GraphModule, node: fx.Node):
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    return None if meta is None else tuple(meta.shape)


RELU_FUNCTIONS = (torch.relu, F.relu)


def used_once(gm: fx.GraphModule, target: str) -> bool:
    """Whether exactly one call_module node of the graph calls the submodule ``target``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == target) == 1


def channelwise_followers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The BatchNorm2d and/or ReLU that alone consume ``node`` (each the single user of the previous).

    Pushed into every part of a lowered conv, ONNX Runtime fuses them into the
    part's conv instead of running them as separate passes after the concat.
    """
    chain, current = [], node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if user.args[:1] != (current,) or len(user.args) != 1:
            break
        module = gm.get_submodule(user.target) if user.op == "call_module" else None
        is_bn = isinstance(module, nn.BatchNorm2d) and not chain and used_once(gm, user.target)
        is_relu = ((isinstance(module, nn.ReLU) or (user.op == "call_function" and user.target in RELU_FUNCTIONS))
                   and not user.kwargs.get("inplace", False))
        if not (is_bn or is_relu):
            break
        chain.append(user)
        current = user
        if is_relu:
            break
    return chain


def apply_followers(b: _Builder, parts: list[tuple[fx.Node, list[int]]], followers: list[fx.Node]):
    """Run the BatchNorm/ReLU followers on every part (exact: both act per channel)."""
    out = []
    for part, filters in parts:
        y, name = part, part.name[len(b.base) + 1:]
        for follower in followers:
            if follower.op == "call_module" and isinstance(b.gm.get_submodule(follower.target), nn.BatchNorm2d):
                y = b.module(f"{name}_bn", batchnorm_channels(b.gm.get_submodule(follower.target), filters), y)
            else:
                y = b.function(torch.relu, (y,), f"{name}_relu")
        out.append((y, filters))
    return out


def permutable_consumers(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """Consumers of ``node`` that can take its channels in any order (plain groups=1 convs), else None."""
    users = list(node.users)
    for user in users:
        module = gm.get_submodule(user.target) if user.op == "call_module" else None
        if not (isinstance(module, nn.Conv2d) and module.groups == 1 and user.args[:1] == (node,)
                and node not in user.args[1:] and not user.kwargs and used_once(gm, user.target)):
            return None
    return users or None


def takes_any_order(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a boxes/one-hot lowering of ``node`` permutes its consumers instead of gathering (``free_order``)."""
    followers = channelwise_followers(gm, node)
    return permutable_consumers(gm, followers[-1] if followers else node) is not None


def lower_conv(gm: fx.GraphModule, node: fx.Node, form: str, min_group: int = DEFAULT_MIN_GROUP,
               fuse_followers: bool = True, align: int = 1) -> fx.Node:
    """Replace the stripe conv ``node`` by the lowered ``form``; returns the node producing its output.

    With ``fuse_followers`` a BatchNorm2d/ReLU that alone consume the conv are
    applied per part (before the concat) so ORT fuses them into the part convs,
    and when only plain convs consume the result, their input channels are
    permuted instead of gathering the output back into filter order. ``min_group``
    and ``align`` are the ``boxes`` partition's (:func:`.stripe_geometry.box_groups`).
    """
    conv, mask = check_stripe_conv(gm, node)
    geometry = ConvGeometry.of(conv, input_shape(gm, node))
    if form not in supported_forms(geometry):
        raise pass_error(PASS, node, f"form {form!r} does not support groups={geometry.groups}")
    b = _Builder(gm, node, form)
    x = node.args[0]
    if form == "boxes":
        parts = build_boxes(b, x, geometry, mask, min_group, align)
    elif form == "onehot":
        parts = build_onehot(b, x, geometry, mask)
    else:
        parts = build_shift(b, x, geometry, mask)
    followers = channelwise_followers(gm, node) if fuse_followers and form != "shift" else []
    parts = apply_followers(b, parts, followers)
    end = followers[-1] if followers else node
    order = [o for _, filters in parts for o in filters]
    consumers = permutable_consumers(gm, end) if fuse_followers else None
    if consumers and order != sorted(order):
        out = b.restore_order([p for p, _ in parts], sorted(order))  # concat only
        for consumer in consumers:
            consumer_conv = gm.get_submodule(consumer.target)
            consumer_conv.weight = nn.Parameter(consumer_conv.weight.detach()[:, order].clone())
            swpfx_meta(consumer)["input_order"] = "permuted by " + b.base
    else:
        out = b.restore_order([p for p, _ in parts], order)
    geometry = replace(geometry, free_order=bool(consumers) and form != "shift")
    info = {"role": "lowered_conv", "conv": b.source, "kept_stripes": int(mask.sum()), "lowering": form,
            "work": form_work(geometry, mask, form, min_group=min_group, align=align)}  # per sample, for the runtime model
    for new in b.created:
        new.meta[META_KEY] = dict(info)
        new.meta[META_KEY]["part"] = new.name[len(b.base) + 1:]
    if "tensor_meta" in end.meta:
        out.meta["tensor_meta"] = end.meta["tensor_meta"]
    end.replace_all_uses_with(out)
    erase_replaced(gm, [*reversed(followers), node])
    return out


# (geometry, mask, supported forms, batch, require_gain) -> (form or "dense", lower_conv options)
FormChooser = Callable[[ConvGeometry, torch.Tensor, tuple, int, bool], tuple]
DEFAULT_GAIN = 0.85  # choose_by_macs lowers under "auto" only below this fraction of the dense conv's MACs


def choose_by_macs(geometry: ConvGeometry, mask: torch.Tensor, forms: tuple, batch: int = 1,
                   require_gain: bool = True) -> tuple[str, dict]:
    """The pass's default form chooser: ``boxes`` when it does fewer conv MACs, no latency model.

    Under ``require_gain`` (``lowering="auto"``) the boxes form must do at most
    ``DEFAULT_GAIN`` × the dense conv's MACs (its pads, concat and gather are
    ignored); otherwise (``"always"``) it is always chosen. ``swpfx.convert``
    passes the runtime model's chooser instead (``swpfx.runtime_model``).

    >>> from torch import nn
    >>> g = ConvGeometry.of(nn.Conv2d(8, 16, 3, padding=1), (1, 8, 10, 10))
    >>> centre = torch.zeros(16, 3, 3, dtype=torch.bool); centre[:, 1, 1] = True
    >>> choose_by_macs(g, centre, FORMS), choose_by_macs(g, torch.ones(16, 3, 3, dtype=torch.bool), FORMS)
    (('boxes', {'min_group': 8}), ('dense', {}))
    """
    boxes = executed_macs(form_work(geometry, mask, "boxes", min_group=DEFAULT_MIN_GROUP))
    dense = executed_macs(form_work(geometry, mask, "dense"))
    if "boxes" in forms and (not require_gain or boxes <= DEFAULT_GAIN * dense):
        return "boxes", {"min_group": DEFAULT_MIN_GROUP}
    return "dense", {}


@dataclass
class LowerStripeConvsResult(PassResult):
    forms: dict[str, str] = field(default_factory=dict)  # stripe conv node name -> form ("dense" if kept)


def lower_stripe_convs(gm: fx.GraphModule, lowering: str = "auto",
                       choose_form: FormChooser = choose_by_macs) -> LowerStripeConvsResult:
    """Lower every stripe-pruned conv of ``gm`` (in place); returns each conv's form.

    lowering: ``"never"`` keeps the dense conv with zeroed stripes; ``"always"``
    lowers every conv with a partially pruned filter (never a 1×1 conv or a conv
    keeping all stripes) with the form ``choose_form`` picks; ``"auto"`` lowers
    only where ``choose_form`` finds a gain (it is called with
    ``require_gain=True`` and returns ``("dense", {})`` to keep the conv).
    ``choose_form(geometry, mask, forms, batch, require_gain) -> (form, options)``
    defaults to :func:`choose_by_macs`; ``swpfx.convert`` passes
    ``swpfx.runtime_model.default_runtime_model().choose_form`` (predicted ORT
    latency). Every stripe conv's meta gets ``kept_stripes`` and ``lowering``
    (``"dense"`` where it stays a conv).

    Example: see the module docstring.
    """
    if lowering not in LOWERINGS:
        raise pass_error(PASS, None, f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    candidates = [n for n in gm.graph.nodes if is_stripe_conv(gm, n)]
    result = LowerStripeConvsResult(gm, modified=False)
    for node in candidates:
        if lowering != "never" and input_shape(gm, node) is None:
            raise pass_error(PASS, node, "the conv's input shape is missing; run "
                                         "torch.fx.passes.shape_prop.ShapeProp on example inputs first")
    for node in candidates:
        conv, mask = check_stripe_conv(gm, node)
        meta = swpfx_meta(node)
        meta["kept_stripes"] = int(mask.sum())
        meta["lowering"] = result.forms[node.name] = "dense"
        if lowering == "never" or not is_lowerable(conv, mask):
            continue
        shape = input_shape(gm, node)
        geometry = replace(ConvGeometry.of(conv, shape), free_order=takes_any_order(gm, node))
        form, options = choose_form(geometry, mask, supported_forms(geometry), shape[0], lowering == "auto")
        if form != "dense":
            result.forms[node.name] = form
            result.modified = True
            lower_conv(gm, node, form, **options)
    gm.graph.lint()
    gm.recompile()
    return result


def mark_stripe_conv(gm: fx.GraphModule, target: str, mask: torch.Tensor, example_input: torch.Tensor | None = None):
    """Test/benchmark helper: make a conv of ``gm`` match this pass's input contract.

    Zeroes the pruned stripes of ``gm.<target>.weight``, stores the mask in the
    call node's meta, and runs ShapeProp with ``example_input``.
    """
    conv = gm.get_submodule(target)
    with torch.no_grad():
        conv.weight.mul_(mask[:, None].to(conv.weight.dtype))
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == target:
            node.meta[META_KEY] = {"role": "conv", "conv": target, "mask": mask.clone()}
    if example_input is not None:
        ShapeProp(gm).propagate(example_input)

"""``swpfx.cost``: FLOPs/MACs, parameters and memory of any traceable model, per node.

Works on an original model, a model from ``swpfx.prepare`` and one from
``swpfx.convert``. ``.flops`` counts convolutions, linear layers and matmuls the
way ``torch.utils.flop_counter.FlopCounterMode`` does (2 per multiply-accumulate,
so the two agree exactly on dense models). Everything else — elementwise ops,
normalisation, pooling, and the pad/slice/concat/gather ops of a lowered conv,
which every FLOP counter reports as zero — is counted separately in
``.other_flops`` and in bytes read/written. See ``passes/count_costs.py`` for the
per-op conventions.

Two FLOP counts, for stripe-pruned models:

* ``.flops``/``.macs`` — *executed*: what the graph runs. A conv kept dense with
  zeroed stripes costs its full kernel; a lowered conv costs its helper convs.
  This is what a runtime sees.
* ``.effective_flops``/``.effective_macs`` — *effective*: only kept stripes of
  kept filters over kept channels, the count the SWP paper reports. For a
  lowered conv it is the count of the masked conv it replaced, once.

They are equal for any model without stripe masks (dense, prepared, or pruned
by whole filters only).

Example:
    >>> import torch, torchvision, swpfx
    >>> report = swpfx.cost(torchvision.models.resnet18(), (torch.randn(1, 3, 224, 224),))
    >>> report.flops, report.params
    (3628146688, 11689512)
    >>> report.effective_flops == report.flops  # no stripe masks: effective == executed
    True
    >>> print(report.table(top=3))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tabulate import tabulate
from torch import fx, nn

from swpfx.passes.count_costs import NodeCost, count_costs, lowered_instance
from swpfx.passes.graph_utils import META_KEY as META
from swpfx.passes.modes import eval_mode
from swpfx.tracing import normalize_example_inputs, trace

COMPUTE_KINDS = ("call_module", "call_function", "call_method")


# ---------------------------------------------------------------- units


def human(value: float, unit: str = "", base: int = 1000) -> str:
    """``1820000000 -> '1.82 G'``: three significant digits and an SI prefix."""
    if value == 0:
        return f"0 {unit}".rstrip()
    prefixes = ["", "K", "M", "G", "T", "P"]
    i, scaled = 0, float(value)
    while abs(scaled) >= base and i < len(prefixes) - 1:
        scaled, i = scaled / base, i + 1
    digits = 0 if abs(scaled) >= 100 or i == 0 else 1 if abs(scaled) >= 10 else 2
    return f"{scaled:.{digits}f} {prefixes[i]}{unit}".rstrip()


def human_bytes(value: float) -> str:
    return human(value, "B")


def ratio(a: float, b: float) -> str:
    """How many times smaller ``b`` is than ``a`` ("2.34×"), '-' when undefined."""
    if a == 0 and b == 0:
        return "-"
    if b == 0:
        return "inf"
    return f"{a / b:.2f}×"


def reduction(a: float, b: float) -> str:
    return f"{100 * (1 - b / a):.1f} %" if a else "-"


# ---------------------------------------------------------------- the report


@dataclass
class CostReport:
    """Per-node costs of one model on one set of example inputs, with totals.

    ``rows`` has one :class:`~swpfx.passes.count_costs.NodeCost` per graph node;
    ``per_layer`` keeps the activation-side compute nodes (no inputs, outputs,
    ``get_attr`` or weight-side nodes). Totals exclude weight-side nodes, which
    are reported on their own in ``weight_op_flops``.
    """

    rows: list[NodeCost]
    peak_activation_bytes: int
    peak_node: str | None = None
    unknown_ops: list[str] = field(default_factory=list)
    model_name: str = ""
    input_shapes: list[tuple] = field(default_factory=list)

    # ---- rows
    @property
    def per_layer(self) -> list[NodeCost]:
        return [r for r in self.rows if r.kind in COMPUTE_KINDS and not r.weight_side]

    def _sum(self, attr: str, rows: Sequence[NodeCost] | None = None) -> int:
        return sum(getattr(r, attr) for r in (self.per_layer if rows is None else rows))

    # ---- totals (state is counted on whichever row owns it, including get_attr rows)
    @property
    def macs(self) -> int:
        return self._sum("macs")

    @property
    def flops(self) -> int:
        """Conv/linear/matmul FLOPs, FlopCounterMode's convention (2 per MAC)."""
        return self._sum("flops")

    @property
    def effective_macs(self) -> int:
        """MACs of kept stripes only (the SWP paper's count); equals ``macs`` without stripe masks."""
        return self._sum("effective_macs")

    @property
    def effective_flops(self) -> int:
        """FLOPs of kept stripes only, 2 per MAC: the paper's count, next to the executed ``flops``."""
        return self._sum("effective_flops")

    @property
    def other_flops(self) -> int:
        """Elementwise, normalisation, pooling, reduction FLOPs (per-pixel work FLOP counters omit)."""
        return self._sum("other_flops")

    @property
    def total_flops(self) -> int:
        return self.flops + self.other_flops

    @property
    def weight_op_flops(self) -> int:
        """FLOPs of weight-side ops (e.g. ``weight * skeleton``), done once per weight update."""
        return sum(r.flops + r.other_flops for r in self.rows if r.weight_side)

    @property
    def params(self) -> int:
        return self._sum("params", self.rows)

    @property
    def param_bytes(self) -> int:
        return self._sum("param_bytes", self.rows)

    @property
    def buffers(self) -> int:
        return self._sum("buffers", self.rows)

    @property
    def buffer_bytes(self) -> int:
        return self._sum("buffer_bytes", self.rows)

    @property
    def bytes_read(self) -> int:
        return self._sum("bytes_read")

    @property
    def bytes_written(self) -> int:
        return self._sum("bytes_written")

    def totals(self) -> dict[str, int]:
        return {
            "macs": self.macs, "flops": self.flops, "effective_macs": self.effective_macs,
            "effective_flops": self.effective_flops, "other_flops": self.other_flops,
            "weight_op_flops": self.weight_op_flops, "params": self.params, "param_bytes": self.param_bytes,
            "buffers": self.buffers, "buffer_bytes": self.buffer_bytes, "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written, "peak_activation_bytes": self.peak_activation_bytes,
        }

    def to_dict(self) -> dict:
        """JSON-serialisable: totals, peak, unknown ops and every row.

        ``totals["flops"]`` (and each row's ``flops``) is executed, ``effective_flops`` counts
        kept stripes only; see the module docstring.
        """
        return {
            "model": self.model_name,
            "input_shapes": [list(s) for s in self.input_shapes],
            "totals": self.totals(),
            "peak_node": self.peak_node,
            "unknown_ops": list(self.unknown_ops),
            "rows": [_jsonable(r.to_dict()) for r in self.rows],
        }

    # ---- printing
    def table(self, top: int | None = None, tablefmt: str = "simple") -> str:
        """A per-layer table with totals; ``top=k`` keeps the k most expensive layers."""
        layers = self.per_layer
        if top is not None:
            layers = sorted(layers, key=lambda r: (r.flops, r.other_flops, r.bytes_written), reverse=True)[:top]
        headers = ["node", "op", "output", "MACs", "FLOPs", "eff. FLOPs", "other FLOPs", "params", "act. bytes", "read",
                   "written"]
        body = [_layer_cells(r) for r in layers]
        body.append(["TOTAL", "", "", human(self.macs), human(self.flops), human(self.effective_flops),
                     human(self.other_flops), human(self.params), "", human_bytes(self.bytes_read),
                     human_bytes(self.bytes_written)])
        text = tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
        footer = [
            f"{self.model_name} on inputs {', '.join(str(tuple(s)) for s in self.input_shapes)}".strip(),
            f"FLOPs {human(self.flops)} executed (MACs {human(self.macs)}), {human(self.effective_flops)} effective "
            f"(kept stripes only), other FLOPs {human(self.other_flops)}, "
            f"params {human(self.params)} ({human_bytes(self.param_bytes)}), buffers {human_bytes(self.buffer_bytes)}, "
            f"peak activations {human_bytes(self.peak_activation_bytes)} (at {self.peak_node})",
        ]
        if self.weight_op_flops:
            footer.append(f"weight-side ops (once per weight update, not in totals): {human(self.weight_op_flops)} FLOPs")
        if top is not None and top < len(self.per_layer):
            footer.append(f"showing the {top} most expensive of {len(self.per_layer)} layers; totals cover all")
        if self.unknown_ops:
            footer.append(f"no cost formula (0 FLOPs, memory counted): {', '.join(self.unknown_ops)}")
        return text + "\n" + "\n".join(footer)

    def __str__(self) -> str:
        return self.table()


def _layer_cells(r: NodeCost) -> list[str]:
    shape = "×".join(map(str, r.shape)) if isinstance(r.shape, tuple) else ("tuple" if r.shape else "")
    return [r.name, r.op + ("" if r.known else " (?)"), shape, human(r.macs), human(r.flops), human(r.effective_flops),
            human(r.other_flops), human(r.params), human_bytes(r.activation_bytes), human_bytes(r.bytes_read),
            human_bytes(r.bytes_written)]


def _jsonable(d: dict) -> dict:
    out = dict(d)
    if isinstance(out.get("shape"), tuple):
        out["shape"] = list(out["shape"])
    elif isinstance(out.get("shape"), list):
        out["shape"] = [list(s) for s in out["shape"]]
    return out


# ---------------------------------------------------------------- public functions


def _graph_module(model: nn.Module, leaf_modules) -> fx.GraphModule:
    """A GraphModule sharing ``model``'s modules and parameters, with its own graph (so meta writes stay local)."""
    if isinstance(model, fx.GraphModule):
        graph = copy.deepcopy(model.graph)
        for node in graph.nodes:  # Graph copies keep node.meta's inner dicts shared; unshare ours
            if isinstance(node.meta.get(META), dict):
                node.meta[META] = dict(node.meta[META])
        return fx.GraphModule(model, graph, type(model).__name__)
    return trace(model, leaf_modules, copy_model=False)


def cost(model: nn.Module, example_inputs, leaf_modules=()) -> CostReport:
    """Count FLOPs/MACs, parameters and memory of ``model`` on ``example_inputs``, per node.

    ``model`` is a plain module (traced with swpfx's tracer; ``leaf_modules`` as in
    ``prepare``), or a GraphModule from ``prepare``/``convert``. It runs once, in
    eval mode, without grad; its parameters, buffers and train/eval flags are left
    as they were.

    Example:
        >>> import torch, torchvision, swpfx
        >>> x = torch.randn(1, 3, 224, 224)
        >>> report = swpfx.cost(torchvision.models.resnet18(), (x,))
        >>> report.macs, report.params, report.unknown_ops
        (1814073344, 11689512, [])
        >>> report.per_layer[0].name, report.per_layer[0].op, report.per_layer[0].shape
        ('conv1', 'Conv2d', (1, 64, 112, 112))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swpfx.cost: expected an nn.Module, got {type(model).__name__}")
    inputs = normalize_example_inputs(example_inputs)
    if inputs is None:
        raise ValueError("swpfx.cost: example_inputs are required (a tensor or a tuple of positional inputs)")
    gm = _graph_module(model, leaf_modules)
    with eval_mode(gm, model):
        result = count_costs(gm, inputs)
    return CostReport(
        rows=result.rows,
        peak_activation_bytes=result.peak_activation_bytes,
        peak_node=result.peak_node,
        unknown_ops=result.unknown,
        model_name=type(model).__name__,
        input_shapes=[tuple(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
    )


def conv_decisions(model: fx.GraphModule) -> dict[str, str]:
    """How each pruned conv of a converted model runs: ``"dense"``, its lowering form or ``"fused"``.

    One entry per conv call, keyed by the conv node's name; the many nodes of a
    lowered conv count once.

    Example:
        >>> import torch, swpfx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1))
        >>> x = torch.randn(1, 8, 12, 12)
        >>> prepared = swpfx.prepare(model, (x,))
        >>> with torch.no_grad():
        ...     swpfx.skeletons(prepared)["0"][:, 0, :] = 0.0  # every filter of conv 0 loses its top row
        >>> deployed = swpfx.convert(prepared, lowering="always", channel_multiple=1)
        >>> sorted(conv_decisions(deployed).values())
        ['boxes', 'dense']
    """
    decisions: dict[str, str] = {}
    for node in model.graph.nodes:
        meta = node.meta.get(META)
        if not isinstance(meta, dict):
            continue
        instance = lowered_instance(node)
        if instance is not None:
            decisions.setdefault(instance, meta.get("lowering", "lowered"))
        elif meta.get("role") == "conv" and isinstance(meta.get("mask"), torch.Tensor):
            decisions[node.name] = meta.get("lowering", "dense")
        elif meta.get("role") == "fused_conv":  # lowering="fused": the compiled kernel (dense convs too)
            decisions[meta.get("conv", node.name)] = "fused"
    return decisions


TOTAL_METRICS = (
    ("MACs", "macs", human), ("FLOPs", "flops", human), ("effective MACs", "effective_macs", human),
    ("effective FLOPs", "effective_flops", human), ("other FLOPs", "other_flops", human),
    ("params", "params", human), ("param bytes", "param_bytes", human_bytes),
    ("buffer bytes", "buffer_bytes", human_bytes), ("bytes read", "bytes_read", human_bytes),
    ("bytes written", "bytes_written", human_bytes), ("peak activations", "peak_activation_bytes", human_bytes),
)


def _groups(report: CostReport) -> dict[str, dict[str, int]]:
    """Per-layer sums keyed by ``NodeCost.group`` (conv name or module path), in graph order."""
    groups: dict[str, dict[str, int]] = {}
    for r in report.per_layer:
        g = groups.setdefault(r.group, {"macs": 0, "effective_macs": 0, "other_flops": 0, "params": 0, "bytes": 0})
        g["macs"] += r.macs
        g["effective_macs"] += r.effective_macs
        g["other_flops"] += r.other_flops
        g["params"] += r.params
        g["bytes"] += r.bytes_read + r.bytes_written
    return groups


def compare(a: CostReport, b: CostReport, names: tuple[str, str] = ("dense", "pruned"), per_layer: bool = True,
            tablefmt: str = "simple") -> str:
    """A side-by-side table of two reports: totals, then layers matched by conv/module name.

    Ratios are ``a / b`` (how many times smaller ``b`` is). "MACs" are executed,
    "effective MACs" count kept stripes only (see the module docstring). Lowering nodes that
    ``convert`` tags with their conv (``node.meta["swpfx"]["conv"]``) are summed
    into that conv's row; other unmatched nodes appear on their own.

    Example:
        >>> import torch, torchvision, swpfx
        >>> x = torch.randn(1, 3, 64, 64)
        >>> a = swpfx.cost(torchvision.models.mobilenet_v2(), (x,))
        >>> b = swpfx.cost(torchvision.models.mobilenet_v2(width_mult=0.5), (x,))
        >>> print(swpfx.compare(a, b, names=("x1.0", "x0.5"), per_layer=False).splitlines()[2])
        MACs              25.7 M   9.10 M   2.83×        64.6 %
    """
    na, nb = names
    total_rows = []
    for label, attr, fmt in TOTAL_METRICS:
        va, vb = getattr(a, attr), getattr(b, attr)
        total_rows.append([label, fmt(va), fmt(vb), ratio(va, vb), reduction(va, vb)])
    text = tabulate(total_rows, headers=["total", na, nb, f"{na}/{nb}", "reduction"], tablefmt=tablefmt,
                    disable_numparse=True)
    if not per_layer:
        return text
    ga, gb = _groups(a), _groups(b)
    keys = list(ga) + [k for k in gb if k not in ga]
    empty = {"macs": 0, "effective_macs": 0, "other_flops": 0, "params": 0, "bytes": 0}
    layer_rows = []
    for k in keys:
        ra, rb = ga.get(k, empty), gb.get(k, empty)
        if not any(ra.values()) and not any(rb.values()):
            continue
        layer_rows.append([
            k, human(ra["macs"]), human(rb["macs"]), ratio(ra["macs"], rb["macs"]), human(ra["effective_macs"]),
            human(rb["effective_macs"]), ratio(ra["effective_macs"], rb["effective_macs"]),
            human(ra["other_flops"]), human(rb["other_flops"]), human(ra["params"]), human(rb["params"]),
            human_bytes(ra["bytes"]), human_bytes(rb["bytes"]),
        ])
    headers = ["layer", f"MACs {na}", f"MACs {nb}", "ratio", f"eff. MACs {na}", f"eff. MACs {nb}", "eff. ratio",
               f"other {na}", f"other {nb}", f"params {na}", f"params {nb}", f"traffic {na}", f"traffic {nb}"]
    return text + "\n\n" + tabulate(layer_rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

"""The cost of ``convert``'s graph for given stripe masks, without building it: what the budgets search on.

:class:`ConversionEstimate` runs the channel analysis once; for a set of masks
it then plans which channels go (``plan_removal``, as ``remove_channels`` does),
gives every conv the geometry and mask it will have after removal, asks the same
form chooser ``convert`` hands the lowering pass which form it gets, and prices
that form with the one cost per conv form (:func:`swpfx.passes.form_work.form_work`):
executed FLOPs exactly as :func:`swpfx.cost` counts the built graph (tested equal),
and predicted ONNX Runtime seconds as the runtime model prices it (tested equal to
:func:`predict_graph` of the built graph). The small ones-map convs that carry a
removed channel's constant through zero padding are priced too.

Example:
    >>> import torch, torchvision, swpfx
    >>> x = torch.randn(1, 3, 64, 64)
    >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10), (x,))
    >>> masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in swpfx.skeletons(prepared).items()}
    >>> masks["layer1.0.conv1"][:32] = False                      # 32 dead filters
    >>> est = ConversionEstimate(prepared, (x,), lowering="never", channel_multiple=1)
    >>> from swpfx.pipeline import convert_with_masks
    >>> built, _ = convert_with_masks(prepared, masks, "never", (x,))
    >>> est.estimate(masks).flops == swpfx.cost(built, (x,)).flops
    True
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from swpfx.passes.analyze_channels import ChannelAnalysis, analyze_channels
from swpfx.passes.channel_rules import kept_groups
from swpfx.passes.count_costs import lowered_instance
from swpfx.passes.fold_skeletons import fold_skeletons
from swpfx.passes.form_work import dense_work, executed_macs, form_work
from swpfx.passes.fuse_stripe_convs import Absorbed, absorbed_followers
from swpfx.passes.graph_utils import NEW_TENSOR_METHODS, swpfx_meta
from swpfx.passes.lower_stripe_convs import channelwise_followers, is_lowerable, takes_any_order, used_once
from swpfx.passes.plan_kernel_buffers import ROLE as BUFFERS_ROLE
from swpfx.passes.remove_channels import (constant_sources, dense_input_weight, has_zero_padding, keep_indices,
                                          plan_removal)
from swpfx.passes.stripe_geometry import ConvGeometry, supported_forms
from swpfx.prepare import skeletons
from swpfx.runtime_model import ONE_RUN

COMPUTE = ("call_module", "call_function", "call_method")
FORMS_TAKING_FOLLOWERS = ("dense", "boxes", "onehot")  # shift leaves BatchNorm/ReLU after its sums


def _elems(node) -> int:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return math.prod(meta.shape) if hasattr(meta, "shape") else 0


def node_work(node: fx.Node) -> dict:
    """Work of a graph op other than a conv or Linear: one op writing its output (0 elements if not a tensor),
    and ``reads``, the elements of its tensor inputs.

    Its own kinds (``graph_ops``, ``graph_elems``), not a lowered form's ``ops`` and ``copy_elems``: a residual
    add or a reshape costs ORT a few microseconds, a lowered form's extra op far more (calibrated apart).
    ``reads`` is not an ORT amount (its elementwise ops cost by what they write); in PyTorch a pool that reads
    four times what it writes costs by what it reads (``swpfx.fused_runtime_model``).
    """
    if _reads_metadata_only(node):
        reads = 0
    elif node.target is operator.getitem:  # indexing reads what it returns
        reads = _elems(node)
    else:
        reads = sum(_elems(a) for a in node.all_input_nodes)
    work = {"graph_elems": _elems(node), "graph_ops": 1, "reads": reads}
    window = _pool_window(node)
    if window:  # a pool's reads are its windows'
        work["reads"], work["pool"] = work["graph_elems"] * window, True
    return work


METADATA_METHODS = frozenset({"size", "dim", *NEW_TENSOR_METHODS})


def _reads_metadata_only(node: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, ``x.new_ones(...)``: ops that read a tensor's shape, dtype or device, not its
    values (remove_channels' ones maps are built so)."""
    return (node.op == "call_method" and node.target in METADATA_METHODS) or \
        (node.op == "call_function" and node.target is getattr)


def _pool_window(node: fx.Node) -> int:
    """Elements in a pooling module's window (0 if ``node`` is no pooling module call); an adaptive pool's is the
    input's size over the output's."""
    if node.op != "call_module" or node.graph.owning_module is None:
        return 0
    module = node.graph.owning_module.get_submodule(node.target)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        return math.prod(nn.modules.utils._pair(module.kernel_size))
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        out = _elems(node)
        return max(1, sum(_elems(a) for a in node.all_input_nodes) // out) if out else 0
    return 0


def fused_followers(gm: fx.GraphModule, convs) -> set[fx.Node]:
    """BatchNorm/ReLU that ONNX Runtime fuses into the conv they alone consume (priced as part of the conv)."""
    return {f for node in convs for f in channelwise_followers(gm, node)}


def predict_graph(gm: fx.GraphModule, runtime_model, batch: int | None = None) -> float:
    """Predicted seconds of a converted graph at ``batch`` samples per run (default: the shapes ShapeProp
    recorded), the runtime model node by node.

    Each lowered conv is priced by the work its lowering recorded, a fused conv
    (``lowering="fused"``) by the kernel's work, every other conv by its dense
    work, a Linear by its MACs, any other op by :func:`node_work`; in ORT
    (a model without ``runs_in_torch``) BatchNorm/ReLU fused into a dense conv
    cost nothing; the run itself once (``runtime_model.ONE_RUN``).
    :class:`ConversionEstimate` predicts the same number before building.
    """
    fuses = not getattr(runtime_model, "runs_in_torch", False)
    dense_convs = [n for n in gm.graph.nodes if n.op == "call_module" and swpfx_meta(n).get("role") != "lowered_conv"
                   and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    fused = fused_followers(gm, dense_convs) if fuses else set()
    placeholder = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    recorded = _batch(placeholder) if placeholder is not None else 1
    batch = recorded if batch is None else batch
    scale = batch / recorded
    seconds, lowered = runtime_model.predict(ONE_RUN), set()
    for node in gm.graph.nodes:
        if node.op not in COMPUTE or node in fused:
            continue
        meta = swpfx_meta(node)
        if meta.get("role") == BUFFERS_ROLE:  # hands out memory: no op runs
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if meta.get("role") == "fused_conv":
            shape = node.args[0].meta["tensor_meta"].shape
            work = form_work(ConvGeometry.of(module, shape), module.mask, "fused", residual=module.residual)
            seconds += runtime_model.predict(work, batch)
        elif meta.get("role") == "lowered_conv":
            key = lowered_instance(node)
            if key not in lowered:
                lowered.add(key)
                seconds += runtime_model.predict(meta["work"], batch)
        elif isinstance(module, nn.Conv2d):
            shape = node.args[0].meta["tensor_meta"].shape
            seconds += runtime_model.predict(dense_work(ConvGeometry.of(module, shape)), batch)
        elif isinstance(module, nn.Linear):
            rows = math.prod(node.meta["tensor_meta"].shape[:-1])
            seconds += runtime_model.predict({"conv_macs": rows * module.in_features * module.out_features, "ops": 1},
                                             scale)
        else:
            seconds += runtime_model.predict(node_work(node), scale)
    return seconds


def _batch(node: fx.Node) -> int:
    meta = node.meta.get("tensor_meta")
    return meta.shape[0] if hasattr(meta, "shape") else 1


@dataclass
class ConvDecision:
    """What one conv becomes: its kept filters and inputs, its form and that form's cost."""

    node: str
    conv: str
    filters: int
    kept_filters: int
    in_channels: int
    kept_stripes: int
    total_stripes: int
    form: str
    flops: int
    seconds: float


@dataclass
class Estimate:
    flops: int
    seconds: float
    decisions: list[ConvDecision] = field(default_factory=list)


@dataclass
class _ConvSite:
    node: fx.Node
    name: str  # skeleton key (the conv's name)
    module: nn.Conv2d
    geometry: ConvGeometry
    batch: int
    src: fx.Node | None
    followers: list = field(default_factory=list)  # BatchNorm/ReLU ORT fuses into the dense conv
    constants: torch.Tensor | None = None  # per input channel: its value if every producer were dead
    position_dependent: bool = False  # a removed input's constant needs the ones-map conv
    ones_map_work: dict = field(default_factory=dict)  # the ones map's ops before the conv (slice, ones, chain)
    absorbed: Absorbed | None = None  # lowering="fused": what the kernel's call takes over (None: not fused)


def _mask_after_removal(mask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The mask ``convert`` lowers: kept filters only; dead filters that stay keep their centre stripe."""
    mask = mask if rows is None else mask[rows]
    dead = ~mask.flatten(1).any(1)
    if dead.any():
        mask = mask.clone()
        mask[dead, mask.shape[1] // 2, mask.shape[2] // 2] = True
    return mask


def _geometry_after_removal(site: _ConvSite, out_keep, in_keep) -> ConvGeometry:
    """The conv's geometry once ``remove_channels`` has sliced it (equal groups, see ``grouped_weight``)."""
    g = site.geometry
    groups, out_ch, in_ch = g.groups, g.out_channels, g.in_channels
    out_n = out_ch if out_keep is None else len(out_keep)
    in_n = in_ch if in_keep is None else len(in_keep)
    if groups > 1 and groups == in_ch:  # depthwise: one group per kept channel
        groups = in_n
    elif groups > 1:
        groups = len(kept_groups(groups, in_ch, out_ch, out_keep, in_keep))
    return ConvGeometry(in_n, out_n, g.kernel, g.stride, g.dilation, g.pads, groups, g.input_hw, g.free_order)


class ConversionEstimate:
    """FLOPs and predicted latency of ``convert_with_masks(prepared, masks, lowering, probe)``, without building it.

    ``choose_form`` is the lowering's form chooser (``convert`` passes the runtime
    model's); ``runtime_model`` prices forms in seconds (``None``: seconds are 0)
    at ``batch`` samples per run. FLOPs are counted for ``probe``'s batch.
    """

    def __init__(self, prepared: fx.GraphModule, probe: tuple, lowering: str = "auto", channel_multiple: int = 1,
                 runtime_model=None, choose_form=None, batch: int = 1):
        self.lowering, self.channel_multiple, self.batch = lowering, channel_multiple, batch
        self.runtime_model = runtime_model
        self.choose_form = choose_form or (runtime_model.choose_form if runtime_model is not None else None)
        if lowering != "never" and self.choose_form is None:
            from swpfx.runtime_model import default_runtime_model

            self.runtime_model = self.runtime_model or default_runtime_model()
            self.choose_form = self.runtime_model.choose_form
        gm = copy.deepcopy(prepared).eval()
        self.full = {name: torch.ones_like(s, dtype=torch.bool) for name, s in skeletons(prepared).items()}
        fold_skeletons(gm, self.full)
        self.gm = gm
        self.analysis: ChannelAnalysis = analyze_channels(gm, probe)
        self.probe_batch = max(next((x.shape[0] for x in probe if isinstance(x, torch.Tensor) and x.dim()), 1), 1)
        self.sources, self.unfoldable = constant_sources(gm, self.analysis)
        self.convs: list[_ConvSite] = []
        self.absorbable: list[fx.Node] = []
        self.linears: list[tuple[fx.Node, nn.Linear]] = []
        self.others: list[fx.Node] = []
        for node in gm.graph.nodes:
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, nn.Conv2d):
                src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
                shape = src.meta["tensor_meta"].shape
                geometry = replace(ConvGeometry.of(module, shape), free_order=takes_any_order(gm, node))
                self.convs.append(_ConvSite(node, swpfx_meta(node).get("conv", ""), module, geometry, shape[0], src,
                                            channelwise_followers(gm, node)))
            elif isinstance(module, nn.Linear):
                self.linears.append((node, module))
            elif node.op in COMPUTE:
                self.others.append(node)
        followers = {f for site in self.convs for f in site.followers}
        if lowering == "fused":
            followers |= self._mark_fused()
        self.others = [n for n in self.others if n not in followers]
        self._capture_dead_constants(probe)

    # ------------------------------------------------------------ set-up

    def _mark_fused(self) -> set[fx.Node]:
        """lowering="fused": give each conv the kernel takes what its call could absorb; returns those nodes.

        Which conv absorbs a residual add depends on the masks (:meth:`_absorb`): the nodes no conv takes are
        priced on their own (``self.absorbable``, in graph order).
        """
        from swpfx.kernels.fused_conv import unsupported_reason  # loaded only when fusing

        absorbed, batchnorms = {}, set()
        for site in self.convs:
            if site.name in self.full and unsupported_reason(site.module) is None:
                site.absorbed = absorbed_followers(self.gm, site.node)
                absorbed.update(dict.fromkeys(site.absorbed.nodes))
                batchnorms.add(site.absorbed.batchnorm)
        self.absorbable = [n for n in absorbed if n not in batchnorms]
        return set(absorbed)

    def _capture_dead_constants(self, probe: tuple) -> None:
        """Every channel's value at each consumer's constant source when all its producers are dead.

        A channel is removed only when every conv producing it is dead, and only
        channel-wise ops lie between (the analysis guarantees it), so one forward
        pass with every prepared conv's weight zeroed gives every removed
        channel's constant, whichever set of filters is dead.
        """
        dead = copy.deepcopy(self.gm)
        for site in self.convs:
            if site.name in self.full:
                with torch.no_grad():
                    dead.get_submodule(site.node.target).weight.zero_()
        wanted = {self.sources[s.node][0].name: s for s in self.convs if s.node in self.sources}
        if not wanted:
            return
        values = {}

        class Capture(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name in wanted:
                    values[n.name] = out[:1].detach().to(torch.float64)
                return out

        with torch.no_grad():
            Capture(dead).run(*probe)
        for site in self.convs:
            if site.node in self.sources:
                base, chain = self.sources[site.node]
                site.constants = values[base.name][0].flatten(1).mean(1)
                site.position_dependent = bool(chain) or has_zero_padding(site.module)
                # the ones map: base.shape, its N, H and W, base.new_ones((N, 1, H, W)) (these read no values),
                # then the chain's ops, one channel each, each reading the one before
                spatial = [math.prod(n.meta["tensor_meta"].shape[2:]) for n in (base, *chain)]
                site.ones_map_work = {"graph_elems": sum(spatial), "graph_ops": 4 + len(spatial),
                                      "reads": sum(spatial[:-1])}

    # ------------------------------------------------------------ estimate

    def keep(self, masks: dict[str, torch.Tensor]) -> dict[fx.Node, torch.Tensor]:
        """Node -> kept channel indices (nodes losing none are absent), as ``remove_channels`` plans them."""
        requests = {}
        for site in self.convs:
            if site.name in masks and site.node in self.analysis.producers:
                dead = (~masks[site.name].flatten(1).any(1)).nonzero().flatten().tolist()
                if dead:
                    requests[site.node] = dead
        removed = plan_removal(self.analysis, requests, channel_multiple=self.channel_multiple,
                               keep_classes=self.unfoldable)
        return keep_indices(self.analysis, removed)

    def estimate(self, masks: dict[str, torch.Tensor]) -> Estimate:
        keep = self.keep(masks)
        result = Estimate(0, self._per_sample(ONE_RUN))
        taken: set[fx.Node] = set()  # lowering="fused": nodes a fused conv absorbed
        for site in self.convs:
            self._add_conv(result, site, masks, keep, taken)
        for node in self.absorbable:
            if node not in taken:
                result.seconds += self._per_probe(self._other_work(node, keep))
        for node, linear in self.linears:
            cols = linear.in_features
            src = node.args[0]
            if src in keep:
                cols = len(keep[src]) * self.analysis.channels[src].expansion
            batch = node.meta["tensor_meta"].shape[0]
            macs = batch * cols * linear.out_features
            result.flops += 2 * macs
            result.seconds += self._per_probe({"conv_macs": macs, "ops": 1})
        for node in self.others:
            result.seconds += self._per_probe(self._other_work(node, keep))
        return result

    def _per_sample(self, work: dict) -> float:
        """Predicted seconds of per-sample ``work`` (a form's) at ``self.batch`` samples per run."""
        return self.runtime_model.predict(work, self.batch) if self.runtime_model is not None else 0.0

    def _per_probe(self, work: dict) -> float:
        """Predicted seconds of ``work`` counted on the probe's tensors, scaled to ``self.batch`` samples."""
        if self.runtime_model is None:
            return 0.0
        return self.runtime_model.predict(work, self.batch / self.probe_batch)

    def _other_work(self, node: fx.Node, keep) -> dict:
        """:func:`node_work` of the node once its removed channels are gone."""
        work = node_work(node)
        info = self.analysis.channels.get(node)
        if node in keep and info is not None and info.width:  # its inputs lose those channels too
            work["graph_elems"] = work["graph_elems"] // info.width * len(keep[node])
            work["reads"] = work["reads"] * len(keep[node]) // info.width
        return work

    def _add_conv(self, result: Estimate, site: _ConvSite, masks, keep, taken: set) -> None:
        out_keep = keep.get(site.node)
        in_keep = keep.get(site.src) if site.src is not None else None
        geometry = _geometry_after_removal(site, out_keep, in_keep)
        mask = masks.get(site.name, self.full.get(site.name))
        if mask is None:
            mask = torch.ones(site.geometry.out_channels, *site.geometry.kernel, dtype=torch.bool)
        folded_mask = mask.to(torch.bool).cpu()
        mask = _mask_after_removal(folded_mask, out_keep)
        dead_flops, dead_seconds = self._dead_channel_conv(site, geometry, folded_mask, in_keep)
        if dead_flops:  # the ones-map sum consumes the conv: its output goes back to filter order
            geometry = replace(geometry, free_order=False)
        form, options = "dense", {}
        if site.absorbed is not None:
            form, options = "fused", {"residual": self._absorb(site, bool(dead_flops), taken)}
        elif self.lowering != "never" and is_lowerable(site.module, mask):
            form, options = self.choose_form(geometry, mask, supported_forms(geometry), site.batch,
                                             self.lowering == "auto")
        work = form_work(geometry, mask, form, **options)
        flops = 2 * site.batch * executed_macs(work)
        seconds = self._per_sample(work) + sum(self._per_probe(self._other_work(f, keep))
                                               for f in self._followers_left(site, form, bool(dead_flops)))
        result.flops += flops + dead_flops
        result.seconds += seconds + dead_seconds
        result.decisions.append(ConvDecision(
            site.node.name, site.name, site.geometry.out_channels, geometry.out_channels, geometry.in_channels,
            int(mask.sum()), mask.numel(), form + "".join(f" {k}={v}" for k, v in options.items()),
            flops + dead_flops, seconds + dead_seconds))

    @staticmethod
    def _absorb(site: _ConvSite, dead: bool, taken: set) -> bool:
        """What ``fuse_stripe_convs`` lets this fused conv absorb, given the convs before it: adds it to ``taken``
        and returns whether its call takes a residual.

        Convs are fused in graph order. A residual add goes to the first conv
        reaching it (ResNet's second conv, before the downsample conv). With a
        ones-map conv (``dead``), whose sum ends ORT's fusion after a BatchNorm
        folds into both convs, the kernel takes that sum as its residual add and
        a ReLU right after it; the block's add is then left to the next conv.
        """
        found = site.absorbed
        if dead:
            if found.add is None:  # the ReLU right after the conv (or its folded BatchNorm)
                taken.update(n for n in found.nodes if n is not found.batchnorm)
            return True
        if found.add in taken:
            return False  # an earlier conv took the add (this conv's output is its residual)
        taken.update(found.nodes)
        return found.add is not None

    def _followers_left(self, site: _ConvSite, form: str, dead: bool) -> list[fx.Node]:
        """The nodes after a conv the kernel does not take that run on their own (priced apart from it).

        ORT fuses a BatchNorm/ReLU into a dense, boxes or one-hot conv; the sum
        with a ones-map conv (``dead``) ends that fusion, after a BatchNorm folds
        into both convs. PyTorch fuses nothing (``lowering="fused"``).
        """
        if site.absorbed is not None:
            return []
        if dead:
            return self._unfolded(site)
        if form in FORMS_TAKING_FOLLOWERS and self.lowering != "fused":
            return []
        return site.followers

    def _unfolded(self, site: _ConvSite) -> list[fx.Node]:
        """The followers left after ``fold_batchnorm_into_sums`` (it folds a leading BatchNorm of an unshared conv)."""
        followers = site.followers
        if followers and followers[0].op == "call_module" and isinstance(
                self.gm.get_submodule(followers[0].target), nn.BatchNorm2d) and used_once(self.gm, site.node.target):
            return followers[1:]
        return followers

    def _dead_channel_conv(self, site: _ConvSite, geometry: ConvGeometry, folded_mask, in_keep) -> tuple[int, float]:
        """Cost of the ones-map conv ``remove_channels`` adds for removed inputs whose constant varies with position.

        It is added unless every removed input's constant meets only pruned (zero) weights.
        """
        if in_keep is None or site.constants is None or not site.position_dependent:
            return 0, 0.0
        removed = torch.ones(site.geometry.in_channels, dtype=torch.bool)
        removed[in_keep] = False
        removed_in = removed.nonzero().flatten()
        weight = dense_input_weight(site.module, removed_in)  # (O, R, kh, kw) float64, before any pruning
        combined = torch.einsum("orhw,r->ohw", weight, site.constants[removed_in].to(weight))
        if not bool(((combined != 0) & folded_mask).any()):
            return 0, 0.0
        ones = ConvGeometry(1, geometry.out_channels, geometry.kernel, geometry.stride, geometry.dilation,
                            geometry.pads, 1, geometry.input_hw)
        work = dense_work(ones)
        ho, wo = ones.output_hw
        out = site.batch * geometry.out_channels * ho * wo
        # conv + ones-map conv: the fused kernel's residual add, else an op of its own
        add = {} if site.absorbed is not None else {"graph_elems": out, "graph_ops": 1, "reads": 2 * out}
        ones_map = {k: v * (site.batch if k in ("graph_elems", "reads") else 1) for k, v in site.ones_map_work.items()}
        seconds = self._per_sample(work) + self._per_probe(add) + self._per_probe(ones_map)
        return 2 * site.batch * executed_macs(work), seconds

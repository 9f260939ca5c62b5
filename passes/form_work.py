"""The work each form of a stripe-pruned conv does: the one cost per conv form.

For one conv (its :class:`~.stripe_geometry.ConvGeometry` and stripe mask) and
one form — ``dense`` or a lowering of ``lower_stripe_convs`` (``boxes``,
``onehot``, ``shift``) — :func:`form_work` counts, per sample, exactly what the
built subgraph executes:

``conv_macs``
    MACs of GEMM-like convs (the dense conv, box convs, 1×1 stripe convs);
``onehot_macs`` / ``onehot_groups``
    MACs and groups of the one-hot grouped convs of ``onehot``;
``copy_elems``
    elements written by pads, slices, concats, gathers and sums;
``ops``
    the number of graph ops (per call, not per sample);

and, for ``fused`` (``lowering="fused"``: the compiled stripe kernel, which runs
dense convs too), ``fused_macs`` (the kept stripes' MACs, all it multiplies),
``fused_in_elems`` (input elements it packs), ``fused_out_elems`` (output
elements it stores, twice with a fused residual add), ``fused_calls`` and
``fused_samples`` (the kernel runs a batch one sample at a time);
``taps`` (filters keeping each kernel tap), ``pixels`` (output pixels) and
``strided`` say how the kernel tiles the work, which ``swpfx.fused_runtime_model`` prices;

and three entries that are not amounts but decide how ONNX Runtime lays the work
out, which ``swpfx.runtime_model`` prices: ``gemms``, ``(filters, MACs)`` of
each GEMM-like conv of an ungrouped conv's form (ORT's blocked kernel reuses each
input load across a few filter blocks only, so few filters cost more per MAC);
``layout``, the conv's
``(in_channels, out_channels, groups)``, which decides whether its GEMM-like
convs run on the fast channel-blocked (NCHWc) path (every form's GEMM-like convs
read all the conv's input channels); and ``output``, ``(parts, elements)``: the
output channel counts of the parts a lowered form concatenates (``None`` when
its ops leave the blocked layout anyway: one-hot and shift, or a gather back to
filter order) and the output's elements per sample. Between blocked neighbours
ORT keeps a Concat blocked only when every part is a block multiple; otherwise
the output is reordered out of the blocked layout and back in.

``executed_macs(work)`` is what :mod:`.count_costs` counts for the built graph
(tested equal); ``swpfx.runtime_model`` turns the same work into predicted
ONNX Runtime seconds; the budget estimate and the lowering's form choice read
both. Pure math: no graphs, no timing.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from swpfx.passes.stripe_geometry import ConvGeometry
    >>> g = ConvGeometry.of(nn.Conv2d(16, 32, 3, padding=1), (1, 16, 8, 8))
    >>> centre = torch.zeros(32, 3, 3, dtype=torch.bool); centre[:, 1, 1] = True
    >>> executed_macs(form_work(g, centre, "dense")), executed_macs(form_work(g, centre, "boxes", min_group=8))
    (294912, 32768)
    >>> form_work(g, centre, "boxes")["output"]   # one part: stays blocked whatever its channel count
    ((32,), 2048)
"""

from __future__ import annotations

import torch

from .stripe_geometry import DEFAULT_MIN_GROUP, ConvGeometry, box_area, box_groups, stripe_count_buckets

WORK_KINDS = ("conv_macs", "onehot_macs", "onehot_groups", "copy_elems", "ops")
FUSED_KINDS = ("fused_macs", "fused_in_elems", "fused_out_elems", "fused_calls", "fused_samples")
MAC_KINDS = ("conv_macs", "onehot_macs", "fused_macs")
BOX_MIN_GROUPS = (8, 16, 32)  # the boxes partitions a form chooser tries


def executed_macs(work: dict) -> int:
    """Per-sample MACs the form executes (``count_costs``' ``macs`` of its nodes, divided by the batch)."""
    return sum(work.get(kind, 0) for kind in MAC_KINDS)


def _symmetric(pads) -> bool:
    return pads[0] == pads[1] >= 0 and pads[2] == pads[3] >= 0


def _padded_elems(channels: int, h: int, w: int, pads) -> int:
    return channels * (h + pads[0] + pads[1]) * (w + pads[2] + pads[3])


def _merge(work: dict, **amounts) -> None:
    for kind, amount in amounts.items():
        work[kind] = work.get(kind, 0) + amount


def _output_gather(work: dict, parts: list[int], reordered: bool, out_elems: int, blocked: bool = True) -> None:
    """The concat of ``parts`` (their output channel counts), the gather back to filter order, and ``output``.

    ``blocked``: whether the form's own ops can stay in ORT's blocked layout.
    """
    if len(parts) > 1:
        _merge(work, copy_elems=out_elems, ops=1)
    if reordered:
        _merge(work, copy_elems=out_elems, ops=1)
    work["output"] = (tuple(parts) if blocked and not reordered else None, out_elems)


def _gemm(work: dict, filters: int, macs: int, grouped: bool = False) -> None:
    """One GEMM-like conv of ``filters`` output channels: its MACs, and (ungrouped) its entry in ``gemms``."""
    _merge(work, conv_macs=macs)
    if not grouped:
        work["gemms"] = (*work.get("gemms", ()), (filters, macs))


def _gathers(geometry: ConvGeometry, out_of_order: bool) -> bool:
    """Whether a boxes/one-hot output is gathered back to filter order (not when the consumers take any order)."""
    return out_of_order and not geometry.free_order


def _spatial(geometry: ConvGeometry) -> tuple[int, int, int, int]:
    if geometry.input_hw is None:
        raise ValueError("form_work: the conv's input size is unknown (ConvGeometry.input_hw is None)")
    return (*geometry.input_hw, *geometry.output_hw)


def layout(geometry: ConvGeometry) -> tuple[int, int, int]:
    """``(in_channels, out_channels, groups)``: what a runtime's channel-blocked fast path depends on."""
    return geometry.in_channels, geometry.out_channels, geometry.groups


def dense_work(geometry: ConvGeometry, mask=None) -> dict:
    _, _, ho, wo = _spatial(geometry)
    kh, kw = geometry.kernel
    macs = geometry.out_channels * (geometry.in_channels // geometry.groups) * kh * kw * ho * wo
    work = {"ops": 1, "layout": layout(geometry)}
    _gemm(work, geometry.out_channels, macs, geometry.groups > 1)
    return work


def boxes_work(geometry: ConvGeometry, mask: torch.Tensor, min_group: int = DEFAULT_MIN_GROUP,
               align: int = 1) -> dict:
    h, w, ho, wo = _spatial(geometry)
    c, g, o = geometry.in_channels, geometry.groups, geometry.out_channels
    work: dict = {"layout": layout(geometry)}
    seen_pads = set()
    order = []
    groups = box_groups(mask, min_group, align)
    for box, filters in groups:
        pads = geometry.box_pads(box)
        if not _symmetric(pads) and pads not in seen_pads:
            seen_pads.add(pads)
            _merge(work, copy_elems=_padded_elems(c, h, w, pads), ops=1)
        if g > 1:  # input channel gather (upper bound: every filter duplicates its group's channels)
            _merge(work, copy_elems=len(filters) * (c // g) * h * w, ops=1)
        _gemm(work, len(filters), len(filters) * (c // g) * box_area(box) * ho * wo, g > 1)
        _merge(work, ops=1)
        order.extend(filters)
    _output_gather(work, [len(fs) for _, fs in groups], _gathers(geometry, order != sorted(order)), o * ho * wo)
    return work


def onehot_work(geometry: ConvGeometry, mask: torch.Tensor) -> dict:
    h, w, ho, wo = _spatial(geometry)
    c, o = geometry.in_channels, geometry.out_channels
    kh, kw = geometry.kernel
    work: dict = {"layout": layout(geometry)}
    buckets = stripe_count_buckets(mask)
    for k, filters in buckets:
        n = len(filters)
        _gemm(work, n * k, n * k * c * h * w)
        _merge(work, ops=2, onehot_macs=n * k * kh * kw * ho * wo, onehot_groups=n)
        if not _symmetric(geometry.pads):
            _merge(work, copy_elems=_padded_elems(n * k, h, w, geometry.pads), ops=1)
    _output_gather(work, [len(fs) for _, fs in buckets], _gathers(geometry, len(buckets) > 1), o * ho * wo,
                   blocked=False)
    return work


def shift_work(geometry: ConvGeometry, mask: torch.Tensor) -> dict:
    # Always gathers: ``free_order`` is judged after the BatchNorm/ReLU that shift leaves after its sums.
    h, w, ho, wo = _spatial(geometry)
    c, o = geometry.in_channels, geometry.out_channels
    work: dict = {"layout": layout(geometry)}
    if any(geometry.pads):
        _merge(work, copy_elems=_padded_elems(c, h, w, geometry.pads), ops=1)
    used = [n for n in mask.flatten(1).sum(0).tolist() if n]
    s = int(mask.sum())
    _merge(work, copy_elems=len(used) * c * ho * wo, ops=2 * len(used))
    for n in used:  # a 1×1 conv per tap, over the filters keeping it
        _gemm(work, n, n * c * ho * wo)
    if len(used) > 1:
        _merge(work, copy_elems=s * ho * wo, ops=1)
    buckets = stripe_count_buckets(mask)
    for k, filters in buckets:
        _merge(work, copy_elems=len(filters) * (k + 1) * ho * wo, ops=3)
    _output_gather(work, [len(fs) for _, fs in buckets], len(buckets) > 1, o * ho * wo, blocked=False)
    return work


def fused_work(geometry: ConvGeometry, mask: torch.Tensor | None, residual: bool = False) -> dict:
    """The compiled kernel's work: only kept stripes are multiplied; ``residual``: it also reads a residual.

    >>> from torch import nn
    >>> g = ConvGeometry.of(nn.Conv2d(16, 32, 3, padding=1), (1, 16, 8, 8))
    >>> m = torch.zeros(32, 3, 3, dtype=torch.bool); m[:, 1, 1] = True; m[:4, 0, 0] = True
    >>> w = fused_work(g, m); w["fused_macs"], w["taps"], w["pixels"]
    (36864, (4, 0, 0, 0, 32, 0, 0, 0, 0), 64)
    """
    if geometry.groups != 1:
        raise ValueError(f"form_work: the fused kernel does ungrouped convs, got groups={geometry.groups}")
    h, w, ho, wo = _spatial(geometry)
    kh, kw = geometry.kernel
    if mask is None:
        mask = torch.ones(geometry.out_channels, kh, kw, dtype=torch.bool)
    taps = mask.to(torch.bool).reshape(mask.shape[0], -1).sum(0)
    out_elems = geometry.out_channels * ho * wo
    return {"fused_macs": geometry.in_channels * int(taps.sum()) * ho * wo,
            "fused_in_elems": geometry.in_channels * h * w,
            "fused_out_elems": out_elems * (2 if residual else 1), "fused_calls": 1, "fused_samples": 1,
            "taps": tuple(int(t) for t in taps), "pixels": ho * wo, "strided": geometry.stride != (1, 1),
            "layout": layout(geometry)}


def form_work(geometry: ConvGeometry, mask: torch.Tensor | None, form: str, **options) -> dict:
    """Per-sample work of ``form`` (``"dense"``, a lowering or ``"fused"``) with ``options`` (``min_group``,
    ``align`` for boxes; ``residual`` for fused)."""
    if form == "dense":
        return dense_work(geometry)
    if form == "fused":
        return fused_work(geometry, mask, options.get("residual", False))
    if form == "boxes":
        return boxes_work(geometry, mask, options.get("min_group", DEFAULT_MIN_GROUP), options.get("align", 1))
    if form == "onehot":
        return onehot_work(geometry, mask)
    if form == "shift":
        return shift_work(geometry, mask)
    raise ValueError(f"form_work: unknown form {form!r}")


def candidate_work(geometry: ConvGeometry, mask: torch.Tensor, forms, align: int = 1) -> dict[tuple, dict]:
    """{(form, options): work} for dense and every candidate lowering of one conv.

    ``boxes`` is tried with each partition of ``BOX_MIN_GROUPS`` that differs,
    and (ungrouped convs, ``align`` > 1) each also with parts aligned to ``align``
    filters, the runtime's channel block.
    """
    candidates = {("dense", ()): dense_work(geometry)}
    if "boxes" in forms:
        seen = []
        aligns = (1, align) if align > 1 and geometry.groups == 1 else (1,)
        for min_group in BOX_MIN_GROUPS:
            for a in aligns:
                partition = [fs for _, fs in box_groups(mask, min_group, a)]
                if partition not in seen:
                    seen.append(partition)
                    options = (("min_group", min_group),) if a == 1 else (("align", a), ("min_group", min_group))
                    candidates[("boxes", options)] = boxes_work(geometry, mask, min_group, a)
    if "onehot" in forms:
        candidates[("onehot", ())] = onehot_work(geometry, mask)
    if "shift" in forms:
        candidates[("shift", ())] = shift_work(geometry, mask)
    return candidates

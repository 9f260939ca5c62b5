"""``swpfx.convert``: prune stripes, remove dead filters across the graph, lower stripe-pruned convs."""

from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import torch
from torch import fx

from swpfx.budget import GRANULARITIES, UnreachableTarget, masks_for_flops_target, masks_for_latency_target
from swpfx.passes.fold_skeletons import stripe_masks
from swpfx.passes.graph_utils import evaluate_attribute_expression, get_attr_path
from swpfx.pipeline import convert_with_masks
from swpfx.prepare import META, _require_prepared, skeletons
from swpfx.tracing import normalize_example_inputs

LOWERING_MODES = ("auto", "always", "never", "fused")
DEFAULT_THRESHOLD = 0.05


def example_inputs_for(prepared: fx.GraphModule, example_inputs=None, caller: str = "convert") -> tuple:
    """The given example inputs, or seeded random tensors of the shapes ``prepare`` recorded.

    Values do not matter to ``convert``: everything it computes from a forward pass
    (shapes, the constants of dead channels) is independent of the input values.
    """
    if example_inputs is not None:
        return normalize_example_inputs(example_inputs)
    specs = prepared.meta.get(META, {}).get("input_specs")
    if not specs:
        raise ValueError(
            f"swpfx.{caller}: pass example_inputs (a tuple of positional inputs), or give them to "
            "swpfx.prepare(model, example_inputs) so their shapes are recorded"
        )
    generator = torch.Generator().manual_seed(0)
    device = next((p.device for p in prepared.parameters()), torch.device("cpu"))
    return tuple(
        torch.randn(shape, generator=generator, dtype=dtype).to(device) if dtype.is_floating_point
        else torch.zeros(shape, dtype=dtype, device=device)
        for shape, dtype in specs
    )


def probe_and_batch(inputs: tuple) -> tuple[tuple, int]:
    """``(probe, batch)``: the example inputs cut to one sample, and their batch size (1 if none has one).

    One sample is enough for shapes and dead-channel constants, which do not depend on the batch.
    """
    probe = tuple(x[:1] if x.dim() > 0 else x for x in inputs)
    return probe, next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), 1)


def check_skeletons(prepared: fx.GraphModule) -> None:
    """Every skeleton still exists and has the (O, Kh, Kw) shape of its conv's weight."""
    paths = prepared.meta[META]["skeletons"]
    for node in prepared.graph.nodes:
        meta = node.meta.get(META, {})
        if meta.get("role") != "skeleton_weight":
            continue
        name = meta["conv"]
        try:
            skel = get_attr_path(prepared, paths[name])
        except (AttributeError, KeyError):
            raise ValueError(f"swpfx.convert: the skeleton of conv '{name}' is missing; prepare the model again") from None
        weight = evaluate_attribute_expression(prepared, node.args[0])
        expected = (weight.shape[0], *weight.shape[2:])
        if not isinstance(skel, torch.Tensor) or tuple(skel.shape) != expected:
            got = tuple(skel.shape) if isinstance(skel, torch.Tensor) else type(skel).__name__
            raise ValueError(
                f"swpfx.convert: the skeleton of conv '{name}' has shape {got}, expected {expected} "
                "(one value per output channel and kernel position); was it replaced? prepare the model again"
            )


def _check_args(threshold, flops_target, latency_target, lowering, channel_multiple, granularity) -> float | None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"swpfx.convert: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not isinstance(channel_multiple, int) or isinstance(channel_multiple, bool) or channel_multiple < 1:
        raise ValueError(f"swpfx.convert: channel_multiple must be a positive int, got {channel_multiple!r}")
    if lowering not in LOWERING_MODES:
        raise ValueError(f"swpfx.convert: lowering must be one of {LOWERING_MODES}, got {lowering!r}")
    given = [name for name, v in (("threshold", threshold), ("flops_target", flops_target),
                                  ("latency_target", latency_target)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"swpfx.convert: {' and '.join(given)} are mutually exclusive; pass one")
    if lowering == "fused":
        _check_fused()
    if flops_target is not None or latency_target is not None:
        return None  # the budget checks its own target
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
        raise ValueError(f"swpfx.convert: threshold must be a number >= 0, got {threshold!r}")
    return float(threshold)


def default_channel_multiple(lowering: str) -> int:
    """ONNX Runtime's NCHWc block (:func:`swpfx.runtime_model.channel_block`); 1 for the fused kernel, which has
    no channel alignment to keep."""
    from swpfx.runtime_model import channel_block

    return 1 if lowering == "fused" else channel_block()


def default_runtime_model_for(lowering: str, calibrate_if_missing: bool):
    """The runtime model that prices ``lowering``'s forms on this machine (None for ``"never"``): the fused
    kernel's in PyTorch for ``"fused"``, else ONNX Runtime's."""
    if lowering == "never":
        return None
    if lowering == "fused":
        from swpfx.fused_runtime_model import default_fused_runtime_model

        return default_fused_runtime_model(calibrate_if_missing=calibrate_if_missing)
    from swpfx.runtime_model import default_runtime_model

    return default_runtime_model(calibrate_if_missing=calibrate_if_missing)


def _check_fused() -> None:
    from swpfx.kernels import stripe_conv

    if not stripe_conv.is_available():
        raise RuntimeError("swpfx.convert: lowering='fused' needs the compiled stripe kernel, which is unavailable "
                           f"here ({stripe_conv.unavailable_reason()}); lowering='auto' uses standard ops only")


def convert(
    prepared: fx.GraphModule,
    threshold: float | None = None,
    *,
    flops_target: float | None = None,
    latency_target: float | None = None,
    lowering: str = "auto",
    example_inputs=None,
    channel_multiple: int | None = None,
    granularity: str = "stripe",
    runtime_model=None,
    measure: int = 0,
) -> fx.GraphModule:
    """Deploy a prepared model: a compact GraphModule of standard ops, for inference.

    1. merge each skeleton into its weight and zero the stripes with ``|I| <= threshold``
       (or, with ``flops_target``, the cut that meets that fraction of the dense FLOPs;
       with ``latency_target``, the cut of most kept importance whose predicted
       ONNX Runtime latency is at most that fraction of the dense model's);
    2. remove filters with no stripe left, and the channels they feed, across the
       whole graph (their constant effect is folded into the consumers, exactly);
    3. lower convs with partially pruned filters (``lowering``: ``"auto"`` decides per
       conv with a runtime model, ``"always"``, or ``"never"`` to keep dense convs;
       ``"fused"`` replaces each by the compiled stripe kernel for PyTorch inference,
       see below).

    ``threshold`` is the paper's rule on raw ``|I|`` (after training with the
    gradual rule, ``threshold=0.0`` drops exactly the stripes it zeroed).
    ``flops_target`` ranks by the scale-free stripe importance instead
    (:func:`swpfx.stripe_importance`, meaningful with and without BatchNorm; ties
    broken by ``|I|`` and position, so the target is met closely even when every
    skeleton is 1). ``granularity``: ``"stripe"`` ranks single stripes;
    ``"filter"`` ranks whole filters by their summed importance, so the budget is
    met by removing channels (what ONNX Runtime turns into speed), keeping only
    the stripes training zeroed out; ``"snapped"`` steps each filter down
    full → centre row/column → centre → nothing (see :mod:`swpfx.budget`).

    ``latency_target`` tries all three orders and keeps the one that keeps the
    most importance; latency is predicted for ``example_inputs``' batch size, by
    ``runtime_model`` (default: this
    machine's calibration, measured on first use — 2-3 minutes — and
    cached; see ``swpfx calibrate``). The chosen cut, predicted latency and
    per-conv decisions are in ``deployed.meta["swpfx"]["cut"]``
    (:func:`swpfx.cut_table` prints them).

    ``measure=N`` (with ``latency_target``) checks the prediction by measuring:
    the converted model and the dense one are timed side by side on
    ``example_inputs`` (ONNX Runtime, exported and verified, on
    ``torch.get_num_threads()`` threads; with ``lowering="fused"``, PyTorch), and
    while the measured ratio misses the target the conversion is repeated with the
    target divided by the miss (measured over predicted ratio), up to ``N``
    conversions in all (fewer when a round's cut is an earlier one's again). The
    result is the most important cut that measured within the target (or, if none
    did, the fastest, with a warning); each round's predicted and measured ratio is
    in ``deployed.meta["swpfx"]["cut"]["measured"]``. A runtime model fitted on
    isolated convs misjudges some graphs by 5-15 % (``benchmarks/RESULTS.md``);
    this trades tens of seconds per round for the latency the user will see.

    ``channel_multiple`` keeps a few dead filters where needed so that every conv
    keeps a multiple of that many output channels (or all of them): ONNX Runtime's
    CPU convs are markedly slower on other channel counts. The default is this
    CPU's NCHWc block (:func:`swpfx.runtime_model.channel_block`: 16 with
    AVX-512, 8 with AVX2), and 1 with ``lowering="fused"``. Use 1 to remove every
    dead filter that can go.

    ``lowering="fused"`` replaces every ungrouped conv, with the BatchNorm,
    residual add and ReLU after it, by one
    :class:`swpfx.kernels.fused_conv.FusedStripeConv2d`: the compiled kernel, which
    multiplies only the kept stripes (float32 CPU inference in PyTorch; grouped
    convs stay dense), and runs the max pools on the compiled pool
    (:class:`swpfx.kernels.max_pool.CompiledMaxPool2d`); kernel outputs that only
    other kernel calls, adds and pools read go to per-thread memory reused by
    lifetime (:mod:`swpfx.kernels.buffers`). With ``latency_target``
    latency is then PyTorch's, predicted by
    :class:`swpfx.fused_runtime_model.FusedRuntimeModel` (calibrated here on first
    use, about 15 s), as a fraction of the dense model run the same way. Its ONNX
    export holds plain dense convs and pools, so ONNX Runtime gains nothing from
    it. Needs a C++ compiler (built on first use).

    The result is in eval mode and equals the prepared model with the pruned
    skeleton entries set to zero. ``prepared`` is not modified.

    Example:
        >>> import torch, torchvision, swpfx
        >>> x = torch.randn(1, 3, 64, 64)
        >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10), (x,))
        >>> with torch.no_grad():
        ...     swpfx.skeletons(prepared)["layer1.0.conv1"][:32] = 0.0   # 32 dead filters
        >>> deployed = swpfx.convert(prepared, threshold=0.05, lowering="never")
        >>> deployed.get_submodule("layer1.0.conv1").out_channels
        32
    """
    _require_prepared(prepared, "convert")

    if channel_multiple is None:
        channel_multiple = default_channel_multiple(lowering)
    threshold = _check_args(threshold, flops_target, latency_target, lowering, channel_multiple, granularity)
    check_skeletons(prepared)
    inputs = example_inputs_for(prepared, example_inputs)
    probe, batch = probe_and_batch(inputs)
    if runtime_model is None:
        runtime_model = default_runtime_model_for(lowering, calibrate_if_missing=latency_target is not None)
    choose_form = runtime_model.choose_form if runtime_model is not None else None

    def build(target: float | None):
        if target is not None:
            masks, cut = masks_for_latency_target(prepared, target, lowering, probe, runtime_model,
                                                  channel_multiple, batch=batch)
        elif flops_target is not None:
            masks, cut = masks_for_flops_target(prepared, flops_target, lowering, probe, channel_multiple,
                                                granularity, runtime_model=runtime_model)
        else:
            masks, cut = stripe_masks(skeletons(prepared), threshold), {"threshold": threshold}
        return (*convert_with_masks(prepared, masks, lowering, probe, channel_multiple, choose_form), cut)

    if measure:
        if latency_target is None:
            raise ValueError("swpfx.convert: measure checks a latency_target; pass one")
        if not isinstance(measure, int) or measure < 0:
            raise ValueError(f"swpfx.convert: measure must be a number of rounds >= 0, got {measure!r}")
        dense = build_dense(prepared, lowering, probe, channel_multiple, choose_form)
        gm, removal, cut = meet_measured_latency(build, latency_target, dense, inputs, lowering, measure)
    else:
        gm, removal, cut = build(latency_target)
    gm.meta[META] = {
        "converted_from": prepared.meta[META].get("source_class"),
        "input_specs": [(tuple(x.shape), x.dtype) for x in inputs],
        "cut": cut,
        "removed_filters": removal.removed,
        "bias_maps": removal.bias_maps,
    }
    return gm


def build_dense(prepared: fx.GraphModule, lowering: str, probe: tuple, channel_multiple: int, choose_form):
    """The dense model a latency target is a fraction of: ``prepared`` with every stripe kept, converted the same
    way (for ``lowering="fused"``: every conv on the kernel)."""
    masks = {name: torch.ones_like(s, dtype=torch.bool) for name, s in skeletons(prepared).items()}
    return convert_with_masks(prepared, masks, lowering, probe, channel_multiple, choose_form)[0]


MEASURE_TOLERANCE = 0.05  # a round measuring within this fraction below the target ends the search


def build_within_reach(build, target: float, closest_instead: bool) -> tuple:
    """``(*build(target), target)``; if ``target`` is out of reach and ``closest_instead``, built at the
    closest reachable target instead."""
    try:
        return (*build(target), target)
    except UnreachableTarget as exc:
        if not closest_instead:
            raise
        return (*build(exc.closest), exc.closest)


def meet_measured_latency(build, latency_target: float, dense: fx.GraphModule, inputs: tuple, lowering: str,
                          rounds: int, caller: str = "convert", first_target: float | None = None):
    """``convert(measure=rounds)``: ``build(target)`` -> (gm, removal, cut) repeated with the target divided by
    the last round's miss (measured over predicted ratio), from ``first_target`` (default: ``latency_target``),
    or the closest reachable target when that is out of the runtime model's reach; returns the best round's
    (gm, removal, cut), ``cut["measured"]`` listing every round."""
    from swpfx.export import export_onnx  # loaded only when measuring (they load ONNX Runtime)
    from swpfx.timing import latencies, torch_and_ort_latencies

    threads = torch.get_num_threads()
    measured_rounds, best, target = [], None, latency_target if first_target is None else first_target
    with tempfile.TemporaryDirectory() as folder:
        dense_path = None if lowering == "fused" else export_onnx(dense, inputs, Path(folder) / "dense.onnx").path
        for round_index in range(rounds):
            try:  # a re-aimed target past the runtime model's reach builds the fastest cut instead
                gm, removal, cut, target = build_within_reach(build, target, closest_instead=round_index > 0)
            except ValueError:
                if round_index == 0:
                    raise
                break  # keep what was measured
            if any(math.isclose(cut["latency_ratio"], r["predicted"], rel_tol=1e-9) for r in measured_rounds):
                break  # the cut of an earlier round again (latency moves in steps): nothing new to measure
            if lowering == "fused":
                ms = torch_and_ort_latencies({"dense": dense, "converted": gm}, {}, inputs, threads=threads)
            else:
                ms = latencies({"dense": dense_path, "converted": gm}, inputs, threads=threads)
            measured = ms["converted"] / ms["dense"]
            measured_rounds.append({"predicted_target": target, "predicted": cut["latency_ratio"],
                                    "measured": measured, "dense_ms": ms["dense"], "converted_ms": ms["converted"]})
            met = measured <= latency_target
            key = (met, cut["kept_importance"] if met else -measured)
            if best is None or key > best[0]:
                best = (key, gm, removal, cut, measured)
            if latency_target * (1 - MEASURE_TOLERANCE) <= measured <= latency_target:
                break
            target = min(1.0, cut["latency_ratio"] * latency_target / measured)  # the target over the miss
    (met, _), gm, removal, cut, measured = best
    cut = {**cut, "measured": measured_rounds, "measured_ratio": measured}
    if not met:
        warnings.warn(f"swpfx.{caller}: no conversion measured within latency_target={latency_target} in "
                      f"{len(measured_rounds)} rounds; kept the fastest, measured at {measured:.3f} of dense",
                      stacklevel=3)
    return gm, removal, cut


def cut_table(deployed: fx.GraphModule, tablefmt: str = "simple") -> str:
    """The budget's per-conv decisions of a converted model, as a table (empty for a threshold cut).

    Example:
        >>> import torch, torchvision, swpfx
        >>> from swpfx.runtime_model import RuntimeModel
        >>> x = torch.randn(1, 3, 64, 64)
        >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10), (x,))
        >>> deployed = swpfx.convert(prepared, latency_target=0.6, runtime_model=RuntimeModel())
        >>> print(swpfx.cut_table(deployed).splitlines()[0])  # doctest: +NORMALIZE_WHITESPACE
        conv    filters kept    in    stripes kept    form    MFLOPs    predicted ms
    """
    from tabulate import tabulate

    cut = deployed.meta.get(META, {}).get("cut", {})
    rows = [[d["conv"] or d["node"], f"{d['kept_filters']}/{d['filters']}", d["in_channels"],
             f"{d['kept_stripes']}/{d['total_stripes']}", d["form"], f"{d['flops'] / 1e6:.2f}",
             f"{d['seconds'] * 1e3:.3f}"] for d in cut.get("decisions", [])]
    headers = ["conv", "filters kept", "in", "stripes kept", "form", "MFLOPs", "predicted ms"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt) if rows else ""

"""Predicted PyTorch latency of a ``lowering="fused"`` graph: the compiled stripe kernel, priced per conv.

The ONNX Runtime model (:mod:`swpfx.runtime_model`) prices ORT's forms; a fused
graph runs in PyTorch, every conv the kernel does (dense ones too) one kernel
call with its BatchNorm, residual add and ReLU. :class:`FusedRuntimeModel` is
the same kind of linear model over work counts, for that runtime:

``lane_macs``
    the kernel's multiply-adds counted in whole vectors of output pixels (a 7×7
    plane of 49 pixels takes 4 vectors of 16 lanes on AVX-512);
``kernel_blocks``
    register blocks × pixel tiles × channel chunks: each block of up to
    ``register_block`` filters keeping one tap loads and stores its accumulators
    once per tile and chunk (many taps with few filters each cost more per MAC);
``strided_lane_macs``
    the same again for a strided conv (each tap reads its own phase plane of the input);
``weight_floats``
    packed weights read, once per call (7×7-plane layers are weight-bound);
``fused_in_elems`` / ``fused_out_elems``
    input elements packed, output elements stored (a residual read counts twice);
``fused_calls`` / ``fused_samples``
    the Python and thread wake-up of one kernel call (about 20 µs), and its
    per-sample dispatch (the kernel runs a batch one sample at a time);
``conv_macs`` / ``ops``
    convs the kernel does not take (grouped ones) and Linear layers, in PyTorch;
``graph_ops`` / ``graph_elems`` / ``graph_reads`` / ``runs``
    every other op of the graph, the elements it writes and reads, and the model call;
``pool_ops`` / ``pool_reads``
    a pooling module's call and the elements its windows read (PyTorch's adaptive
    average pool costs ~0.1 ms whatever its size; the compiled max pool is
    compute-bound on 3×3 windows).

The counts come from the fused form's work in :func:`swpfx.passes.form_work.form_work`
(the one cost per conv form, shared with ``swpfx.cost``'s FLOPs); the vector
width, register block and tile come from the kernel built on this machine.
:func:`calibrate` fits the coefficients here, timing the kernel in PyTorch (about
15 s on 2 cores); ``convert(latency_target=..., lowering="fused")`` calibrates on
first use. A fraction of latency is then of the dense model run the same way
(every conv on the kernel), which is what ``swpfx bench --lowering fused`` measures.

    >>> model = FusedRuntimeModel(lanes=16, register_block=14, tile_vectors=2)
    >>> import torch; from torch import nn
    >>> from swpfx.passes.stripe_geometry import ConvGeometry
    >>> from swpfx.passes.form_work import form_work
    >>> g = ConvGeometry.of(nn.Conv2d(512, 512, 3, padding=1), (1, 512, 7, 7))
    >>> work = form_work(g, torch.ones(512, 3, 3, dtype=torch.bool), "fused")
    >>> priced = model.priced(work)
    >>> priced["lane_macs"] / work["fused_macs"]  # 49 pixels in 64 lanes
    1.3061224489795917
    >>> priced["kernel_blocks"]  # 9 taps x ceil(512 / 14) blocks x 2 tiles x 4 channel chunks
    2664
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from swpfx.runtime_model import CACHE_DIR, ONE_RUN, cached, fit_coefficients, machine_key

# seconds per unit; a fallback only (an AVX-512 AMD EPYC, 2 threads, torch 2.14): calibrate() fits this machine
DEFAULT_COEFFICIENTS = {
    "lane_macs": 1.0e-11,
    "strided_lane_macs": 1e-12,
    "kernel_blocks": 8e-9,
    "weight_floats": 5e-11,
    "fused_in_elems": 3e-10,
    "fused_out_elems": 3e-10,
    "fused_calls": 2.0e-5,
    "fused_samples": 3e-6,
    "conv_macs": 2.0e-11,
    "ops": 1.0e-5,
    "graph_ops": 5e-6,
    "graph_elems": 3e-10,
    "graph_reads": 3e-10,
    "pool_ops": 1e-4,
    "pool_reads": 2e-10,
    "runs": 1e-5,
}
KINDS = tuple(DEFAULT_COEFFICIENTS)
PER_RUN_KINDS = ("fused_calls", "ops", "graph_ops", "pool_ops", "runs")  # once per call, whatever the batch
DESCRIPTIVE = ("layout", "output", "gemms", "taps", "pixels", "strided", "pool")  # entries that say how work is laid out
# How a fused graph runs around its kernel calls; a new value makes earlier calibrations stale.
# 2: kernel outputs written into planned, reused memory (passes/plan_kernel_buffers.py).
GRAPH_RUNNER = 2
CHANNEL_CHUNK = 128  # the kernel sums input channels in chunks of at most this many (stripe_conv._chunks)


def cache_path(directory=None) -> Path:
    """The calibration file for this machine, torch version and kernel source."""
    from swpfx.kernels.stripe_conv import SOURCE

    key = (f"{machine_key()} torch {torch.__version__} kernel {hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:8]} "
           f"graphs {GRAPH_RUNNER}")
    slug = "-".join(part for part in "".join(c if c.isalnum() else "-" for c in key.lower()).split("-") if part)
    return Path(directory if directory is not None else CACHE_DIR) / f"fused_runtime_model-{slug}.json"


def _kernel_shape() -> tuple[int, int, int]:
    """(vector lanes, register block, vectors per tile) of the kernel built here; (16, 14, 2) if none is."""
    from swpfx.kernels import stripe_conv

    if not stripe_conv.is_available():
        return 16, 14, 2
    info = stripe_conv.kernel_info()
    return info["vector_width"], info["default_f"], info["default_pv"]


@dataclass
class FusedRuntimeModel:
    """Predicted seconds of a fused graph's ops in PyTorch: ``Σ coefficient[kind] · work[kind]`` (module docstring).

    ``choose_form`` is what ``convert(lowering="fused")`` hands the lowering: the
    kernel takes every ungrouped conv, so a conv it leaves stays dense. ``block``
    is the filter step of the latency budget's channel removal (the kernel has no
    channel alignment to keep; steps of 8 keep that search short).
    """

    coefficients: dict = field(default_factory=lambda: dict(DEFAULT_COEFFICIENTS))
    lanes: int = 0
    register_block: int = 0
    tile_vectors: int = 0
    source: str = "shipped default"
    machine: str = ""
    block: int = 8
    runs_in_torch = True  # what swpfx.estimate.predict_graph asks: PyTorch fuses no BatchNorm into a conv

    def __post_init__(self):
        if not (self.lanes and self.register_block and self.tile_vectors):
            self.lanes, self.register_block, self.tile_vectors = _kernel_shape()

    def priced(self, work: dict) -> dict:
        """``work``'s amounts by the kinds this model prices: a fused form's MACs become ``lane_macs`` and
        ``kernel_blocks`` (module docstring)."""
        amounts = {k: v for k, v in work.items() if k not in DESCRIPTIVE}
        if work.get("pool"):
            amounts["pool_ops"] = amounts.pop("graph_ops")
            amounts["pool_reads"] = amounts.pop("reads")
        elif "reads" in amounts:
            amounts["graph_reads"] = amounts.pop("reads")
        if "fused_macs" not in amounts:
            return amounts
        macs, pixels, taps, in_channels = amounts.pop("fused_macs"), work["pixels"], work["taps"], work["layout"][0]
        vectors = -(-pixels // self.lanes)
        amounts["lane_macs"] = macs * vectors * self.lanes / pixels
        if work["strided"]:
            amounts["strided_lane_macs"] = amounts["lane_macs"]
        amounts["weight_floats"] = in_channels * sum(taps)
        blocks = sum(-(-t // self.register_block) for t in taps)
        amounts["kernel_blocks"] = blocks * -(-vectors // self.tile_vectors) * -(-in_channels // CHANNEL_CHUNK)
        return amounts

    def predict(self, work: dict, batch: float = 1) -> float:
        return sum(self.coefficients[k] * v * (1 if k in PER_RUN_KINDS else batch) for k, v in self.priced(work).items())

    def choose_form(self, geometry, mask, forms, batch: int = 1, require_gain: bool = True) -> tuple[str, dict]:
        """Convs the kernel leaves (grouped ones) stay dense: ORT's forms are priced for ORT, not PyTorch."""
        return "dense", {}

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"coefficients": self.coefficients, "machine": self.machine, "lanes": self.lanes,
                                    "register_block": self.register_block, "tile_vectors": self.tile_vectors},
                                   indent=1))

    @classmethod
    def load(cls, path) -> FusedRuntimeModel:
        data = json.loads(Path(path).read_text())
        return cls(coefficients={**DEFAULT_COEFFICIENTS, **data["coefficients"]}, lanes=data["lanes"],
                   register_block=data["register_block"], tile_vectors=data["tile_vectors"], source=str(path),
                   machine=data.get("machine", ""))


def default_fused_runtime_model(cache=None, calibrate_if_missing: bool = False,
                                progress: bool = True) -> FusedRuntimeModel:
    """This machine's calibration if cached, else (``calibrate_if_missing``) one measured now, else the shipped table."""
    path = Path(cache) if cache is not None else cache_path()
    if path.exists():
        return FusedRuntimeModel.load(path)
    if not calibrate_if_missing:
        return FusedRuntimeModel()
    import sys

    print(f"swpfx: no fused-kernel runtime model for this machine ({machine_key()}); calibrating the kernel in "
          f"PyTorch now (about 15 s, cached in {path})", file=sys.stderr)
    return calibrate(cache=path, progress=progress)


# ---------------------------------------------------------------- calibration

# (in_channels, out_channels, kernel, stride, padding, input size): ResNet-18's convs at 224² input, its
# downsample 1×1s and stem, and small nets' widths
CALIBRATION_SHAPES = [
    (64, 64, 3, 1, 1, 56), (64, 128, 3, 2, 1, 56), (128, 128, 3, 1, 1, 28), (128, 256, 3, 2, 1, 28),
    (256, 256, 3, 1, 1, 14), (256, 512, 3, 2, 1, 14), (512, 512, 3, 1, 1, 7),
    (64, 128, 1, 2, 0, 56), (128, 256, 1, 2, 0, 28), (256, 512, 1, 2, 0, 14),
    (3, 64, 7, 2, 3, 224),
    (32, 32, 3, 1, 1, 28), (64, 64, 3, 1, 1, 14), (16, 16, 3, 1, 1, 28), (64, 64, 3, 1, 1, 7),
]
SMALL_INPUT, BATCH = 64 * 14 * 14, 16  # layers with at most this many input elements are timed at BATCH too
ELEMENTWISE_SHAPES = [(64, 56, 1), (64, 56, 8), (256, 14, 8), (512, 7, 1), (512, 7, 16), (32, 28, 4)]
# (channels, input size, pool kernel): ResNet's stem pool, VGG's pools (compiled, as in a fused graph)
MAX_POOL_SHAPES = [(64, 112, 3), (64, 224, 2), (128, 112, 2), (512, 14, 2)]
LINEAR_SHAPES = [(512, 1000), (512, 10), (2048, 1000)]


class _ReluChain(nn.Module):
    """``ops`` elementwise PyTorch ops in a row: what a fused graph's leftover ops cost per op and element."""

    def __init__(self, ops: int):
        super().__init__()
        self.ops = ops

    def forward(self, x):
        for _ in range(self.ops):
            x = torch.relu(x)
        return x


def _fused_rows(shapes, generator) -> list[tuple[str, nn.Module, torch.Tensor, dict]]:
    from swpfx.kernels.fused_conv import FusedStripeConv2d
    from swpfx.masks import random_stripe_mask, structured_stripe_mask
    from swpfx.passes.form_work import form_work
    from swpfx.passes.stripe_geometry import ConvGeometry

    rows = []
    for c_in, c_out, k, stride, padding, hw in shapes:
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding)
        x = torch.randn(1, c_in, hw, hw, generator=generator)
        geometry = ConvGeometry.of(conv, x.shape)
        makers = {"dense": None}
        if k > 1:
            makers.update(random=random_stripe_mask, structured=structured_stripe_mask)
        for name, make in makers.items():
            mask = torch.ones(c_out, k, k, dtype=torch.bool) if make is None else \
                make(c_out, k, k, generator=generator)
            module = FusedStripeConv2d.from_conv(conv, mask, relu=True).eval()
            work = form_work(geometry, mask, "fused")
            rows.append((f"{c_in}->{c_out} k{k}/{stride} {hw}² {name}", module, x, work))
            if c_in * hw * hw <= SMALL_INPUT:  # small layers at a batch too: what a batch costs per sample
                xb = torch.randn(BATCH, c_in, hw, hw, generator=generator)
                rows.append((f"{c_in}->{c_out} k{k}/{stride} {hw}² {name} batch {BATCH}", module, xb, work))
    return rows


def pool_output(size: int, kernel: int) -> int:
    """Output size of a stride-2 max pool of ``kernel`` (padding ``kernel // 2`` when odd, as ResNet's)."""
    return (size + 2 * (kernel // 2 if kernel % 2 else 0) - kernel) // 2 + 1


def _other_rows(generator) -> list[tuple[str, nn.Module, torch.Tensor, dict]]:
    from swpfx.kernels.max_pool import CompiledMaxPool2d

    rows = []
    for channels, size, ops in ELEMENTWISE_SHAPES:
        x = torch.randn(1, channels, size, size, generator=generator)
        rows.append((f"{ops} relu {channels}x{size}²", _ReluChain(ops), x,
                     {"graph_ops": ops, "graph_elems": ops * x.numel(), "reads": ops * x.numel()}))
    for channels, size, k in MAX_POOL_SHAPES:
        x = torch.randn(1, channels, size, size, generator=generator)
        pool = CompiledMaxPool2d(k, 2, k // 2 if k % 2 else 0)
        elems = channels * pool_output(size, k) ** 2
        rows.append((f"max pool {k}x{k}/2 {channels}x{size}²", pool, x,
                     {"graph_ops": 1, "graph_elems": elems, "reads": elems * k * k, "pool": True}))
    for channels, size in ((512, 7), (2048, 7)):
        x = torch.randn(1, channels, size, size, generator=generator)
        rows.append((f"average pool {channels}x{size}²", nn.AdaptiveAvgPool2d(1), x,
                     {"graph_ops": 1, "graph_elems": channels, "reads": x.numel(), "pool": True}))
    for features, out in LINEAR_SHAPES:
        rows.append((f"linear {features}->{out}", nn.Linear(features, out).eval(),
                     torch.randn(1, features, generator=generator), {"conv_macs": features * out, "ops": 1}))
    return rows


class _WorkTally:
    """A stand-in runtime model for :func:`swpfx.estimate.predict_graph` that adds up a graph's priced work."""

    runs_in_torch = True

    def __init__(self, pricing: FusedRuntimeModel):
        self.pricing, self.total = pricing, {}

    def predict(self, work: dict, batch: float = 1) -> float:
        for kind, amount in self.pricing.priced(work).items():
            self.total[kind] = self.total.get(kind, 0) + amount * (1 if kind in PER_RUN_KINDS else batch)
        return 0.0


def graph_work(gm, pricing: FusedRuntimeModel) -> dict:
    """The priced work of a converted graph, node by node as :func:`swpfx.estimate.predict_graph` prices it."""
    from swpfx.estimate import predict_graph

    tally = _WorkTally(pricing)
    predict_graph(gm, tally)
    return tally.total


def _graph_rows(protocols, size: int, seed: int, progress: bool) -> list[tuple[str, nn.Module, torch.Tensor, dict]]:
    """Whole fused ResNet-18s (random init): a forward pays what single calls timed back to back do not (its
    first kernel call, caches cold after the previous forward's last ops)."""
    import torchvision

    import swpfx
    from swpfx.progress import progress_bar
    from swpfx.synthetic import synthetic_skeletons_

    pricing, rows = FusedRuntimeModel(), []
    for protocol in progress_bar(protocols, "calibrating: building fused ResNet-18s", progress):
        torch.manual_seed(seed)
        x = torch.randn(1, 3, size, size)
        prepared = swpfx.prepare(torchvision.models.resnet18().eval(), (x,))
        if protocol == "dense":
            threshold = 0.0
        else:
            synthetic_skeletons_(prepared, protocol=protocol, seed=seed)
            threshold = 0.05
        gm = swpfx.convert(prepared, threshold=threshold, lowering="fused", example_inputs=(x,),
                           runtime_model=pricing)
        rows.append((f"resnet18 {size}² {protocol}", gm, x, graph_work(gm, pricing)))
    return rows


GRAPH_PROTOCOLS = ("dense", "random", "structured")
GRAPH_WEIGHT = 5  # a whole graph counts as this many rows: it is what the budget predicts


def calibration_rows(shapes=CALIBRATION_SHAPES, rounds: int = 15, seed: int = 0, progress: bool = True,
                     graphs=GRAPH_PROTOCOLS) -> list[tuple[str, dict, float]]:
    """``(name, priced work, measured seconds)`` of every calibration call: the fused kernel on ``shapes``
    (dense, and both mask protocols of ``swpfx.masks`` for k > 1), PyTorch's leftover ops, and fused
    ResNet-18s at 224² with ``graphs``' masks (``swpfx.synthetic``).

    Each is one eager call under ``no_grad`` on torch's threads, all timed together, interleaved
    (:func:`swpfx.timing.interleaved_medians`, least of 3 blocks' medians).
    """
    from swpfx.kernels import stripe_conv
    from swpfx.timing import interleaved_medians

    if not stripe_conv.is_available():
        raise RuntimeError(f"swpfx.fused_runtime_model.calibrate: the stripe kernel is unavailable here "
                           f"({stripe_conv.unavailable_reason()})")
    generator = torch.Generator().manual_seed(seed)
    pricing = FusedRuntimeModel()
    jobs = _fused_rows(shapes, generator) + _other_rows(generator) + _graph_rows(graphs, 224, seed, progress)
    calls = {name: functools.partial(module, x) for name, module, x, _ in jobs}
    with torch.no_grad():
        seconds = interleaved_medians(calls, rounds=rounds, blocks=3)
    return [(name, {**_at_batch(pricing.priced(work), x.shape[0]), **ONE_RUN}, seconds[name])
            for name, _, x, work in jobs]


def _at_batch(amounts: dict, batch: int) -> dict:
    """Per-sample ``amounts`` for a run of ``batch`` samples (per-call kinds once)."""
    return {k: v * (1 if k in PER_RUN_KINDS else batch) for k, v in amounts.items()}


def calibrate(cache="default", shapes=CALIBRATION_SHAPES, rounds: int = 15, seed: int = 0,
              progress: bool = True, graphs=GRAPH_PROTOCOLS) -> FusedRuntimeModel:
    """Fit a :class:`FusedRuntimeModel` on :func:`calibration_rows` (non-negative least squares on relative
    error) and cache it. ``cache="default"`` writes :func:`cache_path`; ``None`` writes nothing.

    >>> model = calibrate(cache=None, shapes=[(16, 16, 3, 1, 1, 14)], rounds=3)  # doctest: +SKIP
    """
    rows = calibration_rows(shapes, rounds, seed, progress, graphs)
    weighted = [(w, t) for name, w, t in rows for _ in range(GRAPH_WEIGHT if name.startswith("resnet18") else 1)]
    pricing = FusedRuntimeModel()
    model = FusedRuntimeModel(coefficients=fit_coefficients(weighted, KINDS, DEFAULT_COEFFICIENTS),
                              source="calibrated", machine=machine_key(), lanes=pricing.lanes,
                              register_block=pricing.register_block, tile_vectors=pricing.tile_vectors)
    return cached(model, cache, cache_path)

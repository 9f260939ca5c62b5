"""Where latency is predicted: ONNX Runtime seconds of a conv's dense and lowered forms.

For one stripe-pruned conv, :func:`swpfx.passes.form_work.candidate_work` counts
the work of the dense conv and of every lowering the pass can emit (MACs done by
dense GEMM-like convs, MACs and groups of one-hot grouped convs, elements copied
by pad/slice/concat/gather/sum, node count, and whether its output can stay in
ORT's channel-blocked layout), and :class:`RuntimeModel` turns work into seconds
with per-kind coefficients. The shipped coefficients were
fitted on an AVX-512 machine and are a fallback only: :func:`calibrate` (also
``swpfx calibrate``) fits them on the machine it runs on by timing ResNet-18's
conv shapes with both mask protocols, exported with ``swpfx.export_onnx``, in
ONNX Runtime, and caches them as JSON per CPU model and ONNX Runtime version
(:func:`cache_path`), which :func:`default_runtime_model` then prefers.
:func:`channel_block` is ORT's NCHWc channel block on this CPU.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from swpfx.passes.stripe_geometry import ConvGeometry
    >>> model = default_runtime_model(cache="/nonexistent.json")   # the shipped table
    >>> geometry = ConvGeometry.of(nn.Conv2d(512, 512, 3, padding=1), (1, 512, 7, 7))
    >>> mask = torch.ones(512, 3, 3, dtype=torch.bool)
    >>> model.choose(geometry, mask, ("boxes", "onehot", "shift"))[0]   # nothing pruned: stay dense
    'dense'

``swpfx.convert`` hands :meth:`RuntimeModel.choose_form` of the default model to
the lowering pass (``lower_stripe_convs(gm, choose_form=...)``); the pass itself
never imports swpfx. Sessions come from ``swpfx.export.ort_session`` and timings
from ``swpfx.timing``; :func:`stripe_conv_module` and :func:`lowered_copy` are
shared with ``benchmarks/``.

Fitting the coefficients (non-negative least squares on relative error):
    >>> rows = [({"conv_macs": m, "ops": n}, 1e-11 * m + 5e-6 * n) for m, n in ((1e8, 1), (3e8, 4), (5e7, 9))]
    >>> fitted = fit_coefficients(rows)   # kinds no row has keep the shipped coefficient
    >>> round(fitted["conv_macs"], 15), round(fitted["ops"], 15), fitted["nchw_macs"] == DEFAULT_COEFFICIENTS["nchw_macs"]
    (1e-11, 5e-06, True)
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls
from torch import fx, nn

from swpfx.export import ort_session
from swpfx.passes.form_work import WORK_KINDS as FORM_WORK_KINDS
from swpfx.passes.form_work import candidate_work, form_work  # noqa: F401  (re-exported)
from swpfx.passes.lower_stripe_convs import lower_conv, mark_stripe_conv
from swpfx.passes.stripe_geometry import ConvGeometry, supported_forms
from swpfx.timing import time_sessions


def onnx_bytes(model: nn.Module, example_input: torch.Tensor, opset: int = 17) -> bytes:
    """The model exported with the legacy TorchScript exporter (``dynamo=False``), dynamic batch.

    For ``benchmarks/`` that compare exporters; calibration and deployment use ``swpfx.export_onnx``.
    """
    buffer = io.BytesIO()
    torch.onnx.export(model, (example_input,), buffer, dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return buffer.getvalue()


# ---------------------------------------------------------------- the runtime model

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swpfx"

# Fitted by ``calibrate()`` on this project's machine (ORT 1.31 CPU, 2 threads, ResNet-18 conv shapes at 224²,
# both mask protocols, an AVX-512 Xeon); seconds per unit of work. A fallback only: ``calibrate()`` fits the
# machine the model runs on.
DEFAULT_COEFFICIENTS = {
    "conv_macs": 9.78e-12,
    "nchw_macs": 2.5e-11,  # not fitted on that machine; about 2.5x conv_macs, as measured on its successor
    "onehot_macs": 1.40e-10,
    "onehot_groups": 2.54e-7,
    "copy_elems": 2.66e-10,
    "ops": 7.96e-6,
    "reorder_elems": 2.66e-10,  # not fitted on that machine; one copy per element, as copy_elems
    "input_loads": 1.6e-10,  # not fitted on that machine; from 3×3 convs at 28² with 8 to 64 filters on AVX2
    # not fitted on that machine; on an AVX-512 EPYC, a session run from Python took 5-25 µs and a small elementwise
    # op 0.5-5 µs (chains of 1-40 ops timed directly; calibrations there fitted 0.5-2 µs)
    "runs": 5e-6,
    "graph_ops": 2e-6,
    "graph_elems": 1.1e-10,
}


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def channel_block(flags: set[str] | None = None) -> int:
    """ONNX Runtime's NCHWc channel block on this CPU: 16 with AVX-512F, 8 with AVX2, else 1 (no NCHWc).

    ORT's CPU convs take their blocked fast path only when channel counts are
    multiples of it (MLAS picks the block from the widest vector ISA it finds).

    >>> channel_block({"avx2", "fma"}), channel_block({"avx2", "avx512f"}), channel_block(set())
    (8, 16, 1)
    """
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    return 1


def runs_nchwc(in_channels: int, out_channels: int, groups: int, block: int, multiple: int | None = None) -> bool:
    """Whether ONNX Runtime's NCHWc transformer puts this conv on its channel-blocked path (else plain NCHW).

    ``multiple`` is the channel multiple the path accepts, padding the rest of
    the block with zeros (:func:`nchwc_channel_multiple`: 4 in ORT 1.32, which pads;
    the block itself, the default, in older versions). An ungrouped conv needs its
    input channels to be a ``multiple`` — or fewer than one block (a stem
    reading the image, on its NCHW-input kernel); its output channels are
    padded up. A depthwise conv needs a ``multiple`` of channels; another
    grouped conv block multiples of output channels and of channels per group.
    Off that path ORT runs im2col and a GEMM, several times slower per MAC, and
    reorders tensors at the layout boundaries.

    >>> runs_nchwc(64, 40, 1, 16), runs_nchwc(40, 64, 1, 16), runs_nchwc(3, 64, 1, 16), runs_nchwc(40, 64, 1, 8)
    (True, False, True, True)
    >>> runs_nchwc(40, 64, 1, 16, multiple=4), runs_nchwc(42, 64, 1, 16, multiple=4), runs_nchwc(40, 40, 40, 16, 4)
    (True, False, True)
    >>> runs_nchwc(48, 48, 48, 16), runs_nchwc(40, 40, 40, 16), runs_nchwc(64, 64, 2, 16), runs_nchwc(64, 64, 8, 16)
    (True, False, True, False)
    """
    if block <= 1:
        return True
    multiple = block if multiple is None else multiple
    if groups == 1:
        return in_channels < block or in_channels % multiple == 0
    if in_channels == groups and out_channels == groups:  # depthwise
        return out_channels % multiple == 0
    if out_channels % block:
        return False
    return (in_channels // groups) % block == 0 and (out_channels // groups) % block == 0


def padding_factor(channels: int, block: int) -> float:
    """Channels ORT's NCHWc path computes per real one: ``channels`` rounded up to the block.

    >>> padding_factor(40, 16), padding_factor(48, 16), padding_factor(3, 16)
    (1.2, 1.0, 5.333333333333333)
    """
    return -(-channels // block) * block / channels if block > 1 else 1.0


def nchwc_channel_multiple(block: int | None = None) -> int:
    """The channel multiple on which this ONNX Runtime keeps a conv on its NCHWc path (padding to the block).

    Found by asking ORT's optimiser (a tiny one-conv model, no timing) for an
    ungrouped conv with ``block + m`` input channels, m = 1, 2, 4, …: the first m
    it accepts; the block itself if it accepts none (ORT before padding input
    channels). 1 without a channel block. Asked once per block and process.

    >>> nchwc_channel_multiple(1)
    1
    """
    return _probed_channel_multiple(channel_block() if block is None else block)


@functools.lru_cache(maxsize=None)
def _probed_channel_multiple(block: int) -> int:
    if block <= 1:
        return 1
    multiple = 1
    while multiple < block and not _ort_blocks_conv(block + multiple, block):
        multiple *= 2
    return multiple


def _ort_blocks_conv(in_channels: int, out_channels: int, groups: int = 1) -> bool:
    """Whether ORT's optimised graph of one 3×3 conv runs it as an NCHWc conv."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.zeros((out_channels, in_channels // groups, 3, 3), np.float32), "w")
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=groups)
    graph = helper.make_graph([conv], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as directory:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = os.path.join(directory, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        nodes = onnx.load(options.optimized_model_filepath).graph.node
    return any(n.op_type == "Conv" and n.domain.endswith("nchwc") for n in nodes)


def leaves_blocked_layout(output, block: int) -> bool:
    """Whether ORT reorders a form's output out of its NCHWc layout and back in, between blocked neighbours.

    ``output`` is a form's ``(parts, elements)`` (:func:`swpfx.passes.form_work.form_work`;
    ``None`` for a dense conv). A Concat stays blocked only when every part is a
    block multiple; one-hot, shift and gathers (parts ``None``) always leave.

    >>> leaves_blocked_layout(((16, 8), 100), 8), leaves_blocked_layout(((12, 4), 100), 8)
    (False, True)
    >>> leaves_blocked_layout(((12,), 100), 8), leaves_blocked_layout((None, 100), 8), leaves_blocked_layout(None, 8)
    (False, True, False)
    """
    if output is None or block <= 1:
        return False
    parts = output[0]
    return parts is None or (len(parts) > 1 and any(p % block for p in parts))


# the runtime model's work kinds: the forms' (form_work.WORK_KINDS), conv MACs ORT runs off its NCHWc path,
# output elements reordered out of the NCHWc layout and back (counted twice), the input vectors ORT's
# blocked conv kernel loads (:func:`input_loads`), the graph's other ops and the elements they write
# (:func:`swpfx.estimate.node_work`), and the session run itself (one per graph: :data:`ONE_RUN`)
WORK_KINDS = (*FORM_WORK_KINDS, "nchw_macs", "reorder_elems", "input_loads", "graph_ops", "graph_elems", "runs")
PER_RUN_KINDS = ("ops", "graph_ops", "runs")  # counted once per run, whatever the batch
ONE_RUN = {"runs": 1}  # what a whole graph adds to its ops' work: calling the session
NOT_AMOUNTS = ("layout", "output", "gemms", "reads", "pool")  # entries of a work that ORT's model does not price
FILTER_BLOCKS_PER_LOAD = 4  # MLAS's NCHWc conv kernels compute up to 4 filter blocks per pass over the input


def input_loads(gemms, block: int) -> float:
    """Input values ORT's NCHWc conv kernel loads for ``gemms`` (``(filters, MACs)`` of each GEMM-like conv).

    The kernel loads each input value once per pass over the input and
    multiplies it into up to ``FILTER_BLOCKS_PER_LOAD`` filter blocks, so a conv
    of one filter block loads four times as much per MAC as one of four: why, on
    AVX2, a 3×3 conv at 28² with 8 filters ran at 37 GMAC/s and one with 24 or
    more at 80–89, which MACs alone do not say.

    >>> input_loads([(64, 64 * 1000)], 16), input_loads([(16, 16 * 1000)], 16), input_loads([(80, 80 * 1000)], 16)
    (1000.0, 1000.0, 2000.0)
    """
    if block <= 1:
        return 0.0
    return float(sum(macs / filters * _passes(filters, block) for filters, macs in gemms if filters))


def _passes(filters: int, block: int) -> int:
    blocks = -(-filters // block)
    return -(-blocks // FILTER_BLOCKS_PER_LOAD)


def machine_key() -> str:
    """What a calibration is valid for: CPU model, vector ISA (as its channel block) and ORT version."""
    import platform

    import onnxruntime

    model = ""
    try:
        model = next((ln.partition(":")[2].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return f"{model} | nchwc{channel_block()} | onnxruntime {onnxruntime.__version__}"


def cache_path(directory=None) -> Path:
    """The calibration file for this machine (one per CPU model and ONNX Runtime version)."""
    slug = "".join(c if c.isalnum() else "-" for c in machine_key().lower())
    slug = "-".join(part for part in slug.split("-") if part)
    return Path(directory if directory is not None else CACHE_DIR) / f"runtime_model-{slug}.json"


@dataclass
class RuntimeModel:
    """Predicted ORT latency of a conv's dense and lowered forms: a linear model over work counts.

    ``latency = Σ coefficient[kind] · work[kind]`` with the kinds of ``WORK_KINDS``
    (dense-GEMM MACs, one-hot grouped-conv MACs and groups, elements copied by
    pad/slice/concat/gather/sum, op count), the work of
    :func:`swpfx.passes.form_work.form_work`; GEMM MACs of a conv whose layout is
    off ORT's NCHWc path for ``block`` (:func:`runs_nchwc`) are priced as
    ``nchw_macs``, and the output of a form whose parts cannot stay in the
    blocked layout (:func:`leaves_blocked_layout`) is priced as two reorders
    (``reorder_elems``), and the blocked path's input loads of an ungrouped
    conv's GEMM-like convs as ``input_loads`` (:func:`input_loads`). ``pays(lowered, dense)`` is the "auto" rule: lower only if
    predicted faster than ``margin`` × dense.

    >>> model = RuntimeModel()
    >>> import torch; from torch import nn
    >>> g = ConvGeometry.of(nn.Conv2d(256, 256, 3, padding=1), (1, 256, 14, 14))
    >>> mask = torch.zeros(256, 3, 3, dtype=torch.bool); mask[:, 1, 1] = True
    >>> choice = model.choose(g, mask, ("boxes", "onehot", "shift"))
    >>> choice[0]
    'boxes'
    """

    coefficients: dict = field(default_factory=lambda: dict(DEFAULT_COEFFICIENTS))
    margin: float = 0.85
    source: str = "shipped default"
    machine: str = ""
    block: int = field(default_factory=lambda: channel_block())
    nchwc_multiple: int | None = None  # the channel multiple ORT's NCHWc path takes; None: ask this ORT

    def __post_init__(self):
        if self.nchwc_multiple is None:
            self.nchwc_multiple = nchwc_channel_multiple(self.block)

    def priced(self, work: dict) -> dict:
        """``work``'s amounts by the kinds this model prices: GEMM MACs off the NCHWc path become ``nchw_macs``,
        an output that leaves the blocked layout ``reorder_elems``, GEMM-like convs on it also ``input_loads``;
        on the NCHWc path MACs and loads count the channels padded to the block.

        >>> old = RuntimeModel(block=16, nchwc_multiple=16)  # older ORT: input channels a block multiple
        >>> old.priced({"conv_macs": 100, "ops": 1, "layout": (40, 64, 1)})
        {'ops': 1, 'nchw_macs': 100}
        >>> old.priced({"conv_macs": 100, "ops": 1, "layout": (64, 40, 1)})  # 48 filters computed
        {'conv_macs': 120.0, 'ops': 1}
        >>> RuntimeModel(block=16, nchwc_multiple=4).priced({"conv_macs": 100, "ops": 1, "layout": (40, 64, 1)})
        {'conv_macs': 120.0, 'ops': 1}
        >>> old.priced({"conv_macs": 100, "layout": (64, 64, 1), "output": ((40, 24), 50)})
        {'conv_macs': 100, 'reorder_elems': 100}
        >>> old.priced({"conv_macs": 640, "layout": (64, 64, 1), "gemms": ((16, 320), (16, 320))})
        {'conv_macs': 640, 'input_loads': 40.0}
        """
        amounts = {k: v for k, v in work.items() if k not in NOT_AMOUNTS}
        if leaves_blocked_layout(work.get("output"), self.block):
            amounts["reorder_elems"] = 2 * work["output"][1]
        shape = work.get("layout")
        if shape is None or "conv_macs" not in amounts:
            return amounts
        if not runs_nchwc(*shape, self.block, self.nchwc_multiple):
            amounts["nchw_macs"] = amounts.pop("conv_macs") + amounts.get("nchw_macs", 0)
            return amounts
        in_channels, out_channels, groups = shape
        # ORT pads the channels to a block multiple and computes the padding too (a stem reads its input unpadded)
        in_padding = padding_factor(in_channels, self.block) if groups == 1 and in_channels >= self.block else 1.0
        out_padding = padding_factor(out_channels, self.block)
        if work.get("gemms") and self.block > 1:
            amounts["input_loads"] = input_loads(work["gemms"], self.block) * in_padding
        if in_padding * out_padding != 1.0:
            amounts["conv_macs"] = amounts["conv_macs"] * in_padding * out_padding
        return amounts

    def predict(self, work: dict, batch: int = 1) -> float:
        return sum(self.coefficients[k] * v * (1 if k in PER_RUN_KINDS else batch) for k, v in self.priced(work).items())

    def pays(self, lowered: float, dense: float) -> bool:
        return lowered < self.margin * dense

    def predict_all(self, geometry: ConvGeometry, mask, forms, batch: int = 1) -> dict[tuple, float]:
        """{(form, options): predicted seconds} of every candidate, boxes also with parts aligned to the block."""
        candidates = candidate_work(geometry, mask, forms, align=self.block)
        return {key: self.predict(work, batch) for key, work in candidates.items()}

    def choose(self, geometry: ConvGeometry, mask, forms, batch: int = 1, require_gain: bool = True):
        """(form, options, predicted seconds) of the fastest lowering, or ("dense", {}, t) if none pays."""
        costs = self.predict_all(geometry, mask, forms, batch)
        dense = costs[("dense", ())]
        lowered = {key: t for key, t in costs.items() if key[0] != "dense"}
        if not lowered:
            return "dense", {}, dense
        (form, options), t = min(lowered.items(), key=lambda item: item[1])
        if require_gain and not self.pays(t, dense):
            return "dense", {}, dense
        return form, dict(options), t

    def choose_form(self, geometry: ConvGeometry, mask, forms, batch: int = 1,
                    require_gain: bool = True) -> tuple[str, dict]:
        """:meth:`choose` without the prediction: the ``choose_form`` that ``lower_stripe_convs`` takes."""
        return self.choose(geometry, mask, forms, batch, require_gain)[:2]

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"coefficients": self.coefficients, "margin": self.margin,
                                    "machine": self.machine, "block": self.block,
                                    "nchwc_multiple": self.nchwc_multiple}, indent=1))

    @classmethod
    def load(cls, path) -> RuntimeModel:
        data = json.loads(Path(path).read_text())
        return cls(coefficients={**DEFAULT_COEFFICIENTS, **data["coefficients"]}, margin=data.get("margin", 0.85),
                   source=str(path), machine=data.get("machine", ""), block=data.get("block", channel_block()),
                   nchwc_multiple=data.get("nchwc_multiple"))


def is_current(path) -> bool:
    """Whether the calibration at ``path`` fitted every work kind this version prices, under this ORT's
    NCHWc channel rule (:func:`nchwc_channel_multiple`; calibrations that predate it classified convs by the old one)."""
    data = json.loads(Path(path).read_text())
    block = data.get("block", channel_block())
    return set(WORK_KINDS) <= set(data.get("coefficients", {})) and \
        data.get("nchwc_multiple") == nchwc_channel_multiple(block)


def default_runtime_model(cache=None, calibrate_if_missing: bool = False, progress: bool = True) -> RuntimeModel:
    """This machine's calibration (``cache``, else :func:`cache_path`) if present, else the shipped table.

    With ``calibrate_if_missing`` a missing calibration, or one that predates a
    work kind this version prices (:func:`is_current`), is measured now
    (2-3 minutes, announced on stderr) and cached; without it such a calibration
    is used with the shipped coefficients for the kinds it lacks.
    """
    path = Path(cache) if cache is not None else cache_path()
    if path.exists() and (not calibrate_if_missing or is_current(path)):
        return RuntimeModel.load(path)
    if calibrate_if_missing:
        import sys

        why = "its calibration predates this version's work kinds" if path.exists() else "no runtime model for it"
        print(f"swpfx: this machine ({machine_key()}): {why}; calibrating ONNX Runtime now "
              f"(2-3 minutes, cached in {path})", file=sys.stderr)
        return calibrate(cache=path, progress=progress)
    return RuntimeModel()


# ---------------------------------------------------------------- calibration

# (in_channels, out_channels, kernel, stride, padding, input size): ResNet-18's convs at 224² input, and one
# VGG-16 plane.
CALIBRATION_SHAPES = [
    (64, 64, 3, 1, 1, 56),
    (64, 128, 3, 2, 1, 56),
    (128, 128, 3, 1, 1, 28),
    (128, 256, 3, 2, 1, 28),
    (256, 256, 3, 1, 1, 14),
    (256, 512, 3, 2, 1, 14),
    (512, 512, 3, 1, 1, 7),
    # a VGG-16 plane: a form's copies of megabytes leave the cache. Without it VGG-16's budget lowered convs to
    # shift at 112² and measured 0.82 of dense at a predicted 0.5 (AVX-512 Xeon); with it, 0.59 (copy_elems 30x)
    (64, 64, 3, 1, 1, 112),
]
# Timed dense only (at batch 1 and CALIBRATION_BATCH): a linear model fitted on every form at these scales as well
# predicts ResNet-18's lowered graphs worse (measured 0.56-0.67 of dense at a predicted 0.5, against 0.51-0.54).
DENSE_CALIBRATION_SHAPES = [
    # channel counts that are no multiple of 8 or 16, as a channel pruner leaves them: ORT's NCHW path (nchw_macs)
    # when they are no multiple of 4 either, else (ORT 1.32) its NCHWc path with the channels padded to the block
    (58, 58, 3, 1, 1, 56),
    (100, 100, 3, 1, 1, 28),
    (194, 194, 3, 1, 1, 14),
    # small nets (the demo's widths at 28², 14², 7²), aligned and not
    (32, 32, 3, 1, 1, 28),
    (64, 64, 3, 1, 1, 14),
    (26, 26, 3, 1, 1, 28),
    (52, 52, 3, 1, 1, 14),
    (50, 50, 3, 1, 1, 7),
    # few filters (one or two channel blocks), as pruning leaves small nets: ORT's kernel reuses each input load
    # less (input_loads)
    (16, 16, 3, 1, 1, 28),
    (32, 16, 3, 1, 1, 14),
    (16, 8, 3, 1, 1, 28),
    (16, 48, 3, 1, 1, 28),
]


def stripe_conv_module(c_in: int, mask, k: int, stride: int, padding: int, hw: int, seed: int = 0):
    """An isolated conv (one fx.GraphModule node) matching the lowering pass's input contract, and its input."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, mask.shape[0], k, stride=stride, padding=padding, bias=False)
    gm = fx.symbolic_trace(nn.Sequential(conv))
    x = torch.randn(1, c_in, hw, hw)
    mark_stripe_conv(gm, "0", mask, x)
    return gm, x


def lowered_copy(gm, form: str, **options):
    """A deep copy of a one-conv module with its conv lowered to ``form``."""
    gm = copy.deepcopy(gm)
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    lower_conv(gm, node, form, **options)
    gm.graph.lint()
    gm.recompile()
    return gm


class _Side(nn.Module):
    """Every candidate form of one conv side by side, so one export serves them all."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.forms = nn.ModuleList(modules)

    def forward(self, x):
        return tuple(m(x) for m in self.forms)


def exported_sessions(modules: list[nn.Module], x: torch.Tensor, threads: int = 2) -> list:
    """One ORT session per module, each cut from a single ``swpfx.export_onnx`` export of them all.

    The deployment exporter is slow (seconds per call); one export per conv
    shape, then ``onnx.utils.Extractor`` keeps each output's own subgraph.
    """
    import tempfile

    import onnx
    from onnx.utils import Extractor

    from swpfx.export import export_onnx

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "candidates.onnx"
        export_onnx(_Side(modules).eval(), (x,), path, verify=False)
        proto = onnx.load(path)
    extractor = Extractor(proto)
    inputs = [i.name for i in proto.graph.input]
    return [ort_session(extractor.extract_model(inputs, [out.name]).SerializeToString(), threads)
            for out in proto.graph.output]


def measure_candidates(gm, x, candidates, rounds: int = 50, threads: int = 2, consumer: nn.Module | None = None) -> dict:
    """{key: median ORT seconds} for dense (key ("dense", ())) and each (form, options) candidate.

    With ``consumer`` every candidate's output feeds it, as a conv's output feeds
    the next op in a graph. Each ORT output is checked against torch (relative
    error ≤ 1e-4).
    """
    modules = [gm if form == "dense" else lowered_copy(gm, form, **dict(options)) for form, options in candidates]
    if consumer is not None:
        modules = [nn.Sequential(m, consumer) for m in modules]
    with torch.no_grad():
        reference = (gm if consumer is None else nn.Sequential(gm, consumer))(x)
    sessions = {}
    for key, session in zip(candidates, exported_sessions(modules, x, threads)):
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        err = float((out - reference).abs().max() / reference.abs().max())
        if err > 1e-4:
            raise AssertionError(f"{key}: ORT output differs from torch (relative error {err:.2e})")
        sessions[key] = session
    return time_sessions(sessions, x, rounds=rounds, blocks=3)


def fit_coefficients(rows: list[tuple[dict, float]], kinds=None, defaults=None) -> dict:
    """Non-negative least squares on relative error: Σ_k c_k·work_k ≈ t for (work, t) rows, over ``kinds``
    (default: :data:`WORK_KINDS`).

    A kind no row has (e.g. ``nchw_macs`` where every calibration conv ran blocked) keeps its shipped
    coefficient (``defaults``, default :data:`DEFAULT_COEFFICIENTS`).
    """
    kinds = WORK_KINDS if kinds is None else kinds
    defaults = DEFAULT_COEFFICIENTS if defaults is None else defaults
    a = np.array([[row.get(k, 0) / t for k in kinds] for row, t in rows], dtype=float)
    b = np.ones(len(rows))
    scale = a.max(axis=0)
    absent = scale == 0
    scale[absent] = 1.0
    coef, _ = nnls(a / scale, b)
    return {k: defaults[k] if missing else float(c / s) for k, c, s, missing in zip(kinds, coef, scale, absent)}


CALIBRATION_BATCH = 32


def _blocked_consumer(geometry: ConvGeometry, pricing: RuntimeModel) -> tuple[nn.Module, dict]:
    """A small 1×1 conv reading the candidate's output on ORT's blocked path, and its priced work.

    In a graph every conv's output feeds another op; timed after it, a form whose
    parts cannot stay blocked pays the reorder back in, as it does in a graph.
    """
    torch.manual_seed(0)
    consumer = nn.Conv2d(geometry.out_channels, max(pricing.block, 1), 1, bias=False)
    shape = (1, geometry.out_channels, *geometry.output_hw)
    return consumer, pricing.priced(form_work(ConvGeometry.of(consumer, shape), None, "dense"))


def _added(work: dict, other: dict) -> dict:
    return {k: work.get(k, 0) + other.get(k, 0) for k in {*work, *other}}


# (channels, size, ops): chains of elementwise adds, at batch 1 and CALIBRATION_BATCH, so that a graph op's fixed
# cost (``graph_ops``), the run's (``runs``) and the elements it writes (``graph_elems``) are told apart: a net's
# many small ops (residual adds, unfused activations, reshapes) cost a few microseconds each
ELEMENTWISE_CALIBRATION = [(16, 28, 1), (16, 28, 8), (64, 56, 1), (64, 56, 8), (256, 14, 4)]


class _AddChain(nn.Module):
    """``ops`` elementwise adds of a per-channel constant, one after the other."""

    def __init__(self, channels: int, ops: int):
        super().__init__()
        self.shifts = nn.Parameter(torch.randn(ops, 1, channels, 1, 1), requires_grad=False)

    def forward(self, x):
        for shift in self.shifts:
            x = x + shift
        return x


def _seconds_of(module: nn.Module, x: torch.Tensor, rounds: int, threads: int) -> float:
    """ORT seconds of one module on ``x``, exported: the least of 3 blocks' medians of ``rounds`` runs."""
    (session,) = exported_sessions([module], x, threads)
    return time_sessions({"module": session}, x, rounds=rounds, blocks=3)["module"]


def _elementwise_rows(chains, rounds: int, threads: int, generator) -> list[tuple[dict, float]]:
    rows = []
    for channels, size, ops in chains:
        for batch in (1, CALIBRATION_BATCH):
            x = torch.randn(batch, channels, size, size, generator=generator)
            seconds = _seconds_of(_AddChain(channels, ops).eval(), x, rounds, threads)
            rows.append(({"graph_elems": ops * x.numel(), "graph_ops": ops, **ONE_RUN}, seconds))
    return rows


def _dense_row_at_batch(gm, x, work: dict, rounds: int, threads: int, generator) -> tuple[dict, float]:
    """(work of the dense conv at ``CALIBRATION_BATCH`` samples, its measured seconds)."""
    xb = torch.randn(CALIBRATION_BATCH, *x.shape[1:], generator=generator)
    seconds = _seconds_of(gm, xb, rounds, threads)
    return {k: v * (1 if k in PER_RUN_KINDS else CALIBRATION_BATCH) for k, v in work.items()}, seconds


def calibrate(cache="default", shapes=CALIBRATION_SHAPES, rounds: int = 20, seed: int = 0,
              threads: int = 2, progress: bool = True, dense_shapes=DENSE_CALIBRATION_SHAPES,
              elementwise=ELEMENTWISE_CALIBRATION) -> RuntimeModel:
    """Time dense and every lowering on representative conv shapes in ORT, fit a RuntimeModel, cache it.

    Each of ``shapes`` is tried with both mask protocols of ``swpfx.masks`` (live
    filters cut to a block multiple), every candidate followed by a small blocked
    1×1 conv so that leaving ORT's blocked layout costs what it costs in a graph
    (``reorder_elems``), and its dense conv also at ``CALIBRATION_BATCH`` samples;
    each of ``dense_shapes`` as a dense conv only, at both batch sizes; and chains of
    elementwise adds (``elementwise``). Every row is one session run
    (``runs``, which a graph adds once: :data:`ONE_RUN`). Every candidate is
    exported with ``swpfx.export_onnx`` and timed in a session of
    :func:`swpfx.export.ort_session` (thread spinning off), interleaved. About
    2.5 minutes on 2 cores (an AVX-512 Xeon). ``cache="default"`` writes :func:`cache_path`;
    ``None`` writes nothing.

    >>> model = calibrate(cache=None, shapes=[(64, 64, 3, 1, 1, 14)], rounds=3)  # doctest: +SKIP
    """
    from swpfx.masks import random_stripe_mask, structured_stripe_mask
    from swpfx.progress import progress_bar

    generator = torch.Generator().manual_seed(seed)
    pricing = RuntimeModel()  # this machine's NCHWc block classifies the work
    rows = []
    jobs = [(shape, make) for shape in shapes for make in (random_stripe_mask, structured_stripe_mask)]
    jobs += [(shape, None) for shape in dense_shapes]
    for (c_in, c_out, k, stride, padding, hw), make in progress_bar(jobs, "calibrating ORT", progress):
        mask = make(c_out, k, k, generator=generator) if make else torch.ones(c_out, k, k, dtype=torch.bool)
        mask = mask[mask.flatten(1).any(1)]
        if make:  # live filters a block multiple, as a channel pruner rounds them, so the consumer stays blocked
            mask = mask[: max(pricing.block, len(mask) // pricing.block * pricing.block)]
        gm, x = stripe_conv_module(c_in, mask, k, stride, padding, hw, seed)
        geometry = ConvGeometry.of(gm.get_submodule("0"), x.shape)
        work = candidate_work(geometry, mask, supported_forms(geometry) if make else (), align=pricing.block)
        consumer, consumer_work = _blocked_consumer(geometry, pricing) if make else (None, {})
        times = measure_candidates(gm, x, list(work), rounds=rounds, threads=threads, consumer=consumer)
        rows.extend((_added(_added(pricing.priced(work[key]), consumer_work), ONE_RUN), times[key]) for key in work)
        # the dense conv at a batch too: ORT's NCHW path falls behind there
        rows.append(_dense_row_at_batch(gm, x, _added(pricing.priced(work[("dense", ())]), ONE_RUN), rounds, threads,
                                        generator))
    rows += _elementwise_rows(elementwise, rounds, threads, generator)
    model = RuntimeModel(coefficients=fit_coefficients(rows), source="calibrated", machine=machine_key(),
                         block=pricing.block, nchwc_multiple=pricing.nchwc_multiple)
    return cached(model, cache, cache_path)


def cached(model, cache, default_path):
    """``model`` saved to ``cache`` (``"default"``: ``default_path()``; None: not saved), its ``source`` the file."""
    if cache is not None:
        path = default_path() if cache == "default" else Path(cache)
        model.save(path)
        model.source = str(path)
    return model

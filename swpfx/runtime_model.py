"""The runtime model behind ``lowering="auto"``: predicted ONNX Runtime latency of a conv's forms.

For one stripe-pruned conv, :func:`candidate_work` counts the work of the dense
conv and of every lowering the pass can emit (MACs done by dense GEMM-like convs,
MACs and groups of one-hot grouped convs, elements copied by pad/slice/concat/
gather/sum, node count), and :class:`RuntimeModel` turns work into seconds with
per-kind coefficients. The shipped coefficients were fitted on this project's
machine; :func:`calibrate` re-fits them on the user's machine by timing
ResNet-18's conv shapes with both mask protocols in ONNX Runtime (about a
minute) and caches them as JSON (``~/.cache/swpfx/runtime_model.json``), which
:func:`default_runtime_model` then prefers.

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
from ``swpfx.timing``; :func:`onnx_bytes`, :func:`stripe_conv_module` and
:func:`lowered_copy` are shared with ``benchmarks/``.

Fitting the coefficients (non-negative least squares on relative error):
    >>> rows = [({"conv_macs": m, "ops": n}, 1e-11 * m + 5e-6 * n) for m, n in ((1e8, 1), (3e8, 4), (5e7, 9))]
    >>> {k: round(c, 15) for k, c in fit_coefficients(rows).items() if c}
    {'conv_macs': 1e-11, 'ops': 5e-06}
"""

from __future__ import annotations

import copy
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
from swpfx.passes.lower_stripe_convs import lower_conv, mark_stripe_conv
from swpfx.passes.stripe_geometry import ConvGeometry, box_groups, stripe_count_buckets, supported_forms
from swpfx.timing import time_sessions


def onnx_bytes(model: nn.Module, example_input: torch.Tensor, opset: int = 17) -> bytes:
    """The model exported with the TorchScript exporter (``dynamo=False``), dynamic batch."""
    buffer = io.BytesIO()
    torch.onnx.export(model, (example_input,), buffer, dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return buffer.getvalue()


# ---------------------------------------------------------------- the runtime model

WORK_KINDS = ("conv_macs", "onehot_macs", "onehot_groups", "copy_elems", "ops")
BOX_MIN_GROUPS = (8, 16, 32)
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swpfx" / "runtime_model.json"

# Fitted by ``calibrate()`` on this project's machine (ORT 1.31 CPU, 2 threads, ResNet-18 conv shapes at 224²,
# both mask protocols); seconds per unit of work. Re-fit with ``swpfx.runtime_model.calibrate(cache=...)``.
DEFAULT_COEFFICIENTS = {
    "conv_macs": 9.78e-12,
    "onehot_macs": 1.40e-10,
    "onehot_groups": 2.54e-7,
    "copy_elems": 2.66e-10,
    "ops": 7.96e-6,
}


def _spatial(geometry: ConvGeometry) -> tuple[int, int, int, int]:
    h, w = geometry.input_hw
    ho, wo = geometry.output_hw
    return h, w, ho, wo


def _symmetric(pads) -> bool:
    return pads[0] == pads[1] >= 0 and pads[2] == pads[3] >= 0


def _padded_elems(channels: int, h: int, w: int, pads) -> int:
    return channels * (h + pads[0] + pads[1]) * (w + pads[2] + pads[3])


def _merge(work: dict, **amounts) -> None:
    for kind, amount in amounts.items():
        work[kind] = work.get(kind, 0) + amount


def _output_gather(work: dict, parts: int, reordered: bool, out_elems: int) -> None:
    if parts > 1:
        _merge(work, copy_elems=out_elems, ops=1)
    if reordered:
        _merge(work, copy_elems=out_elems, ops=1)


def dense_work(geometry: ConvGeometry, mask) -> dict:
    _, _, ho, wo = _spatial(geometry)
    kh, kw = geometry.kernel
    macs = geometry.out_channels * (geometry.in_channels // geometry.groups) * kh * kw * ho * wo
    return {"conv_macs": macs, "ops": 1}


def boxes_work(geometry: ConvGeometry, mask, min_group: int) -> dict:
    h, w, ho, wo = _spatial(geometry)
    c, g, o = geometry.in_channels, geometry.groups, geometry.out_channels
    work: dict = {}
    seen_pads = set()
    order = []
    groups = box_groups(mask, min_group)
    for box, filters in groups:
        pads = geometry.box_pads(box)
        if not _symmetric(pads) and pads not in seen_pads:
            seen_pads.add(pads)
            _merge(work, copy_elems=_padded_elems(c, h, w, pads), ops=1)
        if g > 1:  # input channel gather (upper bound: every filter duplicates its group's channels)
            _merge(work, copy_elems=len(filters) * (c // g) * h * w, ops=1)
        area = (box[1] - box[0] + 1) * (box[3] - box[2] + 1)
        _merge(work, conv_macs=len(filters) * (c // g) * area * ho * wo, ops=1)
        order.extend(filters)
    _output_gather(work, len(groups), order != sorted(order), o * ho * wo)
    return work


def onehot_work(geometry: ConvGeometry, mask) -> dict:
    h, w, ho, wo = _spatial(geometry)
    c, o = geometry.in_channels, geometry.out_channels
    kh, kw = geometry.kernel
    work: dict = {}
    buckets = stripe_count_buckets(mask)
    for k, filters in buckets:
        n = len(filters)
        _merge(work, conv_macs=n * k * c * h * w, ops=2, onehot_macs=n * k * kh * kw * ho * wo, onehot_groups=n)
        if not _symmetric(geometry.pads):
            _merge(work, copy_elems=_padded_elems(n * k, h, w, geometry.pads), ops=1)
    _output_gather(work, len(buckets), len(buckets) > 1, o * ho * wo)
    return work


def shift_work(geometry: ConvGeometry, mask) -> dict:
    h, w, ho, wo = _spatial(geometry)
    c, o = geometry.in_channels, geometry.out_channels
    kh, kw = geometry.kernel
    work: dict = {}
    if any(geometry.pads):
        _merge(work, copy_elems=_padded_elems(c, h, w, geometry.pads), ops=1)
    per_position = mask.flatten(1).sum(0).tolist()
    used = [n for n in per_position if n]
    s = int(mask.sum())
    _merge(work, copy_elems=len(used) * c * ho * wo, conv_macs=s * c * ho * wo, ops=2 * len(used))
    if len(used) > 1:
        _merge(work, copy_elems=s * ho * wo, ops=1)
    buckets = stripe_count_buckets(mask)
    for k, filters in buckets:
        _merge(work, copy_elems=len(filters) * (k + 1) * ho * wo, ops=3)
    _output_gather(work, len(buckets), len(buckets) > 1, o * ho * wo)
    return work


def candidate_work(geometry: ConvGeometry, mask, forms) -> dict[tuple, dict]:
    """{(form, options): work} for dense and every candidate lowering of one conv."""
    candidates = {("dense", ()): dense_work(geometry, mask)}
    if "boxes" in forms:
        seen = []
        for min_group in BOX_MIN_GROUPS:
            partition = [fs for _, fs in box_groups(mask, min_group)]
            if partition not in seen:
                seen.append(partition)
                candidates[("boxes", (("min_group", min_group),))] = boxes_work(geometry, mask, min_group)
    if "onehot" in forms:
        candidates[("onehot", ())] = onehot_work(geometry, mask)
    if "shift" in forms:
        candidates[("shift", ())] = shift_work(geometry, mask)
    return candidates


@dataclass
class RuntimeModel:
    """Predicted ORT latency of a conv's dense and lowered forms: a linear model over work counts.

    ``latency = Σ coefficient[kind] · work[kind]`` with the kinds of ``WORK_KINDS``
    (dense-GEMM MACs, one-hot grouped-conv MACs and groups, elements copied by
    pad/slice/concat/gather/sum, op count). ``pays(lowered, dense)`` is the
    "auto" rule: lower only if predicted faster than ``margin`` × dense.

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

    def predict(self, work: dict, batch: int = 1) -> float:
        return sum(self.coefficients[k] * v * (1 if k == "ops" else batch) for k, v in work.items())

    def pays(self, lowered: float, dense: float) -> bool:
        return lowered < self.margin * dense

    def predict_all(self, geometry: ConvGeometry, mask, forms, batch: int = 1) -> dict[tuple, float]:
        return {key: self.predict(work, batch) for key, work in candidate_work(geometry, mask, forms).items()}

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
        path.write_text(json.dumps({"coefficients": self.coefficients, "margin": self.margin}, indent=1))

    @classmethod
    def load(cls, path) -> RuntimeModel:
        data = json.loads(Path(path).read_text())
        return cls(coefficients={**DEFAULT_COEFFICIENTS, **data["coefficients"]}, margin=data.get("margin", 0.85),
                   source=str(path))


def default_runtime_model(cache=None) -> RuntimeModel:
    """The user's calibration (``cache`` or ~/.cache/swpfx/runtime_model.json) if present, else the shipped table."""
    path = Path(cache) if cache is not None else DEFAULT_CACHE
    if path.exists():
        return RuntimeModel.load(path)
    return RuntimeModel()


# ---------------------------------------------------------------- calibration

# (in_channels, out_channels, kernel, stride, padding, input size): ResNet-18's convs at 224² input.
CALIBRATION_SHAPES = [
    (64, 64, 3, 1, 1, 56),
    (64, 128, 3, 2, 1, 56),
    (128, 128, 3, 1, 1, 28),
    (128, 256, 3, 2, 1, 28),
    (256, 256, 3, 1, 1, 14),
    (256, 512, 3, 2, 1, 14),
    (512, 512, 3, 1, 1, 7),
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


def measure_candidates(gm, x, candidates, rounds: int = 50) -> dict:
    """{key: median ORT seconds} for dense (key ("dense", ())) and each (form, options) candidate.

    Each ORT output is checked against torch (relative error ≤ 1e-4).
    """
    reference = gm(x).detach()
    sessions = {}
    for key in candidates:
        form, options = key
        module = gm if form == "dense" else lowered_copy(gm, form, **dict(options))
        session = ort_session(onnx_bytes(module, x))
        out = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
        err = float((out - reference).abs().max() / reference.abs().max())
        if err > 1e-4:
            raise AssertionError(f"{key}: ORT output differs from torch (relative error {err:.2e})")
        sessions[key] = session
    return time_sessions(sessions, x, rounds=rounds, blocks=3)


def fit_coefficients(rows: list[tuple[dict, float]]) -> dict:
    """Non-negative least squares on relative error: Σ_k c_k·work_k ≈ t for (work, t) rows."""
    a = np.array([[row.get(k, 0) / t for k in WORK_KINDS] for row, t in rows], dtype=float)
    b = np.ones(len(rows))
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(a / scale, b)
    return {k: float(c / s) for k, c, s in zip(WORK_KINDS, coef, scale)}


def calibrate(cache=DEFAULT_CACHE, shapes=CALIBRATION_SHAPES, rounds: int = 40, seed: int = 0,
              verbose: bool = False) -> RuntimeModel:
    """Time dense and every lowering on representative conv shapes in ORT, fit a RuntimeModel, cache it.

    Uses both mask protocols of ``swpfx.masks`` on each shape (about a minute on
    2 cores). ``cache=None`` skips writing the JSON file.

    >>> model = calibrate(cache=None, shapes=[(64, 64, 3, 1, 1, 14)], rounds=3)  # doctest: +SKIP
    """
    from swpfx.masks import random_stripe_mask, structured_stripe_mask

    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for c_in, c_out, k, stride, padding, hw in shapes:
        for make in (random_stripe_mask, structured_stripe_mask):
            mask = make(c_out, k, k, generator=generator)
            mask = mask[mask.flatten(1).any(1)]
            gm, x = stripe_conv_module(c_in, mask, k, stride, padding, hw, seed)
            geometry = ConvGeometry.of(gm.get_submodule("0"), x.shape)
            work = candidate_work(geometry, mask, supported_forms(geometry))
            times = measure_candidates(gm, x, list(work), rounds=rounds)
            rows.extend((work[key], times[key]) for key in work)
            if verbose:
                print(c_in, c_out, hw, make.__name__, {f"{key[0]}{dict(key[1]).get('min_group', '')}": round(t * 1e3, 3)
                                                       for key, t in times.items()})
    model = RuntimeModel(coefficients=fit_coefficients(rows), source="calibrated")
    if cache is not None:
        model.save(cache)
        model.source = str(cache)
    return model

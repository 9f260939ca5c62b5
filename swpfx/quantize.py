"""int8 deployment: ONNX Runtime's own static quantisation of a verified float ONNX file.

``swpfx.export_onnx(model, example_inputs, path, quantize=calibration_batches)``
exports and verifies the float model as usual, then quantises it with
``onnxruntime.quantization.quantize_static`` and writes the int8 file to
``path`` (the float file stays beside it as ``<name>.fp32.onnx``). Choices, after
ONNX Runtime's quantisation guide:

* preprocessing with ``quant_pre_process`` (graph optimisation and symbolic
  shape inference), which the guide recommends before static quantisation;
* QDQ format (QuantizeLinear/DequantizeLinear around float ops): ORT fuses the
  pairs into int8 kernels, and the file stays a standard ONNX graph;
* signed int8 activations and weights (S8S8), the guide's default for QDQ;
* per-channel weight scales: pruned filters keep very different ranges, and a
  per-tensor scale would flatten the small ones;
* MinMax calibration over the user's batches (a few hundred samples suffice).

Verification runs the int8 file and the float model (torch, eval mode) on the
calibration batches and reports ``max|int8 - float| / max|float|`` per output
and, for (N, classes) outputs, how often the top-1 class agrees. The logit
error is checked against ``INT8_RTOL``; top-1 agreement is reported, not checked:
within that error bound a class can only flip on samples whose float top-2
margin is below ``2 * INT8_RTOL`` of the scale, i.e. ambiguous ones (a collapsed
model with near-equal logits can agree on 0 % at 5 % error). The float export
itself is still checked at ``rtol`` (1e-4).

Example:
    >>> import torch, swpfx
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                             torch.nn.Linear(16 * 8 * 8, 10))
    >>> batches = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    >>> r = swpfx.export_onnx(model, (batches[0][:1],), "/tmp/small_int8.onnx", quantize=batches)
    >>> r.path.name, r.float_path.name, r.calibration_samples
    ('small_int8.onnx', 'small_int8.fp32.onnx', 64)
    >>> r.int8_rel_error < INT8_RTOL, 0.0 <= r.top1_agreement <= 1.0
    (True, True)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from swpfx.export import ExportResult, ExportVerificationError, ort_session, relative_error, run_onnx, torch_outputs

# int8 with per-channel weights and MinMax activations keeps logits within 1-2 % of their scale
# on the models measured here (benchmarks/results/int8.md); 10 % flags a broken quantisation (a
# mis-calibrated range, an op ORT quantised wrongly) without failing on ordinary rounding.
INT8_RTOL = 0.1
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


@dataclass
class QuantizedExportResult(ExportResult):
    """An :class:`~swpfx.export.ExportResult` for the int8 file at ``path``, with its float twin and int8 error.

    ``max_rel_error``/``errors_by_batch`` are the float export's check against torch;
    ``int8_rel_error`` (worst output, ``max|int8 - float| / max|float|``) and
    ``top1_agreement`` compare the int8 file with the float model on the calibration batches.
    """

    float_path: Path | None = None
    calibration_samples: int = 0
    int8_rel_error: float | None = None
    int8_errors: list[float] = field(default_factory=list)  # per output
    top1_agreement: float | None = None  # None when no output is (N, classes)


# ---------------------------------------------------------------- calibration data


def calibration_feeds(batches: Iterable, input_names: list[str]) -> list[dict[str, np.ndarray]]:
    """One ORT feed per batch. A batch is a tensor (one input), or a tuple/list whose first
    ``len(input_names)`` items are the inputs (a DataLoader's ``(x, y)`` works).

    Example:
        >>> feeds = calibration_feeds([(torch.zeros(2, 3), torch.tensor([0, 1]))], ["x"])
        >>> list(feeds[0]), feeds[0]["x"].shape
        (['x'], (2, 3))
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError("swpfx.quantize: calibration batches must be an iterable of batches, not one tensor; "
                        "wrap it: [x]")
    feeds = []
    for i, batch in enumerate(batches):
        items = list(batch) if isinstance(batch, (tuple, list)) else [batch]
        inputs = items[: len(input_names)]
        if len(inputs) < len(input_names) or not all(isinstance(x, (torch.Tensor, np.ndarray)) for x in inputs):
            raise TypeError(f"swpfx.quantize: calibration batch {i} must hold {len(input_names)} input tensor(s) "
                            f"first, got {type(batch).__name__}")
        feeds.append({name: _numpy(x) for name, x in zip(input_names, inputs)})
    if not feeds:
        raise ValueError("swpfx.quantize: no calibration batches; give a few batches of representative inputs")
    return feeds


def _numpy(x) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.ascontiguousarray(array.astype(np.float32) if array.dtype == np.float64 else array)


def _reader(feeds: list[dict[str, np.ndarray]]):
    """ORT's CalibrationDataReader over prepared feeds (a subclass, as quantize_static expects)."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

        def rewind(self):
            self.items = iter(feeds)

    return FeedReader()


# ---------------------------------------------------------------- quantisation (ONNX Runtime's)


def preprocess(float_path, out_path) -> Path:
    """ORT's recommended pre-quantisation step; falls back to skipping symbolic shape inference, then to a copy.

    Symbolic shape inference fails on some graphs (ORT's own advice is to skip it then).
    """
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:  # older onnxruntime: quantise the file as exported
        shutil.copyfile(float_path, out_path)
        return Path(out_path)
    try:
        quant_pre_process(os.fspath(float_path), os.fspath(out_path))
    except Exception:
        quant_pre_process(os.fspath(float_path), os.fspath(out_path), skip_symbolic_shape=True)
    return Path(out_path)


def quantize_onnx(float_path, out_path, calibration_batches, *, per_channel: bool = True, reduce_range: bool = False,
                  calibrate_method: str = "minmax") -> int:
    """Static int8 quantisation (QDQ, S8S8) of ``float_path`` into ``out_path``; returns the calibration sample count.

    ``reduce_range`` (7-bit weights) can help accuracy on CPUs without VNNI, where
    ORT's u8s8 kernels may saturate. This function does not verify; see
    :func:`int8_agreement`.

    Example:
        >>> import swpfx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> _ = swpfx.export_onnx(model, (torch.randn(1, 3, 8, 8),), "/tmp/q_float.onnx")
        >>> quantize_onnx("/tmp/q_float.onnx", "/tmp/q_int8.onnx", [torch.randn(8, 3, 8, 8)])
        8
        >>> import onnx
        >>> ops = {n.op_type for n in onnx.load("/tmp/q_int8.onnx").graph.node}
        >>> {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
        True
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibrate_method not in CALIBRATION_METHODS:
        raise ValueError(f"swpfx.quantize: calibrate_method must be one of {CALIBRATION_METHODS}, "
                         f"got {calibrate_method!r}")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[calibrate_method]
    names = [i.name for i in ort_session(float_path).get_inputs()]
    feeds = calibration_feeds(calibration_batches, names)
    with tempfile.TemporaryDirectory() as tmp:
        ready = preprocess(float_path, Path(tmp) / "preprocessed.onnx")
        quantize_static(os.fspath(ready), os.fspath(out_path), _reader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method)
    return sum(next(iter(f.values())).shape[0] for f in feeds)


# ---------------------------------------------------------------- verification


def top1_agreement(actual: np.ndarray, expected: np.ndarray) -> float | None:
    """Fraction of rows of an (N, classes) output whose argmax agrees; None for other shapes.

    Example:
        >>> top1_agreement(np.array([[0.1, 0.9], [0.6, 0.4]]), np.array([[0.2, 0.8], [0.3, 0.7]]))
        0.5
    """
    if expected.ndim != 2 or expected.shape[1] < 2 or actual.shape != expected.shape:
        return None
    return float((actual.argmax(1) == expected.argmax(1)).mean())


def int8_agreement(int8_path, reference: nn.Module, feeds: list[dict[str, np.ndarray]]) -> tuple[list[float], float | None]:
    """(per-output ``max|int8 - float| / max|float|`` over all feeds, top-1 agreement over all (N, classes) rows).

    ``reference`` is the float torch model (eval mode); each output is compared
    on all feeds concatenated, so the scale is the output's range over the data.
    """
    session = ort_session(int8_path)
    pairs = []
    for feed in feeds:
        expected = torch_outputs(reference, tuple(torch.from_numpy(x) for x in feed.values()))
        pairs.append((run_onnx(session, tuple(feed.values())), expected))
    errors, agreements = [], []
    for i in range(len(pairs[0][1])):
        actual = np.concatenate([a[i] for a, _ in pairs])
        expected = np.concatenate([e[i] for _, e in pairs])
        errors.append(relative_error(actual, expected))
        agreement = top1_agreement(actual, expected)
        if agreement is not None:
            agreements.append(agreement)
    return errors, (min(agreements) if agreements else None)


def check_int8(path, errors: list[float], agreement: float | None, rtol: float = INT8_RTOL) -> None:
    """Raise :class:`~swpfx.export.ExportVerificationError` when the int8 file is off by more than int8 should be."""
    worst = max(errors)
    if not worst <= rtol:
        top1 = "" if agreement is None else f" (top-1 agreement {agreement:.1%})"
        raise ExportVerificationError(
            f"swpfx.export_onnx: the int8 model {path} differs from the float model by {worst:.3e} of the output "
            f"scale (max|int8 - float| / max|float|) > {rtol:.2f}{top1}; try more or more representative "
            "calibration batches, or calibrate_method='percentile' via swpfx.quantize.quantize_onnx")


def quantize_export(result: ExportResult, reference: nn.Module, calibration_batches, verify: bool = True
                    ) -> QuantizedExportResult:
    """The int8 step of ``export_onnx``: the float file at ``result.path`` moves to ``<name>.fp32.onnx``,
    its int8 quantisation takes ``result.path``, and (with ``verify``) is checked against ``reference``.

    Example: see the module docstring.
    """
    if not isinstance(calibration_batches, torch.Tensor):
        calibration_batches = list(calibration_batches)  # used twice: calibration, then verification
    int8_path = Path(result.path)
    float_path = int8_path.with_name(int8_path.stem + ".fp32" + int8_path.suffix)
    os.replace(int8_path, float_path)
    samples = quantize_onnx(float_path, int8_path, calibration_batches)
    out = QuantizedExportResult(**{f.name: getattr(result, f.name) for f in fields(ExportResult)},
                                float_path=float_path, calibration_samples=samples)
    if verify:
        feeds = calibration_feeds(calibration_batches, result.input_names)
        out.int8_errors, out.top1_agreement = int8_agreement(int8_path, reference, feeds)
        out.int8_rel_error = max(out.int8_errors)
        check_int8(int8_path, out.int8_errors, out.top1_agreement)
    return out

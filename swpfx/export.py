"""``swpfx.export_onnx``: export a model to ONNX and check it in ONNX Runtime.

Exporter choice: the torch.export-based ("dynamo") exporter,
``torch.onnx.export(..., dynamo=True)``. Reasons, measured with torch 2.14 and
onnxruntime 1.31:

* The legacy TorchScript exporter (``dynamo=False``) writes ``auto_pad=SAME``
  for ``padding='same'`` convs, which ONNX Runtime rejects when the conv is
  dilated ("Dilation not supported for AutoPadType::SAME_UPPER"); the dynamo
  exporter writes explicit pads, so no rewrite of the user's graph is needed.
* The legacy exporter is deprecated in this torch ("The feature will be
  removed") and the dynamo exporter is the default since torch 2.9.
* Its ONNX optimiser constant-folds weight-side expressions, so a prepared
  model's ``weight * skeleton`` becomes a plain initializer (ResNet-18: 87
  nodes instead of 220).

The cost is export time: about 2-3 s for ResNet-18 and 5 s for MobileNetV2
against 0.2 s for the legacy exporter; export is a one-off step, so correctness
and longevity win.

Verification runs the file with the CPU provider on the example inputs and, when
the batch dimension is dynamic, on a second batch size, and compares with torch:
``max|onnx - torch| / max(max|torch|, tiny)`` must not exceed ``rtol``.

Example:
    >>> import torch, torchvision, swpfx
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> result = swpfx.export_onnx(model, (x,), "/tmp/resnet18.onnx")
    >>> result.max_rel_error < 1e-4
    True
    >>> run_onnx("/tmp/resnet18.onnx", (torch.randn(4, 3, 64, 64),))[0].shape
    (4, 10)
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from swpfx.passes.count_costs import weight_side_nodes
from swpfx.passes.graph_utils import erase_unused_attributes, evaluate_attribute_expression, finalize, unique_attr_name
from swpfx.tracing import normalize_example_inputs

DEFAULT_RTOL = 1e-4


class ExportError(RuntimeError):
    """torch.onnx could not export the model (the cause is chained)."""


class ExportVerificationError(ValueError):
    """The exported ONNX model's outputs differ from the torch model's."""


@dataclass
class ExportResult:
    """Where the file went and how well it matched. Usable as a path (``os.fspath(result)``)."""

    path: Path
    opset: int | None = None
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    dynamic_batch: bool = True
    verified: bool = False
    max_rel_error: float | None = None  # worst over outputs and checked batch sizes
    errors_by_batch: dict[int, float] = field(default_factory=dict)
    dynamic_hw: bool = False
    errors_by_size: dict[tuple[int, int], float] = field(default_factory=dict)  # (H, W) -> error, with dynamic_hw

    def __fspath__(self) -> str:
        return str(self.path)


# ---------------------------------------------------------------- ONNX Runtime helpers


def ort_session(path: str | os.PathLike | bytes, threads: int = 2, profile_prefix: str | None = None):
    """The library's one ONNX Runtime CPU session builder (export checks, runtime model, CLI, benchmarks).

    ``path`` is an ONNX file or the model's bytes. ``threads`` intra-op threads,
    one inter-op thread, sequential execution, all graph optimisations, and idle
    worker threads do not spin (a spinning session would steal the cores from
    the next one timed). With ``profile_prefix`` ORT records every node's time
    (``session.end_profiling()`` writes the JSON trace; see ``swpfx.timing.op_times``).

    Example:
        >>> sess = ort_session("/tmp/resnet18.onnx", threads=2)  # doctest: +SKIP
        >>> [i.name for i in sess.get_inputs()]  # doctest: +SKIP
        ['x']
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    model = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def run_onnx(model, inputs, threads: int = 2) -> list[np.ndarray]:
    """Run an ONNX file (or an existing session) on positional ``inputs`` (tensors or arrays).

    Example:
        >>> outputs = run_onnx("/tmp/resnet18.onnx", (torch.randn(2, 3, 64, 64),))  # doctest: +SKIP
        >>> outputs[0].shape  # doctest: +SKIP
        (2, 10)
    """
    session = model if hasattr(model, "get_inputs") else ort_session(model, threads)
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = (inputs,)
    tensors = [x for x in inputs if isinstance(x, (torch.Tensor, np.ndarray))]
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise ValueError(f"swpfx.run_onnx: the ONNX model takes {len(names)} inputs {names}, got {len(tensors)} tensors")
    return session.run(None, {name: _to_numpy(x) for name, x in zip(names, tensors)})


# ---------------------------------------------------------------- comparison


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max(max|expected|, tiny)``; inf on shape or NaN-pattern mismatch."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        return float("inf")
    if not np.issubdtype(expected.dtype, np.floating):
        return 0.0 if np.array_equal(actual, expected) else float("inf")
    nan_a, nan_e = np.isnan(actual), np.isnan(expected)
    if (nan_a != nan_e).any():
        return float("inf")
    ok = ~nan_e
    if not ok.any():
        return 0.0
    a, e = actual[ok].astype(np.float64), expected[ok].astype(np.float64)
    tiny = float(np.finfo(expected.dtype).tiny)
    return float(np.abs(a - e).max() / max(np.abs(e).max(), tiny))


def torch_outputs(model: nn.Module, inputs: tuple) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(*inputs)
    return [_to_numpy(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def grow_batch(inputs: tuple) -> tuple:
    """The inputs with one more sample (the first one repeated) on dim 0 of every tensor."""
    return tuple(torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() else x for x in inputs)


def check_outputs(session, model: nn.Module, inputs: tuple, rtol: float, path) -> float:
    """Compare ORT with torch on ``inputs``; return the worst relative error or raise."""
    batch = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), None)
    expected = torch_outputs(model, inputs)
    try:
        actual = run_onnx(session, inputs)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportVerificationError(
            f"swpfx.export_onnx: ONNX Runtime could not run {path} at batch size {batch}: {exc}"
        ) from exc
    if len(actual) != len(expected):
        raise ExportVerificationError(
            f"swpfx.export_onnx: {path} has {len(actual)} outputs, the torch model returns {len(expected)}"
        )
    worst = 0.0
    for i, (a, e) in enumerate(zip(actual, expected)):
        err = relative_error(a, e)
        if not err <= rtol:
            detail = f"shape {a.shape} vs {e.shape}" if a.shape != e.shape else f"relative error {err:.3e}"
            raise ExportVerificationError(
                f"swpfx.export_onnx: ONNX Runtime output {i} of {path} differs from torch at batch size {batch}: "
                f"{detail} > rtol {rtol:.1e} (max|onnx - torch| / max|torch|)"
            )
        worst = max(worst, err)
    return worst


def verify_onnx(path, model: nn.Module, example_inputs, rtol: float = DEFAULT_RTOL, dynamic_batch: bool = True,
                threads: int = 2) -> dict[int, float]:
    """Check an exported file against ``model`` (in eval mode) in ONNX Runtime; ``{batch size: error}``.

    Raises :class:`ExportVerificationError` when an output differs by more than ``rtol``.
    """
    reference = copy.deepcopy(model).eval()
    return _verify(path, reference, normalize_example_inputs(example_inputs), rtol, dynamic_batch, threads)


def _verify(path, reference: nn.Module, inputs: tuple, rtol: float, dynamic_batch: bool, threads: int = 2):
    session = ort_session(path, threads)
    batches = [inputs, grow_batch(inputs)] if dynamic_batch else [inputs]
    errors = {}
    for batch_inputs in batches:
        batch = next((x.shape[0] for x in batch_inputs if isinstance(x, torch.Tensor) and x.dim()), 0)
        errors[batch] = check_outputs(session, reference, batch_inputs, rtol, path)
    return errors


# ---------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet():
    """Silence torch.onnx/onnxscript warnings, log records and progress prints."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def fold_weight_expressions_(gm: fx.GraphModule) -> int:
    """Replace each weight-side expression (``weight * skeleton.unsqueeze(1)``) by a constant buffer, in place.

    Used on the export copy only, so the ONNX file holds the effective weights
    instead of a Mul that onnxscript's folder skips for tensors above 8192
    elements. Returns the number of folded expressions.
    """
    side = weight_side_nodes(gm.graph)
    folded = 0
    for node in list(gm.graph.nodes):
        if node not in side or node.op == "get_attr" or not node.all_input_nodes:
            continue  # get_attrs are already constants; input-less factories may be random
        if all(user in side for user in node.users):
            continue  # an inner step of a bigger weight expression
        with torch.no_grad():
            value = evaluate_attribute_expression(gm, node)
        if not isinstance(value, torch.Tensor):
            continue
        name = unique_attr_name(gm, f"{node.name}_folded")
        gm.register_buffer(name, value.detach().clone())
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        node.replace_all_uses_with(constant)
        folded += 1
    if folded:
        finalize(gm)
        erase_unused_attributes(gm)
        gm.recompile()
    return folded


def batch_dynamic_shapes(inputs: tuple) -> tuple:
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(x, torch.Tensor) and x.dim() else None for x in inputs)


def hw_dynamic_shapes(inputs: tuple, dynamic_batch: bool) -> tuple:
    """Dynamic dims 2 and 3 of every 4-D tensor input (and dim 0 with ``dynamic_batch``).

    ``Dim.DYNAMIC``: torch.export infers the valid range (e.g. at least the kernel size)
    instead of failing on a declared one, and raises if the graph fixes the size.
    """
    batch = torch.export.Dim("batch")
    shapes = []
    for x in inputs:
        if not isinstance(x, torch.Tensor) or not x.dim():
            shapes.append(None)
            continue
        dims = {0: batch} if dynamic_batch else {}
        if x.dim() == 4:
            dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
        shapes.append(dims or None)
    return tuple(shapes)


def resized_inputs(inputs: tuple, height: int, width: int, seed: int = 0) -> tuple:
    """The inputs with every 4-D tensor replaced by a seeded random one of spatial size (height, width)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(*x.shape[:2], height, width, generator=g, dtype=x.dtype).to(x.device)
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.is_floating_point() else x
        for x in inputs
    )


def verification_sizes(inputs: tuple) -> list[tuple[int, int]]:
    """The example's (H, W), an odd offset of it and about 1.5× it."""
    image = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() == 4), None)
    if image is None:
        return []
    h, w = image.shape[2:]
    return [(h, w), (h + 7, w + 5), (h * 3 // 2 + 1, w * 3 // 2 + 1)]


def _verify_sizes(path, reference: nn.Module, inputs: tuple, rtol: float, threads: int = 2) -> dict:
    session = ort_session(path, threads)
    errors = {}
    for h, w in verification_sizes(inputs):
        resized = resized_inputs(inputs, h, w)
        try:
            torch_outputs(reference, resized)
        except Exception as exc:  # the torch model itself only runs at the example's size
            raise ExportError(f"swpfx.export_onnx: dynamic_hw=True, but the model does not run at {h}x{w} "
                              f"({type(exc).__name__}: {exc}); export with dynamic_hw=False") from exc
        errors[(h, w)] = check_outputs(session, reference, resized, rtol, f"{path} at {h}x{w}")
    return errors


def require_dynamic_hw(proto, inputs: tuple) -> None:
    """torch.export may specialise height/width the graph pins (e.g. flatten -> Linear); say so."""
    batched = [x for x in inputs if isinstance(x, torch.Tensor)]
    for value, x in zip(proto.graph.input, batched):
        dims = value.type.tensor_type.shape.dim
        if x.dim() == 4 and len(dims) == 4 and not (dims[2].dim_param and dims[3].dim_param):
            raise ExportError(
                f"swpfx.export_onnx: dynamic_hw=True, but the model fixes the height/width of input "
                f"'{value.name}' (an op in the graph depends on them, e.g. flatten -> Linear); export with "
                "dynamic_hw=False"
            )


def require_dynamic_batch(proto, inputs: tuple) -> None:
    """torch.export specialises a batch dimension the graph pins (e.g. adding a (2, C) buffer); say so."""
    batched = [x for x in inputs if isinstance(x, torch.Tensor)]
    for value, x in zip(proto.graph.input, batched):
        dims = value.type.tensor_type.shape.dim
        if x.dim() and dims and not dims[0].dim_param:
            raise ExportError(
                f"swpfx.export_onnx: dynamic_batch=True, but the model fixes the batch size of input "
                f"'{value.name}' to {dims[0].dim_value} (an op in the graph depends on it); "
                "export with dynamic_batch=False, or make the graph batch-independent"
            )


def export_onnx(model: nn.Module, example_inputs, path, dynamic_batch: bool = True, verify: bool = True,
                rtol: float = DEFAULT_RTOL, opset: int | None = None, quantize=None,
                dynamic_hw: bool = False) -> ExportResult:
    """Export ``model`` (an eval-mode copy; the caller's model is untouched) to ONNX at ``path``.

    ``dynamic_batch`` makes dim 0 of every tensor input dynamic. With ``verify``,
    the file is run in ONNX Runtime (CPU) on ``example_inputs`` (and on one more
    sample when the batch is dynamic) and compared with torch; a relative error
    above ``rtol`` raises :class:`ExportVerificationError`. Export failures raise
    :class:`ExportError`. Returns an :class:`ExportResult` (usable as a path).

    ``dynamic_hw`` also makes dims 2 and 3 (height, width) of every 4-D input
    dynamic; verification then also runs at two other sizes (``errors_by_size``).

    ``quantize``: calibration batches (an iterable of input tensors, or of
    tuples/lists starting with the inputs). The verified float file then goes to
    ``<name>.fp32.onnx`` and ONNX Runtime's static int8 quantisation of it (QDQ,
    per-channel weights) to ``path``, checked against the float model with int8
    tolerances; returns a :class:`swpfx.quantize.QuantizedExportResult`.

    Example:
        >>> import torch, swpfx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding="same", dilation=2), torch.nn.ReLU())
        >>> prepared = swpfx.prepare(model)
        >>> r = swpfx.export_onnx(prepared, (torch.randn(2, 3, 16, 16),), "/tmp/small.onnx")
        >>> r.verified, sorted(r.errors_by_batch), r.max_rel_error < 1e-4
        (True, [2, 3], True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swpfx.export_onnx: expected an nn.Module, got {type(model).__name__}")
    inputs = normalize_example_inputs(example_inputs)
    if inputs is None:
        raise ValueError("swpfx.export_onnx: example_inputs are required")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    reference = copy.deepcopy(model).eval()
    exported = reference
    if isinstance(reference, fx.GraphModule):  # verify against the unfolded graph, export the folded one
        exported = copy.deepcopy(reference)
        fold_weight_expressions_(exported)
    dynamic_shapes = batch_dynamic_shapes(inputs) if dynamic_batch else None
    if dynamic_hw:
        dynamic_shapes = hw_dynamic_shapes(inputs, dynamic_batch)
    try:
        with _quiet():
            program = torch.onnx.export(exported, inputs, None, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, verbose=False, optimize=True)
            program.save(path)
    except Exception as exc:
        hint = " (the graph may fix the batch size; try dynamic_batch=False)" if dynamic_batch else ""
        hint += " (the graph may fix the height/width; try dynamic_hw=False)" if dynamic_hw else ""
        raise ExportError(f"swpfx.export_onnx: torch.onnx.export failed{hint}: {type(exc).__name__}: {exc}") from exc
    proto = program.model_proto
    if dynamic_batch:
        require_dynamic_batch(proto, inputs)
    if dynamic_hw:
        require_dynamic_hw(proto, inputs)
    result = ExportResult(
        path=path,
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        input_names=[i.name for i in proto.graph.input],
        output_names=[o.name for o in proto.graph.output],
        dynamic_batch=dynamic_batch,
        dynamic_hw=dynamic_hw,
    )
    if verify:
        result.errors_by_batch = _verify(path, reference, inputs, rtol, dynamic_batch)
        if dynamic_hw:
            result.errors_by_size = _verify_sizes(path, reference, inputs, rtol)
        result.max_rel_error = max([*result.errors_by_batch.values(), *result.errors_by_size.values()])
        result.verified = True
    if quantize is not None:
        from swpfx.quantize import quantize_export  # onnxruntime.quantization is loaded only when asked for

        return quantize_export(result, reference, quantize, verify=verify)
    return result


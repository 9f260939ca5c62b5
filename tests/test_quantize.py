"""int8 export: swpfx.export_onnx(..., quantize=batches) through ONNX Runtime's static quantisation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import swpfx
from swpfx.export import ExportVerificationError, ort_session
from swpfx.quantize import (
    INT8_RTOL,
    QuantizedExportResult,
    calibration_feeds,
    check_int8,
    int8_agreement,
    quantize_onnx,
    top1_agreement,
)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 10),
    ).eval()


def batches(n: int = 4, size: int = 16, scale: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(scale * torch.randn(size, 3, 12, 12, generator=g), torch.zeros(size, dtype=torch.long)) for _ in range(n)]


def weight_dequantizers(path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(int8 weight, scale) of every DequantizeLinear whose input is an initializer (a quantised weight)."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(inits[n.input[0]], inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4]


def test_export_quantize_writes_a_verified_per_channel_int8_file(tmp_path):
    model = small_net()
    calibration = batches()
    result = swpfx.export_onnx(model, (calibration[0][0][:2],), tmp_path / "net.onnx", quantize=calibration)
    assert isinstance(result, QuantizedExportResult)
    assert result.path == tmp_path / "net.onnx" and result.float_path == tmp_path / "net.fp32.onnx"
    assert result.float_path.exists() and result.verified and result.max_rel_error < 1e-4  # the float file, as before
    assert result.calibration_samples == 64
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = weight_dequantizers(result.path)
    assert [w.shape[0] for w, _ in weights] == [16, 24]  # both conv weights quantised...
    assert all(w.dtype == np.int8 and s.shape == (w.shape[0],) for w, s in weights)  # ...int8, one scale per filter
    assert 0 < result.int8_rel_error < INT8_RTOL  # really quantised, and close
    assert result.int8_errors == [result.int8_rel_error]
    assert result.top1_agreement == top1_agreement(  # reported over all 64 calibration samples
        onnx_outputs(result.path, calibration), onnx_outputs(result.float_path, calibration))
    assert result.path.stat().st_size < result.float_path.stat().st_size


def test_quantize_a_converted_stripe_pruned_model(tmp_path):
    model = small_net()
    x = batches()[0][0][:1]
    prepared = swpfx.prepare(model, (x,))
    with torch.no_grad():
        swpfx.skeletons(prepared)["0"][:, 0, :] = 0.0  # top row of every filter
        swpfx.skeletons(prepared)["3"][:8] = 0.0  # 8 dead filters
    deployed = swpfx.convert(prepared, lowering="always", channel_multiple=1)
    assert deployed.get_submodule("3").out_channels == 16
    calibration = batches()
    result = swpfx.export_onnx(deployed, (x,), tmp_path / "pruned.onnx", quantize=calibration)
    assert result.int8_rel_error < INT8_RTOL and result.top1_agreement > 0.5
    # ORT agrees with the errors the result reports
    errors, agreement = int8_agreement(result.path, deployed, calibration_feeds(calibration, result.input_names))
    assert errors == result.int8_errors and agreement == result.top1_agreement


def test_a_miscalibrated_int8_model_fails_verification(tmp_path):
    model = small_net()
    path = swpfx.export_onnx(model, (torch.randn(1, 3, 12, 12),), tmp_path / "f.onnx").path
    quantize_onnx(path, tmp_path / "q.onnx", batches(scale=0.01))  # ranges from inputs 100× too small
    errors, agreement = int8_agreement(tmp_path / "q.onnx", model, calibration_feeds(batches(), ["x"]))
    assert max(errors) > INT8_RTOL
    with pytest.raises(ExportVerificationError, match="of the output scale"):
        check_int8(tmp_path / "q.onnx", errors, agreement)
    check_int8(tmp_path / "q.onnx", [0.05], 0.0)  # tied logits may flip: within the error bound that is no failure


def onnx_outputs(path, calibration) -> np.ndarray:
    session = ort_session(path)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x.numpy()})[0] for x, _ in calibration])


def test_calibration_feeds():
    x, y = torch.randn(4, 3, 2, 2), torch.arange(4)
    feeds = calibration_feeds([(x, y), [x, y], x], ["input"])
    assert [list(f) for f in feeds] == [["input"]] * 3
    assert all(f["input"].dtype == np.float32 and f["input"].shape == (4, 3, 2, 2) for f in feeds)
    two = calibration_feeds([(x, x + 1, y)], ["a", "b"])
    np.testing.assert_array_equal(two[0]["b"], (x + 1).numpy())
    with pytest.raises(TypeError, match="not one tensor"):
        calibration_feeds(x, ["input"])
    with pytest.raises(ValueError, match="no calibration batches"):
        calibration_feeds([], ["input"])
    with pytest.raises(TypeError, match="batch 0 must hold 2 input"):
        calibration_feeds([x], ["a", "b"])


def test_top1_agreement():
    a = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    assert top1_agreement(a, a) == 1.0
    assert top1_agreement(a[:, ::-1], a) == 0.0
    assert top1_agreement(a[:, :1], a[:, :1]) is None  # one column: no classes to agree on
    assert top1_agreement(np.zeros((2, 3, 4)), np.zeros((2, 3, 4))) is None

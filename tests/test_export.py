"""Tests for swpfx/export.py: ONNX export verified in ONNX Runtime."""

from __future__ import annotations

import operator

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
import torchvision
from onnx import numpy_helper
from torch import fx, nn

import swpfx
from helpers import randomize_batchnorm_
from swpfx.convert import convert
from swpfx.synthetic import synthetic_skeletons_
from swpfx.export import (
    ExportError,
    ExportResult,
    ExportVerificationError,
    export_onnx,
    ort_session,
    relative_error,
    run_onnx,
    verify_onnx,
)

RTOL = 1e-4




def assert_matches(path, model: nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        expected = model.eval()(*inputs)
    (actual,) = run_onnx(path, inputs)
    assert actual.shape == tuple(expected.shape)
    assert relative_error(actual, expected.numpy()) <= RTOL


# every conv option, one branch each; outputs flattened and concatenated
CONV_OPTIONS = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=(2, 4), padding="same", bias=False),  # even, non-square: asymmetric 'same'
    dict(kernel_size=(3, 2), padding="same", dilation=(1, 3)),
    dict(kernel_size=3, padding="valid", stride=(2, 1)),
    dict(kernel_size=(3, 5), padding=(1, 2), padding_mode="reflect"),
    dict(kernel_size=3, padding=2, dilation=2, padding_mode="replicate"),
    dict(kernel_size=(2, 2), padding=1, padding_mode="circular", stride=2),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=5, padding="same", groups=8, out_channels=8, padding_mode="reflect"),  # depthwise
    dict(kernel_size=1, bias=False),
]


class ConvOptions(nn.Module):
    def __init__(self, in_channels: int = 8):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, o.pop("out_channels", 6), **o) for o in (dict(c) for c in CONV_OPTIONS)
        )
        self.bn = nn.BatchNorm2d(in_channels)

    def forward(self, x):
        x = self.bn(x)
        return torch.cat([b(x).flatten(1) for b in self.branches], 1)


@pytest.fixture(scope="module")
def conv_options_export(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_batchnorm_(ConvOptions(), torch.Generator().manual_seed(0)).eval()
    x = torch.randn(2, 8, 13, 11)
    path = tmp_path_factory.mktemp("onnx") / "conv_options.onnx"
    return model, x, export_onnx(model, (x,), path)


def test_conv_options_export_and_match(conv_options_export):
    model, x, result = conv_options_export
    assert isinstance(result, ExportResult)
    assert result.verified and result.max_rel_error <= RTOL
    assert sorted(result.errors_by_batch) == [2, 3]  # the example batch and one more
    graph = onnx.load(result.path).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == len(CONV_OPTIONS)
    assert all(a.s != b"SAME_UPPER" for n in convs for a in n.attribute if a.name == "auto_pad")
    assert_matches(result.path, model, (torch.randn(5, 8, 13, 11),))


def test_dynamic_batch_axis(conv_options_export):
    model, _, result = conv_options_export
    dim0 = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value
    assert_matches(result, model, (torch.randn(1, 8, 13, 11),))  # result works as a path


def test_prepared_conv_options(tmp_path):
    torch.manual_seed(1)
    model = randomize_batchnorm_(ConvOptions(), torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, 13, 11)
    prepared = swpfx.prepare(model, (x,))
    with torch.no_grad():
        for s in swpfx.skeletons(prepared).values():
            s.copy_(torch.rand(s.shape) * (torch.rand(s.shape) > 0.4))
    result = export_onnx(prepared, (x,), tmp_path / "prepared_options.onnx")
    assert result.max_rel_error <= RTOL
    assert prepared.training  # the caller's model stays in train mode
    assert_matches(result.path, prepared, (torch.randn(3, 8, 13, 11),))


def test_prepared_resnet18(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 64, 64)
    prepared = swpfx.prepare(model, (x,))
    with torch.no_grad():
        for s in swpfx.skeletons(prepared).values():
            s.mul_(torch.rand(s.shape) + 0.5)
    result = export_onnx(prepared, (x,), tmp_path / "resnet18.onnx")
    assert result.max_rel_error <= RTOL
    graph = onnx.load(result.path).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == 20
    assert not any(n.op_type == "Mul" for n in graph.node)  # weight * skeleton was constant-folded
    assert_matches(result.path, prepared, (torch.randn(4, 3, 64, 64),))


@pytest.mark.slow
def test_prepared_mobilenet_v2(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.mobilenet_v2(num_classes=10), torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 64, 64)
    prepared = swpfx.prepare(model, (x,))
    result = export_onnx(prepared, (x,), tmp_path / "mobilenet_v2.onnx")
    assert result.max_rel_error <= RTOL
    assert_matches(result.path, prepared, (torch.randn(3, 3, 64, 64),))


def lowered_graph() -> fx.GraphModule:
    """The ops a lowered stripe conv uses: 1×1 conv, pad, slices, cat, index_select,
    grouped conv with one-hot kernels, reshape + sum, a bias-map buffer add."""
    g = torch.Generator().manual_seed(3)
    root = nn.Module()
    root.pointwise = nn.Conv2d(4, 9, 1, bias=False)
    root.accumulate = nn.Conv2d(9, 9, 3, groups=9, bias=False)
    with torch.no_grad():
        root.accumulate.weight.copy_(F.one_hot(torch.randint(0, 9, (9,), generator=g), 9).view(9, 1, 3, 3).float())
    root.register_buffer("order", torch.randperm(27, generator=g)[:9])
    root.register_buffer("bias_map", torch.randn(1, 3, 6, 8, generator=g))
    graph = fx.Graph()
    x = graph.placeholder("x")
    p = graph.call_module("pointwise", (x,))
    padded = graph.call_function(F.pad, (p, (1, 1, 1, 1)))
    taps = [graph.call_function(operator.getitem, (padded, (slice(None), slice(None), slice(i, i + 8), slice(0, 10))))
            for i in range(3)]
    cat = graph.call_function(torch.cat, (taps, 1))
    picked = graph.call_function(torch.index_select, (cat, 1, graph.get_attr("order")))
    acc = graph.call_module("accumulate", (picked,))
    grouped = graph.call_method("reshape", (acc, -1, 3, 3, 6, 8))
    summed = graph.call_method("sum", (grouped, 2))
    graph.output(graph.call_function(operator.add, (summed, graph.get_attr("bias_map"))))
    return fx.GraphModule(root, graph)


def test_lowering_ops_export(tmp_path):
    gm = lowered_graph()
    x = torch.randn(2, 4, 8, 8)
    result = export_onnx(gm, (x,), tmp_path / "lowered.onnx")
    assert result.max_rel_error <= RTOL
    ops = {n.op_type for n in onnx.load(result.path).graph.node}
    assert {"Conv", "Pad", "Concat", "Gather", "ReduceSum", "Add"} <= ops
    assert_matches(result.path, gm, (torch.randn(3, 4, 8, 8),))


class ExportsDifferently(nn.Module):
    """Honest mismatch: a model that behaves differently while being exported
    (``torch.onnx.is_in_onnx_export()`` branches exist in real detection code)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if torch.onnx.is_in_onnx_export():
            y = y * 1.001
        return y


def test_mismatch_is_reported(tmp_path):
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ExportVerificationError, match=r"relative error 1\.0\d*e-03 > rtol 1\.0e-04"):
        export_onnx(ExportsDifferently(), (x,), tmp_path / "bad.onnx")
    result = export_onnx(ExportsDifferently(), (x,), tmp_path / "loose.onnx", rtol=2e-3)  # the error is 1e-3
    assert 0.9e-3 < result.max_rel_error < 1.1e-3


def test_corrupted_file_is_reported(conv_options_export, tmp_path):
    model, x, result = conv_options_export
    proto = onnx.load(result.path)
    biggest = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(biggest).copy()
    values.flat[0] += 1.0
    biggest.CopyFrom(numpy_helper.from_array(values, biggest.name))
    onnx.save(proto, tmp_path / "corrupt.onnx")
    assert verify_onnx(result.path, model, (x,))[2] <= RTOL
    with pytest.raises(ExportVerificationError, match="differs from torch at batch size 2"):
        verify_onnx(tmp_path / "corrupt.onnx", model, (x,))


def test_static_batch(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same", dilation=2), nn.ReLU())
    x = torch.randn(2, 3, 9, 9)
    result = export_onnx(model, (x,), tmp_path / "static.onnx", dynamic_batch=False)
    assert list(result.errors_by_batch) == [2]
    dim0 = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_value == 2
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        run_onnx(result.path, (torch.randn(3, 3, 9, 9),))


class PinnedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("offset", torch.randn(2, 3))

    def forward(self, x):
        return x + self.offset  # only batch size 2 broadcasts


def test_pinned_batch_is_reported(tmp_path):
    x = torch.randn(2, 3)
    with pytest.raises(ExportError, match="fixes the batch size of input 'x' to 2"):
        export_onnx(PinnedBatch(), (x,), tmp_path / "pinned.onnx")
    assert export_onnx(PinnedBatch(), (x,), tmp_path / "pinned.onnx", dynamic_batch=False).max_rel_error == 0.0


def test_ort_session_threads(conv_options_export):
    _, x, result = conv_options_export
    session = ort_session(result.path, threads=2)
    assert session.get_session_options().intra_op_num_threads == 2
    assert session.get_providers() == ["CPUExecutionProvider"]
    np.testing.assert_allclose(run_onnx(session, (x,))[0], run_onnx(result.path, x)[0], rtol=0, atol=0)


def test_relative_error():
    b = np.array([1.0, -4.0], dtype=np.float32)
    assert relative_error(b + np.float32(0.004), b) == pytest.approx(1e-3, rel=1e-3)
    assert relative_error(b[:1], b) == float("inf")
    assert relative_error(np.array([np.nan, 1.0]), np.array([0.0, 1.0])) == float("inf")


@pytest.mark.parametrize("lowering", ["always", "never"])
def test_converted_resnet18(tmp_path, lowering):
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), torch.Generator().manual_seed(0))
    x = torch.randn(1, 3, 64, 64)
    prepared = swpfx.prepare(model.eval(), (x,))
    synthetic_skeletons_(prepared, "random", threshold=0.05, seed=1)
    converted = convert(prepared, threshold=0.05, lowering=lowering)
    result = export_onnx(converted, (x,), tmp_path / f"converted_{lowering}.onnx")
    assert result.max_rel_error <= RTOL
    assert_matches(result.path, converted, (torch.randn(3, 3, 64, 64),))

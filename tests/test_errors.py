"""Clear errors on bad input (issue 7), and other dtypes end to end without silent casts."""

from __future__ import annotations


import pytest
import torch
from torch import fx, nn

import swpfx
from helpers import masked_reference, randomize_batchnorm_, relative_error
from swpfx.convert import convert

THRESHOLD = 0.05


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.gate = Gate()
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.head(self.gate(torch.relu(self.bn(self.conv(x)))))


class UntraceableForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        for _ in range(int(y.mean() > 0) + 1):  # data-dependent loop count
            y = y * 2
        return y


def small_net():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    return randomize_batchnorm_(model, torch.Generator().manual_seed(0))


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- tracing


def test_untraceable_submodule_names_it_the_line_and_the_leaf_config():
    with pytest.raises(swpfx.TracingError) as info:
        swpfx.prepare(GatedNet(), (X,))
    msg = str(info.value)
    assert "'gate'" in msg
    assert "if x.sum() > 0:" in msg and "test_errors.py" in msg  # the failing source line
    assert "config={'leaf_modules': ['gate']}" in msg
    assert isinstance(info.value, ValueError)  # catchable as a bad-input error


def test_marking_the_submodule_as_leaf_fixes_it_and_stays_exact():
    model = randomize_batchnorm_(GatedNet().eval(), torch.Generator().manual_seed(1))
    prepared = swpfx.prepare(model, (X,), config={"leaf_modules": ["gate"]}).eval()
    assert any(n.op == "call_module" and n.target == "gate" for n in prepared.graph.nodes)
    with torch.no_grad():
        swpfx.skeletons(prepared)["conv"][:3] = 0.0  # dead filters in front of the opaque leaf
        swpfx.skeletons(prepared)["conv"][3:, 0, :] = 0.01
    for lowering in ("never", "always"):
        deployed = convert(prepared, THRESHOLD, lowering=lowering)
        with torch.no_grad():
            assert relative_error(deployed(X), masked_reference(prepared)(X)) <= 1e-5


def test_untraceable_model_forward_gets_the_generic_hint():
    with pytest.raises(swpfx.TracingError, match=r"(?s)model's own forward.*leaf_modules"):
        swpfx.prepare(UntraceableForward(), (X,))


# ---------------------------------------------------------------- convert arguments


@pytest.mark.parametrize("model", [small_net(), fx.symbolic_trace(small_net())], ids=["module", "traced"])
def test_convert_on_a_model_that_was_not_prepared(model):
    with pytest.raises(ValueError, match=r"swpfx.prepare\(model, example_inputs\) first"):
        convert(model, THRESHOLD)


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("-inf"), "0.05", [0.05]])
def test_bad_thresholds(bad):
    prepared = swpfx.prepare(small_net(), (X,))
    with pytest.raises(ValueError, match=r"threshold must be a number >= 0"):
        convert(prepared, bad)
    with pytest.raises(ValueError, match="threshold"):
        swpfx.regularize_skeletons_(prepared, alpha=1e-4, threshold=bad if isinstance(bad, float) else -1.0)


def test_bad_lowering_mode():
    prepared = swpfx.prepare(small_net(), (X,))
    with pytest.raises(ValueError, match="lowering must be one of"):
        convert(prepared, THRESHOLD, lowering="sometimes")


@pytest.mark.parametrize("alpha", [-1.0, float("nan")])
def test_bad_penalty_strength(alpha):
    prepared = swpfx.prepare(small_net(), (X,))
    with pytest.raises(ValueError, match="alpha must be a non-negative number"):
        swpfx.skeleton_penalty(prepared, alpha)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_config_naming_a_conv_that_does_not_exist(key):
    with pytest.raises(ValueError, match=r"config names conv '3x'.*not in the model.*Did you mean \['3'\]") as info:
        swpfx.prepare(small_net(), (X,), config={key: ["3x"]})
    assert "insert_skeletons" in str(info.value)


def test_unknown_config_keys_and_types():
    with pytest.raises(ValueError, match="unknown config keys \\['exlcude'\\]"):
        swpfx.prepare(small_net(), (X,), config={"exlcude": ["0"]})
    with pytest.raises(TypeError, match="config must be a dict or PrepareConfig"):
        swpfx.prepare(small_net(), (X,), config=["0"])


def test_unknown_leaf_module_name_is_an_error():
    with pytest.raises(ValueError, match="gat"):
        swpfx.prepare(GatedNet(), (X,), config={"leaf_modules": ["gate", "gat"]})


def test_example_inputs_of_the_wrong_kind():
    with pytest.raises(TypeError, match="example_inputs"):
        swpfx.prepare(small_net(), {"x": X})


# ---------------------------------------------------------------- tampered skeletons


@pytest.mark.parametrize("replacement", [lambda: nn.Parameter(torch.ones(5, 3, 3)),
                                         lambda: nn.Parameter(torch.ones(8, 3)),
                                         lambda: nn.Parameter(torch.ones(8, 3, 3, 1))],
                         ids=["fewer-filters", "2d", "4d"])
def test_tampered_skeleton_shape_is_a_clear_error(replacement):
    prepared = swpfx.prepare(small_net(), (X,))
    prepared.get_submodule("0").skeleton = replacement()
    with pytest.raises(ValueError, match=r"(?s)skeleton.*'0'.*shape"):
        convert(prepared, THRESHOLD)


def test_deleted_skeleton_is_a_clear_error():
    prepared = swpfx.prepare(small_net(), (X,))
    del prepared.get_submodule("0").skeleton
    with pytest.raises(ValueError, match=r"(?s)skeleton.*'0'"):
        convert(prepared, THRESHOLD)


# ---------------------------------------------------------------- Central Filter calibration data


def _central_filter():
    from swpfx.central_filter import central_filter

    return central_filter


@pytest.mark.parametrize("batches,exc,pattern", [
    ([], ValueError, "calibration_batches is empty"),
    ([torch.zeros(0, 3, 8, 8)], ValueError, "calibration_batches is empty"),
    ([torch.randn(2, 4, 8, 8)], ValueError, "does not match the example input"),
    ([torch.randn(3, 8, 8)], ValueError, "does not match the example input"),
    (torch.randn(2, 3, 8, 8), TypeError, "not one tensor; wrap it"),
    ([["not a tensor"]], TypeError, "must be a tensor or a tuple/list"),
    (42, TypeError, "must be iterable"),
], ids=["empty", "empty-batch", "channels", "rank", "bare-tensor", "strings", "int"])
def test_central_filter_bad_calibration_data(batches, exc, pattern):
    central_filter = _central_filter()
    with pytest.raises(exc, match=pattern):
        central_filter(small_net(), batches, rate=0.25, example_inputs=(X,))


def test_central_filter_accepts_a_dataloader_style_iterable():
    central_filter = _central_filter()
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(2)]
    pruned = central_filter(small_net(), batches, rate=0.25, example_inputs=(X,))
    assert pruned.get_submodule("0").out_channels == 6


# ---------------------------------------------------------------- dtypes


def conv_bn_net():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, (3, 2), padding="same", padding_mode="reflect", groups=2), nn.BatchNorm2d(8), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()
    return randomize_batchnorm_(model, torch.Generator().manual_seed(2))


def dtypes_of(model):
    return {t.dtype for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 0.05)])
@pytest.mark.parametrize("lowering", ["never", "always"])
def test_other_dtypes_end_to_end_without_silent_casts(dtype, tol, lowering):
    model = conv_bn_net().to(dtype)
    x = X.to(dtype)
    prepared = swpfx.prepare(model, (x,)).eval()
    assert {s.dtype for s in swpfx.skeletons(prepared).values()} == {dtype}
    with torch.no_grad():
        assert prepared(x).dtype == dtype
        assert relative_error(prepared(x).double(), model(x).double()) <= tol / 10
        for name, s in swpfx.skeletons(prepared).items():
            keep = torch.rand(s.shape, generator=torch.Generator().manual_seed(3)) < 0.5
            keep[: s.shape[0] // 4] = False  # dead filters
            s.copy_(torch.where(keep, 1.0, 0.01).to(dtype))
    # convert without example inputs builds its probe from the recorded dtype
    deployed = convert(prepared, THRESHOLD, lowering=lowering)
    assert dtypes_of(deployed) == {dtype}
    with torch.no_grad():
        out = deployed(x)
        expected = masked_reference(prepared)(x)
    assert out.dtype == dtype
    assert relative_error(out.double(), expected.double()) <= tol

"""Tests for swpfx/fused_runtime_model.py: the fused graph's PyTorch latency, priced per conv.

One cost model: for random BatchNorm statistics and random masks (dead filters,
dead-channel constant maps included), the budget's estimate of a
``lowering="fused"`` conversion equals what :func:`swpfx.estimate.predict_graph`
prices on the graph ``convert`` builds, kind by kind, and its FLOPs equal
``swpfx.cost``'s (GoogLeNet, DenseNet-121, EfficientNet-B0 and ResNet-50 agree too: checked once, too slow to test). ``latency_target`` with ``lowering="fused"`` meets the target on
that prediction and stays exact.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import swpfx
from swpfx import fused_runtime_model as frm
from swpfx.estimate import ConversionEstimate, node_work, predict_graph
from swpfx.fused_runtime_model import KINDS, FusedRuntimeModel
from swpfx.kernels import stripe_conv
from swpfx.passes.form_work import form_work
from swpfx.passes.stripe_geometry import ConvGeometry
from swpfx.pipeline import convert_with_masks
from swpfx.synthetic import synthetic_skeletons_

from helpers import randomize_batchnorm_, relative_error

needs_kernel = pytest.mark.skipif(not stripe_conv.is_available(),
                                  reason=f"fused stripe kernel unavailable: {stripe_conv.unavailable_reason()}")
PRICING = FusedRuntimeModel(lanes=16, register_block=14, tile_vectors=2)  # what an AVX-512 build reports


def test_priced_counts_lanes_blocks_weights_and_stride():
    g = ConvGeometry.of(nn.Conv2d(200, 64, 3, stride=2, padding=1), (1, 200, 14, 14))  # 7×7 output
    mask = torch.zeros(64, 3, 3, dtype=torch.bool)
    mask[:, 1, 1] = True
    mask[:20, 0, 0] = True
    work = form_work(g, mask, "fused", residual=True)
    assert work["fused_macs"] == 200 * (64 + 20) * 49 and work["fused_out_elems"] == 2 * 64 * 49
    priced = PRICING.priced(work)
    assert priced["lane_macs"] == priced["strided_lane_macs"] == 200 * (64 + 20) * 64  # 49 pixels in 4 vectors
    # taps of 64 and 20 filters: 5 + 2 register blocks of 14, 2 tiles of 2 vectors, 2 chunks of <= 128 channels
    assert priced["kernel_blocks"] == (5 + 2) * 2 * 2
    assert priced["weight_floats"] == 200 * 84 and "fused_macs" not in priced and "taps" not in priced
    unstrided = form_work(ConvGeometry.of(nn.Conv2d(200, 64, 3, padding=1), (1, 200, 7, 7)), mask, "fused")
    assert "strided_lane_macs" not in PRICING.priced(unstrided)


def test_pools_and_other_ops_are_priced_by_what_they_read():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.MaxPool2d(3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)))
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(torch.randn(2, 4, 8, 8))
    pool, relu, avg = (n for n in gm.graph.nodes if n.op == "call_module")
    assert node_work(pool) == {"graph_elems": 2 * 4 * 16, "graph_ops": 1, "reads": 2 * 4 * 16 * 9, "pool": True}
    assert PRICING.priced(node_work(pool)) == {"graph_elems": 128, "pool_ops": 1, "pool_reads": 1152}
    assert PRICING.priced(node_work(relu)) == {"graph_elems": 128, "graph_ops": 1, "graph_reads": 128}
    assert node_work(avg)["reads"] == 2 * 4 * 16  # an adaptive pool's window: input over output
    model = FusedRuntimeModel(coefficients={k: 1.0 for k in KINDS}, lanes=16, register_block=14, tile_vectors=2)
    assert model.predict({"pool_ops": 1, "pool_reads": 10, "runs": 1}, batch=4) == 1 + 40 + 1  # per call, per sample


def _prepared(name: str, protocol: str, size: int = 64):
    g = torch.Generator().manual_seed(3)
    model = randomize_batchnorm_(getattr(torchvision.models, name)(num_classes=10), g).eval()
    x = torch.randn(1, 3, size, size, generator=g)
    prepared = swpfx.prepare(model, (x,))
    masks = synthetic_skeletons_(prepared, protocol=protocol, seed=5)
    return prepared, x, masks


@pytest.mark.parametrize("name, protocol", [("resnet18", "random"), ("resnet18", "structured"),
                                            ("mobilenet_v2", "random"), ("vgg11_bn", "random"),
                                            ("regnet_x_400mf", "random")])
def test_estimate_equals_the_built_fused_graph_kind_by_kind(name, protocol):
    prepared, x, masks = _prepared(name, protocol)
    built, _ = convert_with_masks(prepared, masks, "fused", (x,), 1, PRICING.choose_form)
    built.graph.lint()
    if name in ("resnet18", "regnet_x_400mf"):  # dead-channel constant maps: the kernel takes their sum as its
        # residual (ResNet), or a grouped conv the kernel leaves adds it on its own (RegNet)
        assert any(n.name.endswith("_dead_channels") for n in built.graph.nodes)
    estimator = ConversionEstimate(prepared, (x,), "fused", 1, PRICING)
    for kind in KINDS:  # one kind priced at a time (the form choice does not depend on the prices)
        estimator.runtime_model = FusedRuntimeModel(coefficients={k: float(k == kind) for k in KINDS}, lanes=16,
                                                    register_block=14, tile_vectors=2)
        unit = estimator.runtime_model
        estimate = estimator.estimate(masks)
        assert estimate.seconds == pytest.approx(predict_graph(built, unit), rel=1e-12, abs=1e-9), kind
    assert estimate.flops == swpfx.cost(built, (x,)).flops


class _NoBatchNorm(nn.Module):
    """Convs with biases and ReLUs, no BatchNorm: a dead filter's bias, through the ReLU and zero padding, needs a
    ones-map conv, whose sum the next fused conv takes as its residual, with the ReLU after it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_estimate_equals_the_built_fused_graph_without_batchnorm():
    g = torch.Generator().manual_seed(0)
    net = _NoBatchNorm().eval()
    with torch.no_grad():
        for conv in (net.a, net.b, net.c):
            conv.bias.uniform_(0.2, 1.0, generator=g)
    x = torch.randn(1, 3, 12, 12, generator=g)
    prepared = swpfx.prepare(net, (x,))
    masks = {n: torch.rand(s.shape, generator=g) > 0.4 for n, s in swpfx.skeletons(prepared).items()}
    masks["a"][:6] = False
    built, _ = convert_with_masks(prepared, masks, "fused", (x,), 1, PRICING.choose_form)
    assert any(n.name.endswith("_dead_channels") for n in built.graph.nodes)
    estimator = ConversionEstimate(prepared, (x,), "fused", 1, PRICING)
    for kind in KINDS:
        estimator.runtime_model = unit = FusedRuntimeModel(coefficients={k: float(k == kind) for k in KINDS},
                                                           lanes=16, register_block=14, tile_vectors=2)
        assert estimator.estimate(masks).seconds == pytest.approx(predict_graph(built, unit), rel=1e-12,
                                                                  abs=1e-9), kind


@needs_kernel
def test_latency_target_fused_meets_its_prediction_and_stays_exact():
    from swpfx.budget import masks_for_latency_target

    prepared, x, _ = _prepared("resnet18", "random")
    deployed = swpfx.convert(prepared, latency_target=0.6, lowering="fused", runtime_model=PRICING)
    cut = deployed.meta["swpfx"]["cut"]
    assert cut["latency_ratio"] <= 0.6 and cut["runtime_model"] == "shipped default"
    assert predict_graph(deployed, PRICING) == pytest.approx(cut["predicted_ms"] / 1e3, rel=1e-9)
    assert {d["form"].split()[0] for d in cut["decisions"]} == {"fused"}
    assert "fused" in swpfx.cut_table(deployed)
    # the budget's masks, converted with the kernel and without: the same function
    masks, again = masks_for_latency_target(prepared, 0.6, "fused", (x,), PRICING, channel_multiple=1)
    assert again["latency_ratio"] == cut["latency_ratio"]
    reference, _ = convert_with_masks(prepared, masks, "never", (x,))
    fused, _ = convert_with_masks(prepared, masks, "fused", (x,), 1, PRICING.choose_form)
    xb = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative_error(fused(xb), reference(xb)) <= 1e-4
        assert relative_error(deployed(xb), reference(xb)) <= 1e-4


def test_latency_target_fused_checks_its_target():
    prepared, _, _ = _prepared("resnet18", "random", size=32)
    with pytest.raises(ValueError, match="latency_target must be a fraction"):
        swpfx.convert(prepared, latency_target=1.5, lowering="fused", runtime_model=PRICING)


@needs_kernel
def test_calibrate_fits_every_kind_and_caches(tmp_path, capsys):
    path = tmp_path / "fused.json"
    model = frm.calibrate(cache=path, shapes=[(16, 16, 3, 1, 1, 14), (16, 32, 3, 2, 1, 14)], rounds=2,
                          progress=False, graphs=())
    assert set(model.coefficients) == set(KINDS) and all(v >= 0 for v in model.coefficients.values())
    assert model.source == str(path) and path.exists()
    loaded = frm.default_fused_runtime_model(cache=path)
    assert loaded.coefficients == model.coefficients and loaded.lanes == model.lanes
    info = stripe_conv.kernel_info()
    assert (loaded.lanes, loaded.register_block) == (info["vector_width"], info["default_f"])


def test_missing_calibration_is_measured_on_request_and_announced(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_calibrate(cache, progress=True):
        calls.append(cache)
        return FusedRuntimeModel(source=str(cache))

    monkeypatch.setattr(frm, "calibrate", fake_calibrate)
    path = tmp_path / "missing.json"
    assert frm.default_fused_runtime_model(cache=path).source == "shipped default" and not calls
    assert frm.default_fused_runtime_model(cache=path, calibrate_if_missing=True).source == str(path)
    assert calls == [path] and "calibrating the kernel in PyTorch now" in capsys.readouterr().err


@needs_kernel
def test_budget_pruner_aims_at_the_fused_budget_by_default(monkeypatch):
    prepared, x, _ = _prepared("resnet18", "random", size=32)
    asked = []

    def fake_default(calibrate_if_missing=False, **kwargs):
        asked.append(calibrate_if_missing)
        return PRICING

    monkeypatch.setattr(frm, "default_fused_runtime_model", fake_default)
    pruner = swpfx.BudgetPruner(prepared, latency_target=0.7, lowering="fused", example_inputs=(x,), updates=1)
    pruner.step(progress=1.0)
    assert asked == [True] and pruner.channel_multiple == 1
    assert pruner.report["latency_ratio"] <= 0.7 and pruner.report["runtime_model"] == "shipped default"

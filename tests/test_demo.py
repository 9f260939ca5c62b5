"""The demo end to end in its quick mode (CI), and the demo's building blocks."""

from __future__ import annotations

import json
import math

import pytest
import torch

from swpfx import demo

REQUIRED = ("accuracy_dense", "accuracy_pruned", "flops_dense", "flops_pruned", "ort_ms_dense", "ort_ms_pruned",
            "onnx_max_rel_err")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    metrics = demo.run_demo(out, quick=True, progress=False, threads=1, log=lambda *a: None)
    return out, metrics


def test_quick_demo_writes_its_files(quick_run):
    out, _ = quick_run
    for name in ("dense.onnx", "pruned.onnx", "metrics.json", "stripes.png", "flops_per_layer.png"):
        assert (out / name).stat().st_size > 0, name


def test_quick_demo_metrics_are_sane(quick_run):
    out, returned = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in REQUIRED:
        assert isinstance(metrics[key], (int, float)) and math.isfinite(metrics[key]), key
        assert metrics[key] == pytest.approx(returned[key])
    assert 0 <= metrics["accuracy_dense"] <= 1 and 0 <= metrics["accuracy_pruned"] <= 1
    assert 0 < metrics["flops_pruned"] <= metrics["flops_target"] * metrics["flops_dense"]
    assert metrics["params_pruned"] < metrics["params_dense"]
    assert metrics["onnx_max_rel_err"] <= 1e-4
    assert metrics["ort_ms_dense"] > 0 and metrics["ort_ms_pruned"] > 0
    assert metrics["ort_batch"] == 64
    assert metrics["flop_ratio"] == pytest.approx(metrics["flops_dense"] / metrics["flops_pruned"])
    assert metrics["quick"] is True


def test_demo_cnn_runs_and_has_no_batchnorm():
    model = demo.demo_cnn()
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == list(demo.WIDTHS)


def test_round_kept_filters_counts_are_multiples_and_follow_scores():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(40, 3, 3, generator=g) > 0.5
    mask[:13] = False  # 27 alive -> rounded to 32 (nearest multiple of 16)
    scores = torch.rand(40, generator=g)
    rounded = demo.round_kept_filters({"c": mask}, {"c": scores}, 16)["c"]
    alive = rounded.flatten(1).any(1)
    assert int(alive.sum()) == 32
    # the 32 best-scoring filters are the kept ones
    assert set(alive.nonzero().flatten().tolist()) == set(torch.argsort(scores, descending=True)[:32].tolist())
    # a filter that stays keeps exactly its stripes; a revived one keeps all
    for f in alive.nonzero().flatten().tolist():
        expected = mask[f] if mask[f].any() else torch.ones(3, 3, dtype=torch.bool)
        assert torch.equal(rounded[f], expected)
    # a conv no wider than the multiple keeps every filter
    small = torch.zeros(8, 3, 3, dtype=torch.bool)
    small[0, 1, 1] = True
    assert bool(demo.round_kept_filters({"s": small}, {"s": torch.rand(8)}, 16)["s"].flatten(1).any(1).all())


def test_with_masks_converts_to_exactly_the_masked_model():
    import swpfx
    from swpfx.convert import convert

    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    prepared = swpfx.prepare(demo.demo_cnn(), (x[:1],))
    g = torch.Generator().manual_seed(1)
    masks = {}
    with torch.no_grad():
        for name, skel in swpfx.skeletons(prepared).items():
            skel.copy_(torch.rand(skel.shape, generator=g) * 2 - 0.5)  # some negative, some zero-ish
            skel[:2] = 0.0  # two filters whose skeleton died in training
            masks[name] = torch.rand(skel.shape, generator=g) > 0.4
            masks[name][2:4] = False  # two filters pruned by the mask
    reference = demo.with_masks(prepared, masks)
    for name, skel in swpfx.skeletons(prepared).items():
        weight = prepared.get_submodule(name).weight
        # kept stripes compute W·I (W alone where the skeleton had died), pruned ones nothing
        expected_weight = weight * torch.where(skel != 0, skel, torch.ones_like(skel))[:, None]
        expected_weight = expected_weight * masks[name][:, None]
        new_weight = reference.get_submodule(name).weight * swpfx.skeletons(reference)[name][:, None]
        assert torch.allclose(new_weight, expected_weight, rtol=0, atol=1e-6)
    assert torch.equal(swpfx.skeletons(prepared)["features.conv1"][:2], torch.zeros(2, 3, 3))  # caller untouched
    deployed = convert(reference, threshold=0.5, lowering="never", example_inputs=(x[:1],), channel_multiple=1)
    with torch.no_grad():
        expected, actual = reference(x), deployed(x)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5)
    assert deployed.get_submodule("features.conv2").out_channels == int(masks["features.conv2"].flatten(1).any(1).sum())

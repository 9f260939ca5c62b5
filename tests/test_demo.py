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
    assert 0 < metrics["flops_pruned"] <= metrics["flops_dense"]
    # the gradual rule reached its target, and effective FLOPs count exactly the kept stripes
    assert metrics["pruned_stripe_fraction"] == pytest.approx(metrics["sparsity_target"], abs=1e-3)
    assert metrics["kept_stripes"] + metrics["total_stripes"] * metrics["pruned_stripe_fraction"] == pytest.approx(
        metrics["total_stripes"])
    assert metrics["flops_effective_pruned"] < metrics["flops_effective_dense"]
    assert metrics["flops_effective_pruned"] <= metrics["flops_pruned"]
    assert 0 <= metrics["stripes_pruned_in_surviving_filters"] <= metrics["total_stripes"] - metrics["kept_stripes"]
    # conversion is exact: the converted net scores what the trained prepared net scored
    assert metrics["accuracy_converted_before_finetune"] == pytest.approx(metrics["accuracy_trained"], abs=2e-3)
    assert metrics["params_pruned"] <= metrics["params_dense"]
    assert metrics["onnx_max_rel_err"] <= 1e-4
    assert metrics["ort_ms_dense"] > 0 and metrics["ort_ms_pruned"] > 0
    assert metrics["ort_batch"] == 64
    assert metrics["flop_ratio"] == pytest.approx(metrics["flops_dense"] / metrics["flops_pruned"])
    assert metrics["quick"] is True


@pytest.mark.parametrize("batchnorm", [True, False])
def test_demo_cnn_runs_with_and_without_batchnorm(batchnorm):
    model = demo.demo_cnn(batchnorm=batchnorm)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == (len(demo.WIDTHS) if batchnorm else 0)
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)] == list(demo.WIDTHS)

"""Smoke run of benchmarks/accuracy_latency.py --quick: one seed, one target, a tiny budget, two methods."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ≈ 75 s on this 2-core machine (exports and tracing dominate)
def test_accuracy_latency_quick(tmp_path):
    out = tmp_path / "accuracy_latency"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "accuracy_latency.py"), "--quick", "--nets", "demo_nobn",
           "--methods", "swpfx-latency", "tp-round", "--jobs", "1", "--shipped-runtime-model",
           "--out", str(out), "--workdir", str(tmp_path / "onnx")]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True, text=True)
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    methods = {r["method"] for r in runs}
    assert methods == {"dense", "swpfx-latency", "tp-round"}
    for r in runs:
        if r["method"] != "dense":
            assert r["ratio_batch"] > 0 and r["ratio_b1"] > 0 and 0 < r["flops_ratio"] <= 1
            assert 0 <= r["accuracy_before"] <= 1 and 0 <= r["accuracy_after"] <= 1
    swpfx_row = next(r for r in runs if r["method"] == "swpfx-latency")
    assert swpfx_row["predicted_ratio"] <= swpfx_row["aimed_target"] + 1e-9  # latency_target meets its prediction
    aims = swpfx_row["aims"]  # --jobs 1: the pruner measured at construction and at its last update
    assert [a["update"] for a in aims] == [0, 10] and aims[0]["rounds"][0]["predicted_target"] == 0.5
    assert all(1 <= len(a["rounds"]) <= 2 for a in aims)  # --quick measures up to 2 rounds
    assert swpfx_row["aimed_target"] == aims[-1]["target"]
    assert "| 0.5 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0

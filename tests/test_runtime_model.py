"""swpfx/runtime_model.py: calibration on this machine, its cache, and the NCHWc block (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch

import swpfx.runtime_model as rm
from swpfx.cli import main
from swpfx.passes.form_work import WORK_KINDS


def test_channel_block_follows_the_vector_isa():
    assert rm.channel_block({"avx512f", "avx2"}) == 16
    assert rm.channel_block({"avx2", "fma"}) == 8
    assert rm.channel_block({"neon"}) == 1
    assert rm.channel_block() in (1, 8, 16)


def test_cache_path_names_cpu_and_onnxruntime_version(tmp_path):
    import onnxruntime

    path = rm.cache_path(tmp_path)
    assert path.parent == tmp_path and path.suffix == ".json"
    assert onnxruntime.__version__.replace(".", "-") in path.name
    assert f"nchwc{rm.channel_block()}" in path.name


def test_calibrate_fits_every_kind_from_exported_graphs_and_caches(tmp_path):
    path = tmp_path / "rm.json"
    model = rm.calibrate(cache=path, shapes=[(16, 16, 3, 1, 1, 8)], rounds=2, progress=False)
    assert set(model.coefficients) == set(WORK_KINDS)
    assert all(c >= 0 for c in model.coefficients.values()) and model.coefficients["conv_macs"] > 0
    saved = json.loads(path.read_text())
    assert saved["machine"] == rm.machine_key()
    loaded = rm.default_runtime_model(path)
    assert loaded.coefficients == pytest.approx(model.coefficients) and loaded.machine == rm.machine_key()


def test_missing_calibration_is_measured_on_request_and_announced(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_calibrate(cache, progress=True):
        calls.append(cache)
        return rm.RuntimeModel(source=str(cache))

    monkeypatch.setattr(rm, "calibrate", fake_calibrate)
    missing = tmp_path / "none.json"
    assert rm.default_runtime_model(missing).source == "shipped default" and not calls
    assert rm.default_runtime_model(missing, calibrate_if_missing=True).source == str(missing)
    assert calls == [missing] and "calibrating ONNX Runtime now" in capsys.readouterr().err


def test_cli_calibrate_writes_the_file_it_names(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_calibrate(cache, shapes, rounds, threads, progress):
        seen.update(cache=cache, shapes=shapes, rounds=rounds, threads=threads)
        return rm.RuntimeModel()

    monkeypatch.setattr(rm, "calibrate", fake_calibrate)
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--out", str(out), "--rounds", "3", "--quick", "--no-progress"]) == 0
    assert seen["cache"] == str(out) and seen["rounds"] == 3 and len(seen["shapes"]) < len(rm.CALIBRATION_SHAPES)
    printed = capsys.readouterr().out
    assert "conv_macs" in printed and str(out) in printed


def test_latency_target_uses_the_given_runtime_model_without_calibrating(monkeypatch):
    import swpfx

    monkeypatch.setattr(rm, "calibrate", lambda *a, **k: pytest.fail("must not calibrate"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    deployed = swpfx.convert(swpfx.prepare(model, (x,)), latency_target=0.8, runtime_model=rm.RuntimeModel())
    assert deployed.meta["swpfx"]["cut"]["runtime_model"] == "shipped default"

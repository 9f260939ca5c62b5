"""swpfx/runtime_model.py: calibration on this machine, its cache, and the NCHWc block (no timing asserted)."""

from __future__ import annotations

import json

import pytest
import torch

import swpfx.runtime_model as rm
from swpfx.cli import main
from swpfx.runtime_model import WORK_KINDS


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
    # 24² inputs: 1-2 M MACs per conv (tens of µs), above a session run's 5-25 µs, so the fit can see the convs
    # (at 8² a noisy run fitted conv_macs to 0)
    model = rm.calibrate(cache=path, shapes=[(16, 16, 3, 1, 1, 24)], rounds=2, progress=False,
                         dense_shapes=[(12, 20, 3, 1, 1, 24), (20, 20, 3, 1, 1, 24)],
                         elementwise=[(8, 8, 1), (8, 8, 4)])
    assert set(model.coefficients) == set(WORK_KINDS)
    assert all(c >= 0 for c in model.coefficients.values()) and model.coefficients["conv_macs"] > 0
    saved = json.loads(path.read_text())
    assert saved["machine"] == rm.machine_key()
    loaded = rm.default_runtime_model(path)
    assert loaded.coefficients == pytest.approx(model.coefficients) and loaded.machine == rm.machine_key()


def test_graph_ops_and_the_run_have_their_own_kinds_counted_once_per_run():
    """A residual add or reshape is priced as ``graph_ops``/``graph_elems`` (a few µs), not as a lowered form's extra
    ``ops``; per-op and per-run costs do not grow with the batch, the elements do; a graph pays one run."""
    from torch import fx, nn

    from swpfx.estimate import node_work, predict_graph

    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Flatten()))
    x = torch.randn(2, 3, 4, 4)
    torch.fx.passes.shape_prop.ShapeProp(gm).propagate(x)
    relu = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert node_work(relu) == {"graph_elems": 2 * 3 * 4 * 4, "graph_ops": 1, "reads": 2 * 3 * 4 * 4}
    zero = {k: 0.0 for k in WORK_KINDS}
    model = rm.RuntimeModel(coefficients={**zero, "graph_ops": 1.0, "graph_elems": 1e-3, "runs": 10.0}, block=16)
    assert model.predict({"graph_ops": 1, "graph_elems": 100, "runs": 1}, batch=8) == pytest.approx(1 + 0.8 + 10)
    assert predict_graph(gm, model) == pytest.approx(10 + 2 * 1 + 2 * 0.096)  # one run, two ops, 96 elements each


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

    def fake_calibrate(cache, shapes, rounds, threads, progress, dense_shapes, elementwise):
        seen.update(cache=cache, shapes=shapes, rounds=rounds, threads=threads, dense_shapes=dense_shapes,
                    elementwise=elementwise)
        return rm.RuntimeModel()

    monkeypatch.setattr(rm, "calibrate", fake_calibrate)
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--out", str(out), "--rounds", "3", "--quick", "--no-progress"]) == 0
    assert seen["cache"] == str(out) and seen["rounds"] == 3 and len(seen["shapes"]) < len(rm.CALIBRATION_SHAPES)
    assert len(seen["dense_shapes"]) < len(rm.DENSE_CALIBRATION_SHAPES)
    assert 0 < len(seen["elementwise"]) < len(rm.ELEMENTWISE_CALIBRATION)
    printed = capsys.readouterr().out
    assert "conv_macs" in printed and str(out) in printed


def test_latency_target_uses_the_given_runtime_model_without_calibrating(monkeypatch):
    import swpfx

    monkeypatch.setattr(rm, "calibrate", lambda *a, **k: pytest.fail("must not calibrate"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 32, 3, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    # 1.0: on this two-conv chain every faster cut empties filters of a conv on every path (the output's own)
    deployed = swpfx.convert(swpfx.prepare(model, (x,)), latency_target=1.0, runtime_model=rm.RuntimeModel())
    assert deployed.meta["swpfx"]["cut"]["runtime_model"] == "shipped default"


def test_convs_off_the_nchwc_path_are_priced_as_nchw_macs_and_padded_outputs_as_computed():
    from torch import nn

    from swpfx.passes.form_work import dense_work
    from swpfx.passes.stripe_geometry import ConvGeometry

    def model(multiple):
        coefficients = {**rm.DEFAULT_COEFFICIENTS, "conv_macs": 1e-11, "nchw_macs": 3e-11, "ops": 0}
        return rm.RuntimeModel(coefficients=coefficients, block=16, nchwc_multiple=multiple)

    def work(c_in, c_out):
        return dense_work(ConvGeometry.of(nn.Conv2d(c_in, c_out, 3, padding=1), (1, c_in, 14, 14)))

    aligned, unaligned, stem = work(32, 32), work(26, 26), work(3, 26)  # stem: < one block, NCHWc
    for multiple in (16, 4, 2):  # old ORT (block multiples only), ORT 1.32 (pads multiples of 4), a finer one
        assert model(multiple).priced(stem)["conv_macs"] == pytest.approx(stem["conv_macs"] * 32 / 26)
    for multiple in (16, 4):
        assert model(multiple).priced(unaligned) == {"nchw_macs": unaligned["conv_macs"], "ops": 1}
        assert model(multiple).predict(unaligned) > model(multiple).predict(aligned)  # fewer MACs, slower path
    padded = model(2).priced(unaligned)  # blocked, both channel counts padded to 32
    assert padded["conv_macs"] == pytest.approx(unaligned["conv_macs"] * (32 / 26) ** 2)
    assert padded["input_loads"] == pytest.approx(rm.input_loads(unaligned["gemms"], 16) * 32 / 26)
    assert model(4).priced(work(24, 24))["conv_macs"] == pytest.approx(work(24, 24)["conv_macs"] * (32 / 24) ** 2)
    assert model(16).priced(work(24, 24)) == {"nchw_macs": work(24, 24)["conv_macs"], "ops": 1}
    assert rm.RuntimeModel(block=1).priced(unaligned) == {"conv_macs": unaligned["conv_macs"], "ops": 1}


@pytest.mark.skipif(rm.channel_block() <= 1, reason="ORT has no NCHWc path on a CPU without AVX2")
def test_the_nchwc_rule_is_what_this_onnx_runtime_does():
    """runs_nchwc with the detected channel multiple agrees with ORT's optimiser on ungrouped, depthwise and grouped
    convs, aligned and not (ORT 1.32 pads input channels that are multiples of 4; older versions did not)."""
    block, multiple = rm.channel_block(), rm.nchwc_channel_multiple()
    assert multiple in (1, 2, 4, 8, 16) and multiple <= block
    half = block // 2
    shapes = [(block, block, 1), (block + 4, block + 4, 1), (block + 3, 2 * block, 1), (3, block + 4, 1),
              (half, block, 1), (3 * block, block + 1, 1), (block + 4, block + 4, block + 4),
              (block + 2, block + 2, block + 2), (2 * block, 2 * block, 2), (3 * half, 3 * half, 2),
              (4 * block, 4 * block, 4)]
    for c_in, c_out, groups in shapes:
        assert rm.runs_nchwc(c_in, c_out, groups, block, multiple) == rm._ort_blocks_conv(c_in, c_out, groups), \
            (c_in, c_out, groups, multiple)


def test_a_calibration_made_under_another_nchwc_rule_is_stale(tmp_path):
    model = rm.RuntimeModel(block=16, nchwc_multiple=4)
    model.save(tmp_path / "now.json")
    assert rm.RuntimeModel.load(tmp_path / "now.json").nchwc_multiple == 4
    data = json.loads((tmp_path / "now.json").read_text())
    del data["nchwc_multiple"]  # written before the rule was recorded
    (tmp_path / "before.json").write_text(json.dumps(data))
    assert not rm.is_current(tmp_path / "before.json")
    assert rm.is_current(tmp_path / "now.json") == (rm.nchwc_channel_multiple(16) == 4)


def test_every_gemm_of_a_form_is_recorded_and_few_filters_load_more_per_mac(generator):
    from swpfx.masks import random_stripe_mask
    from swpfx.passes.form_work import candidate_work
    from swpfx.passes.stripe_geometry import ConvGeometry, supported_forms

    geometry = ConvGeometry.of(torch.nn.Conv2d(32, 48, 3, padding=1), (1, 32, 12, 12))
    mask = random_stripe_mask(48, 3, 3, generator=generator)
    for key, work in candidate_work(geometry, mask, supported_forms(geometry), align=16).items():
        assert sum(macs for _, macs in work["gemms"]) == work["conv_macs"], key
    model = rm.RuntimeModel(block=16)

    def loads_per_mac(filters):
        work = rm.form_work(ConvGeometry.of(torch.nn.Conv2d(64, filters, 3, padding=1), (1, 64, 14, 14)), None, "dense")
        return model.priced(work)["input_loads"] / work["conv_macs"]

    assert loads_per_mac(16) == pytest.approx(4 * loads_per_mac(64))
    assert loads_per_mac(32) == pytest.approx(2 * loads_per_mac(64)) == pytest.approx(2 * loads_per_mac(128))


def test_a_calibration_that_lacks_a_work_kind_is_refitted_on_request(tmp_path, monkeypatch, capsys):
    old = tmp_path / "old.json"
    rm.RuntimeModel(coefficients={k: 1e-10 for k in WORK_KINDS if k != "input_loads"}).save(old)
    assert not rm.is_current(old)
    loaded = rm.default_runtime_model(old)  # used as it is, the missing kind at its shipped price
    assert loaded.source == str(old) and loaded.coefficients["input_loads"] == rm.DEFAULT_COEFFICIENTS["input_loads"]
    monkeypatch.setattr(rm, "calibrate", lambda cache, progress=True: rm.RuntimeModel(source="refitted"))
    assert rm.default_runtime_model(old, calibrate_if_missing=True).source == "refitted"
    assert "predates" in capsys.readouterr().err

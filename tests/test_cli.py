"""The ``swpfx`` command line: success paths and usage errors with their exit codes."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import textwrap

import pytest

from swpfx.cli import main, parse_shape
from swpfx.kernels import stripe_conv

DEMO_NET = "swpfx.demo:demo_cnn"


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_python_m_swpfx_help():
    result = subprocess.run([sys.executable, "-m", "swpfx", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("demo", "cost", "bench"):
        assert command in result.stdout
    assert "Exit codes" in result.stdout


@pytest.mark.parametrize("command", ["demo", "cost", "bench"])
def test_subcommand_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"usage: swpfx {command}" in out


def test_parse_shape():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape(" 2, 1 ,28,28") == (2, 1, 28, 28)
    for bad in ("1,3,a", "1,0,2", "", "1,-3"):
        with pytest.raises(Exception):
            parse_shape(bad)


def test_cost_factory_spec(capsys):
    code, out, err = run(capsys, "cost", DEMO_NET, "--input", "1,1,28,28")
    assert code == 0, err
    assert "TOTAL" in out
    for layer in ("features_conv1", "features_conv4", "classifier"):
        assert layer in out
    # 16·9·784 + 32·16·9·196 + 64·32·9·196 + 64·64·9·49 + 64·10 multiply-accumulates
    assert "MACs 6.44 M" in out


def test_cost_torchvision_model(capsys):
    code, out, err = run(capsys, "cost", "resnet18", "--input", "1,3,32,32", "--top", "3")
    assert code == 0, err
    assert "showing the 3 most expensive" in out


def test_bench_success(capsys, tmp_path):
    code, out, err = run(capsys, "bench", DEMO_NET, "--input", "1,28,28", "--batch", "4", "--protocol",
                         "structured", "--repeats", "3", "--lowering", "always", "--keep", str(tmp_path))
    assert code == 0, err
    assert "ORT speed-up" in out
    executed, effective = (float(v) for v in re.search(r"FLOP ratio executed ([\d.]+)×.*effective ([\d.]+)×", out).groups())
    assert effective > executed > 1  # structured masks: lowering saves less than the kept stripes do
    assert len(re.findall(r"realised fraction [\d.]+", out)) == 2
    # the demo net has 4 convs; a lowered conv's many nodes count once
    decisions = ast.literal_eval(re.search(r"per-conv decisions: (\{.*?\})", out).group(1))
    assert sum(decisions.values()) == 4 and "(4 convs)" in out
    assert set(decisions) - {"dense"}  # lowering="always" lowered at least one
    assert (tmp_path / "dense.onnx").exists() and (tmp_path / "pruned.onnx").exists()


@pytest.mark.skipif(not stripe_conv.is_available(), reason="fused stripe kernel unavailable: "
                    f"{stripe_conv.unavailable_reason()}")
def test_bench_fused_times_the_pytorch_model_against_ort_dense(capsys):
    code, out, err = run(capsys, "bench", DEMO_NET, "--input", "1,28,28", "--batch", "2", "--protocol",
                         "random", "--repeats", "5", "--lowering", "fused")
    assert code == 0, err
    assert "converted: PyTorch with the fused kernel" in out and "speed-up over ORT dense" in out
    decisions = ast.literal_eval(re.search(r"per-conv decisions: (\{.*?\})", out).group(1))
    assert decisions == {"fused": 4}  # the demo net's 4 convs, each one kernel call
    dense_ms, fused_ms = (float(v) for v in re.findall(r"^\| (?:dense|converted) \|.*\| ([\d.]+) \|$", out, re.M))
    assert dense_ms > 0 and fused_ms > 0


def test_bench_profile_prints_ort_time_per_op_type(capsys):
    code, out, err = run(capsys, "bench", DEMO_NET, "--input", "1,28,28", "--batch", "2", "--protocol",
                         "structured", "--repeats", "3", "--lowering", "always", "--profile")
    assert code == 0, err
    table = out[out.index("ORT time per op type"):].splitlines()
    assert table[2] == "| op type | dense | converted |"
    rows = {line.split(" | ")[0].strip("| "): line for line in table[4:]}
    dense_convs = int(re.search(r"\| [\d.]+ \((\d+)\) \|", rows["Conv"]).group(1))
    assert dense_convs == 4 and "Concat" in rows  # the dense net's 4 convs; a lowered conv concatenates its parts
    assert "total" in rows


@pytest.mark.parametrize("argv, needle", [
    (["cost", "no_such_model"], "unknown model 'no_such_model'"),
    (["cost", "resnet"], "did you mean"),
    (["cost", "no_such_package_xyz.models:net"], "cannot import module"),
    (["cost", "swpfx.demo:no_such_factory"], "has no callable"),
    (["cost", DEMO_NET, "--input", "1,3,28,28"], "cannot run on an input of shape 1,3,28,28"),
    (["bench", DEMO_NET, "--input", "1,2,3,28,28"], "3 (C,H,W) or 4 (N,C,H,W)"),
    (["bench", DEMO_NET, "--input", "1,28,28", "--lowering", "fused", "--profile"], "takes no --profile"),
])
def test_usage_errors_exit_2_without_traceback(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["cost", "resnet18", "--input", "1,3,a"],
    ["cost", "resnet18", "--input", "1,0,32,32"],
    ["bench", "resnet18", "--protocol", "diagonal"],
    ["bench", "resnet18", "--lowering", "sometimes"],
    ["bench", "resnet18", "--threshold", "-1"],
    ["demo", "--epochs", "0"],
    ["demo", "--sparsity", "1.5"],
    ["demo", "--sparsity", "1"],
    ["frobnicate"],
    [],
])
def test_argparse_errors_exit_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "usage:" in err


def test_runtime_failure_exits_1(capsys, tmp_path, monkeypatch):
    (tmp_path / "broken_models_for_cli.py").write_text(textwrap.dedent("""
        def net():
            raise RuntimeError("weights file is corrupt")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = run(capsys, "cost", "broken_models_for_cli:net")
    assert code == 1
    assert "weights file is corrupt" in err and "Traceback" not in err


def test_bench_latency_target_reports_torch_pruning_at_the_same_predicted_latency(capsys, monkeypatch):
    import swpfx.runtime_model as rm

    monkeypatch.setattr(rm, "default_runtime_model", lambda *a, **k: rm.RuntimeModel())  # no calibration in tests
    code, out, err = run(capsys, "bench", DEMO_NET, "--input", "1,28,28", "--batch", "4", "--repeats", "3",
                         "--latency-target", "0.6")
    assert code == 0, err
    predicted = float(re.search(r"predicted latency ratio ([\d.]+)", out).group(1))
    assert predicted <= 0.6
    peer = re.search(r"Torch-Pruning \(group L2 magnitude, round_to=(\d+)\) at pruning ratio ([\d.]+), "
                     r"predicted ([\d.]+) of dense.*measured ([\d.]+) of dense.*realised fraction ([\d.]+)", out)
    assert peer is not None, out
    assert int(peer.group(1)) == rm.channel_block() and float(peer.group(3)) <= predicted + 1e-9


def test_bench_measure_reports_each_conversion_round(capsys, monkeypatch):
    import swpfx.runtime_model as rm

    monkeypatch.setattr(rm, "default_runtime_model", lambda *a, **k: rm.RuntimeModel())  # no calibration in tests
    converted = []  # the rounds themselves, unrounded: the printed ones have 3 decimals
    convert_module = importlib.import_module("swpfx.convert")  # bench imports convert from it when called
    real_convert = convert_module.convert
    monkeypatch.setattr(convert_module, "convert",
                        lambda *a, **k: converted.append(real_convert(*a, **k)) or converted[-1])
    code, out, err = run(capsys, "bench", DEMO_NET, "--input", "1,28,28", "--batch", "4", "--repeats", "3",
                         "--latency-target", "0.6", "--measure", "2")
    assert code == 0, err
    rounds = re.search(r"\(convert measure=2: predicted -> measured per round((?:, [\d.]+ -> [\d.]+)+)\)", out)
    assert rounds is not None, out
    measured = converted[0].meta["swpfx"]["cut"]["measured"]
    printed = re.findall(r"([\d.]+) -> ([\d.]+)", rounds.group(1))
    assert printed == [(f"{r['predicted']:.3f}", f"{r['measured']:.3f}") for r in measured]
    assert 1 <= len(measured) <= 2 and measured[0]["predicted"] <= 0.6
    first = measured[0]["measured"]
    assert len(measured) == 1 or first > 0.6 or first < 0.6 * 0.95  # a second round had a reason
    code, _, err = run(capsys, "bench", DEMO_NET, "--input", "1,28,28", "--measure", "2")
    assert code == 2 and "--measure checks a --latency-target" in err


@pytest.mark.skipif(not stripe_conv.is_available(), reason="fused stripe kernel unavailable: "
                    f"{stripe_conv.unavailable_reason()}")
def test_bench_fused_latency_target_reports_the_ratio_of_the_dense_model_on_the_kernel(capsys, monkeypatch):
    import swpfx.fused_runtime_model as frm

    monkeypatch.setattr(frm, "default_fused_runtime_model", lambda *a, **k: frm.FusedRuntimeModel())  # no calibration
    code, out, err = run(capsys, "bench", DEMO_NET, "--input", "1,28,28", "--batch", "2", "--repeats", "5",
                         "--lowering", "fused", "--latency-target", "0.8")
    assert code == 0, err
    predicted = float(re.search(r"predicted latency ratio ([\d.]+), measured ([\d.]+) \(of the dense model with "
                                r"every conv on the kernel", out).group(1))
    assert predicted <= 0.8
    assert re.search(r"^\| dense fused \|.*\| [\d.]+ \|$", out, re.M) and "Torch-Pruning" not in out

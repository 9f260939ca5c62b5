"""``convert(latency_target=T, lowering="fused")``: predicted against measured PyTorch latency (issues 12 and 14).

Random-init torchvision models at 224², batch 1, with ``swpfx bench``'s synthetic
skeletons (``swpfx.synthetic.synthetic_skeletons_``, seed 0), this machine's
fused runtime model (``swpfx calibrate --fused``; calibrated first if missing).
Per model and protocol, timed side by side in one interleaved loop
(``swpfx.timing.torch_and_ort_latencies``: medians of ``--rounds`` rounds of
``--burst`` back-to-back calls, least of ``--blocks`` blocks), ``--threads``
threads for torch, the kernel and ORT (spinning off):

- ``dense fused``: every stripe kept, every conv on the kernel -- the reference a
  fused latency target is a fraction of;
- ``T=...``: the budget's cut for each target;
- ``torch dense``: the dense model in PyTorch eager; ``ORT dense``: exported with
  ``swpfx.export_onnx``.

Columns: the predicted ratio (the runtime model's, of ``dense fused``), the
measured one and its error, the speed-up over ORT dense, the FLOP ratio (dense
over the cut's MACs, ``swpfx.cost``) and the realised fraction (speed-up over ORT
dense / FLOP ratio; issue 14's end-to-end target is ≥ 0.7).

    .venv/bin/python benchmarks/fused_latency_target.py [--models resnet18 vgg16] [--targets 0.7 0.5 0.35]

Writes ``benchmarks/results/fused_latency_target.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmark, also when imported from elsewhere

import swpfx
from swpfx.cost import cost
from swpfx.fused_runtime_model import default_fused_runtime_model
from swpfx.kernels import stripe_conv
from swpfx.synthetic import synthetic_skeletons_
from swpfx.timing import torch_and_ort_latencies

from fused_end_to_end import add_timing_arguments  # noqa: E402

OUT = Path(__file__).parent / "results" / "fused_latency_target.md"


def measure(name: str, protocol: str, targets, runtime_model, args) -> list[dict]:
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prepared = swpfx.prepare(model, (x,))
    dense_fused = swpfx.convert(prepared, threshold=0.0, lowering="fused", runtime_model=runtime_model)
    synthetic_skeletons_(prepared, protocol=protocol, threshold=0.05, seed=0)
    cuts = {f"T={t}": swpfx.convert(prepared, latency_target=t, lowering="fused", runtime_model=runtime_model)
            for t in targets}
    with tempfile.TemporaryDirectory() as tmp:
        dense_onnx = swpfx.export_onnx(model, (x,), Path(tmp) / "dense.onnx").path
        times = torch_and_ort_latencies({"dense fused": dense_fused, **cuts, "torch dense": model},
                                        {"ORT dense": dense_onnx}, (x,), threads=args.threads, rounds=args.rounds,
                                        burst=args.burst, blocks=args.blocks)
    dense_macs = cost(model, (x,)).macs
    rows = []
    for label, gm in cuts.items():
        cut = gm.meta["swpfx"]["cut"]
        measured = times[label] / times["dense fused"]
        speedup = times["ORT dense"] / times[label]
        flop_ratio = dense_macs / cost(gm, (x,)).effective_macs
        rows.append({"model": name, "protocol": protocol, "target": label, "order": cut["granularity"],
                     "predicted": cut["latency_ratio"], "measured": measured,
                     "error": measured / cut["latency_ratio"] - 1, "ms": times[label],
                     "speedup": speedup, "flop_ratio": flop_ratio, "realised": speedup / flop_ratio})
    rows.append({"model": name, "protocol": protocol, "reference_ms": {k: times[k] for k in
                                                                       ("dense fused", "torch dense", "ORT dense")}})
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | masks | target | order | predicted | measured | error | ms | speed-up over ORT dense "
             "| FLOP ratio | realised |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "reference_ms" in r:
            refs = ", ".join(f"{k} {v:.2f} ms" for k, v in r["reference_ms"].items())
            lines.append(f"| {r['model']} | {r['protocol']} | *references* | | | | | {refs} | | | |")
            continue
        lines.append(f"| {r['model']} | {r['protocol']} | {r['target']} | {r['order']} | {r['predicted']:.3f} "
                     f"| {r['measured']:.3f} | {r['error']:+.0%} | {r['ms']:.2f} | {r['speedup']:.2f}× "
                     f"| {r['flop_ratio']:.2f}× | {r['realised']:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, OUT)
    parser.add_argument("--targets", nargs="+", type=float, default=[0.7, 0.5, 0.35])
    args = parser.parse_args(argv)
    if not stripe_conv.is_available():
        print(f"the stripe kernel is unavailable here: {stripe_conv.unavailable_reason()}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    runtime_model = default_fused_runtime_model(calibrate_if_missing=True)
    start, load_before = time.perf_counter(), os.getloadavg()
    rows = [r for name in args.models for protocol in args.protocols
            for r in measure(name, protocol, args.targets, runtime_model, args)]
    info = stripe_conv.kernel_info("openmp" if stripe_conv.is_available("openmp") else "own")
    lines = [
        "# `convert(latency_target=T, lowering=\"fused\")`: predicted vs measured", "",
        f"Command: `.venv/bin/python benchmarks/fused_latency_target.py --models {' '.join(args.models)} --targets "
        f"{' '.join(map(str, args.targets))} --rounds {args.rounds} --burst {args.burst} --blocks {args.blocks}`; "
        f"{time.perf_counter() - start:.0f} s; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} "
        "after (what else was running).", "",
        f"Machine: {swpfx.runtime_model.machine_key()}, {os.cpu_count()} CPUs, kernel {info['isa']} "
        f"({info['vector_width']} lanes, {info['threading']}), torch {torch.__version__}, {args.threads} threads; "
        f"runtime model {runtime_model.source}.", "",
        "Predicted and measured ratios are of `dense fused` (every conv on the kernel, every stripe kept); the "
        "speed-up and the realised fraction are against ORT's dense model.", "",
        *table(rows), "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

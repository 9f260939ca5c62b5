"""End to end: ``convert(lowering="fused")`` in PyTorch against ONNX Runtime's dense model (issue 14).

Random-init torchvision models at 224², batch 1, with ``swpfx bench``'s synthetic
skeletons (``swpfx.synthetic.synthetic_skeletons_``, random and structured mask
protocols, seed 0, threshold 0.05). Per model and protocol, timed side by side in
one interleaved loop (``swpfx.timing.torch_and_ort_latencies``: medians of
``--rounds`` rounds of ``--burst`` back-to-back calls each, least of ``--blocks``
blocks), ``--threads`` threads for torch, the kernel and ORT (spinning off).
Bursts, because torch's OpenMP threads spin after each op: an ORT call right
after a torch one ran 10-15 % slower, which favoured the torch rows in single-call
interleaving (RESULTS.md):

- ``ORT dense``: the dense model exported with ``swpfx.export_onnx``;
- ``ORT auto``: ``convert(..., lowering="auto")`` (the best standard-op forms) in ORT;
- ``torch fused``: ``convert(..., lowering="fused")`` run by PyTorch (the kernel for every
  ungrouped conv, with its BatchNorm, residual add and ReLU; max pools on the compiled pool);
- ``torch dense``: the dense model in PyTorch eager, for scale;
- ``ORT TP``: Torch-Pruning (``round_to`` = the channel block, its best setting here)
  pruned to the fused model's effective MACs (mildest 1/64 knob at or below them), in ORT.

Realised = (ORT dense ms / model ms) / FLOP ratio, where the FLOP ratio is the dense
MACs over the model's effective MACs (``swpfx.cost``). Issue 14's target: ``torch
fused`` realises ≥ 0.7 on random masks.

    .venv/bin/python benchmarks/fused_end_to_end.py [--models resnet18 vgg16] [--rounds 8] [--burst 5] [--blocks 3]

Writes ``benchmarks/results/fused_end_to_end.md``.
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

import swpfx
from swpfx.cost import cost
from swpfx.kernels import stripe_conv
from swpfx.peers import mildest_meeting, torch_pruning_prune
from swpfx.runtime_model import channel_block
from swpfx.synthetic import synthetic_skeletons_
from swpfx.timing import torch_and_ort_latencies

OUT = Path(__file__).parent / "results" / "fused_end_to_end.md"


def measure(name: str, protocol: str, args) -> list[dict]:
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prepared = swpfx.prepare(model, (x,))
    synthetic_skeletons_(prepared, protocol=protocol, threshold=0.05, seed=0)
    fused = swpfx.convert(prepared, threshold=0.05, lowering="fused")
    auto = swpfx.convert(prepared, threshold=0.05, lowering="auto")
    dense_cost, fused_cost, auto_cost = cost(model, (x,)), cost(fused, (x,)), cost(auto, (x,))
    masked = swpfx.convert(prepared, threshold=0.05, lowering="never")  # what the fused model must equal
    with torch.no_grad():
        expected = masked(x)
        error = float((fused(x) - expected).abs().max() / expected.abs().max())
    target = fused_cost.effective_macs / dense_cost.macs
    found = mildest_meeting(lambda r: torch_pruning_prune(model, (x,), r, round_to=channel_block()),
                            lambda m: cost(m, (x,)).macs / dense_cost.macs, target)
    peer, peer_cost = found["model"], cost(found["model"], (x,))
    with tempfile.TemporaryDirectory() as tmp:
        onnx = {key: swpfx.export_onnx(m, (x,), Path(tmp) / f"{i}.onnx").path
                for i, (key, m) in enumerate([("ORT dense", model), ("ORT auto", auto), ("ORT TP", peer)])}
        ms = torch_and_ort_latencies({"torch fused": fused, "torch dense": model}, onnx, (x,), threads=args.threads,
                                     rounds=args.rounds, burst=args.burst, blocks=args.blocks)
    macs = {"ORT dense": dense_cost.macs, "ORT auto": auto_cost.effective_macs, "torch fused": fused_cost.effective_macs,
            "torch dense": dense_cost.macs, "ORT TP": peer_cost.macs}
    rows = []
    for key in macs:  # table order
        ratio = dense_cost.macs / macs[key]
        speedup = ms["ORT dense"] / ms[key]
        rows.append({"model": name, "protocol": protocol, "runner": key, "ms": ms[key], "flop_ratio": ratio,
                     "speedup": speedup, "realised": speedup / ratio, "error": error if key == "torch fused" else None})
        print(f"{name} {protocol:10s} {key:12s} {ms[key]:8.2f} ms  FLOP ratio {ratio:.2f}  speed-up {speedup:.2f}  "
              f"realised {speedup / ratio:.2f}", flush=True)
    return rows


def add_timing_arguments(parser: argparse.ArgumentParser, out: Path) -> None:
    """The arguments the fused end-to-end benchmarks share: models, mask protocols, the burst timing, output."""
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--protocols", nargs="+", default=["random", "structured"], choices=("random", "structured"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_timing_arguments(parser, OUT)
    args = parser.parse_args(argv)
    if not stripe_conv.is_available():
        print(f"fused stripe kernel unavailable: {stripe_conv.unavailable_reason()}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    started, load_before = time.time(), os.getloadavg()
    rows = [r for name in args.models for protocol in args.protocols for r in measure(name, protocol, args)]
    info = stripe_conv.kernel_info()
    lines = [
        "# `convert(lowering=\"fused\")` end to end (issue 14)", "",
        f"Command: `.venv/bin/python benchmarks/fused_end_to_end.py --models {' '.join(args.models)} "
        f"--rounds {args.rounds} --burst {args.burst} --blocks {args.blocks}` ({(time.time() - started) / 60:.1f} min; load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after)", "",
        f"- machine: {swpfx.runtime_model.machine_key()}; kernel ISA {info['isa']}; {args.threads} threads for torch, "
        "the kernel and ORT (spinning off); batch 1, 224², random init, synthetic skeletons (seed 0, threshold 0.05)",
        f"- `OMP_WAIT_POLICY`: {os.environ.get('OMP_WAIT_POLICY', 'unset')} (unset: torch's OpenMP threads, which "
        "the fused convs run on too, spin after each op; hence the bursts)",
        "- realised = (ORT dense ms / ms) / FLOP ratio; FLOP ratio = dense MACs / effective MACs (`swpfx.cost`)",
        f"- ORT TP: Torch-Pruning `round_to={channel_block()}` at the fused model's effective MACs", "",
        "| model | masks | runner | ms | FLOP ratio | speed-up vs ORT dense | realised | max rel. err (fused vs masked) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        err = "" if r["error"] is None else f"{r['error']:.1e}"
        lines.append(f"| {r['model']} | {r['protocol']} | {r['runner']} | {r['ms']:.2f} | {r['flop_ratio']:.2f} | "
                     f"{r['speedup']:.2f} | {r['realised']:.2f} | {err} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

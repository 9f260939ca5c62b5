"""How well the runtime model predicts what channel pruning does to a small net's latency in ONNX Runtime.

The latency budget compares cuts that keep different channel counts, so the
runtime model must get the *ratio* between a net and a narrower one right.
This times ``swpfx.data.residual_bn_cnn`` at several widths (batch 64, 28²,
the accuracy_latency benchmark's setting) side by side with the (16, 32, 64)
reference, and prints measured and predicted ratios, with this machine's
calibration and, for comparison, a second runtime-model file (``--compare``,
e.g. a calibration made before a change of the model).

    .venv/bin/python benchmarks/runtime_model_widths.py [--compare OLD.json] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

# block-aligned; off the block but multiples of 4 (ORT 1.32 pads them); what Torch-Pruning without round_to left
# in benchmarks/accuracy_latency.py (odd counts: ORT's NCHW path, and stems of fewer channels than one block)
WIDTHS = [(16, 32, 64), (16, 32, 48), (16, 16, 32), (16, 16, 16), (32, 32, 32), (16, 48, 64), (8, 16, 32),
          (24, 40, 56), (11, 23, 47), (8, 17, 35), (6, 13, 27)]


def measure(widths: list[tuple], batch: int, threads: int, rounds: int, blocks: int) -> dict[tuple, float]:
    from swpfx.data import residual_bn_cnn
    from swpfx.timing import latencies

    torch.manual_seed(0)
    models = {w: residual_bn_cnn(widths=w).eval() for w in widths}
    ms = latencies({str(w): m for w, m in models.items()}, (torch.randn(batch, 1, 28, 28),), threads=threads,
                   rounds=rounds, blocks=blocks)
    return {w: ms[str(w)] for w in widths}


def predict(widths: list[tuple], batch: int, runtime_model) -> dict[tuple, float]:
    from swpfx.data import residual_bn_cnn
    from swpfx.peers import predicted_seconds

    x = torch.randn(batch, 1, 28, 28)
    return {w: predicted_seconds(residual_bn_cnn(widths=w).eval(), x, runtime_model) for w in widths}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--compare", type=Path, default=None, help="a second runtime-model JSON to predict with")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from swpfx.runtime_model import RuntimeModel, default_runtime_model, machine_key

    models = {"this machine's calibration": default_runtime_model()}
    if args.compare is not None:
        models[f"`{args.compare.name}`"] = RuntimeModel.load(args.compare)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    measured = measure(WIDTHS, args.batch, args.threads, args.rounds, args.blocks)
    predicted = {name: predict(WIDTHS, args.batch, model) for name, model in models.items()}
    ref = WIDTHS[0]
    header = ["widths", "measured ms", "measured ratio"] + [f"predicted ratio ({n})" for n in models] + \
        [f"error ({n})" for n in models]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    worst = {n: 0.0 for n in models}
    for w in WIDTHS:
        ratio = measured[w] / measured[ref]
        preds = [predicted[n][w] / predicted[n][ref] for n in models]
        errors = [p / ratio - 1 for p in preds]
        for n, e in zip(models, errors):
            worst[n] = max(worst[n], abs(e))
        lines.append(f"| {w} | {measured[w]:.2f} | {ratio:.3f} | " + " | ".join(f"{p:.3f}" for p in preds) + " | "
                     + " | ".join(f"{100 * e:+.1f} %" for e in errors) + " |")
    command = " ".join([".venv/bin/python", "benchmarks/runtime_model_widths.py"] +
                       (sys.argv[1:] if argv is None else argv))
    text = "\n".join([
        f"Command: `{command}` ({started}); machine `{machine_key()}`; batch {args.batch}, 28², "
        f"{args.threads} ORT threads, interleaved, min over {args.blocks} blocks of the median of "
        f"{args.rounds} rounds. "
        f"Ratios are over {ref}.", "", *lines, "",
        "Largest |error|: " + "; ".join(f"{n} {100 * e:.1f} %" for n, e in worst.items()), ""])
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

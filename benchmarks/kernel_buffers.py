"""A fused graph with its kernel outputs in planned memory against the same graph without the plan (issue 14).

``convert(lowering="fused")`` ends with ``plan_kernel_buffers``: kernel calls write
into per-thread memory reused by lifetime instead of fresh tensors. This times
the converted model against a copy with the plan stripped (every call allocating
its output, as before the pass), alternating the two in one process: ``rounds``
rounds of 2 warm-up and ``burst`` timed forwards each; median per variant and the
median of the per-round ratios. Random-init torchvision models at 224², batch 1,
``swpfx bench``'s synthetic skeletons. Both variants must agree bit for bit.

    .venv/bin/python benchmarks/kernel_buffers.py --models resnet18 vgg16
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torchvision

import swpfx
from report import table, write_report
from swpfx.passes.plan_kernel_buffers import unplan_kernel_buffers
from swpfx.runtime_model import machine_key
from swpfx.synthetic import synthetic_skeletons_

OUT = Path(__file__).parent / "results" / "kernel_buffers.md"


def alternate(models: dict, x: torch.Tensor, rounds: int, burst: int) -> dict[str, list[float]]:
    seconds = {name: [] for name in models}
    with torch.no_grad():
        for _ in range(rounds):
            for name, model in models.items():
                for _ in range(2):
                    model(x)
                start = time.perf_counter()
                for _ in range(burst):
                    model(x)
                seconds[name].append((time.perf_counter() - start) / burst)
    return seconds


def measure(name: str, protocol: str, rounds: int, burst: int) -> dict:
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prepared = swpfx.prepare(model, (x,))
    synthetic_skeletons_(prepared, protocol=protocol, threshold=0.05, seed=0)
    planned = swpfx.convert(prepared, threshold=0.05, lowering="fused")
    plain = copy.deepcopy(planned)
    unplan_kernel_buffers(plain)  # every kernel call allocating its output, as before the pass
    with torch.no_grad():
        if not torch.equal(planned(x), plain(x)):
            raise AssertionError(f"{name} {protocol}: the planned graph differs from the unplanned one")
    seconds = alternate({"planned": planned, "fresh outputs": plain}, x, rounds, burst)
    ratio = statistics.median(a / b for a, b in zip(seconds["planned"], seconds["fresh outputs"]))
    row = {"model": name, "protocol": protocol, "slots": planned.kernel_buffers.slots,
           "planned_calls": sum("slot" in n.kwargs for n in planned.graph.nodes),
           "planned_ms": 1e3 * statistics.median(seconds["planned"]),
           "fresh_ms": 1e3 * statistics.median(seconds["fresh outputs"]), "ratio": ratio}
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--protocols", nargs="+", default=["random", "structured"], choices=("random", "structured"))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--burst", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [measure(m, p, args.rounds, args.burst) for m in args.models for p in args.protocols]
    lines = [
        "# Fused kernel outputs in planned memory vs fresh outputs (issue 14)", "",
        f"Command: `.venv/bin/python benchmarks/kernel_buffers.py --models {' '.join(args.models)} --rounds "
        f"{args.rounds}` ({(time.perf_counter() - started) / 60:.1f} min)", "",
        f"- machine: {machine_key()}; {args.threads} threads; batch 1, 224², random init, synthetic skeletons "
        "(seed 0, threshold 0.05); both variants bit-identical",
        f"- {args.rounds} rounds alternating the two variants in one process, each 2 warm-up and {args.burst} timed "
        "forwards; ms = median per variant, ratio = median of the per-round ratios", "",
        *table(["model", "masks", "planned calls", "slots", "planned ms", "fresh outputs ms", "ratio"],
               [[r["model"], r["protocol"], str(r["planned_calls"]), str(r["slots"]), f"{r['planned_ms']:.2f}",
                 f"{r['fresh_ms']:.2f}", f"{r['ratio']:.3f}"] for r in rows]),
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

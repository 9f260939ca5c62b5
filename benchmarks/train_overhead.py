"""Training-step overhead of swpfx.prepare on torchvision ResNet-18, and the time of prepare itself.

Plain vs prepared ResNet-18 (10 classes, batch 64, 64×64 input, SGD momentum,
CE loss; the prepared step also adds ``skeleton_penalty``), measured
interleaved (pair i runs A then B for even i, B then A for odd i) after warm-up;
reports the median of the per-pair ratios and their spread. Then the median
time of ``swpfx.prepare`` on ResNet-50.

    .venv/bin/python benchmarks/train_overhead.py [--pairs 30] [--out benchmarks/results/prepare.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import swpfx

COMMAND = "cd /work/main && .venv/bin/python benchmarks/train_overhead.py"


def make_step(model, optimizer, x, y, penalty_alpha=None):
    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if penalty_alpha is not None:
            loss = loss + swpfx.skeleton_penalty(model, penalty_alpha)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def interleaved(step_a, step_b, pairs: int, warmup: int) -> tuple[list[float], list[float]]:
    for _ in range(warmup):
        step_a(), step_b()
    times_a, times_b = [], []
    for i in range(pairs):
        if i % 2 == 0:
            a = step_a()
            b = step_b()
        else:
            b = step_b()
            a = step_a()
        times_a.append(a)
        times_b.append(b)
    return times_a, times_b


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def bench_train_step(pairs: int, warmup: int) -> dict:
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10).train()
    x = torch.randn(64, 3, 64, 64)
    y = torch.randint(0, 10, (64,))
    prepared = swpfx.prepare(copy.deepcopy(plain), (x[:1],)).train()
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_b = torch.optim.SGD(swpfx.param_groups(prepared, 1e-4), lr=0.01, momentum=0.9)
    times_a, times_b = interleaved(
        make_step(plain, opt_a, x, y), make_step(prepared, opt_b, x, y, penalty_alpha=1e-5), pairs, warmup
    )
    ratios = [b / a for a, b in zip(times_a, times_b)]
    return {"a": times_a, "b": times_b, "ratios": ratios}


def bench_prepare(repeats: int) -> dict:
    model = torchvision.models.resnet50()
    x = (torch.randn(1, 3, 224, 224),)
    out = {}
    for label, inputs in (("without example_inputs", None), ("with example_inputs (1×3×224×224, adds one forward)", x)):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            swpfx.prepare(model, inputs)
            times.append(time.perf_counter() - start)
        out[label] = times
    return out


def markdown(train: dict, prep: dict, args) -> str:
    qa, qb, qr = quartiles(train["a"]), quartiles(train["b"]), quartiles(train["ratios"])
    lines = [
        "## swpfx.prepare: training overhead and prepare time",
        "",
        f"Command: `{COMMAND} --pairs {args.pairs} --warmup {args.warmup} --repeats {args.repeats}`",
        "",
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, torch.set_num_threads(2), CPU "
        "shared with other jobs (timings are noisy; ratios of interleaved pairs are what counts).",
        "",
        f"Training step, torchvision ResNet-18 (10 classes), batch 64, 64×64 input, SGD momentum 0.9; "
        f"prepared step adds `skeleton_penalty(alpha=1e-5)`. {args.pairs} interleaved pairs after "
        f"{args.warmup} warm-up pairs.",
        "",
        "| | q1 | median | q3 | min | max |",
        "|---|---|---|---|---|---|",
        f"| plain step (ms) | {qa[0]*1e3:.1f} | {qa[1]*1e3:.1f} | {qa[2]*1e3:.1f} | {min(train['a'])*1e3:.1f} | {max(train['a'])*1e3:.1f} |",
        f"| prepared step (ms) | {qb[0]*1e3:.1f} | {qb[1]*1e3:.1f} | {qb[2]*1e3:.1f} | {min(train['b'])*1e3:.1f} | {max(train['b'])*1e3:.1f} |",
        f"| ratio prepared / plain (per pair) | {qr[0]:.3f} | **{qr[1]:.3f}** | {qr[2]:.3f} | {min(train['ratios']):.3f} | {max(train['ratios']):.3f} |",
        "",
        f"Ratio of the medians: {qb[1] / qa[1]:.3f}; ratio of the minima (least-disturbed steps): "
        f"{min(train['b']) / min(train['a']):.3f}.",
        "",
        f"Target: median per-pair ratio ≤ 1.10 → {'met' if qr[1] <= 1.10 else 'NOT met'} ({qr[1]:.3f}).",
        "",
        f"`swpfx.prepare(torchvision.models.resnet50(), ...)`, {args.repeats} repeats:",
        "",
        "| | median (s) | min (s) | max (s) |",
        "|---|---|---|---|",
    ]
    for label, times in prep.items():
        lines.append(f"| {label} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="also write the markdown section to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    text = markdown(bench_train_step(args.pairs, args.warmup), bench_prepare(args.repeats), args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main(sys.argv[1:])

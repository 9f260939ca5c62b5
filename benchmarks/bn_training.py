"""Does training prune stripes on BatchNorm networks? The gradual rule against the paper's rule, on a knob grid.

For each model, rule, knob value and seed: prepare, train with the rule for the
same budget (SGD, cosine schedule, the demo's 4,000 MNIST images), then report
the pruned-stripe fraction, the share of pruned stripes inside filters that
survive, the accuracy of the trained prepared net and of the converted net
*before any fine-tuning*, and the converted FLOPs (executed and effective).
The unpruned baseline is the gradual rule at sparsity 0 (the same training).

    .venv/bin/python benchmarks/bn_training.py --jobs 2            # all runs, results/bn_training.{json,md,png}
    .venv/bin/python benchmarks/bn_training.py --models resnet_small --seeds 0 --epochs 2   # a quick look

Runs already in the JSON file are not repeated (delete it to start over).
Models: ``resnet18`` is torchvision's ResNet-18 (random init, 10 classes, its
first conv taking 1 channel) at the demo's 28×28; ``resnet_small`` is
``swpfx.data.residual_bn_cnn``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).parent / "results"
GRADUAL_GRID = [round(1 - 2 ** (-i / 2), 3) for i in range(1, 6)]  # kept fraction on a log grid: 0.71 ... 0.18
REFERENCE_GRID = [2e-3 * 2 ** i for i in range(5)]  # alpha 2e-3 ... 3.2e-2
THRESHOLD = 0.05  # the reference's hard-zero threshold, and convert's
BATCH, LR, MOMENTUM, WEIGHT_DECAY = 64, 0.05, 0.9, 5e-4


def build(name: str) -> nn.Module:
    import torchvision

    from swpfx.data import residual_bn_cnn

    if name == "resnet18":
        model = torchvision.models.resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # MNIST has one channel
        return model
    if name == "resnet_small":
        return residual_bn_cnn()
    raise ValueError(f"unknown model {name!r}")


def train_one(model_name: str, rule: str, knob: float, seed: int, epochs: int, threads: int) -> dict:
    """One training run with one rule and knob; returns its measurements."""
    import swpfx
    from swpfx.data import accuracy, load_mnist

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_mnist(seed=0)
    prepared = swpfx.prepare(build(model_name), (x_test[:1],))
    optimizer = torch.optim.SGD(swpfx.param_groups(prepared, WEIGHT_DECAY), lr=LR, momentum=MOMENTUM, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / BATCH)
    total = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    generator = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    prepared.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for i in range(0, len(x_train), BATCH):
            idx = order[i:i + BATCH]
            loss = F.cross_entropy(prepared(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if rule == "reference":
                swpfx.regularize_skeletons_(prepared, alpha=knob, threshold=THRESHOLD)
            optimizer.step()
            schedule.step()
            step += 1
            if rule.startswith("gradual"):
                scope = "layer" if rule == "gradual_layer" else "global"
                swpfx.regularize_skeletons_(prepared, sparsity=knob, progress=step / total, scope=scope)
    train_seconds = time.perf_counter() - start
    prepared.eval()
    # the gradual rule zeroes stripes exactly: convert drops those (threshold 0), as README recommends
    threshold = THRESHOLD if rule == "reference" else 0.0
    report = swpfx.sparsity(prepared, threshold)
    example = (x_test[:1],)
    deployed = swpfx.convert(prepared, threshold, lowering="never", channel_multiple=1)
    dense_cost, pruned_cost = swpfx.cost(prepared, example), swpfx.cost(deployed, example)
    return {
        "model": model_name, "rule": rule, "knob": knob, "seed": seed, "epochs": epochs,
        "pruned_stripes": report.stripe_fraction,
        "dead_filters": report.filter_fraction,
        "pruned_in_surviving": report.pruned_in_surviving / max(report.pruned_stripes, 1),
        "accuracy_trained": accuracy(prepared, x_test, y_test),
        "accuracy_converted": accuracy(deployed, x_test, y_test),
        "flops_ratio_executed": pruned_cost.flops / dense_cost.flops,
        "flops_ratio_effective": _effective_flops(pruned_cost) / _effective_flops(dense_cost),
        "train_seconds": train_seconds,
    }


def _effective_flops(report) -> float:
    """Kept-stripe FLOPs where the cost report has them (issue 13 §4), else executed FLOPs."""
    return float(getattr(report, "effective_flops", report.flops))


def _run(args):
    return train_one(*args)


def run_all(models, rules, seeds, epochs, jobs, threads, path: Path) -> list[dict]:
    done = json.loads(path.read_text())["runs"] if path.exists() else []
    have = {(r["model"], r["rule"], r["knob"], r["seed"], r["epochs"]) for r in done}
    todo = []
    for model in models:
        for seed in seeds:
            todo.append((model, "gradual", 0.0, seed, epochs, threads))  # the unpruned baseline
            for rule in rules:
                for knob in (REFERENCE_GRID if rule == "reference" else GRADUAL_GRID):
                    todo.append((model, rule, knob, seed, epochs, threads))
    todo = [t for t in todo if t[:5] not in have]
    print(f"{len(done)} runs cached, {len(todo)} to do", flush=True)
    with mp.get_context("spawn").Pool(jobs) as pool:
        for result in pool.imap_unordered(_run, todo):
            done.append(result)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
            _save(done, path)
    return done


def _save(runs: list[dict], path: Path) -> None:
    machine = {"cpu": _cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": runs[-1].get("threads", 1) if runs else 1}
    path.write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))


def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds per (model, rule, knob)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["rule"], r["knob"]), []).append(r)
    rows = []
    for (model, rule, knob), rs in sorted(groups.items()):
        row = {"model": model, "rule": rule, "knob": knob, "seeds": len(rs)}
        for key in ("pruned_stripes", "dead_filters", "pruned_in_surviving", "accuracy_trained", "accuracy_converted",
                    "flops_ratio_executed", "flops_ratio_effective"):
            values = [r[key] for r in rs]
            row[key] = statistics.mean(values)
            row[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[str]:
    """The issue's three targets, per model and rule, as sentences."""
    lines = []
    for model in sorted({r["model"] for r in rows}):
        dense = next((r for r in rows if r["model"] == model and r["rule"] == "gradual" and r["knob"] == 0.0), None)
        for rule in ("gradual", "gradual_layer", "reference"):
            grid = [r for r in rows if r["model"] == model and r["rule"] == rule and r["knob"] > 0]
            if not grid or dense is None:
                continue
            fractions = [r["pruned_stripes"] for r in sorted(grid, key=lambda r: r["knob"])]
            jump = max((abs(b - a) for a, b in zip(fractions, fractions[1:])), default=0.0)
            near = min(grid, key=lambda r: abs(r["pruned_stripes"] - 0.5))
            drop = 100 * (dense["accuracy_converted"] - near["accuracy_converted"])
            lines.append(
                f"{model} / {rule}: largest jump in pruned stripes between neighbouring knob values "
                f"{100 * jump:.1f} points (target ≤ 25: {'met' if jump <= 0.25 else 'missed'}); nearest 50 % run "
                f"(knob {near['knob']:g}, {100 * near['pruned_stripes']:.1f} % pruned): converted accuracy before "
                f"fine-tuning {100 * near['accuracy_converted']:.1f} % vs unpruned {100 * dense['accuracy_converted']:.1f} % "
                f"({drop:+.1f} points lost; target ≤ 1: {'met' if drop <= 1 else 'missed'}); pruned stripes inside "
                f"surviving filters {100 * near['pruned_in_surviving']:.0f} % (target ≥ 30: "
                f"{'met' if near['pruned_in_surviving'] >= 0.3 else 'missed'})")
    return lines


def markdown(rows: list[dict], machine: dict, command: str) -> str:
    def pct(row, key):
        return f"{100 * row[key]:.1f} ± {100 * row[key + '_std']:.1f}"

    out = [
        "# Training that prunes stripes on BatchNorm networks",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine.get('cpu')}, torch {machine.get('torch')}, {machine.get('threads', 1)} torch thread(s) per run. "
        "Accuracies only (no timing): other jobs sharing the machine change how long runs take, not what they compute.",
        "",
        "Knob: `sparsity` for the gradual rule (`gradual`: stripes ranked globally; `gradual_layer`: within each layer),",
        "`alpha` for the reference rule (hard-zero threshold 0.05). Accuracy on the 1,000 held-out images; *converted* is",
        "`swpfx.convert(prepared, threshold)` with no fine-tuning, threshold 0.05 for the reference rule and 0 for the",
        "gradual one (it zeroes stripes exactly; for `gradual` both thresholds give the same masks, as its pruned",
        "fraction equals the knob). Mean ± std over seeds.",
        "",
        "| model | rule | knob | pruned stripes % | dead filters % | pruned inside surviving filters % | "
        "acc. trained % | acc. converted % | FLOPs executed | FLOPs effective |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        knob = "none (unpruned)" if r["knob"] == 0 else f"{r['knob']:g}"
        out.append(f"| {r['model']} | {r['rule']} | {knob} | {pct(r, 'pruned_stripes')} | {pct(r, 'dead_filters')} | "
                   f"{pct(r, 'pruned_in_surviving')} | {pct(r, 'accuracy_trained')} | {pct(r, 'accuracy_converted')} | "
                   f"{r['flops_ratio_executed']:.2f} | {r['flops_ratio_effective']:.2f} |")
    out += ["", "Targets:", ""] + [f"- {line}" for line in targets(rows)] + ["", "![bn training](bn_training.png)", ""]
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 8), squeeze=False)
    colours = {"gradual": "tab:blue", "gradual_layer": "tab:green", "reference": "tab:red"}
    for col, model in enumerate(models):
        dense = next((r for r in rows if r["model"] == model and r["knob"] == 0.0), None)
        for rule, colour in colours.items():
            grid = sorted((r for r in rows if r["model"] == model and r["rule"] == rule and r["knob"] > 0),
                          key=lambda r: r["knob"])
            if not grid:
                continue
            knobs = [r["knob"] for r in grid]
            top = axes[0][col].twiny() if rule == "reference" else axes[0][col]
            top.errorbar(knobs, [100 * r["pruned_stripes"] for r in grid],
                         yerr=[100 * r["pruned_stripes_std"] for r in grid], marker="o", color=colour, label=rule)
            top.set_xscale("log")
            top.set_xlabel("alpha (reference)" if rule == "reference" else "sparsity knob (gradual)", color=colour)
            axes[1][col].errorbar([100 * r["pruned_stripes"] for r in grid], [100 * r["accuracy_converted"] for r in grid],
                                  yerr=[100 * r["accuracy_converted_std"] for r in grid], marker="o", color=colour,
                                  label=f"{rule}: converted, no fine-tuning")
        axes[0][col].set_ylabel("pruned stripes %")
        axes[0][col].set_title(model)
        if dense is not None:
            axes[1][col].axhline(100 * dense["accuracy_converted"], color="grey", ls="--", label="unpruned")
        axes[1][col].set_xlabel("pruned stripes %")
        axes[1][col].set_ylabel("test accuracy %")
        axes[1][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet_small", "resnet18"])
    parser.add_argument("--rules", nargs="+", default=["gradual", "reference"], choices=["gradual", "gradual_layer", "reference"],
                        help="gradual_layer: the gradual rule ranking stripes within each layer")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--out", type=Path, default=RESULTS / "bn_training")
    args = parser.parse_args(argv)
    path = args.out.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = run_all(args.models, args.rules, args.seeds, args.epochs, args.jobs, args.threads, path)
    rows = summarise([r for r in runs if r["epochs"] == args.epochs])
    machine = json.loads(path.read_text())["machine"]
    command = "python benchmarks/bn_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.with_suffix(".md").write_text(markdown(rows, machine, command.strip()))
    plot(rows, args.out.with_suffix(".png"))
    print("\n".join(targets(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

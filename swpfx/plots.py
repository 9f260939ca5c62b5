"""The demo's pictures: learned filter shapes and FLOPs per layer (matplotlib, written to PNG files).

Example:
    >>> import torch
    >>> masks = {"conv": torch.rand(8, 3, 3, generator=torch.Generator().manual_seed(0)) > 0.5}
    >>> plot_stripes(masks, "/tmp/stripes.png")
    >>> plot_flops({"conv": 2_000_000}, {"conv": 800_000}, "/tmp/flops.png")
"""

from __future__ import annotations

import math

import torch


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

"""Synthetic skeletons for benchmarks and tests: what a trained skeleton looks like, without training."""

from __future__ import annotations

import torch
from torch import fx

from swpfx.masks import random_stripe_mask, structured_stripe_mask
from swpfx.prepare import skeletons

PROTOCOLS = ("random", "structured")


def stripe_mask(protocol: str, out_channels: int, kh: int, kw: int, generator: torch.Generator) -> torch.Tensor:
    """A (O, Kh, Kw) keep mask drawn with one of the protocols of ``swpfx.masks``."""
    if protocol == "random":
        return random_stripe_mask(out_channels, kh, kw, generator=generator)
    if protocol == "structured":
        return structured_stripe_mask(out_channels, kh, kw, generator=generator)
    raise ValueError(f"unknown mask protocol {protocol!r}; use one of {PROTOCOLS}")


@torch.no_grad()
def skeletons_from_masks_(
    prepared: fx.GraphModule,
    masks: dict[str, torch.Tensor],
    threshold: float,
    generator: torch.Generator,
) -> None:
    """Set every skeleton so that ``|I| > threshold`` is exactly ``masks[name]``.

    Kept stripes get values in (threshold + 0.5, threshold + 1.5], pruned ones in
    [0, threshold] (both non-trivial, so merging the skeleton into the weight matters).
    """
    for name, skel in skeletons(prepared).items():
        mask = masks[name]
        kept = threshold + 0.5 + torch.rand(skel.shape, generator=generator, dtype=torch.float64)
        pruned = threshold * torch.rand(skel.shape, generator=generator, dtype=torch.float64)
        skel.copy_(torch.where(mask, kept, pruned).to(skel.dtype))


def synthetic_skeletons_(
    prepared: fx.GraphModule, protocol: str = "random", threshold: float = 0.05, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Give every skeleton of ``prepared`` a mask drawn with ``protocol``; returns the masks.

    1×1 convs (a single stripe per filter) only get the dead-filter part of the protocol.

    Example:
        >>> import torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18())
        >>> masks = synthetic_skeletons_(prepared, "structured", threshold=0.05)
        >>> mask = masks["layer1.0.conv1"]            # 64 filters, 10 % of them dead
        >>> mask.shape, int((~mask.flatten(1).any(1)).sum())
        (torch.Size([64, 3, 3]), 6)
    """
    generator = torch.Generator().manual_seed(seed)
    masks = {
        name: stripe_mask(protocol, skel.shape[0], skel.shape[1], skel.shape[2], generator)
        for name, skel in skeletons(prepared).items()
    }
    skeletons_from_masks_(prepared, masks, threshold, generator)
    return masks

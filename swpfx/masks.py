"""Stripe-mask generators for the two benchmark/test protocols of issue 4.

A stripe mask is a ``BoolTensor(O, kh, kw)``: ``mask[o, i, j]`` is True when
stripe ``(i, j)`` of filter ``o`` is kept.

- *random*: each stripe kept with probability ``keep``, the centre stripe always
  kept, a fraction ``dead`` of filters fully pruned;
- *structured*: each filter keeps the centre stripe only (40 %), the centre row
  (20 %), the centre column (20 %) or all stripes (20 %), a fraction ``dead`` of
  filters fully pruned.

Example:
    >>> import torch
    >>> from swpfx.masks import random_stripe_mask, structured_stripe_mask
    >>> g = torch.Generator().manual_seed(0)
    >>> random_stripe_mask(64, 3, 3, generator=g).shape
    torch.Size([64, 3, 3])
    >>> bool(structured_stripe_mask(64, 3, 3, dead=0.0, generator=g).any(dim=(1, 2)).all())
    True
"""

from __future__ import annotations

import torch

STRUCTURED_SHARES = {"centre": 0.4, "row": 0.2, "column": 0.2, "all": 0.2}


def _dead_filters(out_channels: int, dead: float, generator: torch.Generator | None) -> torch.Tensor:
    """Exactly ``round(dead * O)`` fully pruned filters, chosen at random (bool (O,))."""
    n_dead = int(round(dead * out_channels))
    order = torch.randperm(out_channels, generator=generator)
    is_dead = torch.zeros(out_channels, dtype=torch.bool)
    is_dead[order[:n_dead]] = True
    return is_dead


def random_stripe_mask(out_channels: int, kh: int, kw: int, keep: float = 0.35, dead: float = 0.1,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Random protocol: stripes kept i.i.d. with prob ``keep``, centre kept, ``dead`` of filters pruned.

    The centre stripe is ``(kh // 2, kw // 2)`` (for even kernels the lower-right
    of the four central positions).

    >>> random_stripe_mask(8, 3, 3, dead=0.25, generator=torch.Generator().manual_seed(1)).any(dim=(1, 2)).sum().item()
    6
    """
    mask = torch.rand(out_channels, kh, kw, generator=generator) < keep
    mask[:, kh // 2, kw // 2] = True
    mask[_dead_filters(out_channels, dead, generator)] = False
    return mask


def structured_stripe_mask(out_channels: int, kh: int, kw: int, dead: float = 0.1,
                           shares: dict[str, float] | None = None,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Structured protocol: centre only / centre row / centre column / all, then ``dead`` of filters pruned.

    ``shares`` maps ``centre``, ``row``, ``column``, ``all`` to probabilities
    (default 0.4, 0.2, 0.2, 0.2); each filter draws its pattern independently.

    >>> m = structured_stripe_mask(1000, 3, 3, dead=0.0, generator=torch.Generator().manual_seed(0))
    >>> round(m.sum().item() / m.numel(), 1)  # 0.4/9 + 0.4*3/9 + 0.2
    0.4
    """
    shares = dict(STRUCTURED_SHARES if shares is None else shares)
    ci, cj = kh // 2, kw // 2
    patterns = torch.zeros(4, kh, kw, dtype=torch.bool)
    patterns[0, ci, cj] = True
    patterns[1, ci, :] = True
    patterns[2, :, cj] = True
    patterns[3] = True
    probs = torch.tensor([shares["centre"], shares["row"], shares["column"], shares["all"]], dtype=torch.float)
    choice = torch.multinomial(probs, out_channels, replacement=True, generator=generator)
    mask = patterns[choice].clone()
    mask[_dead_filters(out_channels, dead, generator)] = False
    return mask

"""``swpfx.sparsity``: what ``convert`` would prune right now, per conv and in total — cheap enough to log every epoch.

Example:
    >>> import torch, torchvision, swpfx
    >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10))
    >>> with torch.no_grad():
    ...     swpfx.skeletons(prepared)["layer1.0.conv1"][:8] = 0.0        # 8 whole filters
    ...     swpfx.skeletons(prepared)["layer1.0.conv2"][:, 0, :] = 0.0   # the top row of every filter
    >>> report = swpfx.sparsity(prepared)
    >>> report.pruned_stripes, report.dead_filters, report.pruned_in_surviving
    (264, 8, 192)
    >>> print(report.table(top=2))  # doctest: +NORMALIZE_WHITESPACE
    conv            stripes    pruned    filters    dead    pruned in surviving
    --------------  ---------  --------  ---------  ------  ---------------------
    layer1.0.conv2  576        33.3 %    64         0       192
    layer1.0.conv1  576        12.5 %    64         8       0
    TOTAL           38,592     0.7 %     4,800      8       192
    showing the 2 convs with most pruned stripes of 20
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tabulate import tabulate
from torch import fx

from swpfx.convert import DEFAULT_THRESHOLD
from swpfx.passes.fold_skeletons import stripe_masks
from swpfx.prepare import _require_prepared, skeletons


@dataclass(frozen=True)
class ConvSparsity:
    """One conv: its stripes and filters, and how many ``convert`` would prune."""

    name: str
    stripes: int
    pruned_stripes: int
    filters: int
    dead_filters: int  # every stripe pruned: convert removes the filter (unless its channel is pinned)

    @property
    def pruned_in_surviving(self) -> int:
        """Pruned stripes inside filters that keep at least one stripe: the stripe-wise part of the pruning."""
        return self.pruned_stripes - self.dead_filters * (self.stripes // max(self.filters, 1))


@dataclass(frozen=True)
class SparsityReport:
    """Per-conv rows and totals; ``str()`` is a table, ``to_dict()`` is JSON-ready."""

    threshold: float
    rows: tuple[ConvSparsity, ...]

    def _sum(self, attr: str) -> int:
        return sum(getattr(r, attr) for r in self.rows)

    stripes = property(lambda self: self._sum("stripes"))
    pruned_stripes = property(lambda self: self._sum("pruned_stripes"))
    filters = property(lambda self: self._sum("filters"))
    dead_filters = property(lambda self: self._sum("dead_filters"))
    pruned_in_surviving = property(lambda self: self._sum("pruned_in_surviving"))

    @property
    def stripe_fraction(self) -> float:
        """Fraction of all stripes pruned."""
        return self.pruned_stripes / max(self.stripes, 1)

    @property
    def filter_fraction(self) -> float:
        """Fraction of all filters with no stripe left."""
        return self.dead_filters / max(self.filters, 1)

    def to_dict(self) -> dict:
        totals = {k: getattr(self, k) for k in ("stripes", "pruned_stripes", "filters", "dead_filters",
                                                 "pruned_in_surviving", "stripe_fraction", "filter_fraction")}
        rows = [{**asdict(r), "pruned_in_surviving": r.pruned_in_surviving} for r in self.rows]
        return {"threshold": self.threshold, "totals": totals, "rows": rows}

    def table(self, top: int | None = None, tablefmt: str = "simple") -> str:
        """Per-conv table with a TOTAL row; ``top=k`` keeps the k convs with most pruned stripes."""
        rows = list(self.rows)
        if top is not None:
            rows = sorted(rows, key=lambda r: r.pruned_stripes, reverse=True)[:top]
        body = [_cells(r.name, r.stripes, r.pruned_stripes, r.filters, r.dead_filters, r.pruned_in_surviving)
                for r in rows]
        body.append(_cells("TOTAL", self.stripes, self.pruned_stripes, self.filters, self.dead_filters,
                           self.pruned_in_surviving))
        headers = ["conv", "stripes", "pruned", "filters", "dead", "pruned in surviving"]
        text = tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)
        if top is not None and top < len(self.rows):
            text += f"\nshowing the {top} convs with most pruned stripes of {len(self.rows)}"
        return text

    def __str__(self) -> str:
        return self.table()


def _cells(name, stripes, pruned, filters, dead, inside) -> list[str]:
    share = f"{100 * pruned / max(stripes, 1):.1f} %"
    return [name, f"{stripes:,}", share, f"{filters:,}", f"{dead:,}", f"{inside:,}"]


def conv_sparsity(name: str, mask: torch.Tensor) -> ConvSparsity:
    """Counts for one conv's (O, Kh, Kw) keep mask."""
    dead = int((~mask.flatten(1).any(1)).sum())
    return ConvSparsity(name, mask.numel(), int((~mask).sum()), mask.shape[0], dead)


def sparsity(prepared: fx.GraphModule, threshold: float | None = None) -> SparsityReport:
    """Stripes and filters that ``swpfx.convert(prepared, threshold)`` would prune now.

    A stripe is pruned when ``|I| <= threshold`` (``convert``'s rule and default);
    a filter is dead when all its stripes are. ``convert`` may keep a dead filter
    whose channel the graph pins, or to round channel counts (``channel_multiple``).
    """
    _require_prepared(prepared, "sparsity")
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    masks = stripe_masks(skeletons(prepared), threshold)
    return SparsityReport(float(threshold), tuple(conv_sparsity(name, m.cpu()) for name, m in masks.items()))

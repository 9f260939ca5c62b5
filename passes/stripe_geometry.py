"""Pure stripe geometry shared by the lowering pass and the runtime model (no graphs, no passes).

A conv's geometry (:class:`ConvGeometry`: channels, kernel, stride, dilation,
explicit per-side pads, groups, input size), the bounding boxes of each filter's
kept stripes and how filters are grouped by box (:func:`box_groups`) or bucketed
by stripe count (:func:`stripe_count_buckets`). Both ``lower_stripe_convs`` (which
builds the lowered forms) and ``swpfx.runtime_model`` (which predicts their cost)
read these, so they always agree on what a form computes.

Example:
    >>> import torch
    >>> from torch import nn
    >>> g = ConvGeometry.of(nn.Conv2d(8, 16, 3, stride=2, padding=1), (1, 8, 10, 10))
    >>> g.output_hw, g.box_pads((1, 1, 1, 1)), supported_forms(g)
    ((5, 5), (0, 0, 0, 0), ('boxes', 'onehot', 'shift'))
    >>> m = torch.zeros(4, 3, 3, dtype=torch.bool); m[:, 1, 1] = True; m[3, 0, :] = True
    >>> stripe_boxes(m).tolist()[3], stripe_count_buckets(m)
    ([0, 1, 0, 2], [(1, [0, 1, 2]), (4, [3])])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FORMS = ("boxes", "onehot", "shift")
DEFAULT_MIN_GROUP = 8


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a conv that decides its lowering, with explicit per-side pads.

    pads = (top, bottom, left, right), as the conv pads its input with zeros.
    ``free_order``: the conv's consumers take its output channels in any order
    (``lower_stripe_convs`` permutes their weights instead of gathering the
    lowered output back into filter order), a fact of the graph the form's cost
    depends on.
    """

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pads: tuple[int, int, int, int]
    groups: int
    input_hw: tuple[int, int] | None = None
    free_order: bool = False

    @classmethod
    def of(cls, conv: nn.Conv2d, input_shape=None) -> ConvGeometry:
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        if conv.padding == "valid":
            pads = (0, 0, 0, 0)
        elif conv.padding == "same":
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            ph, pw = conv.padding
            pads = (ph, ph, pw, pw)
        hw = tuple(input_shape[-2:]) if input_shape is not None else None
        return cls(conv.in_channels, conv.out_channels, (kh, kw), tuple(conv.stride), (dh, dw), pads,
                   conv.groups, hw)

    @property
    def output_hw(self) -> tuple[int, int] | None:
        if self.input_hw is None:
            return None
        (h, w), (kh, kw), (sh, sw), (dh, dw) = self.input_hw, self.kernel, self.stride, self.dilation
        pt, pb, pl, pr = self.pads
        return ((h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1)

    def box_pads(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """Input pads (negative = crop) for a conv whose kernel is ``box`` = (r0, r1, c0, c1) of ours.

        Cropping the taps before r0 and after r1 shifts the first/last used input
        row by multiples of the dilation; the output grid stays identical for any
        input size.
        """
        r0, r1, c0, c1 = box
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        pt, pb, pl, pr = self.pads
        return (pt - r0 * dh, pb - (kh - 1 - r1) * dh, pl - c0 * dw, pr - (kw - 1 - c1) * dw)


def stripe_box(mask_o: torch.Tensor) -> tuple[int, int, int, int]:
    """Bounding box (r0, r1, c0, c1), inclusive, of the kept stripes of one filter's mask (kh, kw)."""
    rows = mask_o.any(dim=1).nonzero().flatten()
    cols = mask_o.any(dim=0).nonzero().flatten()
    return (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1]))


def stripe_boxes(mask: torch.Tensor) -> torch.Tensor:
    """Bounding boxes (O, 4) = (r0, r1, c0, c1), inclusive, of every filter's kept stripes (vectorised)."""
    rows, cols = mask.any(dim=2).to(torch.uint8), mask.any(dim=1).to(torch.uint8)
    kh, kw = rows.shape[1], cols.shape[1]
    return torch.stack([rows.argmax(1), kh - 1 - rows.flip(1).argmax(1),
                        cols.argmax(1), kw - 1 - cols.flip(1).argmax(1)], dim=1)


def box_area(box: tuple[int, int, int, int]) -> int:
    return (box[1] - box[0] + 1) * (box[3] - box[2] + 1)


def box_covers(outer, inner) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1] and outer[2] <= inner[2] and inner[3] <= outer[3]


def box_groups(mask: torch.Tensor, min_group: int = DEFAULT_MIN_GROUP,
               align: int = 1) -> list[tuple[tuple[int, int, int, int], list[int]]]:
    """Partition filters by the bounding box of their kept stripes.

    Groups with fewer than ``min_group`` filters are merged (smallest first) into
    the group of smallest area whose box covers theirs; the full kernel box
    covers everything. With ``align`` > 1 every group but the full box then keeps
    a multiple of ``align`` filters, the rest moving up to a covering box (exact:
    a filter computed in a larger box gets zero weights outside its stripes): ORT
    keeps a Concat in its channel-blocked layout only when every part is aligned.
    Returns [(box, sorted filter indices)], largest box last.

    >>> m = torch.zeros(4, 3, 3, dtype=torch.bool); m[:, 1, 1] = True; m[3] = True
    >>> box_groups(m, min_group=1)
    [((1, 1, 1, 1), [0, 1, 2]), ((0, 2, 0, 2), [3])]
    >>> box_groups(m, min_group=1, align=2)
    [((1, 1, 1, 1), [0, 1]), ((0, 2, 0, 2), [2, 3])]
    """
    kh, kw = mask.shape[1:]
    groups: dict[tuple, list[int]] = {}
    for o, box in enumerate(stripe_boxes(mask).tolist()):
        groups.setdefault(tuple(box), []).append(o)
    full = (0, kh - 1, 0, kw - 1)
    while True:
        small = [b for b, fs in groups.items() if len(fs) < min_group and b != full]
        if not small:
            break
        box = min(small, key=lambda b: (len(groups[b]), box_area(b)))
        groups.setdefault(_covering_box(groups, box, full), []).extend(groups.pop(box))
    if align > 1:
        _align_groups(groups, align, full)
    return sorted(((b, sorted(fs)) for b, fs in groups.items()), key=lambda item: (box_area(item[0]), item[0]))


def _covering_box(groups: dict, box, full):
    """The smallest other box in ``groups`` that covers ``box`` (the full kernel box if none)."""
    targets = [b for b in groups if b != box and box_covers(b, box)]
    return min(targets, key=box_area) if targets else full


def _align_groups(groups: dict, align: int, full) -> None:
    """Move each non-full group's filters beyond a multiple of ``align`` to its covering box, smallest box first."""
    for box in sorted((b for b in groups if b != full), key=lambda b: (box_area(b), b)):
        filters = sorted(groups[box])
        excess = len(filters) % align
        if not excess:
            continue
        groups.setdefault(_covering_box(groups, box, full), []).extend(filters[-excess:])
        if excess == len(filters):
            del groups[box]
        else:
            groups[box] = filters[:-excess]


def stripe_count_buckets(mask: torch.Tensor) -> list[tuple[int, list[int]]]:
    """Filters bucketed by their number of kept stripes: [(k, filter indices)], k ascending."""
    counts = mask.flatten(1).sum(1).tolist()
    buckets: dict[int, list[int]] = {}
    for o, k in enumerate(counts):
        buckets.setdefault(int(k), []).append(o)
    return sorted(buckets.items())


def inverse_order(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for position, o in enumerate(order):
        inv[o] = position
    return inv


def group_units(filters: list[int], out_per_group: int) -> tuple[list[int], int]:
    """How a subset of a grouped conv's filters becomes one grouped conv.

    Returns (the original group feeding each new group, filters per new group).
    If every original group present contributes the same number m of filters, the
    new conv has one group per present group with m filters each; otherwise
    every filter becomes its own group (its input channels are duplicated).
    """
    per_group: dict[int, int] = {}
    for o in filters:
        per_group[o // out_per_group] = per_group.get(o // out_per_group, 0) + 1
    sizes = set(per_group.values())
    if len(sizes) == 1:
        return sorted(per_group), sizes.pop()
    return [o // out_per_group for o in filters], 1


def supported_forms(geometry: ConvGeometry) -> tuple[str, ...]:
    """The lowered forms that can express this conv (``onehot`` and ``shift`` need ``groups == 1``)."""
    return FORMS if geometry.groups == 1 else ("boxes",)

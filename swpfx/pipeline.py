"""The conversion pipeline for given stripe masks: fold, remove channels, lower — shared by ``convert`` and the budget."""

from __future__ import annotations

import copy

from torch import fx

from swpfx.passes.fold_skeletons import fold_skeletons
from swpfx.passes.graph_utils import swpfx_meta
from swpfx.passes.lower_stripe_convs import lower_stripe_convs
from swpfx.passes.remove_channels import remove_channels


def dead_filters(gm: fx.GraphModule) -> dict[str, list[int]]:
    """Conv node name -> output channels whose every stripe is pruned."""
    dead = {}
    for node in gm.graph.nodes:
        mask = swpfx_meta(node).get("mask") if node.op == "call_module" else None
        if mask is not None:
            rows = (~mask.flatten(1).any(1)).nonzero().flatten().tolist()
            if rows:
                dead[node.name] = rows
    return dead


def mark_kept_dead_filters(gm: fx.GraphModule) -> None:
    """Dead filters that had to stay (coupled or pinned) get their centre stripe marked kept.

    Their weights are all zero, so this changes nothing numerically; it spares the
    lowering a filter with no stripe at all.
    """
    for node in gm.graph.nodes:
        mask = swpfx_meta(node).get("mask") if node.op == "call_module" else None
        if mask is None:
            continue
        rows = ~mask.flatten(1).any(1)
        if rows.any():
            mask = mask.clone()
            mask[rows, mask.shape[1] // 2, mask.shape[2] // 2] = True
            swpfx_meta(node)["mask"] = mask


def convert_with_masks(prepared: fx.GraphModule, masks: dict, lowering: str, probe: tuple, channel_multiple: int = 1):
    """The conversion pipeline for given stripe masks; returns (GraphModule, RemoveChannelsResult)."""
    gm = copy.deepcopy(prepared).eval()
    fold_skeletons(gm, masks)
    removal = remove_channels(gm, probe, dead_filters(gm), fold_constants=True, channel_multiple=channel_multiple)
    mark_kept_dead_filters(gm)
    if lowering != "never":
        from swpfx.runtime_model import default_runtime_model  # loads or calibrates only when lowering

        lower_stripe_convs(gm, lowering=lowering, choose_form=default_runtime_model().choose_form)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm, removal

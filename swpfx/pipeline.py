"""The conversion pipeline for given stripe masks — a list of passes shared by ``convert`` and the budget.

Example:
    >>> import torch, torchvision, swpfx
    >>> x = torch.randn(1, 3, 32, 32)
    >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10), (x,))
    >>> masks = {n: torch.ones_like(s, dtype=torch.bool) for n, s in swpfx.skeletons(prepared).items()}
    >>> [name for name, _ in conversion_passes(masks, "auto", (x,), 1, None)[0]]
    ['fold_skeletons', 'remove_channels', 'fold_batchnorm_into_sums', 'mark_kept_dead_filters', 'lower_stripe_convs', 'eliminate_dead_code']
"""

from __future__ import annotations

import copy

from torch import fx

from swpfx.passes.fold_batchnorm_into_sums import fold_batchnorm_into_sums
from swpfx.passes.fold_skeletons import fold_skeletons
from swpfx.passes.fuse_stripe_convs import fuse_stripe_convs
from swpfx.passes.graph_utils import swpfx_meta
from swpfx.passes.lower_stripe_convs import lower_stripe_convs
from swpfx.passes.plan_kernel_buffers import plan_kernel_buffers
from swpfx.passes.remove_channels import remove_channels
from swpfx.passes.replace_max_pools import replace_max_pools


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


def conversion_passes(masks: dict, lowering: str, probe: tuple, channel_multiple: int, choose_form):
    """``convert``'s passes, in order: ``[(name, pass)]``, each pass taking and changing the GraphModule."""
    state = {}

    def remove(gm):
        state["removal"] = remove_channels(gm, probe, dead_filters(gm), fold_constants=True,
                                           channel_multiple=channel_multiple)

    passes = [
        ("fold_skeletons", lambda gm: fold_skeletons(gm, masks)),
        ("remove_channels", remove),
        ("fold_batchnorm_into_sums", fold_batchnorm_into_sums),
        ("mark_kept_dead_filters", mark_kept_dead_filters),
    ]
    if lowering == "fused":  # the compiled kernel for every conv it does (dense ones too), standard forms for the rest
        passes.append(("fuse_stripe_convs", lambda gm: fuse_stripe_convs(gm, make_fused_conv, include_dense=True)))
        passes.append(("lower_stripe_convs", lambda gm: lower_stripe_convs(gm, "auto", choose_form)))
        passes.append(("replace_max_pools", lambda gm: replace_max_pools(gm, make_compiled_max_pool)))
        passes.append(("plan_kernel_buffers", lambda gm: plan_kernel_buffers(gm, takes_kernel_buffer,
                                                                             make_kernel_buffers)))
    elif lowering != "never":
        passes.append(("lower_stripe_convs", lambda gm: lower_stripe_convs(gm, lowering, choose_form)))
    passes.append(("eliminate_dead_code", _eliminate_dead_code))
    return passes, state


def make_fused_conv(conv, mask, *, relu, residual, scale, shift):
    """``fuse_stripe_convs``' factory: the compiled stripe kernel's module, None for convs it does not do."""
    from swpfx.kernels.fused_conv import FusedStripeConv2d, unsupported_reason  # loaded only when fusing

    if unsupported_reason(conv) is not None:
        return None
    return FusedStripeConv2d.from_conv(conv, mask, relu=relu, residual=residual, scale=scale, shift=shift)


def make_compiled_max_pool(pool):
    """``replace_max_pools``' factory for fused graphs: the same pool, run by the compiled pool in eager calls."""
    from swpfx.kernels.max_pool import CompiledMaxPool2d

    return CompiledMaxPool2d.from_pool(pool)


def takes_kernel_buffer(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``plan_kernel_buffers``' predicate: the compiled kernels' modules write into planned slots."""
    from swpfx.kernels.fused_conv import FusedStripeConv2d
    from swpfx.kernels.max_pool import CompiledMaxPool2d

    return isinstance(gm.get_submodule(node.target), (FusedStripeConv2d, CompiledMaxPool2d))


def make_kernel_buffers(slots: int):
    """``plan_kernel_buffers``' factory: the per-thread slot memory of :mod:`swpfx.kernels.buffers`."""
    from swpfx.kernels.buffers import KernelBuffers

    return KernelBuffers(slots)


def _eliminate_dead_code(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def convert_with_masks(prepared: fx.GraphModule, masks: dict, lowering: str, probe: tuple, channel_multiple: int = 1,
                       choose_form=None):
    """The conversion pipeline for given stripe masks; returns (GraphModule, RemoveChannelsResult).

    Runs :func:`conversion_passes` on a copy of ``prepared``, checking the graph
    (``lint``) after each. ``choose_form`` picks each conv's lowering (default:
    this machine's runtime model).
    """
    if lowering != "never" and choose_form is None:
        from swpfx.runtime_model import default_runtime_model  # loaded only when lowering

        choose_form = default_runtime_model().choose_form
    gm = copy.deepcopy(prepared).eval()
    passes, state = conversion_passes(masks, lowering, probe, channel_multiple, choose_form)
    for _, run in passes:
        run(gm)
        gm.graph.lint()
    gm.recompile()
    return gm, state["removal"]

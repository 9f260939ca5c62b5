"""Replace the graph's ``nn.MaxPool2d`` calls by modules an injected factory builds (same arithmetic, faster).

In ``swpfx`` the factory builds ``swpfx.kernels.max_pool.CompiledMaxPool2d`` for
``convert(lowering="fused")``, whose graphs run in PyTorch: its own NCHW max pool
is the slowest op left there. The pass is a plain graph edit: each
``call_module`` of an ``nn.MaxPool2d`` (of exactly that type) gets a new module of
its own under the same name; a pool the factory refuses (returns None) stays.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> from swpfx.passes.replace_max_pools import replace_max_pools
    >>> class Logged(nn.MaxPool2d):
    ...     pass
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)))
    >>> replace_max_pools(gm, lambda pool: Logged(pool.kernel_size)).replaced
    ['_1']
    >>> type(gm.get_submodule("1")).__name__
    'Logged'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import fx, nn

from .graph_utils import pass_error, swpfx_meta, unique_attr_name
from .lower_stripe_convs import used_once
from .pass_result import PassResult

PASS = "replace_max_pools"

# make_pool(pool) -> a module computing pool(x), or None to leave that pool alone
PoolFactory = Callable[[nn.MaxPool2d], nn.Module | None]


@dataclass
class ReplaceMaxPoolsResult(PassResult):
    replaced: list[str] = field(default_factory=list)  # node names whose module was replaced
    refused: list[str] = field(default_factory=list)  # node names make_pool left alone


def _is_max_pool_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.MaxPool2d


def replace_max_pools(gm: fx.GraphModule, make_pool: PoolFactory) -> ReplaceMaxPoolsResult:
    """Give every ``nn.MaxPool2d`` call of ``gm`` the module ``make_pool(pool)`` builds (in place).

    A pool module called from several nodes gets one new module per node, so no
    node's module changes behind another's back.
    """
    result = ReplaceMaxPoolsResult(gm, modified=False)
    for node in [n for n in gm.graph.nodes if _is_max_pool_call(gm, n)]:
        pool = gm.get_submodule(node.target)
        module = make_pool(pool)
        if module is None:
            result.refused.append(node.name)
            continue
        if not isinstance(module, nn.Module):
            raise pass_error(PASS, node, f"make_pool returned {type(module).__name__}, not an nn.Module or None",
                             TypeError)
        # a shared pool's last caller takes the old name (replacing the old module); the others get new names
        name = node.target if used_once(gm, node.target) else unique_attr_name(gm, node.target + "_replaced")
        gm.add_submodule(name, module)
        node.target = name
        swpfx_meta(node)["replaced_max_pool"] = type(module).__name__
        result.replaced.append(node.name)
        result.modified = True
    gm.graph.lint()
    gm.recompile()
    return result

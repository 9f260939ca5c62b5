"""Small helpers shared by the passes: errors, attribute paths, conv argument access."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import skip_init

CONV2D_FUNCTIONS = (torch.conv2d, F.conv2d)
META_KEY = "swpfx"


class PassError(ValueError):
    """A pass could not handle a node; the message names the pass and the node."""


def pass_error(pass_name: str, node: fx.Node | None, message: str, cls: type[Exception] = PassError) -> Exception:
    where = f" at node {node.format_node()}" if node is not None else ""
    return cls(f"swpfx.{pass_name}: {message}{where}")


def swpfx_meta(node: fx.Node) -> dict:
    """The node's ``meta['swpfx']`` dict, created on first use."""
    return node.meta.setdefault(META_KEY, {})


def get_attr_path(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def split_path(target: str) -> tuple[str, str]:
    owner, _, leaf = target.rpartition(".")
    return owner, leaf


def unique_attr_name(root: nn.Module, base: str) -> str:
    """``base`` (a dotted path) if it is free on ``root``, else ``base_1``, ``base_2``..."""
    candidate, i = base, 0
    while True:
        try:
            get_attr_path(root, candidate)
        except AttributeError:
            return candidate
        i += 1
        candidate = f"{base}_{i}"


def is_conv2d_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in CONV2D_FUNCTIONS


@dataclass
class Conv2dArgs:
    """The arguments of a functional ``conv2d`` call, with defaults filled in."""

    input: fx.Node
    weight: Any
    bias: Any = None
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1

    @classmethod
    def of(cls, node: fx.Node) -> Conv2dArgs:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        values = dict(zip(names, node.args))
        values.update(node.kwargs)
        return cls(**values)

    def as_args(self) -> tuple:
        return (self.input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def ancestors(node: fx.Node) -> Iterator[fx.Node]:
    """All nodes ``node`` depends on (not including itself)."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        stack.extend(n.all_input_nodes)


def depends_only_on_attributes(node: fx.Node) -> bool:
    """True if ``node`` is computed from module attributes alone (no inputs, no submodule calls)."""
    if node.op == "get_attr":
        return True
    if node.op in ("placeholder", "call_module", "output"):
        return False
    return all(a.op not in ("placeholder", "call_module") for a in ancestors(node))


def evaluate_attribute_expression(gm: nn.Module, node: fx.Node) -> Any:
    """Evaluate a node that depends only on module attributes (e.g. a conv's effective weight)."""
    cache: dict[fx.Node, Any] = {}

    def run(n: fx.Node) -> Any:
        if n in cache:
            return cache[n]
        args = fx.node.map_arg(n.args, run)
        kwargs = fx.node.map_arg(n.kwargs, run)
        if n.op == "get_attr":
            value = get_attr_path(gm, n.target)
        elif n.op == "call_function":
            value = n.target(*args, **kwargs)
        elif n.op == "call_method":
            value = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            raise ValueError(f"cannot evaluate {n.op} node {n.name} without inputs")
        cache[n] = value
        return value

    return run(node)


def erase_unused_attributes(gm: fx.GraphModule) -> None:
    """Drop get_attr nodes nobody uses and submodules no node references."""
    for node in reversed(list(gm.graph.nodes)):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def batchnorm_channels(bn: nn.modules.batchnorm._BatchNorm, keep) -> nn.Module:
    """A new BatchNorm of the same type holding only channels ``keep`` (indices) of ``bn``."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    new = skip_init(type(bn), len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    device=bn.weight.device if bn.affine else None,
                    dtype=bn.weight.dtype if bn.affine else None)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new

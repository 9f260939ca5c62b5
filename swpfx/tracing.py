"""Symbolic tracing with swpfx's leaf rules and errors a user can act on."""

from __future__ import annotations

import copy
import traceback
from collections.abc import Iterable

import torch
from torch import fx, nn


class TracingError(ValueError):
    """torch.fx could not trace the model (the message names the submodule and source line)."""


def has_standard_conv_forward(module: nn.Module) -> bool:
    """True for ``nn.Conv2d`` and subclasses that do not override ``forward``."""
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward


class SwpfxTracer(fx.Tracer):
    """``fx.Tracer`` that keeps every standard-forward ``Conv2d`` as one call_module node.

    Conv2d subclasses with their own ``forward`` (weight standardisation, dynamic
    'same' padding) are traced through, so their ``F.conv2d`` call and the weight
    expression feeding it appear in the graph. ``leaf_modules`` (types or
    qualified names) are kept opaque, which is how users get past untraceable code.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        leaves = tuple(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        if has_standard_conv_forward(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch, as 'file:line: code'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "<unknown source line>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def trace(model: nn.Module, leaf_modules: Iterable[type | str] = (), copy_model: bool = True) -> fx.GraphModule:
    """Trace ``model`` (deep-copied unless ``copy_model=False``) into a GraphModule.

    Example:
        >>> import torchvision
        >>> gm = trace(torchvision.models.resnet18())
        >>> sum(n.op == "call_module" for n in gm.graph.nodes) > 0
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swpfx.trace: expected an nn.Module, got {type(model).__name__}")
    root = copy.deepcopy(model) if copy_model else model
    tracer = SwpfxTracer(leaf_modules)
    try:
        graph = tracer.trace(root)
    except Exception as exc:  # torch.fx raises many types; all mean "not traceable"
        stack = list(getattr(tracer, "module_stack", {}).keys())
        inner = next((s for s in reversed(stack) if s), "")
        where = f"inside submodule '{inner}'" if inner else "in the model's own forward"
        hint = (
            f"mark it as a leaf: swpfx.prepare(model, config={{'leaf_modules': ['{inner}']}})"
            if inner
            else "make the forward traceable (no data-dependent Python control flow) or wrap the untraceable part in a submodule and mark it as a leaf via config={'leaf_modules': [...]}"
        )
        raise TracingError(
            f"swpfx.trace: torch.fx symbolic tracing failed {where}.\n"
            f"  at {_user_frame(exc)}\n  {type(exc).__name__}: {exc}\n  To fix: {hint}"
        ) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def input_specs(example_inputs) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of a tuple of example tensors (what convert needs later)."""
    specs = []
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a tensor, got {type(x).__name__}")
        specs.append((tuple(x.shape), x.dtype))
    return specs


def normalize_example_inputs(example_inputs) -> tuple:
    """Accept a tensor or a tuple/list of tensors; return a tuple."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )

"""Symbolic tracing with swpfx's leaf rules and errors a user can act on."""

from __future__ import annotations

import copy
import difflib
import traceback
from collections.abc import Iterable

import torch
from torch import fx, nn

from swpfx.passes.modes import eval_mode


class TracingError(ValueError):
    """torch.fx could not trace the model (the message names the submodule and source line)."""


def has_standard_conv_forward(module: nn.Module) -> bool:
    """True for ``nn.Conv2d`` and subclasses that do not override ``forward``."""
    return isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward


class _ShapedProxy(fx.Proxy):
    """A Proxy whose ``shape``/``size()``/``dim()`` are the concrete values seen on the example input.

    Used to retrace a Conv2d subclass whose forward does Python arithmetic on the
    input size (timm's ``Conv2dSame``: ``max(math.ceil(ih / s) ..., 0)``), which
    symbolic tracing cannot follow. Only that module's forward sees it.
    """

    def __init__(self, node: fx.Node, tracer: fx.Tracer, shape: torch.Size):
        super().__init__(node, tracer)
        self._concrete_shape = torch.Size(shape)

    @property
    def shape(self) -> torch.Size:
        return self._concrete_shape

    @property
    def ndim(self) -> int:
        return len(self._concrete_shape)

    def size(self, dim: int | None = None):
        return self._concrete_shape if dim is None else self._concrete_shape[dim]

    def dim(self) -> int:
        return len(self._concrete_shape)


class SwpfxTracer(fx.Tracer):
    """``fx.Tracer`` that keeps every standard-forward ``Conv2d`` as one call_module node.

    Conv2d subclasses with their own ``forward`` (weight standardisation, dynamic
    'same' padding) are traced through, so their ``F.conv2d`` call and the weight
    expression feeding it appear in the graph. If such a forward is not
    symbolically traceable and ``input_shapes`` has the module's (single) input
    shape, it is retraced with that concrete shape, and a ``torch._assert`` on
    the input's spatial size guards the specialisation; otherwise it becomes a
    leaf, listed in ``leaf_convs`` with the reason. ``leaf_modules`` (types or
    qualified names) are kept opaque, which is how users get past untraceable code.
    """

    def __init__(self, leaf_modules: Iterable[type | str] = (), input_shapes: dict[str, torch.Size] | None = None):
        super().__init__()
        leaves = tuple(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = {x for x in leaves if isinstance(x, str)}
        self._input_shapes = dict(input_shapes or {})
        self._proxy_cache: dict | None = None
        self._specializing = False
        self.specialized_convs: dict[str, torch.Size] = {}  # qualified name -> input shape baked in
        self.leaf_convs: dict[str, str] = {}  # qualified name -> why it could not be traced through

    def is_user_leaf(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.is_user_leaf(m, module_qualified_name) or module_qualified_name in self.leaf_convs:
            return True
        if has_standard_conv_forward(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        self._proxy_cache = parameter_proxy_cache  # kept so a rollback can drop proxies of erased nodes
        value = super().getattr(attr, attr_val, parameter_proxy_cache)
        if self._specializing and isinstance(value, fx.Proxy) and isinstance(attr_val, torch.Tensor):
            return _ShapedProxy(value.node, self, attr_val.shape)  # e.g. kernel size from weight.shape
        return value

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if not isinstance(m, nn.Conv2d) or has_standard_conv_forward(m) or self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        mark = self.graph._root.prev  # last node before the attempt
        stack_depth, num_calls = len(self.module_stack), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # roll back and try the fallbacks
            self._rollback(mark, stack_depth, num_calls)
            shape = self._input_shapes.get(name)
            if shape is None or not args or not isinstance(args[0], fx.Proxy):
                self.leaf_convs[name] = f"{type(exc).__name__}: {exc}".strip()
                return super().call_module(m, forward, args, kwargs)
        x = args[0]
        torch._assert(
            x.shape[-2:] == tuple(shape[-2:]),
            f"swpfx: '{name}' was specialised to input size {tuple(shape[-2:])} because its forward computes "
            "from the input size; prepare the model again with example_inputs of the new size",
        )
        self.specialized_convs[name] = shape
        self._specializing = True
        try:
            return super().call_module(m, forward, (_ShapedProxy(x.node, self, shape), *args[1:]), kwargs)
        finally:
            self._specializing = False

    def _rollback(self, mark: fx.Node, stack_depth: int, num_calls: dict) -> None:
        """Erase the nodes a failed trace-through created and restore the tracer's bookkeeping."""
        erased = set()
        while self.graph._root.prev is not mark:
            node = self.graph._root.prev
            erased.add(node)
            self.graph.erase_node(node)
        if self._proxy_cache is not None:
            for key in [k for k, p in self._proxy_cache.items() if p.node in erased]:
                del self._proxy_cache[key]
        while len(self.module_stack) > stack_depth:
            self.module_stack.popitem(last=True)
        self.num_calls.clear()
        self.num_calls.update(num_calls)


def conv_input_shapes(model: nn.Module, example_inputs: tuple | None) -> dict[str, torch.Size]:
    """Input shape of each Conv2d subclass with its own forward, from one eval-mode run.

    Only modules called with a single shape are listed (a specialisation must be
    unambiguous). Empty when there are no such modules or no example inputs.

    Example:
        >>> class WS(nn.Conv2d):
        ...     def forward(self, x):
        ...         return self._conv_forward(x, self.weight - self.weight.mean(), self.bias)
        >>> conv_input_shapes(nn.Sequential(nn.Conv2d(3, 4, 1), WS(4, 4, 3)), (torch.randn(1, 3, 8, 8),))
        {'1': torch.Size([1, 4, 8, 8])}
    """
    custom = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and not has_standard_conv_forward(m)}
    if not custom or example_inputs is None:
        return {}
    seen: dict[str, set] = {n: set() for n in custom}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: seen[n].add(tuple(a[0].shape)) if a else None)
        for n, m in custom.items()
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.Size(next(iter(s))) for n, s in seen.items() if len(s) == 1}


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch, as 'file:line: code'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "<unknown source line>"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {f.line}"


def check_leaf_modules(model: nn.Module, leaf_modules: tuple) -> None:
    """Leaf names must be submodules of ``model`` (a typo would otherwise surface as a tracing error)."""
    known = {name for name, _ in model.named_modules() if name}
    for leaf in leaf_modules:
        if isinstance(leaf, str) and leaf not in known:
            close = difflib.get_close_matches(leaf, sorted(known), n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(f"swpfx.trace: leaf_modules names '{leaf}', which is not a submodule of the model.{hint}")
        if not isinstance(leaf, (str, type)):
            raise TypeError(f"swpfx.trace: leaf_modules entries are qualified names or module types, got {leaf!r}")


def trace(
    model: nn.Module,
    leaf_modules: Iterable[type | str] = (),
    copy_model: bool = True,
    example_inputs: tuple | None = None,
) -> fx.GraphModule:
    """Trace ``model`` (deep-copied unless ``copy_model=False``) into a GraphModule.

    ``example_inputs`` are only used when a Conv2d subclass's own forward is not
    symbolically traceable (see :class:`SwpfxTracer`). The result's
    ``meta["swpfx_trace"]`` lists ``specialized_convs`` and ``leaf_convs``.

    Example:
        >>> import torchvision
        >>> gm = trace(torchvision.models.resnet18())
        >>> sum(n.op == "call_module" for n in gm.graph.nodes) > 0
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swpfx.trace: expected an nn.Module, got {type(model).__name__}")
    leaf_modules = tuple(leaf_modules)
    check_leaf_modules(model, leaf_modules)
    root = copy.deepcopy(model) if copy_model else model
    tracer = SwpfxTracer(leaf_modules, conv_input_shapes(root, example_inputs))
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
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["swpfx_trace"] = {"specialized_convs": dict(tracer.specialized_convs), "leaf_convs": dict(tracer.leaf_convs)}
    return gm


def input_specs(example_inputs) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of a tuple of example tensors (what convert needs later).

    Example:
        >>> input_specs((torch.zeros(1, 3, 8, 8),))
        [((1, 3, 8, 8), torch.float32)]
    """
    specs = []
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example_inputs[{i}] must be a tensor, got {type(x).__name__}")
        specs.append((tuple(x.shape), x.dtype))
    return specs


def normalize_example_inputs(example_inputs) -> tuple:
    """Accept a tensor or a tuple/list of tensors; return a tuple (``None`` stays ``None``).

    Example:
        >>> len(normalize_example_inputs(torch.zeros(1)))
        1
    """
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )

"""``swpfx.prepare``: trace a model and give every Conv2d a learnable filter skeleton."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from swpfx.passes.graph_utils import META_KEY, get_attr_path
from swpfx.passes.insert_skeletons import SkippedConv, insert_skeletons
from swpfx.passes.modes import eval_mode
from swpfx.tracing import input_specs, normalize_example_inputs, trace

META = META_KEY  # the node.meta / model.meta key of swpfx's entries


@dataclass
class PrepareConfig:
    """What ``prepare`` touches.

    include: conv qualified names or module types to give skeletons (default: all).
    exclude: conv qualified names or module types to leave dense (e.g. ``["conv1"]``).
    leaf_modules: submodule qualified names or types that tracing must not enter.
    """

    include: list | None = None
    exclude: list = field(default_factory=list)
    leaf_modules: list = field(default_factory=list)

    @classmethod
    def coerce(cls, config) -> PrepareConfig:
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            unknown = set(config) - {"include", "exclude", "leaf_modules"}
            if unknown:
                raise ValueError(f"swpfx.prepare: unknown config keys {sorted(unknown)}; use include, exclude, leaf_modules")
            return cls(**{k: (list(v) if v is not None else None) for k, v in config.items()})
        raise TypeError(f"swpfx.prepare: config must be a dict or PrepareConfig, got {type(config).__name__}")


def prepare(model: nn.Module, example_inputs=None, config=None) -> fx.GraphModule:
    """Trace ``model`` and insert a filter skeleton on every 2-D convolution.

    The caller's model is deep-copied and never modified. At initialisation the
    skeletons are all ones, so the prepared model computes what ``model`` does.
    With ``example_inputs`` (a tuple of positional inputs) tensor shapes are
    recorded in ``node.meta`` and ``convert`` can later run without inputs.

    Convolutions that cannot carry a skeleton stay dense; they are listed by
    :func:`skipped_convs` and a warning names them.

    Example:
        >>> import torch, torchvision, swpfx
        >>> model = torchvision.models.resnet18(num_classes=10)
        >>> prepared = swpfx.prepare(model, (torch.randn(1, 3, 64, 64),))
        >>> len(swpfx.skeletons(prepared))
        20
        >>> swpfx.skeletons(prepared)["layer1.0.conv1"].shape
        torch.Size([64, 3, 3])
    """
    cfg = PrepareConfig.coerce(config)
    example_inputs = normalize_example_inputs(example_inputs)
    gm = trace(model, cfg.leaf_modules, example_inputs=example_inputs)
    result = insert_skeletons(gm, include=cfg.include, exclude=cfg.exclude)
    traced = gm.meta.pop("swpfx_trace")
    targets = {n.name: n.target for n in gm.graph.nodes if n.op == "call_module"}
    result.skipped = [explain_leaf_conv(s, targets.get(s.node), traced["leaf_convs"]) for s in result.skipped]
    gm.meta[META] = {
        "skeletons": dict(result.skeletons),
        "skipped": [(s.node, s.reason) for s in result.skipped],
        "input_specs": None,
        "source_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "specialized_convs": {k: tuple(v) for k, v in traced["specialized_convs"].items()},
    }
    if example_inputs is not None:
        gm.meta[META]["input_specs"] = input_specs(example_inputs)
        record_shapes(gm, example_inputs)
    gm.training = model.training  # submodules keep their own modes (e.g. a frozen BN in eval)
    unexpected = [s for s in result.skipped if not s.reason.startswith(("excluded", "not selected"))]
    if unexpected:
        listing = "; ".join(f"{s.node}: {s.reason}" for s in unexpected)
        warnings.warn(f"swpfx.prepare: {len(unexpected)} convolution(s) stay dense: {listing}", stacklevel=2)
    return gm


def explain_leaf_conv(skipped: SkippedConv, target: str | None, leaf_convs: dict[str, str]) -> SkippedConv:
    """Replace the generic reason of a conv tracing could not enter by the tracing error and the fix."""
    if target not in leaf_convs:
        return skipped
    return SkippedConv(
        skipped.node,
        f"its forward is not symbolically traceable ({leaf_convs[target]}); pass example_inputs to "
        "swpfx.prepare so its input-size computations can be specialised to that size",
    )


def record_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Run ``ShapeProp`` in eval mode so the example forward cannot update BatchNorm running stats."""
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)


def is_prepared(model: nn.Module) -> bool:
    """True for a GraphModule returned by :func:`prepare`.

    Example:
        >>> import torch, swpfx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
        >>> swpfx.is_prepared(model), swpfx.is_prepared(swpfx.prepare(model))
        (False, True)
    """
    return isinstance(model, fx.GraphModule) and "skeletons" in getattr(model, "meta", {}).get(META, {})


def _require_prepared(model: nn.Module, caller: str) -> None:
    if not is_prepared(model):
        raise ValueError(
            f"swpfx.{caller}: expected a model returned by swpfx.prepare, got {type(model).__name__} "
            "without skeletons; call swpfx.prepare(model, example_inputs) first"
        )


def skeletons(prepared: fx.GraphModule) -> dict[str, nn.Parameter]:
    """The skeleton parameters, ``{conv qualified name: Parameter of shape (O, Kh, Kw)}``, in graph order.

    Example:
        >>> import torchvision, swpfx
        >>> prepared = swpfx.prepare(torchvision.models.resnet18())
        >>> next(iter(swpfx.skeletons(prepared)))
        'conv1'
    """
    _require_prepared(prepared, "skeletons")
    return {name: get_attr_path(prepared, path) for name, path in prepared.meta[META]["skeletons"].items()}


def skipped_convs(prepared: fx.GraphModule) -> list[SkippedConv]:
    """Convolutions ``prepare`` left dense, with the reason for each.

    Example:
        >>> import torch, swpfx
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1))
        >>> swpfx.skipped_convs(swpfx.prepare(model, config={"exclude": ["0"]}))
        [SkippedConv(node='_0', reason="excluded by config['exclude']")]
    """
    _require_prepared(prepared, "skipped_convs")
    return [SkippedConv(n, r) for n, r in prepared.meta[META]["skipped"]]

"""Save side: the JSON plan of a GraphModule (module tree, tensors, graph nodes) and :func:`save`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .allowlist import GETATTR_NAMES, MODULE_TYPES, annotation_ref, construct, function_ref, own_tensors, tensor_methods
from .codec import Encoder, enum_name
from .container import FORMAT, META, VERSION, write_file

# ---------------------------------------------------------------- module constructors


def constructor_kwargs(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments of an allowlisted module, read back from its attributes."""
    kwargs = {}
    for p in list(inspect.signature(type(module).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.name == "bias" and not isinstance(getattr(module, "bias", None), bool):
            kwargs["bias"] = getattr(module, "bias", None) is not None or getattr(module, "in_proj_bias", None) is not None
        elif p.name == "add_bias_kv":
            kwargs[p.name] = module.bias_k is not None
        elif p.name == "init" and isinstance(module, nn.PReLU):
            continue  # the weight is loaded
        elif hasattr(module, p.name):
            kwargs[p.name] = getattr(module, p.name)
        elif p.default is p.empty:
            raise ValueError(f"cannot read constructor argument {p.name!r} of {type(module).__name__}")
    return kwargs



def check_rebuilds(path: str, module: nn.Module, kwargs: dict) -> None:
    """Save-time self check: the constructor arguments rebuild the same module (repr and tensor shapes)."""
    rebuilt = construct(type(module).__name__, kwargs)
    if rebuilt.extra_repr() != module.extra_repr():
        raise ValueError(f"swpfx.save: module '{path}' ({type(module).__name__}) does not rebuild from its "
                         f"constructor arguments: {rebuilt.extra_repr()!r} != {module.extra_repr()!r}")
    theirs, ours = own_tensors(rebuilt), own_tensors(module)
    for name, (kind, t) in theirs.items():
        if name not in ours or ours[name][0] != kind or ours[name][1].shape != t.shape:
            raise ValueError(f"swpfx.save: module '{path}' ({type(module).__name__}): {kind} '{name}' "
                             "differs from what its constructor creates")


# ---------------------------------------------------------------- save


def _is_plain_container(module: nn.Module, called: set[str], path: str) -> bool:
    return path not in called and (type(module).__name__ not in MODULE_TYPES or type(module) is not MODULE_TYPES[
        type(module).__name__])


def _payload(t: torch.Tensor, storages: set[int]) -> torch.Tensor:
    """The tensor as safetensors stores it: CPU, contiguous, owning its storage (copied only when needed)."""
    t = t.detach().cpu()
    ptr = t.untyped_storage().data_ptr()
    if not t.is_contiguous() or ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()  # safetensors refuses tensors that share or only view a storage
    storages.add(t.untyped_storage().data_ptr())
    return t


def _plan_modules(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> tuple[list, list]:
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    attr_targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    modules, tensor_plan = [], []
    seen_modules: dict[int, str] = {}
    seen_tensors: dict[int, str] = {}
    storages: set[int] = set()
    owned_by_parent: set[str] = set()

    def add_tensor(record: dict, t: torch.Tensor) -> None:
        """Plan ``t`` at ``record['path']``: its payload, or an alias of a tensor planned before."""
        if id(t) in seen_tensors:
            record["alias_of"] = seen_tensors[id(t)]
        else:
            seen_tensors[id(t)] = record["path"]
            record.update(shape=list(t.shape), dtype=enum_name(t.dtype), key=f"t/{record['path']}")
            tensors[record["key"]] = _payload(t, storages)
        tensor_plan.append(record)

    for path, module in gm.named_modules(remove_duplicate=False):
        if id(module) in seen_modules:
            modules.append({"path": path, "alias_of": seen_modules[id(module)]})
            continue
        seen_modules[id(module)] = path
        entry: dict[str, Any] = {"path": path, "training": module.training}
        if path == "":
            entry["type"] = "GraphModule"
        elif path in owned_by_parent:
            entry["type"] = "owned:" + type(module).__name__
        elif _is_plain_container(module, called, path):
            entry["type"] = "Module"
        else:
            if type(module).__name__ not in MODULE_TYPES or type(module) is not MODULE_TYPES[type(module).__name__]:
                raise ValueError(f"swpfx.save: the graph calls submodule '{path}' of type "
                                 f"{type(module).__module__}.{type(module).__qualname__}, which is not on the "
                                 f"allowlist of torch.nn module types ({', '.join(sorted(MODULE_TYPES))})")
            kwargs = constructor_kwargs(module)
            check_rebuilds(path, module, kwargs)
            entry["type"] = type(module).__name__
            entry["kwargs"] = Encoder({})(kwargs)
            with torch.device("meta"):
                rebuilt = construct(entry["type"], kwargs)
            for child, _ in rebuilt.named_children():
                owned_by_parent.add(f"{path}.{child}" if path else child)
        modules.append(entry)
        for name, (kind, t) in own_tensors(module).items():
            full = f"{path}.{name}" if path else name
            record = {"path": full, "kind": kind}
            if kind == "buffer":
                record["persistent"] = name not in module._non_persistent_buffers_set
            if kind == "parameter":
                record["requires_grad"] = t.requires_grad
            add_tensor(record, t)
    known = {r["path"] for r in tensor_plan}
    for target in sorted(attr_targets - known):
        owner, _, leaf = target.rpartition(".")
        value = getattr(gm.get_submodule(owner) if owner else gm, leaf)
        if isinstance(value, nn.Module):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"swpfx.save: get_attr target '{target}' is a {type(value).__name__}, not a tensor")
        add_tensor({"path": target, "kind": "attribute"}, value)
    return modules, tensor_plan


def _plan_graph(gm: fx.GraphModule, encoder: Encoder) -> list[dict]:
    if type(gm.graph._codegen) is not fx.graph.CodeGen:
        raise ValueError(f"swpfx.save: graphs with a custom code generator ({type(gm.graph._codegen).__name__}) "
                         "are not supported")
    nodes = []
    methods = tensor_methods()
    for node in gm.graph.nodes:
        entry = {"op": node.op, "name": node.name}
        if node.op == "call_function":
            entry["target"] = function_ref(node.target, node)
            if node.target is getattr and (len(node.args) != 2 or node.args[1] not in GETATTR_NAMES):
                raise ValueError(f"swpfx.save: node {node.format_node()} reads an attribute load would refuse "
                                 f"(allowed: {sorted(GETATTR_NAMES)})")
        elif node.op == "call_method":
            if node.target not in methods:
                raise ValueError(f"swpfx.save: node {node.format_node()} calls method {node.target!r}, "
                                 "which is not an allowlisted tensor method")
            entry["target"] = node.target
        else:
            entry["target"] = node.target
        try:
            entry["args"] = encoder(tuple(node.args), allow_nodes=True)
            entry["kwargs"] = encoder(dict(node.kwargs), allow_nodes=True)
        except TypeError as exc:
            raise ValueError(f"swpfx.save: cannot encode the arguments of node {node.format_node()}: {exc}") from exc
        if node.type is not None and annotation_ref(node.type) is not None:
            entry["type"] = annotation_ref(node.type)  # other annotations are dropped (code unaffected otherwise)
        meta = {}
        if META in node.meta:
            try:
                meta[META] = encoder(node.meta[META], allow_tensors=True)
            except TypeError as exc:
                raise ValueError(f"swpfx.save: cannot encode node.meta['swpfx'] of node {node.name}: {exc}") from exc
        if "tensor_meta" in node.meta:
            try:
                meta["tensor_meta"] = Encoder({})(node.meta["tensor_meta"])
            except TypeError:
                pass  # shape analysis only; convert recomputes it
        if node.meta.get("is_wrapped") is True:  # FX emits a wrap() line for these in the code
            meta["is_wrapped"] = True
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
    return nodes


def save(model: fx.GraphModule, path) -> Path:
    """Write ``model`` (a prepared, converted or plain traced GraphModule) to one ``.safetensors`` file.

    Nothing is pickled: the graph and module tree become a JSON plan in the file's
    header, tensors become safetensors data. Raises ``ValueError`` if the model
    uses something :func:`load` would not accept (a leaf module or function
    outside the allowlist). Returns the path.

    Example:
        >>> import torch, swpfx
        >>> from torch import nn
        >>> prepared = swpfx.prepare(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (torch.randn(1, 3, 8, 8),))
        >>> save(prepared, "/tmp/tiny.safetensors").name
        'tiny.safetensors'
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"swpfx.save: expected a torch.fx.GraphModule (from swpfx.prepare, swpfx.convert or "
                        f"torch.fx.symbolic_trace), got {type(model).__name__}")
    tensors: dict[str, torch.Tensor] = {}
    modules, tensor_plan = _plan_modules(model, tensors)
    encoder = Encoder(tensors)
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "class_name": type(model).__name__,
        "modules": modules,
        "tensors": tensor_plan,
        "nodes": _plan_graph(model, encoder),
    }
    if META in model.meta:
        try:
            plan["meta"] = encoder(model.meta[META], allow_tensors=True)
        except TypeError as exc:
            raise ValueError(f"swpfx.save: cannot encode model.meta['swpfx']: {exc}") from exc
    return write_file(path, json.dumps(plan, separators=(",", ":"), allow_nan=False), tensors)

"""Load side: rebuild the module tree and the graph from a validated plan (nothing from the file is executed)."""

from __future__ import annotations

import torch
from torch import fx, nn

from .allowlist import (GETATTR_NAMES, MODULE_TYPES, check_identifier, check_path, construct, fail, own_tensors,
                        resolve_annotation, resolve_function, tensor_methods)
from .codec import Decoder, torch_constant
from .container import META, read_file


def _loaded_tensor(record: dict, tensors: dict[str, torch.Tensor], device) -> torch.Tensor:
    key = record.get("key")
    if key not in tensors or not key.startswith("t/"):
        raise fail(f"tensor '{record.get('path')}' is missing from the file")
    t = tensors.pop(key)  # each module tensor is used once (aliases share it); frees memory as we go
    dtype = torch_constant(record.get("dtype"), torch.dtype, "dtype")
    if list(t.shape) != record.get("shape") or t.dtype != dtype:
        raise fail(f"tensor '{record['path']}' has shape {list(t.shape)} and dtype {t.dtype}, but the plan says "
                    f"{record.get('shape')} and {dtype}")
    # A fresh allocation: safetensors' buffers are not 64-byte aligned, and oneDNN picks
    # different (equally valid) kernels for unaligned weights, which breaks bit-identity.
    return (t.to(device) if device is not None else t).clone()


def _build_modules(plan: dict, tensors: dict, device) -> fx.GraphModule:
    root = fx.GraphModule(nn.Module(), fx.Graph(), check_identifier(plan.get("class_name", "GraphModule"),
                                                                    "class name"))
    by_path: dict[str, nn.Module] = {"": root}
    fresh: dict[str, set[str]] = {}  # module path -> constructor-made tensors still to be loaded
    for entry in plan["modules"]:
        path = entry["path"]
        if path == "":
            root.training = bool(entry.get("training", True))
            continue
        check_path(path, "module path")
        owner_path, _, leaf = path.rpartition(".")
        if owner_path not in by_path:
            raise fail(f"module '{path}' comes before its parent")
        owner = by_path[owner_path]
        if "alias_of" in entry:
            if entry["alias_of"] not in by_path:
                raise fail(f"module alias '{path}' refers to unknown module {entry['alias_of']!r}")
            owner.add_module(leaf, by_path[entry["alias_of"]])
            by_path[path] = by_path[entry["alias_of"]]
            continue
        type_name = entry.get("type")
        if isinstance(type_name, str) and type_name.startswith("owned:"):
            module = owner._modules.get(leaf)
            if module is None or type(module).__name__ != type_name[len("owned:"):]:
                raise fail(f"module '{path}' should have been created by its parent as {type_name[6:]}")
        elif type_name == "Module":
            module = nn.Module()
            owner.add_module(leaf, module)
        else:
            kwargs = Decoder({})(entry.get("kwargs", {"dict": []}))
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise fail(f"malformed constructor arguments for module '{path}'")
            module = construct(type_name, kwargs)
            owner.add_module(leaf, module)
            for sub, m in module.named_modules():
                fresh[f"{path}.{sub}" if sub else path] = set(own_tensors(m))
        module.training = bool(entry.get("training", True))
        by_path[path] = module
    loaded: dict[str, torch.Tensor] = {}
    for record in plan["tensors"]:
        path = check_path(record.get("path"), "tensor path")
        owner_path, _, leaf = path.rpartition(".")
        owner = by_path.get(owner_path)
        if owner is None:
            raise fail(f"tensor '{path}' belongs to unknown module {owner_path!r}")
        if "alias_of" in record:
            if record["alias_of"] not in loaded:
                raise fail(f"tensor alias '{path}' refers to unknown tensor {record['alias_of']!r}")
            t = loaded[record["alias_of"]]
        else:
            t = _loaded_tensor(record, tensors, device)
        kind = record.get("kind")
        expected = own_tensors(owner).get(leaf)
        if expected is not None:
            if expected[0] != kind or (expected[1].shape != t.shape and "alias_of" not in record):
                raise fail(f"{kind} '{path}' has shape {tuple(t.shape)}, but {type(owner).__name__} "
                            f"'{owner_path}' needs {tuple(expected[1].shape)} ({expected[0]})")
            fresh.get(owner_path, set()).discard(leaf)
        if kind == "parameter":
            if not isinstance(t, nn.Parameter):
                t = nn.Parameter(t, requires_grad=bool(record.get("requires_grad", True)))
            owner._parameters[leaf] = t
        elif kind == "buffer":
            owner.register_buffer(leaf, t, persistent=bool(record.get("persistent", True)))
        elif kind == "attribute":
            setattr(owner, leaf, t)
        else:
            raise fail(f"tensor '{path}' has unknown kind {kind!r}")
        loaded[path] = t
    missing = [f"{p}.{n}" for p, names in fresh.items() for n in names]
    if missing:
        raise fail(f"the file has no values for {sorted(missing)[:5]}")
    return root


def _build_graph(plan: dict, root: fx.GraphModule, decoder: Decoder) -> fx.Graph:
    graph = fx.Graph(owning_module=root)
    methods = tensor_methods()
    for entry in plan["nodes"]:
        op, name, target = entry.get("op"), entry.get("name"), entry.get("target")
        check_identifier(name, "node name")
        if op == "placeholder":
            target = check_identifier(target, "placeholder name")
        elif op in ("get_attr", "call_module"):
            check_path(target, f"{op} target")
            try:
                value = root.get_submodule(target) if op == "call_module" else _get_attr(root, target)
            except AttributeError as exc:
                raise fail(f"node {name!r} refers to missing attribute {target!r}") from exc
            if op == "call_module" and type(value).__name__ not in MODULE_TYPES:
                raise fail(f"node {name!r} calls '{target}', which is a {type(value).__name__}, not an "
                            "allowlisted module")
        elif op == "call_function":
            target = resolve_function(target)
        elif op == "call_method":
            if target not in methods:
                raise fail(f"node {name!r} calls method {target!r}, which is not an allowlisted tensor method")
        elif op != "output":
            raise fail(f"node {name!r} has unknown op {op!r}")
        args = decoder(entry.get("args", {"tuple": []}))
        kwargs = decoder(entry.get("kwargs", {"dict": []}))
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise fail(f"node {name!r} has malformed args or kwargs")
        for k in kwargs:
            check_identifier(k, f"keyword of node {name!r}")
        if target is getattr and (len(args) != 2 or args[1] not in GETATTR_NAMES):
            raise fail(f"node {name!r}: getattr is only allowed for the tensor properties {sorted(GETATTR_NAMES)}")
        type_expr = entry.get("type")
        node = graph.create_node(op, target, args, kwargs, name=name,
                                 type_expr=resolve_annotation(type_expr) if type_expr is not None else None)
        if node.name != name:
            raise fail(f"duplicate or reserved node name {name!r}")
        for key, value in (entry.get("meta") or {}).items():
            if key not in (META, "tensor_meta", "is_wrapped") or (key == "is_wrapped" and value is not True):
                raise fail(f"node {name!r} has unsupported meta entry {key!r}")
            node.meta[key] = decoder(value)
        decoder.nodes[name] = node
    return graph


def _get_attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, (torch.Tensor, nn.Module)):
        raise AttributeError(target)
    return obj


def load(path, device=None) -> fx.GraphModule:
    """Read a file written by :func:`save`; returns a new GraphModule (nothing from the file is executed).

    ``device`` moves the tensors (default: CPU). Raises ``ValueError`` for a
    missing, truncated, corrupted or tampered file, or one that names anything
    outside the allowlists; nothing is returned in that case.

    Example:
        >>> import torch, swpfx
        >>> from torch import nn
        >>> from swpfx.persist import save
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> prepared = swpfx.prepare(model, (torch.randn(1, 3, 8, 8),))
        >>> loaded = load(save(prepared, "/tmp/tiny.safetensors"))
        >>> loaded.code == prepared.code
        True
    """
    plan, tensors = read_file(path)
    try:
        root = _build_modules(plan, tensors, device)
        decoder = Decoder(tensors)
        graph = _build_graph(plan, root, decoder)
        root.graph = graph  # sets the owning module and generates forward from the validated graph
        root.graph.lint()
        if "meta" in plan:
            root.meta[META] = decoder(plan["meta"])
    except ValueError:
        raise
    except Exception as exc:  # a malformed plan that slipped past the checks above
        raise fail(f"{path} has a malformed plan: {type(exc).__name__}: {exc}") from exc
    return root


"""``swpfx.save`` / ``swpfx.load``: persist prepared, converted or plain traced GraphModules safely.

One ``.safetensors`` file holds everything:

* the tensors (parameters, buffers, tensor attributes, and tensors found in
  ``meta["swpfx"]`` such as stripe masks) as safetensors data, which is read
  as raw numbers and can never execute code;
* in its metadata header, a JSON *plan*: the module tree (each module as an
  allowlisted ``torch.nn`` type with its constructor arguments, or a plain
  container), every tensor's path, kind, shape and dtype, every graph node (op,
  name, target, args/kwargs as tagged JSON), ``node.meta["swpfx"]`` and
  ``tensor_meta``, and ``model.meta["swpfx"]``;
* a SHA-256 of the plan and the tensors, so a corrupted file is detected.

Loading never unpickles and never imports or calls a name taken from the file
that is not on an allowlist: call_function targets resolve only to tensor
functions of ``torch`` / ``torch.nn.functional`` (those taking part in
``__torch_function__``), listed ``operator`` and ``math`` functions,
``builtins.getattr`` (of tensor properties such as ``shape`` only), ``torchvision.ops`` and the
functions torchvision's traced models wrap; call_method targets only to public
``torch.Tensor`` methods (no hooks, no ``apply_``); node names, targets and
keyword names must be plain identifiers (they become Python code when FX
generates ``forward``). Any violation, a truncated or bit-flipped file, or a
tensor whose shape or dtype disagrees with the plan or with the module that owns
it raises ``ValueError`` and returns nothing.

A call_module target must be an allowlisted module type (what torchvision's
classification models use after tracing); a user leaf module of another type
cannot be saved (``save`` raises ``ValueError`` naming it). Modules that the
graph never calls (e.g. a custom Conv2d subclass that tracing went through)
are restored as plain ``nn.Module`` containers holding their tensors.

Example:
    >>> import torch, torchvision, swpfx
    >>> from swpfx.persist import save, load
    >>> x = torch.randn(1, 3, 32, 32)
    >>> prepared = swpfx.prepare(torchvision.models.resnet18(num_classes=10).eval(), (x,))
    >>> _ = save(prepared, "/tmp/resnet18-prepared.safetensors")
    >>> loaded = load("/tmp/resnet18-prepared.safetensors")
    >>> torch.equal(loaded(x), prepared(x)), list(swpfx.skeletons(loaded))[:2]
    (True, ['conv1', 'layer1.0.conv1'])
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

FORMAT = "swpfx-graph"
VERSION = 1
META = "swpfx"

# ---------------------------------------------------------------- allowlists

MODULE_TYPES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d,
        nn.LocalResponseNorm,
        nn.Linear, nn.Bilinear, nn.Identity, nn.Flatten, nn.Unflatten,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
        nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LogSoftmax, nn.Softplus,
        nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
        nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d, nn.Upsample, nn.PixelShuffle, nn.ChannelShuffle,
        nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
        nn.MultiheadAttention,
    )
}
# Submodules an allowlisted module creates itself (checked by type name, never constructed from the plan).
OWNED_CHILD_TYPES = {"NonDynamicallyQuantizableLinear", "Linear"}

OPERATOR_FUNCTIONS = frozenset({
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
    "getitem", "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "lshift", "rshift",
    "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor",
})
MATH_FUNCTIONS = frozenset({"ceil", "floor", "sqrt", "prod", "log", "log2", "exp", "trunc", "isqrt", "gcd"})
BUILTIN_FUNCTIONS = frozenset({"getattr"})
# getattr nodes may only read these tensor properties (torchvision's traced models use ``shape``).
GETATTR_NAMES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "layout", "is_cuda", "requires_grad"})
TORCHVISION_WRAPPED = {
    "torchvision.models.swin_transformer": frozenset({"_get_relative_position_bias", "shifted_window_attention",
                                                      "_patch_merging_pad"}),
}
TENSOR_METHOD_DENYLIST = frozenset({
    "apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "backward", "storage",
    "untyped_storage", "share_memory_", "numpy", "tolist", "record_stream", "set_", "data_ptr", "retain_grad",
    "pin_memory", "resize_", "resize_as_",
})
NAMESPACES = ("torch", "torch.nn.functional", "operator", "math", "builtins", "torchvision.ops",
              *TORCHVISION_WRAPPED)
# Type annotations FX writes into the generated code (``x : torch.Tensor``, ``-> GoogLeNetOutputs``).
ANNOTATION_TYPES = ("torch:Tensor", "builtins:int", "builtins:float", "builtins:bool", "builtins:str",
                    "torchvision.models.googlenet:GoogLeNetOutputs", "torchvision.models.inception:InceptionOutputs")


def resolve_annotation(ref: str) -> type:
    import importlib

    if ref not in ANNOTATION_TYPES:
        raise _fail(f"unsupported type annotation {ref!r}")
    module_name, name = ref.split(":")
    return getattr(importlib.import_module(module_name), name)  # both parts from the fixed list above


def annotation_ref(t) -> str | None:
    for ref in ANNOTATION_TYPES:
        try:
            if resolve_annotation(ref) is t:
                return ref
        except (ImportError, AttributeError):
            continue
    return None


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# FX writes a non-identifier path part as getattr(x, "part") without escaping: no quotes, no backslashes.
_PATH_PART = re.compile(r"[A-Za-z0-9_-]+\Z")


def _fail(message: str) -> ValueError:
    return ValueError(f"swpfx.load: {message}")


def _namespace(name: str):
    import importlib

    if name not in NAMESPACES:
        raise _fail(f"function namespace {name!r} is not allowed (allowed: {', '.join(NAMESPACES)})")
    return importlib.import_module(name)  # only names from the fixed allowlist above


_torch_function_cache: dict[str, set[int]] = {}


def _overridable_ids(namespace: str) -> set[int]:
    """ids of the tensor functions of ``torch`` / ``torch.nn.functional`` (``__torch_function__`` ones)."""
    if namespace not in _torch_function_cache:
        from torch.overrides import get_overridable_functions

        table = get_overridable_functions()
        key = torch if namespace == "torch" else F
        ids = {id(f) for f in table.get(key, [])}
        if namespace == "torch":
            ids |= {id(f) for f in table.get(torch.functional, [])} | {id(torch._assert)}
        _torch_function_cache[namespace] = ids
    return _torch_function_cache[namespace]


def resolve_function(ref: str):
    """``"module:name"`` -> the function, only if it is on the allowlist (else ValueError)."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise _fail(f"malformed function reference {ref!r}")
    module_name, name = ref.split(":")
    if not _IDENTIFIER.match(name):
        raise _fail(f"malformed function name in {ref!r}")
    module = _namespace(module_name)
    allowed = {
        "operator": lambda: name in OPERATOR_FUNCTIONS,
        "math": lambda: name in MATH_FUNCTIONS,
        "builtins": lambda: name in BUILTIN_FUNCTIONS,
        "torchvision.ops": lambda: name in getattr(module, "__all__", ()) and not name[0].isupper(),
    }
    if module_name in TORCHVISION_WRAPPED:
        ok = name in TORCHVISION_WRAPPED[module_name]
    elif module_name in allowed:
        ok = allowed[module_name]()
    else:  # torch, torch.nn.functional
        ok = hasattr(module, name) and id(getattr(module, name)) in _overridable_ids(module_name)
    if not ok or not hasattr(module, name):
        raise _fail(f"function {ref!r} is not on the allowlist")
    return getattr(module, name)


def function_ref(fn, node: fx.Node) -> str:
    """The allowlisted ``"module:name"`` of a call_function target (ValueError if there is none)."""
    name = getattr(fn, "__name__", None)
    for module_name in NAMESPACES:
        try:
            module = _namespace(module_name)
        except ImportError:
            continue
        if name and getattr(module, name, None) is fn:
            ref = f"{module_name}:{name}"
            try:
                resolve_function(ref)
            except ValueError:
                continue
            return ref
    raise ValueError(f"swpfx.save: node {node.format_node()} calls {fn!r}, which is not on the load allowlist "
                     "(tensor functions of torch / torch.nn.functional, operator, math, getattr, torchvision.ops)")


_tensor_methods: frozenset[str] | None = None


def tensor_methods() -> frozenset[str]:
    global _tensor_methods
    if _tensor_methods is None:
        from torch.overrides import get_overridable_functions

        names = {getattr(f, "__name__", "") for f in get_overridable_functions()[torch.Tensor]}
        _tensor_methods = frozenset(n for n in names if n and not n.startswith("_") and callable(
            getattr(torch.Tensor, n, None))) - TENSOR_METHOD_DENYLIST
    return _tensor_methods


def check_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path or not all(_PATH_PART.match(p) for p in path.split(".")):
        raise _fail(f"malformed {what} {path!r} (expected a dotted path of identifiers)")
    return path


def check_identifier(name: str, what: str) -> str:
    import keyword

    if not isinstance(name, str) or not _IDENTIFIER.match(name) or keyword.iskeyword(name):
        raise _fail(f"malformed {what} {name!r} (expected a Python identifier)")
    return name


# ---------------------------------------------------------------- values <-> tagged JSON


def _enum_name(value) -> str:
    return str(value).removeprefix("torch.")


def _torch_constant(name: str, kind: type, what: str):
    value = getattr(torch, name, None) if isinstance(name, str) and _IDENTIFIER.match(name) else None
    if not isinstance(value, kind):
        raise _fail(f"unknown {what} {name!r}")
    return value


class Encoder:
    """Python values -> tagged JSON; tensors are collected under keys for the safetensors payload."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __call__(self, v, allow_nodes: bool = False, allow_tensors: bool = False):
        enc = lambda x: self(x, allow_nodes, allow_tensors)  # noqa: E731
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"float": repr(v)}
        if isinstance(v, fx.Node):
            if not allow_nodes:
                raise TypeError("a graph node outside the graph")
            return {"node": v.name}
        if isinstance(v, TensorMetadata):
            return {"tensor_meta": [enc(x) for x in v]}
        if isinstance(v, torch.Size):
            return {"size": [int(x) for x in v]}
        if isinstance(v, tuple):
            return {"tuple": [enc(x) for x in v]}
        if isinstance(v, list):
            return [enc(x) for x in v]
        if isinstance(v, dict):
            return {"dict": [[enc(k), enc(x)] for k, x in v.items()]}
        if isinstance(v, slice):
            return {"slice": [enc(v.start), enc(v.stop), enc(v.step)]}
        if v is Ellipsis:
            return {"ellipsis": True}
        if isinstance(v, torch.dtype):
            return {"dtype": _enum_name(v)}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"memory_format": _enum_name(v)}
        if isinstance(v, torch.layout):
            return {"layout": _enum_name(v)}
        if isinstance(v, torch.Tensor) and allow_tensors:
            key = f"meta/{len(self.tensors)}"
            self.tensors[key] = v.detach().cpu().contiguous().clone()
            return {"tensor": key}
        raise TypeError(f"cannot encode a value of type {type(v).__name__}: {v!r}"[:300])


class Decoder:
    """Tagged JSON -> Python values; node references resolve through ``nodes``."""

    def __init__(self, tensors: dict[str, torch.Tensor], nodes: dict[str, fx.Node] | None = None):
        self.tensors = tensors
        self.nodes = nodes if nodes is not None else {}

    def __call__(self, v):
        if v is None or isinstance(v, (bool, str, int, float)):
            return v
        if isinstance(v, list):
            return [self(x) for x in v]
        if not isinstance(v, dict) or len(v) != 1:
            raise _fail(f"malformed value {v!r}"[:200])
        (tag, x), = v.items()
        if tag == "node":
            if x not in self.nodes:
                raise _fail(f"reference to unknown or later node {x!r}")
            return self.nodes[x]
        if tag == "tuple":
            return tuple(self(y) for y in self._list(x, tag))
        if tag == "size":
            return torch.Size([self._int(y) for y in self._list(x, tag)])
        if tag == "dict":
            return {self._key(self(k)): self(y) for k, y in (self._pair(p) for p in self._list(x, tag))}
        if tag == "slice":
            start, stop, step = (self(y) for y in self._list(x, tag, 3))
            return slice(start, stop, step)
        if tag == "ellipsis":
            return Ellipsis
        if tag == "float":
            if x not in ("inf", "-inf", "nan"):
                raise _fail(f"malformed float {x!r}")
            return float(x)
        if tag == "dtype":
            return _torch_constant(x, torch.dtype, "dtype")
        if tag == "memory_format":
            return _torch_constant(x, torch.memory_format, "memory format")
        if tag == "layout":
            return _torch_constant(x, torch.layout, "layout")
        if tag == "device":
            try:
                return torch.device(x)
            except (RuntimeError, TypeError) as exc:
                raise _fail(f"malformed device {x!r}") from exc
        if tag == "tensor_meta":
            fields = [self(y) for y in self._list(x, tag, len(TensorMetadata._fields))]
            return TensorMetadata(*fields)
        if tag == "tensor":
            if x not in self.tensors:
                raise _fail(f"tensor {x!r} is missing from the file")
            return self.tensors[x]
        raise _fail(f"unknown value tag {tag!r}")

    @staticmethod
    def _list(x, tag, n=None):
        if not isinstance(x, list) or (n is not None and len(x) != n):
            raise _fail(f"malformed {tag} value {x!r}"[:200])
        return x

    @staticmethod
    def _int(x):
        if not isinstance(x, int) or isinstance(x, bool):
            raise _fail(f"expected an integer, got {x!r}")
        return x

    @staticmethod
    def _pair(p):
        if not isinstance(p, list) or len(p) != 2:
            raise _fail(f"malformed dict item {p!r}"[:200])
        return p

    @staticmethod
    def _key(k):
        try:
            hash(k)
        except TypeError:
            raise _fail(f"unhashable dict key {k!r}") from None
        return k


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


def construct(type_name: str, kwargs: dict) -> nn.Module:
    """An allowlisted module built on the meta device (its tensors are replaced by the loaded ones)."""
    cls = MODULE_TYPES.get(type_name)
    if cls is None:
        raise _fail(f"module type {type_name!r} is not on the allowlist")
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception as exc:
        raise _fail(f"cannot construct {type_name}({kwargs}): {type(exc).__name__}: {exc}"[:400]) from exc


def own_tensors(module: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    out = {n: ("parameter", p) for n, p in module._parameters.items() if p is not None}
    out.update({n: ("buffer", b) for n, b in module._buffers.items() if b is not None})
    return out


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
            record.update(shape=list(t.shape), dtype=_enum_name(t.dtype), key=f"t/{record['path']}")
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


def _digest(plan: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(plan.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{_enum_name(t.dtype)}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


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
    from safetensors.torch import save_file

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
    text = json.dumps(plan, separators=(",", ":"), allow_nan=False)
    metadata = {"format": FORMAT, "version": str(VERSION), "plan": text, "sha256": _digest(text, tensors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ---------------------------------------------------------------- load


def read_file(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(plan, tensors) after checking the container, the format tag and the SHA-256."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _fail(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated / malformed files
        raise _fail(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                    f"{type(exc).__name__}: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise _fail(f"{path} is not a swpfx model file (format tag {metadata.get('format')!r})")
    if metadata.get("version") != str(VERSION):
        raise _fail(f"{path} has format version {metadata.get('version')!r}; this swpfx reads version {VERSION}")
    text = metadata.get("plan", "")
    if _digest(text, tensors) != metadata.get("sha256"):
        raise _fail(f"{path} is corrupted: its checksum does not match its contents")
    try:
        plan = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise _fail(f"{path} has a malformed plan: {type(exc).__name__}: {exc}") from exc
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise _fail(f"{path} has a malformed plan")
    return plan, tensors


def _loaded_tensor(record: dict, tensors: dict[str, torch.Tensor], device) -> torch.Tensor:
    key = record.get("key")
    if key not in tensors or not key.startswith("t/"):
        raise _fail(f"tensor '{record.get('path')}' is missing from the file")
    t = tensors.pop(key)  # each module tensor is used once (aliases share it); frees memory as we go
    dtype = _torch_constant(record.get("dtype"), torch.dtype, "dtype")
    if list(t.shape) != record.get("shape") or t.dtype != dtype:
        raise _fail(f"tensor '{record['path']}' has shape {list(t.shape)} and dtype {t.dtype}, but the plan says "
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
            raise _fail(f"module '{path}' comes before its parent")
        owner = by_path[owner_path]
        if "alias_of" in entry:
            if entry["alias_of"] not in by_path:
                raise _fail(f"module alias '{path}' refers to unknown module {entry['alias_of']!r}")
            owner.add_module(leaf, by_path[entry["alias_of"]])
            by_path[path] = by_path[entry["alias_of"]]
            continue
        type_name = entry.get("type")
        if isinstance(type_name, str) and type_name.startswith("owned:"):
            module = owner._modules.get(leaf)
            if module is None or type(module).__name__ != type_name[len("owned:"):]:
                raise _fail(f"module '{path}' should have been created by its parent as {type_name[6:]}")
        elif type_name == "Module":
            module = nn.Module()
            owner.add_module(leaf, module)
        else:
            kwargs = Decoder({})(entry.get("kwargs", {"dict": []}))
            if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                raise _fail(f"malformed constructor arguments for module '{path}'")
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
            raise _fail(f"tensor '{path}' belongs to unknown module {owner_path!r}")
        if "alias_of" in record:
            if record["alias_of"] not in loaded:
                raise _fail(f"tensor alias '{path}' refers to unknown tensor {record['alias_of']!r}")
            t = loaded[record["alias_of"]]
        else:
            t = _loaded_tensor(record, tensors, device)
        kind = record.get("kind")
        expected = own_tensors(owner).get(leaf)
        if expected is not None:
            if expected[0] != kind or (expected[1].shape != t.shape and "alias_of" not in record):
                raise _fail(f"{kind} '{path}' has shape {tuple(t.shape)}, but {type(owner).__name__} "
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
            raise _fail(f"tensor '{path}' has unknown kind {kind!r}")
        loaded[path] = t
    missing = [f"{p}.{n}" for p, names in fresh.items() for n in names]
    if missing:
        raise _fail(f"the file has no values for {sorted(missing)[:5]}")
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
                raise _fail(f"node {name!r} refers to missing attribute {target!r}") from exc
            if op == "call_module" and type(value).__name__ not in MODULE_TYPES:
                raise _fail(f"node {name!r} calls '{target}', which is a {type(value).__name__}, not an "
                            "allowlisted module")
        elif op == "call_function":
            target = resolve_function(target)
        elif op == "call_method":
            if target not in methods:
                raise _fail(f"node {name!r} calls method {target!r}, which is not an allowlisted tensor method")
        elif op != "output":
            raise _fail(f"node {name!r} has unknown op {op!r}")
        args = decoder(entry.get("args", {"tuple": []}))
        kwargs = decoder(entry.get("kwargs", {"dict": []}))
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise _fail(f"node {name!r} has malformed args or kwargs")
        for k in kwargs:
            check_identifier(k, f"keyword of node {name!r}")
        if target is getattr and (len(args) != 2 or args[1] not in GETATTR_NAMES):
            raise _fail(f"node {name!r}: getattr is only allowed for the tensor properties {sorted(GETATTR_NAMES)}")
        type_expr = entry.get("type")
        node = graph.create_node(op, target, args, kwargs, name=name,
                                 type_expr=resolve_annotation(type_expr) if type_expr is not None else None)
        if node.name != name:
            raise _fail(f"duplicate or reserved node name {name!r}")
        for key, value in (entry.get("meta") or {}).items():
            if key not in (META, "tensor_meta", "is_wrapped") or (key == "is_wrapped" and value is not True):
                raise _fail(f"node {name!r} has unsupported meta entry {key!r}")
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
        raise _fail(f"{path} has a malformed plan: {type(exc).__name__}: {exc}") from exc
    return root

"""What ``swpfx.load`` accepts: the one place listing allowed module types, functions, methods and names.

To allow another module type, add it to ``MODULE_TYPES``; another function, to the
matching ``*_FUNCTIONS`` set or namespace. Everything else in ``swpfx.persist``
reads these tables and never resolves a name any other way.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import fx, nn

from swpfx.kernels.buffers import KernelBuffers
from swpfx.kernels.fused_conv import FusedStripeConv2d
from swpfx.kernels.max_pool import CompiledMaxPool2d
from swpfx.passes.graph_utils import NEW_TENSOR_METHODS

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
        FusedStripeConv2d, CompiledMaxPool2d, KernelBuffers,
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
# Tensor methods torch.overrides does not list (new_ones..., which remove_channels' ones maps call).
CONSTRUCTOR_METHODS = NEW_TENSOR_METHODS
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
        raise fail(f"unsupported type annotation {ref!r}")
    module_name, name = ref.split(":")
    return getattr(importlib.import_module(module_name), name)  # both parts from the fixed list above


def annotation_ref(t) -> str | None:
    return next((ref for ref in ANNOTATION_TYPES if resolve_annotation(ref) is t), None)


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# FX writes a non-identifier path part as getattr(x, "part") without escaping: no quotes, no backslashes.
_PATH_PART = re.compile(r"[A-Za-z0-9_-]+\Z")


def fail(message: str) -> ValueError:
    return ValueError(f"swpfx.load: {message}")


def _namespace(name: str):
    import importlib

    if name not in NAMESPACES:
        raise fail(f"function namespace {name!r} is not allowed (allowed: {', '.join(NAMESPACES)})")
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
        raise fail(f"malformed function reference {ref!r}")
    module_name, name = ref.split(":")
    if not _IDENTIFIER.match(name):
        raise fail(f"malformed function name in {ref!r}")
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
        raise fail(f"function {ref!r} is not on the allowlist")
    return getattr(module, name)


def function_ref(fn, node: fx.Node) -> str:
    """The allowlisted ``"module:name"`` of a call_function target (ValueError if there is none)."""
    name = getattr(fn, "__name__", None)
    for module_name in NAMESPACES:
        module = _namespace(module_name)
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
        _tensor_methods = (frozenset(n for n in names if n and not n.startswith("_") and callable(
            getattr(torch.Tensor, n, None))) | CONSTRUCTOR_METHODS) - TENSOR_METHOD_DENYLIST
    return _tensor_methods


def check_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path or not all(_PATH_PART.match(p) for p in path.split(".")):
        raise fail(f"malformed {what} {path!r} (expected a dotted path of identifiers)")
    return path


def check_identifier(name: str, what: str) -> str:
    import keyword

    if not isinstance(name, str) or not _IDENTIFIER.match(name) or keyword.iskeyword(name):
        raise fail(f"malformed {what} {name!r} (expected a Python identifier)")
    return name



# ---------------------------------------------------------------- allowlisted module constructors


def construct(type_name: str, kwargs: dict) -> nn.Module:
    """An allowlisted module built on the meta device (its tensors are replaced by the loaded ones)."""
    cls = MODULE_TYPES.get(type_name)
    if cls is None:
        raise fail(f"module type {type_name!r} is not on the allowlist")
    try:
        with torch.device("meta"):
            return cls(**kwargs)
    except Exception as exc:
        raise fail(f"cannot construct {type_name}({kwargs}): {type(exc).__name__}: {exc}"[:400]) from exc


def own_tensors(module: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    out = {n: ("parameter", p) for n, p in module._parameters.items() if p is not None}
    out.update({n: ("buffer", b) for n, b in module._buffers.items() if b is not None})
    return out



"""Python values <-> tagged JSON (the plan's encoding of node args, kwargs and ``node.meta``)."""

from __future__ import annotations

import math

import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata

from .allowlist import _IDENTIFIER, fail



def enum_name(value) -> str:
    return str(value).removeprefix("torch.")


def torch_constant(name: str, kind: type, what: str):
    value = getattr(torch, name, None) if isinstance(name, str) and _IDENTIFIER.match(name) else None
    if not isinstance(value, kind):
        raise fail(f"unknown {what} {name!r}")
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
            return {"dtype": enum_name(v)}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, torch.memory_format):
            return {"memory_format": enum_name(v)}
        if isinstance(v, torch.layout):
            return {"layout": enum_name(v)}
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
            raise fail(f"malformed value {v!r}"[:200])
        (tag, x), = v.items()
        if tag == "node":
            if x not in self.nodes:
                raise fail(f"reference to unknown or later node {x!r}")
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
                raise fail(f"malformed float {x!r}")
            return float(x)
        if tag == "dtype":
            return torch_constant(x, torch.dtype, "dtype")
        if tag == "memory_format":
            return torch_constant(x, torch.memory_format, "memory format")
        if tag == "layout":
            return torch_constant(x, torch.layout, "layout")
        if tag == "device":
            try:
                return torch.device(x)
            except (RuntimeError, TypeError) as exc:
                raise fail(f"malformed device {x!r}") from exc
        if tag == "tensor_meta":
            fields = [self(y) for y in self._list(x, tag, len(TensorMetadata._fields))]
            return TensorMetadata(*fields)
        if tag == "tensor":
            if x not in self.tensors:
                raise fail(f"tensor {x!r} is missing from the file")
            return self.tensors[x]
        raise fail(f"unknown value tag {tag!r}")

    @staticmethod
    def _list(x, tag, n=None):
        if not isinstance(x, list) or (n is not None and len(x) != n):
            raise fail(f"malformed {tag} value {x!r}"[:200])
        return x

    @staticmethod
    def _int(x):
        if not isinstance(x, int) or isinstance(x, bool):
            raise fail(f"expected an integer, got {x!r}")
        return x

    @staticmethod
    def _pair(p):
        if not isinstance(p, list) or len(p) != 2:
            raise fail(f"malformed dict item {p!r}"[:200])
        return p

    @staticmethod
    def _key(k):
        try:
            hash(k)
        except TypeError:
            raise fail(f"unhashable dict key {k!r}") from None
        return k



"""safetensors I/O: one file holding the tensors, the JSON plan in its header and a SHA-256 of both."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from swpfx.passes.graph_utils import META_KEY

from .allowlist import fail
from .codec import enum_name

FORMAT = "swpfx-graph"
VERSION = 1
META = META_KEY  # the node.meta / model.meta key whose contents are saved


def digest(plan: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(plan.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{enum_name(t.dtype)}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return h.hexdigest()


def write_file(path, plan: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` with the JSON ``plan`` and the checksum in the header, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    metadata = {"format": FORMAT, "version": str(VERSION), "plan": plan, "sha256": digest(plan, tensors)}
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


def read_file(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(plan, tensors) after checking the container, the format tag and the SHA-256."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise fail(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated / malformed files
        raise fail(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                    f"{type(exc).__name__}: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise fail(f"{path} is not a swpfx model file (format tag {metadata.get('format')!r})")
    if metadata.get("version") != str(VERSION):
        raise fail(f"{path} has format version {metadata.get('version')!r}; this swpfx reads version {VERSION}")
    text = metadata.get("plan", "")
    if digest(text, tensors) != metadata.get("sha256"):
        raise fail(f"{path} is corrupted: its checksum does not match its contents")
    try:
        plan = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise fail(f"{path} has a malformed plan: {type(exc).__name__}: {exc}") from exc
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise fail(f"{path} has a malformed plan")
    return plan, tensors



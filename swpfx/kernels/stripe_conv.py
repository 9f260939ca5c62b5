"""A fused stripe-sparse 2-D convolution on the CPU (DESIGN.md §4b, issue 14).

The C++ kernel (``stripe_conv.cpp`` next to this file) is compiled on first use
with the system compiler (``$CXX`` or ``g++``; ``-O3 -march=native -pthread``)
into a cache directory keyed by the source, the flags, the compiler version and
the CPU's feature flags (``$SWPFX_KERNEL_CACHE``, default
``~/.cache/swpfx/kernels``), then loaded with :mod:`ctypes`. The vector width
follows the CPU it is built on: AVX-512, AVX2+FMA, or portable vector code.
Threads come from a small pool inside the library (the caller plus workers that
sleep when idle), not from OpenMP: libgomp's default spin-waiting, shared with
torch's OpenMP runtime, made 2-thread calls 30x slower on a busy machine.

``stripe_conv2d(x, pack_weights(weight, mask), bias, stride, padding)`` equals
``F.conv2d(x, weight * mask[:, None], bias, stride, padding)`` (float32, to
rounding) while doing only the kept stripes' multiply-adds.

Example:
    >>> import torch
    >>> from swpfx.kernels import stripe_conv
    >>> from swpfx.masks import random_stripe_mask
    >>> if stripe_conv.is_available():
    ...     w = torch.randn(16, 8, 3, 3); m = random_stripe_mask(16, 3, 3, generator=torch.Generator().manual_seed(0))
    ...     x = torch.randn(1, 8, 10, 10)
    ...     y = stripe_conv.stripe_conv2d(x, stripe_conv.pack_weights(w, m), stride=2)
    ...     ref = torch.nn.functional.conv2d(x, w * m[:, None], stride=2, padding=1)
    ...     assert torch.allclose(y, ref, atol=1e-4)

Set ``SWPFX_NO_KERNELS=1`` to make :func:`is_available` return False (the
callers then use the standard-op forms); ``SWPFX_KERNEL_EXTRA_FLAGS`` appends
compiler flags (``-march=haswell`` tests the AVX2 path on an AVX-512 CPU,
``-march=x86-64`` the portable one).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("stripe_conv.cpp")
BASE_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread")
DEFAULT_THREADS = 2

__all__ = ["is_available", "unavailable_reason", "kernel_info", "pack_weights", "stripe_conv2d",
           "StripePackedWeights"]


# ----------------------------------------------------------------------------- build and load

def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() + " " + platform.processor()


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    return shutil.which("g++") or shutil.which("c++")


def _cache_root() -> Path:
    env = os.environ.get("SWPFX_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swpfx" / "kernels"


def _compile(cxx: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Compile SOURCE into ``target`` atomically; None on success, else the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return (proc.stderr or proc.stdout).strip()[-2000:] or f"exit code {proc.returncode}"
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    i64, c_int, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    for name in ("swp_vector_width", "swp_default_pv", "swp_default_f", "swp_max_pv", "swp_max_f"):
        getattr(lib, name).restype = c_int
        getattr(lib, name).argtypes = []
    lib.swp_isa.restype = ctypes.c_char_p
    lib.swp_isa.argtypes = []
    lib.swp_plan_create.restype = vp
    lib.swp_plan_create.argtypes = ([i64] * 10 + [vp] * 11 + [i64, c_int, c_int, c_int, c_int,
                                                               ctypes.POINTER(c_int)])
    lib.swp_plan_destroy.restype = None
    lib.swp_plan_destroy.argtypes = [vp]
    lib.swp_plan_run.restype = c_int
    lib.swp_plan_run.argtypes = [vp, vp, i64, vp, vp, vp, c_int]


@functools.lru_cache(maxsize=1)
def _library():
    """(ctypes library, info dict) or (None, reason)."""
    if os.environ.get("SWPFX_NO_KERNELS"):
        return None, "disabled by SWPFX_NO_KERNELS"
    if not SOURCE.is_file():
        return None, f"kernel source {SOURCE} is missing from the installation"
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found (set $CXX or install g++); the fused stripe kernel is built on first use"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"C++ compiler {cxx} does not run: {exc}"
    source = SOURCE.read_bytes()
    errors = []
    # e.g. SWPFX_KERNEL_EXTRA_FLAGS=-march=haswell builds the AVX2 path on an AVX-512 machine (the last -march wins)
    extra = tuple(os.environ.get("SWPFX_KERNEL_EXTRA_FLAGS", "").split())
    for flags in (BASE_FLAGS + extra,):
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), _cpu_flags().encode(),
                                         " ".join(version).encode(), cxx.encode()])).hexdigest()[:20]
        target = _cache_root() / key / "stripe_conv.so"
        if not target.is_file():
            try:
                error = _compile(cxx, flags, target)
            except (OSError, subprocess.SubprocessError) as exc:
                error = str(exc)
            if error is not None:
                errors.append(f"{cxx} {' '.join(flags)}: {error}")
                continue
        try:
            lib = ctypes.CDLL(str(target))
            _declare(lib)
        except OSError as exc:
            errors.append(f"loading {target}: {exc}")
            continue
        info = {"path": str(target), "compiler": cxx, "compiler_version": version[0] if version else "",
                "flags": " ".join(flags), "isa": lib.swp_isa().decode(), "vector_width": lib.swp_vector_width(),
                "threading": "built-in pool (std::thread)", "default_pv": lib.swp_default_pv(),
                "default_f": lib.swp_default_f(), "max_pv": lib.swp_max_pv(), "max_f": lib.swp_max_f()}
        return lib, info
    return None, "building the fused stripe kernel failed: " + " | ".join(errors)


def is_available() -> bool:
    """True when the kernel is (or can be) compiled and loaded on this machine (builds it on first call)."""
    return _library()[0] is not None


def unavailable_reason() -> str | None:
    """Why :func:`is_available` is False (None when it is True)."""
    lib, info = _library()
    return None if lib is not None else info


def kernel_info() -> dict:
    """The build: library path, compiler, flags, ISA (``avx512f``/``avx2+fma``/``generic``), vector width."""
    lib, info = _library()
    if lib is None:
        raise RuntimeError(f"swpfx.kernels.stripe_conv: kernel unavailable: {info}")
    return dict(info)


def _require():
    lib, info = _library()
    if lib is None:
        raise RuntimeError(f"swpfx.kernels.stripe_conv: kernel unavailable: {info}")
    return lib, info


# ----------------------------------------------------------------------------- weights

def _to_numpy(a, dtype) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def _addr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


class _Plan:
    """A compiled-side plan: one input geometry x one table layout; owns the padded-input workspace."""

    def __init__(self, lib, packed: "StripePackedWeights", key: tuple, tables: dict, pv: int, cc: int, m: int,
                 threads: int):
        c, h, w, kh, kw, sh, sw, ph, pw = key
        self._lib, self._tables = lib, tables  # the C side borrows the tables' memory
        error = ctypes.c_int(0)
        t = tables
        self.handle = lib.swp_plan_create(
            c, h, w, packed.out_channels, kh, kw, sh, sw, ph, pw,
            _addr(t["wpack"]), _addr(t["blk_woff"]), _addr(t["blk_tap"]), _addr(t["blk_nf"]), _addr(t["blk_rows"]),
            _addr(t["blk_first"]), _addr(t["rows"]), _addr(t["grp_blk"]), _addr(t["grp_filt"]), _addr(t["filters"]),
            _addr(t["alive"]), t["groups"],
            pv, cc, m, threads, ctypes.byref(error))
        if not self.handle:
            raise RuntimeError(f"swpfx.kernels.stripe_conv: the kernel rejected the plan (code {error.value})")
        self.lock = threading.Lock()

    def __del__(self):
        if getattr(self, "handle", None):
            self._lib.swp_plan_destroy(self.handle)
            self.handle = None


class StripePackedWeights:
    """A stripe-pruned conv weight packed for the kernel (see :func:`pack_weights`).

    Attributes: ``out_channels``, ``in_channels``, ``kernel_size``, ``mask``
    (bool (O, Kh, Kw)), ``kept_stripes``, ``kept_fraction``, ``flop_ratio``
    (dense MACs / kept MACs). Per-layout tables (filter groups x blocks) are
    built lazily per group count and cached on the object.
    """

    def __init__(self, weight: np.ndarray, mask: np.ndarray, block: int):
        self.out_channels, self.in_channels, kh, kw = weight.shape
        self.kernel_size = (kh, kw)
        self.mask = mask
        self.block = block
        self._weight = weight  # (O, C, Kh, Kw), float32
        self.kept_stripes = int(mask.sum())
        self.kept_fraction = self.kept_stripes / mask.size
        self.flop_ratio = mask.size / self.kept_stripes if self.kept_stripes else math.inf
        self._tables: dict[int, dict] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        o, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        return (f"StripePackedWeights({o}x{c}x{kh}x{kw}, kept {self.kept_stripes}/{self.mask.size} stripes, "
                f"block {self.block})")

    def tables(self, groups: int) -> dict:
        """Block tables for ``groups`` filter groups (contiguous filter ranges balanced by kept stripes)."""
        groups = max(1, min(int(groups), self.out_channels))
        with self._lock:
            if groups not in self._tables:
                self._tables[groups] = self._build(groups)
            return self._tables[groups]

    def _build(self, groups: int) -> dict:
        o_n, c_n, kh, kw = self._weight.shape
        per_filter = self.mask.reshape(o_n, kh * kw)
        counts = per_filter.sum(axis=1)
        # contiguous split of the filters into `groups` ranges of about equal kept stripes
        cum = np.concatenate([[0], np.cumsum(counts)])
        total = cum[-1]
        bounds = [0]
        for g in range(1, groups):
            bounds.append(int(np.searchsorted(cum, total * g / groups, side="left")))
        bounds.append(o_n)
        bounds = np.maximum.accumulate(np.clip(bounds, 0, o_n))
        w_taps = self._weight.reshape(o_n, c_n, kh * kw)
        chunks, woff, btap, bnf, brows, bfirst, rows, grp_blk = [], [], [], [], [], [], [], [0]
        alive = np.zeros(o_n, np.uint8)
        offset = 0
        for g in range(groups):
            f0, f1 = int(bounds[g]), int(bounds[g + 1])
            seen = np.zeros(f1 - f0, bool)
            for t in range(kh * kw):
                local = np.nonzero(per_filter[f0:f1, t])[0]
                if local.size == 0:
                    continue
                n_blocks = -(-local.size // self.block)
                for part in np.array_split(local, n_blocks):  # near-equal blocks, none tiny
                    woff.append(offset)
                    btap.append(t)
                    bnf.append(part.size)
                    brows.append(len(rows))
                    rows.extend(part.tolist())
                    bfirst.append(sum(1 << k for k, r in enumerate(part.tolist()) if not seen[r]))
                    seen[part] = True
                    w = np.ascontiguousarray(w_taps[f0 + part, :, t].T)  # (C, nf)
                    chunks.append(w.reshape(-1))
                    offset += w.size
            grp_blk.append(len(btap))
            alive[f0:f1] = seen
        return {
            "groups": groups,
            "wpack": np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(1, np.float32),
            "blk_woff": np.asarray(woff, np.int64).reshape(-1) if woff else np.zeros(1, np.int64),
            "blk_tap": np.asarray(btap if btap else [0], np.int32),
            "blk_nf": np.asarray(bnf if bnf else [1], np.int32),
            "blk_rows": np.asarray(brows if brows else [0], np.int32),
            "blk_first": np.asarray(bfirst if bfirst else [0], np.int32),
            "alive": alive,
            "rows": np.asarray(rows if rows else [0], np.int32),
            "grp_blk": np.asarray(grp_blk, np.int32),
            "grp_filt": np.asarray(bounds, np.int32),
            "filters": np.arange(o_n, dtype=np.int32),
        }

    def plan(self, lib, key: tuple, groups: int, pv: int, cc: int, m: int, threads: int) -> _Plan:
        """The cached kernel plan for an input geometry ``key`` and the tuning knobs."""
        full = key + (groups, pv, cc, m, threads)
        tables = self.tables(groups)
        with self._lock:
            plan = self._plans.get(full)
            if plan is None:
                plan = _Plan(lib, self, key, tables, pv, cc, m, threads)
                self._plans[full] = plan
            return plan


def pack_weights(weight, mask, block: int | None = None) -> StripePackedWeights:
    """Pack a conv weight ``(O, C, Kh, Kw)`` and its stripe mask ``(O, Kh, Kw)`` (bool) for :func:`stripe_conv2d`.

    Per kernel tap, the filters keeping that tap are listed and split into
    near-equal blocks of at most ``block`` filters (the register block; default
    per ISA), each block's weights stored as ``[C][block]``. Pruned stripes are
    never stored or multiplied. Accepts numpy arrays or torch tensors.
    """
    w = _to_numpy(weight, np.float32)
    m = _to_numpy(mask, bool)
    if w.ndim != 4:
        raise ValueError(f"swpfx.kernels.stripe_conv.pack_weights: weight must be (O, C, Kh, Kw), got {w.shape}")
    if m.shape != (w.shape[0], w.shape[2], w.shape[3]):
        raise ValueError(f"swpfx.kernels.stripe_conv.pack_weights: mask must be (O, Kh, Kw) = "
                         f"{(w.shape[0], w.shape[2], w.shape[3])}, got {m.shape}")
    _, info = _require()
    block = info["default_f"] if block is None else int(block)
    if not 1 <= block <= info["max_f"]:
        raise ValueError(f"swpfx.kernels.stripe_conv.pack_weights: block must be in 1..{info['max_f']}, got {block}")
    return StripePackedWeights(w, m, block)


# ----------------------------------------------------------------------------- forward

def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: {name} must be an int or a pair, got {v}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def default_groups(packed: StripePackedWeights, n_tiles: int, threads: int) -> int:
    """Filter groups so that there are at least 4 work items per thread (1 when pixel tiles suffice)."""
    want = 4 * threads
    if n_tiles >= want:
        return 1
    return max(1, min(packed.out_channels // 8 or 1, -(-want // n_tiles)))


def default_tiles_per_item(n_tiles: int, groups: int, threads: int, tile_pixels: int) -> int:
    """Micro-tiles per work item: up to ~256 pixels, keeping >= 4 items per thread."""
    per_group = max(1, (4 * threads) // groups)
    return max(1, min(max(1, 256 // tile_pixels), n_tiles // per_group))


def stripe_conv2d(x, packed: StripePackedWeights, bias=None, stride=1, padding=None, *, relu: bool = False,
                  residual=None, threads: int = DEFAULT_THREADS, groups: int | None = None, pv: int | None = None,
                  channel_chunk: int | None = None, tiles_per_item: int | None = None,
                  out: np.ndarray | None = None):
    """``F.conv2d(x, weight * mask[:, None], bias, stride, padding)`` (+ ``residual``, then ReLU if ``relu``).

    ``x`` is float32 ``(N, C, H, W)`` or ``(C, H, W)`` (numpy or torch; torch in,
    torch out). ``padding`` defaults to ``K // 2`` (zero padding); ``stride``
    and ``padding`` are ints or pairs; no dilation or groups. ``threads`` is the
    number of threads (the caller's plus a shared worker pool). ``groups``
    (filter groups), ``pv`` (pixel vectors per micro-tile), ``channel_chunk``
    and ``tiles_per_item`` are tuning knobs (defaults are heuristics).
    """
    lib, info = _require()
    is_torch = hasattr(x, "detach")
    xa = _to_numpy(x, np.float32)
    squeeze = xa.ndim == 3
    if squeeze:
        xa = xa[None]
    if xa.ndim != 4:
        raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: x must be (N, C, H, W), got {xa.shape}")
    n, c, h, w = xa.shape
    kh, kw = packed.kernel_size
    if c != packed.in_channels:
        raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: x has {c} channels, the weight expects "
                         f"{packed.in_channels}")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair((kh // 2, kw // 2) if padding is None else padding, "padding")
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: unsupported stride {stride} / padding {padding}")
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: input {h}x{w} too small for kernel {kh}x{kw}")
    o = packed.out_channels
    threads = max(1, int(threads))
    pv = info["default_pv"] if pv is None else int(pv)
    if not 1 <= pv <= info["max_pv"]:
        raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: pv must be in 1..{info['max_pv']}")
    vl = info["vector_width"]
    wq = wo + (kw - 1) // sw
    n_vec = -(-(ho * wq) // vl)
    n_tiles = -(-n_vec // pv)
    if groups is None:
        groups = default_groups(packed, n_tiles, threads)
    if tiles_per_item is None:
        tiles_per_item = default_tiles_per_item(n_tiles, groups, threads, pv * vl)
    cc = 128 if channel_chunk is None else int(channel_chunk)

    b = None if bias is None else _to_numpy(bias, np.float32).reshape(-1)
    if b is not None and b.size != o:
        raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: bias has {b.size} values, expected {o}")
    r = None
    if residual is not None:
        r = _to_numpy(residual, np.float32).reshape(n, o, ho, wo)
    if out is None:
        out = np.empty((n, o, ho, wo), np.float32)
    elif out.shape != (n, o, ho, wo) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: out must be contiguous float32 {(n, o, ho, wo)}")
    plan = packed.plan(lib, (c, h, w, kh, kw, sh, sw, ph, pw), int(groups), pv, cc, int(tiles_per_item), threads)
    with plan.lock:  # a plan owns its workspace: one call at a time
        code = lib.swp_plan_run(plan.handle, xa.ctypes.data, n, out.ctypes.data, _addr(b), _addr(r),
                                int(bool(relu)))
    if code != 0:
        raise RuntimeError(f"swpfx.kernels.stripe_conv.stripe_conv2d: kernel rejected its arguments (code {code})")
    if squeeze:
        out = out[0]
    if is_torch:
        import torch

        return torch.from_numpy(out)
    return out

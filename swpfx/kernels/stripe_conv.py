"""A fused stripe-sparse 2-D convolution on the CPU (DESIGN.md §4b, issue 14).

The C++ kernel (``stripe_conv.cpp`` next to this file) is compiled on first use
with the system compiler (``$CXX`` or ``g++``; ``-O3 -march=native -pthread``)
into a cache directory keyed by the source, the flags, the compiler version and
the CPU's feature flags (``$SWPFX_KERNEL_CACHE``, default
``~/.cache/swpfx/kernels``), then loaded with :mod:`ctypes`. The vector width
follows the CPU it is built on (detected by the compiler, never assumed):
AVX-512, AVX2+FMA, or portable vector code.

Threads come from a small pool inside the library (the caller plus workers that
spin briefly after a call, then sleep), not from OpenMP: libgomp's default
spin-waiting, shared with torch's OpenMP runtime, made 2-thread calls 30x slower
on a busy machine. A second build, ``pool="openmp"`` (``-fopenmp``), runs the same
work items on the process's OpenMP threads instead; loaded after torch it binds
torch's libgomp, so inside a torch model the kernel and torch's ops share one
pool (what ``swpfx.kernels.fused_conv`` uses). The two builds give identical results.
The output is partitioned into row bands x filter groups (:func:`partition`); each
thread packs only the input rows of its own bands into its own buffer and stores
its own outputs, so threads share no accumulator, no
input copy and no barrier. With "same"-style padding the packed rows hold only
the real input columns and the taps that reach into the padding mask those
lanes, so no output is computed and discarded (``SWPFX_KERNEL_PADDED_ROWS=1``
stores the padding instead, as for other paddings); at stride 1 those rows are
the input's own, so such a conv reads its input in place and packs nothing
(``SWPFX_KERNEL_PACK_ALL=1`` packs anyway, for tests and comparisons). On Linux
the workers are pinned to CPUs other than the caller's (``SWPFX_KERNEL_PIN=0``
turns that off; ``SWPFX_KERNEL_SPIN_US`` sets the spin time, default 100).

``stripe_conv2d(x, pack_weights(weight, mask), bias, stride, padding, dilation)``
equals ``F.conv2d(x, weight * mask[:, None], bias, stride, padding, dilation)``
(float32, to rounding) while doing only the kept stripes' multiply-adds. Zero
padding only (ints or pairs); no groups.

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

__all__ = ["is_available", "unavailable_reason", "kernel_info", "pack_weights", "stripe_conv2d", "bind", "partition",
           "StripePackedWeights", "BoundStripeConv", "POOLS", "max_pool2d_into"]


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
    for name in ("swp_vector_width", "swp_default_pv", "swp_default_f", "swp_max_pv", "swp_max_f",
                 "swp_max_threads"):
        getattr(lib, name).restype = c_int
        getattr(lib, name).argtypes = []
    for name in ("swp_isa", "swp_threading"):
        getattr(lib, name).restype = ctypes.c_char_p
        getattr(lib, name).argtypes = []
    lib.swp_plan_create.restype = vp
    lib.swp_plan_create.argtypes = ([i64] * 12 + [vp] * 11 + [i64, vp, i64, vp, c_int, c_int, ctypes.POINTER(c_int)])
    lib.swp_plan_destroy.restype = None
    lib.swp_plan_destroy.argtypes = [vp]
    lib.swp_plan_run.restype = c_int
    lib.swp_plan_run.argtypes = [vp, vp, i64, vp, vp, vp, c_int]
    lib.swp_plan_dense.restype = c_int
    lib.swp_plan_dense.argtypes = [vp]
    lib.swp_plan_in_place.restype = c_int
    lib.swp_plan_in_place.argtypes = [vp]
    lib.swp_pool_wake.restype = None
    lib.swp_pool_wake.argtypes = [c_int]
    lib.swp_max_pool2d.restype = c_int
    lib.swp_max_pool2d.argtypes = [vp, vp] + [i64] * 11 + [c_int]


def _l2_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index2/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 1 << 20


POOLS = ("own", "openmp")  # the kernel's thread pool: its own workers, or the process's OpenMP threads (for torch)


@functools.lru_cache(maxsize=None)
def _library(pool: str = "own"):
    """(ctypes library, info dict) or (None, reason), for the build with that ``pool`` (see :data:`POOLS`)."""
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
    for flags in (BASE_FLAGS + (("-fopenmp",) if pool == "openmp" else ()) + extra,):
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
        except (OSError, AttributeError) as exc:
            errors.append(f"loading {target}: {exc}")
            continue
        info = {"path": str(target), "compiler": cxx, "compiler_version": version[0] if version else "",
                "flags": " ".join(flags), "isa": lib.swp_isa().decode(), "vector_width": lib.swp_vector_width(),
                "threading": lib.swp_threading().decode(), "pool": pool,
                "default_pv": lib.swp_default_pv(), "default_f": lib.swp_default_f(), "max_pv": lib.swp_max_pv(),
                "max_f": lib.swp_max_f(), "max_threads": lib.swp_max_threads(), "l2_bytes": _l2_bytes()}
        return lib, info
    return None, "building the fused stripe kernel failed: " + " | ".join(errors)


def is_available(pool: str = "own") -> bool:
    """True when the kernel is (or can be) compiled and loaded on this machine (builds it on first call).

    ``pool="openmp"`` asks for the build whose work runs on the process's OpenMP
    threads (``-fopenmp``): inside torch, torch's own, so the two share the cores.
    """
    return _library(pool)[0] is not None


def unavailable_reason(pool: str = "own") -> str | None:
    """Why :func:`is_available` is False (None when it is True)."""
    lib, info = _library(pool)
    return None if lib is not None else info


def kernel_info(pool: str = "own") -> dict:
    """The build: library path, compiler, flags, ISA (``avx512f``/``avx2+fma``/``generic``), vector width, threading."""
    return dict(_require(pool)[1])


def _require(pool: str = "own"):
    if pool not in POOLS:
        raise ValueError(f"swpfx.kernels.stripe_conv: pool must be one of {POOLS}, got {pool!r}")
    lib, info = _library(pool)
    if lib is None:
        raise RuntimeError(f"swpfx.kernels.stripe_conv: kernel unavailable: {info}")
    return lib, info


def max_pool2d_into(x_address: int, out_address: int, planes: int, input_hw: tuple, output_hw: tuple, kernel: tuple,
                    stride: tuple, padding: tuple, threads: int, pool: str = "own") -> None:
    """Max pool of ``planes`` contiguous float32 planes (``input_hw``) into ``output_hw`` planes at the given
    addresses; windows are clipped to the input (implicit -inf padding), NaN propagates (as PyTorch's)."""
    lib, _ = _require(pool)
    if lib.swp_max_pool2d(x_address, out_address, planes, *input_hw, *output_hw, *kernel, *stride, *padding,
                          threads) != 0:
        raise ValueError(f"swpfx.kernels.stripe_conv.max_pool2d_into: bad arguments (kernel {kernel}, stride "
                         f"{stride}, padding {padding}, {planes} planes)")


# ----------------------------------------------------------------------------- weights

def _to_numpy(a, dtype) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a), dtype=dtype)


def _addr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


def _empty_aligned(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array whose data starts on a 64-byte boundary (partition boundaries then fall on cache lines)."""
    n = int(np.prod(shape))
    raw = np.empty(n + 16, np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + n].reshape(shape)


class _Plan:
    """A compiled-side plan: one input geometry x one partition; holds no per-call state."""

    def __init__(self, lib, packed: "StripePackedWeights", geometry: tuple, tables: dict, part: "Partition",
                 pv: int, threads: int):
        c, h, w, kh, kw, sh, sw, ph, pw, dh, dw = geometry
        self._lib, self._tables = lib, tables  # the C side borrows the tables' memory
        self._band_y = np.asarray(part.band_rows, np.int64)
        self._grp_cc = np.asarray(part.channel_chunks, np.int32)
        error = ctypes.c_int(0)
        t = tables
        self.handle = lib.swp_plan_create(
            c, h, w, packed.out_channels, kh, kw, sh, sw, ph, pw, dh, dw,
            _addr(t["wpack"]), _addr(t["blk_woff"]), _addr(t["blk_tap"]), _addr(t["blk_nf"]), _addr(t["blk_rows"]),
            _addr(t["blk_first"]), _addr(t["rows"]), _addr(t["grp_blk"]), _addr(t["grp_filt"]), _addr(t["filters"]),
            _addr(t["alive"]), t["groups"], _addr(self._grp_cc), len(self._band_y) - 1, _addr(self._band_y),
            pv, threads, ctypes.byref(error))
        if not self.handle:
            raise RuntimeError(f"swpfx.kernels.stripe_conv: the kernel rejected the plan (code {error.value})")
        self.dense_rows = bool(lib.swp_plan_dense(self.handle))
        self.in_place = bool(lib.swp_plan_in_place(self.handle))  # the taps read the input itself, nothing packed

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
        self._per_filter = mask.reshape(self.out_channels, kh * kw).sum(axis=1)
        self.kept_stripes = int(mask.sum())
        self.kept_fraction = self.kept_stripes / mask.size
        self.flop_ratio = mask.size / self.kept_stripes if self.kept_stripes else math.inf
        self._tables: dict[tuple, dict] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._partitions: dict[tuple, Partition] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        o, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        return (f"StripePackedWeights({o}x{c}x{kh}x{kw}, kept {self.kept_stripes}/{self.mask.size} stripes, "
                f"block {self.block})")

    def group_bounds(self, groups: int, align: int = 1) -> np.ndarray:
        """Filter-range bounds of ``groups`` contiguous groups with about equal kept stripes.

        Inner bounds are rounded to multiples of ``align`` when that keeps every group non-empty (an
        output plane boundary then starts a cache line, so two threads never write one line).
        """
        o_n = self.out_channels
        groups = max(1, min(int(groups), o_n))
        cum = np.concatenate([[0], np.cumsum(self._per_filter)])
        total = cum[-1]
        bounds = [0] + [int(np.searchsorted(cum, total * g / groups, side="left")) for g in range(1, groups)] + [o_n]
        bounds = np.maximum.accumulate(np.clip(bounds, 0, o_n))
        if align > 1:
            snapped = np.concatenate([[0], np.round(bounds[1:-1] / align).astype(np.int64) * align, [o_n]])
            snapped = np.clip(snapped, 0, o_n)
            if np.all(np.diff(snapped) > 0):
                bounds = snapped
        return bounds.astype(np.int64)

    def tables(self, groups: int, align: int = 1) -> dict:
        """Block tables for ``groups`` filter groups (:meth:`group_bounds`)."""
        groups = max(1, min(int(groups), self.out_channels))
        key = (groups, int(align))
        with self._lock:
            if key not in self._tables:
                self._tables[key] = self._build(self.group_bounds(groups, align))
            return self._tables[key]

    def _build(self, bounds: np.ndarray) -> dict:
        o_n, c_n, kh, kw = self._weight.shape
        groups = len(bounds) - 1
        per_filter = self.mask.reshape(o_n, kh * kw)
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
            "bounds": bounds,
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

    def plan(self, lib, geometry: tuple, part: "Partition", pv: int, threads: int) -> _Plan:
        """The cached kernel plan for an input geometry and a partition."""
        full = geometry + (part.key(), pv, threads, id(lib))
        tables = self.tables(part.groups, part.align)
        with self._lock:
            plan = self._plans.get(full)
            if plan is None:
                plan = _Plan(lib, self, geometry, tables, part, pv, threads)
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
    if w.shape[2] * w.shape[3] > 64:
        raise ValueError(f"swpfx.kernels.stripe_conv.pack_weights: at most 64 kernel taps, got {w.shape[2:]}")
    _, info = _require()
    block = info["default_f"] if block is None else int(block)
    if not 1 <= block <= info["max_f"]:
        raise ValueError(f"swpfx.kernels.stripe_conv.pack_weights: block must be in 1..{info['max_f']}, got {block}")
    return StripePackedWeights(w, m, block)


# ----------------------------------------------------------------------------- partition

class Partition:
    """How one call is cut into work items: output row bands x filter groups (items ordered band-major;
    thread t owns the t-th contiguous slice of items). ``cost`` is the model's estimate (vector-FMA units)
    of the busiest thread."""

    def __init__(self, band_rows: list[int], groups: int, align: int, channel_chunks: list[int], cost: float):
        self.band_rows, self.groups, self.align = list(band_rows), int(groups), int(align)
        self.channel_chunks, self.cost = list(channel_chunks), cost

    @property
    def bands(self) -> int:
        return len(self.band_rows) - 1

    def key(self) -> tuple:
        return (tuple(self.band_rows), self.groups, self.align, tuple(self.channel_chunks))

    def __repr__(self) -> str:
        return f"Partition(bands={self.band_rows}, groups={self.groups}, align={self.align})"


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a conv along one axis (zero padding ``padding`` on both sides)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _split_rows(ho: int, bands: int, align: int) -> list[int]:
    """Balanced row bounds; inner bounds rounded to multiples of ``align`` when that keeps the largest band."""
    bounds = [round(ho * r / bands) for r in range(bands + 1)]
    if align > 1 and bands > 1:
        snapped = [0] + [int(round(b / align)) * align for b in bounds[1:-1]] + [ho]
        if all(b1 > b0 for b0, b1 in zip(snapped, snapped[1:])) and \
                max(np.diff(snapped)) <= max(np.diff(bounds)):
            return snapped
    return bounds


def _chunks(c: int, groups: int, chunk: int | None) -> list[int]:
    """Input channels per chunk (the same for every group, so the summation order never depends on the
    partition): at most 128, in equal chunks, unless ``chunk`` says otherwise."""
    if chunk is None:
        chunk = -(-c // -(-c // 128))
    return [max(1, min(int(chunk), c))] * groups


# Cost-model constants, in vector-FMA units (one micro-kernel FMA of one vector ~ one cycle).
COST_BLOCK_TILE = 40.0  # per register block x micro-tile x channel chunk: accumulator load/add/store, call
COST_PACK_FLOAT = 1.0  # per packed input float (read from memory; masked vector loads/stores, zero padding)
COST_STORE_VEC = 2.0  # per stored output vector (bias, residual, ReLU)
COST_ITEM = 200.0  # per item
COST_MEM_FLOAT = 1.0  # per packed weight float read from memory (once per item: another runtime or layer
#                       ran in between; measured: a second copy of 512/7²'s weights per thread costs ~0.17 ms)
COST_L2_FLOAT = 0.02  # per packed weight float re-read from L2 (once per further micro-tile)
COST_L3_FLOAT = 0.06  # ... from L3, when an item's working set overflows L2
COST_SPILL = 0.15  # extra fraction of an item's multiply-adds when a channel chunk of its band's packed input
#                    plus its accumulators overflow half of L2 (measured on Zen 3, AVX2, 512 KB L2: 64/56² in
#                    4 bands of 14 rows ran 10-20% slower than in 8-14 bands, 128/28² in 2 bands than in 4)
MIN_ITEMS_PER_THREAD = 2  # preferred when threads > 1 (1 leaves nothing to take; 2, 4 and 8 measured alike)
COST_LATE = 40000.0  # expected loss to a worker that starts late, with one item per thread


def _row_floats(w: int, wo: int, ext_w: int, sw: int, pw: int, phases_b: set[int], vl: int) -> int:
    """Floats per packed row (mirrors the kernel): ``wo`` ("dense rows") when every phase plane's real input
    columns fit in ``wo`` and the build vectorises (VL >= 8), else ``wo + ext_w`` (padding stored)."""
    if vl < 8 or os.environ.get("SWPFX_KERNEL_PADDED_ROWS", "0") not in ("", "0"):
        return wo + ext_w
    for b in phases_b:
        vlo = max(0, -(-(pw - b) // sw))
        vhi = 0 if w - 1 + pw - b < 0 else (w - 1 + pw - b) // sw + 1
        if vhi - vlo > wo:
            return wo + ext_w
    return wo


def partition(packed: StripePackedWeights, geometry: tuple, threads: int, pv: int, vl: int, *,
              groups: int | None = None, bands: int | None = None, channel_chunk: int | None = None,
              l2_bytes: int = 1 << 20) -> Partition:
    """Choose row bands x filter groups for one call by a small cost model (cached per ``packed``).

    Per thread: the multiply-adds of its items (vectors of the flat pixel axis x kept stripes x
    channels), a fixed cost per register block and tile, packing each band's input rows once, the
    epilogue, reading the group's weights from memory (once per item, plus once per further micro-tile
    from L2 or L3 when tiles are the outer loop), a surcharge when a channel chunk of the band's packed
    input plus the item's accumulators overflow half of L2 (stride 1), and, with several threads, the
    expected loss to a late worker (smaller with more items to steal). The busiest thread's total is
    minimised.
    """
    key = (geometry, threads, pv, vl, groups, bands, channel_chunk, l2_bytes)
    cached = packed._partitions.get(key)
    if cached is not None:
        return cached
    c, h, w, kh, kw, sh, sw, ph, pw, dh, dw = geometry
    ho, wo = output_size(h, kh, sh, ph, dh), output_size(w, kw, sw, pw, dw)
    ext_h, ext_w = dh * (kh - 1) // sh, dw * (kw - 1) // sw
    phases = {((dh * i) % sh, (dw * j) % sw) for i in range(kh) for j in range(kw)}
    planes = len(phases)
    wq = _row_floats(w, wo, ext_w, sw, pw, {b for _, b in phases}, vl)
    o = packed.out_channels
    plane_out = ho * wo
    g_align = 16 // math.gcd(plane_out, 16)  # filters per cache-line-aligned output-plane boundary
    r_align = 16 // math.gcd(wo, 16) if plane_out % 16 == 0 else 1
    g_cands = [groups] if groups is not None else sorted({g for g in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
                                                          if g <= max(1, o // 8)})
    r_cands = [bands] if bands is not None else list(range(1, min(ho, 8 * threads, 32) + 1))
    late = 0.0 if threads == 1 else COST_LATE
    best = None
    # group bounds snapped to cache-line-aligned output planes where that costs (almost) nothing
    combos = [(max(1, min(g, o)), a) for g in g_cands for a in sorted({1, g_align})
              if a == 1 or (g > 1 and o // g >= 4 * a)]
    for g_eff, align in combos:
        bounds = packed.group_bounds(g_eff, align)
        nfg = np.diff(bounds)
        cum = np.concatenate([[0], np.cumsum(packed._per_filter)])
        kept = cum[bounds[1:]] - cum[bounds[:-1]]
        nblocks = np.ceil(kept / max(1, packed.block))  # about one partial block per tap more: folded in below
        cc = _chunks(c, g_eff, channel_chunk)
        nchunks = np.array([-(-c // x) for x in cc])
        for r in r_cands:
            r_eff = max(1, min(r, ho))
            rows_b = _split_rows(ho, r_eff, r_align)
            rows = np.diff(rows_b)
            nv = np.ceil(rows * wq / vl)
            ntiles = np.ceil(nv / pv)
            items = r_eff * g_eff
            # Packing is charged even where the kernel reads its input in place (stride 1, "same"): without
            # it the model picked partitions that ran slower in a fused graph (ResNet-18 1.007, VGG-16 1.022
            # of the packed kernel's time, against 0.976 and 1.002 with it; random masks, 2 threads).
            pack = planes * c * (rows + ext_h) * wq * COST_PACK_FLOAT
            # item (band i, group j) cost
            comp = np.outer(nv * c, kept) + np.outer(ntiles, (nblocks + kh * kw) * nchunks) * COST_BLOCK_TILE \
                + np.outer(np.ceil(wo / vl) * rows, nfg) * COST_STORE_VEC + COST_ITEM
            foot = (planes * c * ((rows + ext_h) * wq + ext_w + vl) * 4)[:, None] \
                + np.outer(ntiles * pv * vl, nfg + 1) * 4 + (np.array(cc) * kept * 4)[None, :]
            # The group's packed weights come from memory once per item; with tiles as the outer loop (the
            # kernel's choice when the weights are the smaller stream) every further tile re-reads them from
            # L2, or from L3 when the item's working set overflows half of L2.
            wfloats = (kept * c)[None, :]
            tiles_outer = kept[None, :] <= (ntiles * pv * vl)[:, None]
            again = np.where(foot > l2_bytes, COST_L3_FLOAT, COST_L2_FLOAT) * (ntiles - 1)[:, None]
            comp = comp + wfloats * (COST_MEM_FLOAT + np.where(tiles_outer, again, 0.0))
            # Within a channel chunk, every input row is re-read by the blocks and tiles of several output rows,
            # with the weights streaming through L2 and the band's accumulators written in between: unless the
            # chunk's packed band and the accumulators fit in half of L2, those re-reads come from L3. Measured
            # for one phase plane (stride 1) only: at stride 2 (four planes) the bands it asked for were slower.
            live = (planes * cc[0] * ((rows + ext_h) * wq + ext_w + vl) * 4)[:, None] \
                + np.outer(ntiles * pv * vl, nfg + 1) * 4
            comp = comp + np.where((live > l2_bytes / 2) & (planes == 1), COST_SPILL * np.outer(nv * c, kept), 0.0)
            flat = comp.reshape(-1)
            worst = 0.0
            for t in range(threads):
                lo, hi = items * t // threads, items * (t + 1) // threads
                if hi <= lo:
                    continue
                band_ids = {i // g_eff for i in range(lo, hi)}
                worst = max(worst, float(flat[lo:hi].sum() + sum(pack[b] for b in band_ids)))
            total = (worst + late * threads / items) * (1.0 if align > 1 or g_eff == 1 else 1.002)
            # with several threads, prefer >= MIN_ITEMS_PER_THREAD items per thread: the work of a thread that
            # starts late or is preempted (a shared machine) can then be taken by the others
            rank = (threads > 1 and items < MIN_ITEMS_PER_THREAD * threads, total)
            if best is None or rank[0] < best[0][0] or (rank[0] == best[0][0] and total < best[0][1] * 0.999):
                best = (rank, rows_b, g_eff, align, cc)
    part = Partition(best[1], best[2], best[3], best[4], best[0][1])
    packed._partitions[key] = part
    return part


# ----------------------------------------------------------------------------- forward

def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"swpfx.kernels.stripe_conv.stripe_conv2d: {name} must be an int or a pair, got {v}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def stripe_conv2d(x, packed: StripePackedWeights, bias=None, stride=1, padding=None, dilation=1, *,
                  relu: bool = False, residual=None, threads: int = DEFAULT_THREADS, groups: int | None = None,
                  bands: int | None = None, pv: int | None = None, channel_chunk: int | None = None,
                  out: np.ndarray | None = None):
    """``F.conv2d(x, weight * mask[:, None], bias, stride, padding, dilation)`` (+ ``residual``, then ReLU if ``relu``).

    ``x`` is float32 ``(N, C, H, W)`` or ``(C, H, W)`` (numpy or torch; torch in,
    torch out). ``padding`` (zeros) defaults to ``dilation * (K - 1) // 2``;
    ``stride``, ``padding`` and ``dilation`` are ints or pairs; no groups.
    ``threads`` is the number of threads (the caller's plus a shared worker pool).
    ``groups`` (filter groups), ``bands`` (output row bands), ``pv`` (pixel
    vectors per micro-tile) and ``channel_chunk`` are tuning knobs (defaults:
    :func:`partition`'s cost model); they never change the result. To call one
    conv many times on one input shape, :func:`bind` it once.
    """
    is_torch = hasattr(x, "detach")
    xa = _to_numpy(x, np.float32)
    squeeze = xa.ndim == 3
    if squeeze:
        xa = xa[None]
    call = bind(packed, xa.shape, stride, padding, dilation, relu=relu, threads=threads, groups=groups, bands=bands,
                pv=pv, channel_chunk=channel_chunk)
    b = None if bias is None else _to_numpy(bias, np.float32)
    r = None if residual is None else _to_numpy(residual, np.float32)
    out = call(xa, b, r, out=out)
    if squeeze:
        out = out[0]
    if is_torch:
        import torch

        return torch.from_numpy(out)
    return out


class BoundStripeConv:
    """One stripe conv bound to one input shape: arguments checked and the kernel plan resolved once.

    ``call(x, bias, residual, out=None)`` takes contiguous float32 numpy arrays
    (``bias`` and ``residual`` may be None) and returns the output array.
    """

    def __init__(self, lib, plan: _Plan, input_shape: tuple, output_shape: tuple, relu: bool, threads: int):
        self._lib, self._plan, self.relu, self.threads = lib, plan, bool(relu), int(threads)
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)

    def __call__(self, x: np.ndarray, bias: np.ndarray | None = None, residual: np.ndarray | None = None,
                 out: np.ndarray | None = None) -> np.ndarray:
        name = "swpfx.kernels.stripe_conv.stripe_conv2d"
        self.wake()  # the workers wake while the arguments are checked
        if x.shape != self.input_shape or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"{name}: x must be contiguous float32 {self.input_shape}, got {x.dtype} {x.shape}")
        if bias is not None and (bias.size != self.output_shape[1] or bias.dtype != np.float32
                                 or not bias.flags.c_contiguous):
            raise ValueError(f"{name}: bias must be contiguous float32 with {self.output_shape[1]} values, "
                             f"got {bias.dtype} with {bias.size}")
        if residual is not None and (residual.size != math.prod(self.output_shape) or residual.dtype != np.float32
                                     or not residual.flags.c_contiguous):
            raise ValueError(f"{name}: residual must be contiguous float32 of {self.output_shape}")
        if out is None:
            out = _empty_aligned(self.output_shape)
        elif out.shape != self.output_shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"{name}: out must be contiguous float32 {self.output_shape}")
        self.run_addresses(x.ctypes.data, out.ctypes.data, _addr(bias), _addr(residual))
        return out

    def wake(self) -> None:
        """Wake the pool's workers ahead of a call (they spin briefly, then sleep)."""
        if self.threads > 1:
            self._lib.swp_pool_wake(self.threads)

    def run_addresses(self, x: int, out: int, bias: int | None = None, residual: int | None = None) -> None:
        """The kernel call on raw data addresses, unchecked: for callers that have done ``__call__``'s checks
        themselves (``swpfx.kernels.fused_conv`` on torch tensors, where numpy's views cost ~10 us a call)."""
        code = self._lib.swp_plan_run(self._plan.handle, x, self.input_shape[0], out, bias, residual, int(self.relu))
        if code != 0:
            raise RuntimeError(f"swpfx.kernels.stripe_conv.stripe_conv2d: kernel rejected its arguments (code {code})")


def bind(packed: StripePackedWeights, input_shape, stride=1, padding=None, dilation=1, *, relu: bool = False,
         threads: int = DEFAULT_THREADS, groups: int | None = None, bands: int | None = None, pv: int | None = None,
         channel_chunk: int | None = None, pool: str = "own") -> BoundStripeConv:
    """:func:`stripe_conv2d`'s checks and plan for one input shape ``(N, C, H, W)``, done once (same arguments).

    ``pool`` picks the build (:func:`is_available`); the result does not depend on it.
    """
    lib, info = _require(pool)
    name = "swpfx.kernels.stripe_conv.stripe_conv2d"
    if len(input_shape) != 4:
        raise ValueError(f"{name}: x must be (N, C, H, W), got {tuple(input_shape)}")
    n, c, h, w = (int(v) for v in input_shape)
    kh, kw = packed.kernel_size
    if c != packed.in_channels:
        raise ValueError(f"{name}: x has {c} channels, the weight expects {packed.in_channels}")
    sh, sw = _pair(stride, "stride")
    dh, dw = _pair(dilation, "dilation")
    if dh < 1 or dw < 1:
        raise ValueError(f"{name}: unsupported dilation {dilation}")
    ph, pw = _pair((dh * (kh - 1) // 2, dw * (kw - 1) // 2) if padding is None else padding, "padding")
    if sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(f"{name}: unsupported stride {stride} / padding {padding}")
    ho, wo = output_size(h, kh, sh, ph, dh), output_size(w, kw, sw, pw, dw)
    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1 or ho < 1 or wo < 1:
        raise ValueError(f"{name}: input {h}x{w} too small for kernel {kh}x{kw} (padding {ph, pw}, dilation {dh, dw})")
    threads = max(1, min(int(threads), info["max_threads"]))
    pv = info["default_pv"] if pv is None else int(pv)
    if not 1 <= pv <= info["max_pv"]:
        raise ValueError(f"{name}: pv must be in 1..{info['max_pv']}")
    geometry = (c, h, w, kh, kw, sh, sw, ph, pw, dh, dw)
    part = partition(packed, geometry, threads, pv, info["vector_width"], groups=groups, bands=bands,
                     channel_chunk=channel_chunk, l2_bytes=info["l2_bytes"])
    plan = packed.plan(lib, geometry, part, pv, threads)
    return BoundStripeConv(lib, plan, (n, c, h, w), (n, packed.out_channels, ho, wo), relu, threads)

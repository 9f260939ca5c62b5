"""Go/no-go benchmark of the fused stripe kernel (issue 14) against ONNX Runtime's dense conv.

ResNet-18's 3x3 conv shapes at a 224² input, batch 1; stripe masks from issue 4's
random and structured protocols (``swpfx.masks``, seeded). For every (shape, mask)
the dense conv of the same shape (weight * mask, so the same arithmetic result) is
a one-node ONNX model run by ONNX Runtime (CPU, ``threads`` intra-op threads,
``allow_spinning=0``), and the kernel (``swpfx.kernels.stripe_conv``) runs on the
same number of threads (its own pool). At more than one thread ORT runs two sessions
(default and with pinned workers), timed against each other first; the faster is the
reference. The reference and the kernel are then timed interleaved (alternating order
each round), just the two of them; reported is the minimum over ``--blocks`` blocks of
the median of ``--rounds`` rounds. A short sleep after every timed call lets both runtimes'
worker threads go idle (ORT's do not spin; the kernel's spin 100 us, then sleep), so
neither steals cores from the other's next run and both pay their wake-up on every call.
Thread counts are interleaved too: for every (shape, mask) all ``--threads`` are measured
before the next shape, so every table sees the same load.

Before measuring, the script waits (``--wait-s`` seconds, at most ``--max-waits`` times)
while the 1-minute load average is above ``--max-load``, and it records ``uptime``
before and after the run in the results.

    .venv/bin/python benchmarks/stripe_kernel.py [--rounds 200] [--blocks 3] [--threads 1 2] [--no-stride2]

Writes benchmarks/results/stripe_kernel.md (everything from its first ``<!-- notes -->``
or ``<!-- history -->`` line on is kept). GO (issue 14): realised fraction (= speed-up / FLOP ratio) >= 0.7 at
56², 28², 14² and >= 0.5 at 7² (stride-1 shapes) at 2 threads.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper

from swpfx.kernels import stripe_conv
from swpfx.masks import random_stripe_mask, structured_stripe_mask
from swpfx.runtime_model import ort_session

# (name, in channels, out channels, input size, stride): ResNet-18's 3x3 convs at a 224² input
SHAPES = [
    ("64/56²", 64, 64, 56, 1),
    ("128/28²", 128, 128, 28, 1),
    ("256/14²", 256, 256, 14, 1),
    ("512/7²", 512, 512, 7, 1),
    ("64→128/56²→28² s2", 64, 128, 56, 2),
    ("128→256/28²→14² s2", 128, 256, 28, 2),
    ("256→512/14²→7² s2", 256, 512, 14, 2),
]
GO_THRESHOLD = {56: 0.7, 28: 0.7, 14: 0.7, 7: 0.5}  # keyed by the output size of the stride-1 shapes
RESULTS = Path(__file__).resolve().parent / "results" / "stripe_kernel.md"
KEEP = ("<!-- notes -->", "<!-- history -->")  # the results file keeps everything from the first of these on


def dense_conv_onnx(weight: np.ndarray, bias: np.ndarray, h: int, w: int, stride: int) -> bytes:
    """A one-node ONNX model: y = Conv(x, weight, bias), pads K//2, the given stride."""
    o, c, kh, kw = weight.shape
    ho, wo = (h + 2 * (kh // 2) - kh) // stride + 1, (w + 2 * (kw // 2) - kw) // stride + 1
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[kh, kw], strides=[stride, stride],
                            pads=[kh // 2, kw // 2, kh // 2, kw // 2])
    graph = helper.make_graph(
        [node], "dense_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, o, ho, wo])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def cpu_description() -> tuple[str, str]:
    """CPU model name and its vector-ISA flags (avx*, fma, amx*) from /proc/cpuinfo."""
    model, flags = platform_name(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(sorted({t for t in line.split(":", 1)[1].split()
                                             if t.startswith(("avx", "fma", "amx"))}))
                    break
    except OSError:
        pass
    return model, flags


def platform_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def time_all(fns, rounds: int, blocks: int, warmup: int = 10, gap: float = 0.0005) -> list[float]:
    """Seconds per call of each callable, interleaved (order rotating per round); min over blocks of medians."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(blocks):
        times = [[] for _ in fns]
        for r in range(rounds):
            for k in range(len(fns)):
                i = (k + r) % len(fns)
                t0 = time.perf_counter()
                fns[i]()
                times[i].append(time.perf_counter() - t0)
                time.sleep(gap)
        best = [min(b, statistics.median(t)) for b, t in zip(best, times)]
    return best


def pinned_ort_session(model: bytes, threads: int, cpus: list[int]):
    """``ort_session``'s options plus ``session.intra_op_thread_affinities``: ORT's intra-op worker k on
    CPU cpus[k + 1] (the caller, pinned to cpus[0] by ``main``, keeps its own CPU)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.intra_op_thread_affinities",
                                     ";".join(str(cpus[k + 1] + 1) for k in range(threads - 1)))  # 1-based ids
    return onnxruntime.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        la = os.getloadavg()
        return f"load average: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"


def wait_for_load(max_load: float, max_waits: int, wait_s: float) -> list[str]:
    """Sleep while the 1-minute load average exceeds ``max_load`` (at most ``max_waits`` times); the log."""
    log = []
    for _ in range(max_waits):
        load = os.getloadavg()[0]
        if load <= max_load:
            break
        log.append(f"load {load:.2f} > {max_load}: waited {wait_s:.0f} s")
        print(log[-1], file=sys.stderr, flush=True)
        time.sleep(wait_s)
    return log


def measure(name, c, o, h, stride, protocol, threads, args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    weight = torch.randn(o, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5
    bias = torch.randn(o, generator=g) * 0.1
    if protocol == "random":
        mask = random_stripe_mask(o, 3, 3, generator=g)
    else:
        mask = structured_stripe_mask(o, 3, 3, generator=g)
    x = torch.randn(1, c, h, h, generator=g)
    dense_w = (weight * mask[:, None]).numpy()
    model = dense_conv_onnx(dense_w, bias.numpy(), h, h, stride)
    sessions = {"ort": ort_session(model, threads=threads)}
    if args.pin_cpus and threads > 1:
        sessions["ort_pinned"] = pinned_ort_session(model, threads, args.pin_cpus)
    xn = x.numpy()
    feed = {"x": xn}
    packed = stripe_conv.pack_weights(weight, mask)
    ho = (h + 2 - 3) // stride + 1
    out = np.empty((1, o, ho, ho), np.float32)
    bn = bias.numpy()

    bound = stripe_conv.bind(packed, xn.shape, stride, 1, threads=threads, pool=args.pool)

    def run_kernel():
        return bound(xn, bn, out=out)

    got = run_kernel()
    err = 0.0
    for sess in sessions.values():
        ref = sess.run(None, feed)[0]
        err = max(err, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
    assert err < 1e-4, f"{name} {protocol}: kernel differs from ORT dense (rel {err:.2e})"
    runs = {name: functools.partial(sess.run, None, feed) for name, sess in sessions.items()}
    # Each comparison interleaves only its two contenders: with ORT's default session in the same loop, its
    # unpinned worker slows the kernel's next calls by 10-25 % (measured at 64/56²-256/14², 2 threads), and the
    # default session is never the reference. So ORT's two sessions are timed against each other first, and
    # the faster one against the kernel.
    times = {"ort_pinned": math.inf}
    if len(runs) > 1:
        times.update(zip(runs, time_all(list(runs.values()), args.rounds, args.blocks)))
        reference = min(runs, key=times.get)
    else:
        reference = "ort"
    t_ort, t_kernel = time_all([runs[reference], run_kernel], args.rounds, args.blocks)
    times[reference] = t_ort
    info = stripe_conv.kernel_info(args.pool)
    part = stripe_conv.partition(packed, (c, h, h, 3, 3, stride, stride, 1, 1, 1, 1), threads, info["default_pv"],
                                 info["vector_width"], l2_bytes=info["l2_bytes"])
    dense_macs = o * c * 9 * ho * ho
    kept_macs = int(mask.sum()) * c * ho * ho
    ratio = dense_macs / kept_macs
    speedup = t_ort / t_kernel
    row = {
        "shape": name, "mask": protocol, "threads": threads, "kept": kept_macs / dense_macs, "ratio": ratio,
        "ort_ms": t_ort * 1e3, "kernel_ms": t_kernel * 1e3, "speedup": speedup,
        "ort_free_ms": times["ort"] * 1e3, "ort_pinned_ms": times["ort_pinned"] * 1e3 if len(runs) > 1 else math.nan,
        "reference": reference,
        "realised": speedup / ratio, "ort_gmacs": dense_macs / t_ort / 1e9,
        "kernel_gmacs": kept_macs / t_kernel / 1e9, "err": err, "out": ho, "stride": stride,
        "part": f"{part.bands}x{part.groups}",
    }
    print(f"{threads}t {name:>20} {protocol:>10}  kept {row['kept']:.2f}  ratio {ratio:.2f}  ORT {row['ort_free_ms']:.3f}/{row['ort_pinned_ms']:.3f} ms"
          f"  kernel {row['kernel_ms']:.3f} ms  speed-up {speedup:.2f}  realised {row['realised']:.2f}"
          f"  ({row['ort_gmacs']:.0f} / {row['kernel_gmacs']:.0f} GMAC/s)  {row['part']}  err {err:.1e}", flush=True)
    return row


def verdict(rows: list[dict]) -> tuple[bool, str]:
    parts, go = [], True
    for r in rows:
        if r["stride"] == 1:
            need = GO_THRESHOLD[r["out"]]
            ok = r["realised"] >= need
            go &= ok
            parts.append(f"{r['shape']} {r['mask']} {r['realised']:.3f} {'≥' if ok else '<'} {need}")
    return go, "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stride2", action="store_true", help="only the four stride-1 shapes")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait while the 1-min load average is above this")
    ap.add_argument("--max-waits", type=int, default=3)
    ap.add_argument("--wait-s", type=float, default=120.0)
    ap.add_argument("--pool", choices=stripe_conv.POOLS, default="own",
                    help="kernel build: its own thread pool (default) or the OpenMP one FusedStripeConv2d uses "
                         "(then nothing is pinned: OpenMP's threads would inherit the caller's one CPU)")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the caller to one CPU and a second ORT session's workers to the others")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    if not stripe_conv.is_available(args.pool):
        print(f"fused stripe kernel unavailable: {stripe_conv.unavailable_reason(args.pool)}", file=sys.stderr)
        return 1
    info = stripe_conv.kernel_info(args.pool)
    waits = wait_for_load(args.max_load, args.max_waits, args.wait_s)
    torch.set_num_threads(max(args.threads))
    # Pin this (the calling) thread to one CPU, after the kernel's pool has seen the process's CPUs; ORT gets a
    # second session whose workers are pinned to the other CPUs, and the faster of the two ORT sessions is the
    # reference (the kernel pins its own workers away from the caller's CPU; ORT's default session does not).
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    args.pin_cpus = None
    if not args.no_pin and args.pool == "own" and len(cpus) >= max(args.threads) > 1:
        probe = stripe_conv.pack_weights(torch.ones(4, 4, 3, 3), torch.ones(4, 3, 3, dtype=torch.bool))
        stripe_conv.stripe_conv2d(np.ones((1, 4, 8, 8), np.float32), probe, threads=max(args.threads))
        os.sched_setaffinity(0, {cpus[0]})
        args.pin_cpus = cpus
    started = time.time()
    up_start = uptime()
    cpu, flags = cpu_description()
    shapes = [s for s in SHAPES if not (args.no_stride2 and s[4] != 1)]
    rows = []
    for name, c, o, h, stride in shapes:
        for protocol in ("random", "structured"):
            for threads in args.threads:
                rows.append(measure(name, c, o, h, stride, protocol, threads, args))
    up_end = uptime()
    minutes = (time.time() - started) / 60

    command = (f".venv/bin/python benchmarks/stripe_kernel.py --rounds {args.rounds} --blocks {args.blocks} "
               f"--threads {' '.join(map(str, args.threads))}{' --no-stride2' if args.no_stride2 else ''}"
               f"{f' --pool {args.pool}' if args.pool != 'own' else ''}"
               f"{f' --out {args.out}' if args.out != RESULTS else ''}")
    lines = [
        "# Fused stripe kernel vs ONNX Runtime dense conv (issue 14 go/no-go)",
        "",
        f"Command: `{command}` ({minutes:.1f} min)",
        "",
        f"- CPU: {cpu}; {os.cpu_count()} logical CPUs; ISA flags (/proc/cpuinfo): {flags}",
        f"- kernel: ISA {info['isa']} ({info['vector_width']} floats per vector, detected by `-march=native`), "
        f"threads: {info['threading']}, {info['compiler_version']}, `{info['flags']}`",
        f"- ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider, ORT_ENABLE_ALL, allow_spinning=0); "
        f"torch {torch.__version__}",
        f"- threads: ORT intra-op threads = kernel threads; batch 1; masks seeded {args.seed}",
        *([f"- `OMP_WAIT_POLICY`: {os.environ.get('OMP_WAIT_POLICY', 'unset')} (the OpenMP build's threads are "
           "torch's; unset, they spin after each call on the cores ORT runs on next and slow it (1.6-1.8x on the "
           "EPYC of 2026-12-03, RESULTS.md); PASSIVE makes them sleep, and the kernel pays their wake-up every call)"]
          if args.pool == "openmp" else []),
        ("- placement: the calling thread pinned to CPU "
         f"{args.pin_cpus[0]}; ORT timed twice at >1 thread, its default session (workers unpinned) and one with "
         "`session.intra_op_thread_affinities` (workers on the other CPUs), the two timed against each other; the "
         "faster is the reference, the ms shown for it are from its own loop with the kernel"
         if args.pin_cpus else "- placement: nothing pinned by the benchmark (the own pool pins its workers; "
         "OpenMP's threads are placed by the OS)"),
        f"- `uptime` before: `{up_start}`",
        f"- `uptime` after: `{up_end}`",
    ]
    if waits:
        lines.append(f"- waited for the load first: {'; '.join(waits)}")
    lines += [
        f"- timing: interleaved, two contenders per loop (ORT default / pinned, then the faster ORT / kernel; "
        f"thread counts interleaved per shape), min over "
        f"{args.blocks} blocks of the median of {args.rounds} rounds, 0.5 ms sleep after every call; outputs checked "
        "against each other (max rel. error column)",
        "- partition: the kernel's row bands x filter groups (`stripe_conv.partition`)",
        "",
    ]
    summary = []
    for threads in args.threads:
        sel = [r for r in rows if r["threads"] == threads]
        go, detail = verdict(sel)
        summary.append((threads, go))
        lines += [
            f"## {threads} thread{'s' if threads > 1 else ''}",
            "",
            "| shape | mask | kept | FLOP ratio | ORT dense ms (default / pinned) | kernel ms | speed-up | realised "
            "| ORT GMAC/s (dense) | kernel GMAC/s (kept) | partition | max rel. err |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sel:
            pinned = "" if math.isnan(r["ort_pinned_ms"]) else f" / {r['ort_pinned_ms']:.3f}"
            lines.append(f"| {r['shape']} | {r['mask']} | {r['kept']:.2f} | {r['ratio']:.2f} | "
                         f"{r['ort_free_ms']:.3f}{pinned} | "
                         f"{r['kernel_ms']:.3f} | {r['speedup']:.2f} | {r['realised']:.2f} | {r['ort_gmacs']:.0f} | "
                         f"{r['kernel_gmacs']:.0f} | {r['part']} | {r['err']:.1e} |")
        lines += [
            "",
            f"Bar at {threads} thread(s): {'met' if go else 'not met'} — {detail}",
            "",
        ]
    if len(args.threads) > 1:
        lines += ["## Scaling (kernel ms / ORT ms, 1 thread over each thread count)", "",
                  "| shape | mask | " + " | ".join(f"{t}t kernel | {t}t ORT" for t in args.threads[1:]) + " |",
                  "|---|---|" + "---|---|" * (len(args.threads) - 1)]
        base = {(r["shape"], r["mask"]): r for r in rows if r["threads"] == args.threads[0]}
        for (shape, mask), b in base.items():
            cells = []
            for t in args.threads[1:]:
                r = next(x for x in rows if x["threads"] == t and x["shape"] == shape and x["mask"] == mask)
                cells += [f"{b['kernel_ms'] / r['kernel_ms']:.2f}x", f"{b['ort_ms'] / r['ort_ms']:.2f}x"]
            lines.append(f"| {shape} | {mask} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "realised = speed-up / FLOP ratio (1.0 = the kernel is as fast per kept MAC as ORT per dense MAC). "
        "GMAC/s: ORT counts the dense MACs, the kernel the kept ones.",
        "",
    ]
    two = [go for t, go in summary if t == 2]
    if two:
        lines += [f"**Verdict (issue 14's bar, 2 threads): {'GO' if two[0] else 'NO-GO'}** "
                  "(realised >= 0.7 at 56², 28², 14² and >= 0.5 at 7², stride-1 shapes, both mask protocols)", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    if args.out.exists():
        old = args.out.read_text()
        cut = min((old.index(m) for m in KEEP if m in old), default=None)
        if cut is not None:
            text = text.rstrip("\n") + "\n\n" + old[cut:]
    args.out.write_text(text)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Go/no-go benchmark of the fused stripe kernel (issue 14) against ONNX Runtime's dense conv.

ResNet-18's 3x3 conv shapes at a 224² input, batch 1; stripe masks from issue 4's
random and structured protocols (``swpfx.masks``, seeded). For every (shape, mask)
the dense conv of the same shape (weight * mask, so the same arithmetic result) is
a one-node ONNX model run by ONNX Runtime (CPU, ``threads`` intra-op threads,
``allow_spinning=0``), and the kernel (``swpfx.kernels.stripe_conv``) runs on the
same number of threads (its own pool). The two are timed interleaved (alternating order
each round); reported is the minimum over ``--blocks`` blocks of the median of
``--rounds`` rounds. A short sleep after every timed call lets both runtimes'
worker threads go idle, so neither steals cores from the other's next run.

    .venv/bin/python benchmarks/stripe_kernel.py [--rounds 200] [--blocks 3] [--threads 2] [--no-stride2] [--append]

Writes benchmarks/results/stripe_kernel.md. GO (issue 14): realised fraction
(= speed-up / FLOP ratio) >= 0.7 at 56², 28², 14² and >= 0.5 at 7² (stride-1 shapes).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    model, flags = platform_name(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = " ".join(sorted({t for t in line.split(":", 1)[1].split()
                                             if t.startswith(("avx", "fma"))}))
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


def time_pair(run_a, run_b, rounds: int, blocks: int, warmup: int = 10, gap: float = 0.0005) -> tuple[float, float]:
    """Seconds per call of two callables, interleaved (order alternating per round); min over blocks of medians."""
    for _ in range(warmup):
        run_a()
        run_b()
    best_a = best_b = float("inf")
    for _ in range(blocks):
        ta, tb = [], []
        for r in range(rounds):
            order = ((run_a, ta), (run_b, tb)) if r % 2 == 0 else ((run_b, tb), (run_a, ta))
            for fn, acc in order:
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
                time.sleep(gap)
        best_a = min(best_a, statistics.median(ta))
        best_b = min(best_b, statistics.median(tb))
    return best_a, best_b


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-stride2", action="store_true", help="only the four stride-1 shapes")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--append", action="store_true", help="append a section to --out instead of replacing it")
    args = ap.parse_args(argv)

    if not stripe_conv.is_available():
        print(f"fused stripe kernel unavailable: {stripe_conv.unavailable_reason()}", file=sys.stderr)
        return 1
    info = stripe_conv.kernel_info()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    cpu, flags = cpu_description()
    shapes = [s for s in SHAPES if not (args.no_stride2 and s[4] != 1)]
    rows = []
    for name, c, o, h, stride in shapes:
        for protocol in ("random", "structured"):
            g = torch.Generator().manual_seed(args.seed)
            weight = torch.randn(o, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5
            bias = torch.randn(o, generator=g) * 0.1
            if protocol == "random":
                mask = random_stripe_mask(o, 3, 3, generator=g)
            else:
                mask = structured_stripe_mask(o, 3, 3, generator=g)
            x = torch.randn(1, c, h, h, generator=g)
            dense_w = (weight * mask[:, None]).numpy()
            session = ort_session(dense_conv_onnx(dense_w, bias.numpy(), h, h, stride), threads=args.threads)
            xn = x.numpy()
            feed = {"x": xn}
            packed = stripe_conv.pack_weights(weight, mask)
            ho = (h + 2 - 3) // stride + 1
            out = np.empty((1, o, ho, ho), np.float32)
            bn = bias.numpy()

            def run_ort():
                return session.run(None, feed)

            def run_kernel():
                return stripe_conv.stripe_conv2d(xn, packed, bn, stride=stride, padding=1, threads=args.threads,
                                                 out=out)

            ref = run_ort()[0]
            got = run_kernel()
            err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))
            assert err < 1e-4, f"{name} {protocol}: kernel differs from ORT dense (rel {err:.2e})"
            t_ort, t_kernel = time_pair(run_ort, run_kernel, args.rounds, args.blocks)
            dense_macs = o * c * 9 * ho * ho
            kept_macs = int(mask.sum()) * c * ho * ho
            ratio = dense_macs / kept_macs
            speedup = t_ort / t_kernel
            row = {
                "shape": name, "mask": protocol, "kept": kept_macs / dense_macs, "ratio": ratio,
                "ort_ms": t_ort * 1e3, "kernel_ms": t_kernel * 1e3, "speedup": speedup,
                "realised": speedup / ratio, "ort_gmacs": dense_macs / t_ort / 1e9,
                "kernel_gmacs": kept_macs / t_kernel / 1e9, "err": err, "out": ho, "stride": stride,
            }
            rows.append(row)
            print(f"{name:>20} {protocol:>10}  kept {row['kept']:.2f}  ratio {ratio:.2f}  ORT {row['ort_ms']:.3f} ms"
                  f"  kernel {row['kernel_ms']:.3f} ms  speed-up {speedup:.2f}  realised {row['realised']:.2f}"
                  f"  ({row['ort_gmacs']:.0f} / {row['kernel_gmacs']:.0f} GMAC/s)  err {err:.1e}", flush=True)
    load_end = os.getloadavg()

    verdicts = []
    for r in rows:
        if r["stride"] == 1:
            need = GO_THRESHOLD[r["out"]]
            verdicts.append((r, need, r["realised"] >= need))
    go = all(ok for _, _, ok in verdicts)
    lines = [
        "# Fused stripe kernel vs ONNX Runtime dense conv (issue 14 go/no-go)",
        "",
        f"## {args.threads} thread{'s' if args.threads > 1 else ''}",
        "",
        f"Command: `.venv/bin/python benchmarks/stripe_kernel.py --rounds {args.rounds} --blocks {args.blocks} "
        f"--threads {args.threads}{' --no-stride2' if args.no_stride2 else ''}`",
        "",
        f"- CPU: {cpu}; {os.cpu_count()} logical CPUs; flags: {flags}",
        f"- kernel: ISA {info['isa']} ({info['vector_width']} floats per vector), threads: {info['threading']}, "
        f"{info['compiler_version']}, `{info['flags']}`",
        f"- ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider, ORT_ENABLE_ALL, allow_spinning=0); "
        f"torch {torch.__version__}",
        f"- threads: {args.threads} (ORT intra-op) = {args.threads} (kernel threads); batch 1; masks seeded {args.seed}",
        f"- load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/{load_start[2]:.2f}, "
        f"at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}",
        f"- timing: interleaved, alternating order, min over {args.blocks} blocks of the median of {args.rounds} "
        "rounds; both outputs checked against each other (max rel. error column)",
        "",
        "| shape | mask | kept | FLOP ratio | ORT dense ms | kernel ms | speed-up | realised | ORT GMAC/s (dense) "
        "| kernel GMAC/s (kept) | max rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['mask']} | {r['kept']:.2f} | {r['ratio']:.2f} | {r['ort_ms']:.3f} | "
                     f"{r['kernel_ms']:.3f} | {r['speedup']:.2f} | {r['realised']:.2f} | {r['ort_gmacs']:.0f} | "
                     f"{r['kernel_gmacs']:.0f} | {r['err']:.1e} |")
    lines += [
        "",
        "realised = speed-up / FLOP ratio (1.0 = the kernel is as fast per kept MAC as ORT per dense MAC). "
        "GMAC/s: ORT counts the dense MACs, the kernel the kept ones.",
        "",
        f"**Verdict at {args.threads} thread(s): {'GO' if go else 'NO-GO'}** (needs realised >= 0.7 at 56², 28², 14² and >= 0.5 at 7², "
        "stride-1 shapes, both mask protocols): "
        + "; ".join(f"{r['shape']} {r['mask']} {r['realised']:.3f} {'≥' if ok else '<'} {need}"
                    for r, need, ok in verdicts),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines)
    if args.append and args.out.exists():
        text = args.out.read_text().rstrip("\n") + "\n\n" + "\n".join(lines[2:])
    args.out.write_text(text)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

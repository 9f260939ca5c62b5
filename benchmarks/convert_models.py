"""Convert every torchvision classification model with synthetic stripe masks; check exactness.

For each model: random weights, random BatchNorm statistics, the *random* mask
protocol (each stripe kept with p=0.35, centre kept, 10 % of filters dead, pruned
skeleton values in [0, threshold]); `swpfx.prepare` then `swpfx.convert` in the
given lowering mode; relative error against the masked prepared model, parameters
and FLOPs before/after, and the time of prepare and convert.

    .venv/bin/python benchmarks/convert_models.py                  # all 80, lowering=never
    .venv/bin/python benchmarks/convert_models.py --lowering always resnet18 mobilenet_v2
    .venv/bin/python benchmarks/convert_models.py --timing resnet50 regnet_y_128gf   # prepare+convert time at 224²
    .venv/bin/python benchmarks/convert_models.py --grouped --resolutions 77,96   # ResNeXt/RegNet, also at 77², 96²

``--resolutions`` runs each converted model at those input sizes too (it was
converted at the size in the table) and reports the worst error over all sizes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import swpfx  # noqa: E402
from helpers import randomize_batchnorm_, relative_error  # noqa: E402
from swpfx.synthetic import synthetic_skeletons_  # noqa: E402
from test_prepare_torchvision import MIN_TEST_SIZE, SMALLEST_INPUT  # noqa: E402

THRESHOLD = 0.05


def build(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return randomize_batchnorm_(model.eval(), torch.Generator().manual_seed(0))


def masked_output(prepared, x):
    ref = copy.deepcopy(prepared)
    with torch.no_grad():
        for s in swpfx.skeletons(ref).values():
            s.masked_fill_(s.abs() <= THRESHOLD, 0.0)
        return ref(x)


GROUPED_FAMILIES = ("resnext", "regnet")  # the models with grouped (non-depthwise) convs


def grouped_share(model: torch.nn.Module) -> tuple[int, int]:
    """(output channels of grouped non-depthwise convs, of all convs)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return sum(m.out_channels for m in convs if 1 < m.groups < m.in_channels), sum(m.out_channels for m in convs)


def check(name: str, lowering: str, channel_multiple: int, resolutions: tuple[int, ...] = ()) -> dict:
    model = build(name)
    size = max(SMALLEST_INPUT[name], MIN_TEST_SIZE)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    prepared = swpfx.prepare(model, (x,)).eval()
    t1 = time.perf_counter()
    synthetic_skeletons_(prepared, "random", THRESHOLD, seed=0)
    t2 = time.perf_counter()
    deployed = swpfx.convert(prepared, THRESHOLD, lowering=lowering, channel_multiple=channel_multiple)
    t3 = time.perf_counter()
    with torch.no_grad():
        err = relative_error(deployed(x), masked_output(prepared, x))
        for r in resolutions:
            xr = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(r))
            err = max(err, relative_error(deployed(xr), masked_output(prepared, xr)))
    grouped_before, grouped_after = grouped_share(model)[0], grouped_share(deployed)[0]
    dense, pruned = swpfx.cost(model, (x,)), swpfx.cost(deployed, (x,))
    deployed.graph.lint()
    return {"model": name, "size": size, "err": err, "params": (dense.params, pruned.params),
            "flops": (dense.flops, pruned.flops), "prepare_s": t1 - t0, "convert_s": t3 - t2,
            "removed": sum(deployed.meta["swpfx"]["removed_filters"].values()),
            "grouped": (grouped_before, grouped_after)}


def timing(name: str, repeats: int) -> tuple[float, float]:
    model = build(name)
    x = torch.randn(1, 3, 224, 224)
    prep, conv = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        prepared = swpfx.prepare(model, (x,)).eval()
        t1 = time.perf_counter()
        synthetic_skeletons_(prepared, "random", THRESHOLD, seed=0)
        t2 = time.perf_counter()
        swpfx.convert(prepared, THRESHOLD, lowering="never")
        t3 = time.perf_counter()
        prep.append(t1 - t0)
        conv.append(t3 - t2)
        del prepared
        gc.collect()
    return statistics.median(prep), statistics.median(conv)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model names (default: all 80)")
    parser.add_argument("--lowering", default="never", choices=("never", "always", "auto"))
    parser.add_argument("--timing", action="store_true", help="time prepare and convert at 224x224 instead")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channel-multiple", type=int, default=1, help="passed to swpfx.convert (default 1: remove every dead filter that can go)")
    parser.add_argument("--grouped", action="store_true", help="only the models with grouped convs (ResNeXt, RegNet)")
    parser.add_argument("--resolutions", default="", help="comma-separated extra input sizes to check each converted model at")
    args = parser.parse_args()
    torch.set_num_threads(2)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    if args.grouped:
        names = [n for n in names if n.startswith(GROUPED_FAMILIES)]
    resolutions = tuple(int(r) for r in args.resolutions.split(",") if r)
    if args.timing:
        print("| model | prepare (s) | convert (s) | total (s) |\n|---|---|---|---|")
        for name in names:
            p, c = timing(name, args.repeats)
            print(f"| {name} | {p:.2f} | {c:.2f} | {p + c:.2f} |", flush=True)
        return 0
    extra = f", errors also at {', '.join(f'{r}²' for r in resolutions)}" if resolutions else ""
    print(f"lowering={args.lowering}, threshold={THRESHOLD}, channel_multiple={args.channel_multiple}, random mask protocol{extra}\n")
    print("| model | input | rel. error | params dense → pruned | FLOPs dense → pruned | filters removed "
          "| grouped-conv channels kept | prepare (s) | convert (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = 0
    for name in names:
        try:
            r = check(name, args.lowering, args.channel_multiple, resolutions)
        except Exception as exc:  # report and go on: this is a survey
            failures += 1
            print(f"| {name} | | FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | | | | | |", flush=True)
            continue
        ok = "" if r["err"] <= 1e-4 else " **> 1e-4**"
        g0, g1 = r["grouped"]
        kept = f"{g1}/{g0} ({100 * (1 - g1 / g0):.1f} % removed)" if g0 else "–"
        failures += bool(ok)
        print(f"| {name} | {r['size']}² | {r['err']:.1e}{ok} | {r['params'][0] / 1e6:.2f}M → {r['params'][1] / 1e6:.2f}M "
              f"| {r['flops'][0] / 1e9:.3f}G → {r['flops'][1] / 1e9:.3f}G | {r['removed']} | {kept} | {r['prepare_s']:.2f} | {r['convert_s']:.2f} |",
              flush=True)
        gc.collect()
    print(f"\n{len(names) - failures}/{len(names)} models exact (≤ 1e-4)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

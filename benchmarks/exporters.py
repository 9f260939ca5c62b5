"""Compare ONNX exporters for swpfx.export_onnx: export time and ONNX Runtime latency.

Exports each model with the torch.export-based exporter (what swpfx.export_onnx
uses) and with the legacy TorchScript exporter, then times both files in ONNX
Runtime (CPU, 2 intra-op threads), interleaved A/B, medians.

    .venv/bin/python benchmarks/exporters.py --reps 50
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from swpfx.export import export_onnx, ort_session, relative_error, run_onnx
from swpfx.timing import time_sessions


class SameDilated(nn.Module):
    """padding='same' with dilation: what the legacy exporter gets wrong."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding="same", dilation=2), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding="same", dilation=3))

    def forward(self, x):
        return self.body(x)


def legacy_export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    models = {
        "resnet18": torchvision.models.resnet18(),
        "mobilenet_v2": torchvision.models.mobilenet_v2(),
        "same_dilated_convs": SameDilated(),
    }
    x = torch.randn(1, 3, args.size, args.size)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            model.eval()
            dyn_path, leg_path = Path(tmp) / f"{name}_dynamo.onnx", Path(tmp) / f"{name}_legacy.onnx"
            t = time.perf_counter()
            export_onnx(model, (x,), dyn_path, verify=False)
            dyn_time = time.perf_counter() - t
            t = time.perf_counter()
            legacy_export(model, x, leg_path)
            leg_time = time.perf_counter() - t
            with torch.no_grad():
                expected = model(x).numpy()
            dyn_sess = ort_session(dyn_path)
            dyn_err = relative_error(run_onnx(dyn_sess, (x,))[0], expected)
            try:
                leg_sess = ort_session(leg_path)
                leg_err = relative_error(run_onnx(leg_sess, (x,))[0], expected)
            except Exception as exc:  # ORT rejects the legacy file
                leg_sess, leg_err = None, f"fails in ORT: {str(exc).split(':')[-1].strip()[:70]}"
            sessions = {"dynamo": dyn_sess, **({"legacy": leg_sess} if leg_sess is not None else {})}
            t = time_sessions(sessions, x, rounds=args.reps)
            dyn_ms = 1e3 * t["dynamo"]
            leg_ms = 1e3 * t["legacy"] if "legacy" in t else float("nan")
            rows.append((name, dyn_time, leg_time, dyn_ms, leg_ms, dyn_err, leg_err))
    print(f"## ONNX exporters (torch {torch.__version__}, input 1×3×{args.size}², ORT CPU 2 threads, "
          f"median of {args.reps} runs, interleaved)\n")
    print("| model | export s (dynamo) | export s (legacy) | ORT ms (dynamo) | ORT ms (legacy) | rel. error dynamo | legacy |")
    print("|---|---|---|---|---|---|---|")
    for name, dt, lt, dm, lm, de, le in rows:
        le_s = f"{le:.1e}" if isinstance(le, float) else le
        print(f"| {name} | {dt:.2f} | {lt:.2f} | {dm:.2f} | {lm:.2f} | {de:.1e} | {le_s} |")


if __name__ == "__main__":
    main()

"""A dead channel's ones map built from the activation's shape vs from a channel slice of it, in ONNX Runtime.

``remove_channels`` adds a removed channel's position-dependent constant back with
a small conv over a ones map. Built as ``torch.ones_like(x[:, :1])`` the map reads
a channel slice of a conv output, which ONNX Runtime keeps in its channel-blocked
(NCHWc) layout: it reorders the whole activation out of that layout for the Slice.
Built as ``x.new_ones((N, 1, H, W))`` (what ``remove_channels`` does) only Shape
reads it. This converts the demo's BN residual net (random init, random BatchNorm
statistics, a fraction of each conv's filters dead), makes a copy with the slice
version of every ones map, counts ``ReorderOutput`` nodes in ORT's optimised graphs
and times the dense, shape and slice models side by side (``swpfx.latencies``).

    .venv/bin/python benchmarks/ones_map.py
"""

from __future__ import annotations

import argparse
import copy
import operator
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

import swpfx
from report import table, write_report
from swpfx.data import residual_bn_cnn
from swpfx.runtime_model import machine_key
from swpfx.timing import latencies

OUT = Path(__file__).parent / "results" / "ones_map.md"


def randomize_batchnorm_(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1, generator=generator)
                m.running_var.uniform_(0.5, 2, generator=generator)
                m.bias.uniform_(-1, 1, generator=generator)
    return model


def with_sliced_ones_maps(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """A copy of ``gm`` whose ones maps are ``torch.ones_like(x[:, :1])`` (the earlier construction)."""
    old = copy.deepcopy(gm)
    graph, count = old.graph, 0
    for node in list(graph.nodes):
        if node.op == "call_method" and node.target == "new_ones":
            with graph.inserting_before(node):
                sliced = graph.call_function(operator.getitem, (node.args[0], (slice(None), slice(None, 1))))
                ones = graph.call_function(torch.ones_like, (sliced,))
            node.replace_all_uses_with(ones)
            graph.erase_node(node)
            count += 1
    graph.eliminate_dead_code()
    old.recompile()
    return old, count


def reorders(model: torch.nn.Module, x: torch.Tensor) -> int:
    """``ReorderOutput`` nodes in ONNX Runtime's optimised graph of ``model``."""
    with tempfile.TemporaryDirectory() as folder:
        path = swpfx.export_onnx(model, (x,), Path(folder) / "m.onnx").path
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(folder) / "optimised.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "ReorderOutput" for n in onnx.load(options.optimized_model_filepath).graph.node)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dead", type=float, default=0.5, help="fraction of each conv's filters made dead")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, rows = time.perf_counter(), []
    for seed in args.seeds:
        g = torch.Generator().manual_seed(seed)
        model = randomize_batchnorm_(residual_bn_cnn(), g).eval()
        x = torch.randn(args.batch, 1, 28, 28, generator=g)
        prepared = swpfx.prepare(model, (x[:1],))
        with torch.no_grad():
            for s in swpfx.skeletons(prepared).values():
                s[torch.rand(s.shape[0], generator=g) < args.dead] = 0
        shaped = swpfx.convert(prepared, threshold=0.0, lowering="never", example_inputs=(x,))
        sliced, maps = with_sliced_ones_maps(shaped)
        with torch.no_grad():
            if not torch.equal(shaped(x), sliced(x)):
                raise AssertionError("the two ones-map constructions differ")
        ms = latencies({"dense": model, "shape": shaped, "slice": sliced}, (x,), threads=args.threads,
                       rounds=args.rounds, blocks=3)
        row = {"seed": seed, "maps": maps, "reorders_shape": reorders(shaped, x), "reorders_slice": reorders(sliced, x),
               **ms}
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    lines = [
        "# A dead channel's ones map: built from the shape vs from a channel slice (ONNX Runtime)", "",
        f"Command: `.venv/bin/python benchmarks/ones_map.py` ({(time.perf_counter() - started) / 60:.1f} min)", "",
        f"- machine: {machine_key()}; ORT {args.threads} intra-op threads, spinning off; batch {args.batch}, 28²; "
        f"`swpfx.data.residual_bn_cnn`, random init and BatchNorm statistics, {args.dead:.0%} of each conv's filters "
        "dead, `convert(threshold=0.0, lowering=\"never\")`; the two constructions agree bit for bit",
        f"- ms: `swpfx.latencies` ({args.rounds} interleaved rounds × 3 blocks, min of the block medians)", "",
        *table(["seed", "ones maps", "ReorderOutput: shape / slice", "dense ms", "shape ms", "slice ms",
                "shape / slice"],
               [[str(r["seed"]), str(r["maps"]), f"{r['reorders_shape']} / {r['reorders_slice']}", f"{r['dense']:.3f}",
                 f"{r['shape']:.3f}", f"{r['slice']:.3f}", f"{r['shape'] / r['slice']:.3f}"] for r in rows]),
    ]
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

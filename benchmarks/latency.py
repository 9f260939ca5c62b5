"""End-to-end ONNX Runtime latency: dense vs swpfx-converted (lowering never/auto/always) vs Torch-Pruning.

Models are torchvision classifiers with random init (eval mode), 224² input.
Skeletons are set from issue 4's mask protocols (``swpfx.synthetic``), then
``swpfx.convert(prepared, threshold=0.05, lowering=...)``. The peer is
Torch-Pruning magnitude channel pruning (``torch_pruning``, benchmark-only) at
the same MACs as the swpfx graph (the lowering ops excluded). Every graph is
exported with ``swpfx.export_onnx`` (verified against torch) and all sessions
are timed interleaved (ORT CPU, 2 intra-op threads, medians).

    .venv/bin/python benchmarks/latency.py [--models resnet18] [--batch 1 8] [--rounds 50]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

import swpfx
from swpfx.convert import convert
from swpfx.export import export_onnx, ort_session
from swpfx.runtime_model import onnx_bytes
from swpfx.synthetic import synthetic_skeletons_
from swpfx.timing import time_sessions

THRESHOLD = 0.05


def conv_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs of Conv2d and Linear layers (forward hooks), the same count for every variant."""
    total = 0

    def conv_hook(m, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        nonlocal total
        total += out.numel() // out.shape[0] * m.in_features

    hooks = [m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return total


def stripe_macs(deployed, x) -> int:
    """Dense MACs of the never-lowered graph minus the pruned stripes' share (what lowering can reach)."""
    total = conv_macs(deployed, x)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(deployed).propagate(x[:1])
    for node in deployed.graph.nodes:
        mask = node.meta.get("swpfx", {}).get("mask")
        if mask is not None and node.op == "call_module":
            conv = deployed.get_submodule(node.target)
            out = node.meta["tensor_meta"].shape
            per_stripe = out[2] * out[3] * conv.in_channels // conv.groups
            total -= int((~mask).sum()) * per_stripe
    return total


def torch_pruning_peer(model_fn, x, target_macs: int):
    """Torch-Pruning L1 channel pruning of a fresh model down to ``target_macs`` (iterative steps)."""
    import torch_pruning as tp

    model = model_fn().eval()
    probe = torch.randn(1, 3, 64, 64)  # MAC ratios at 64² match 224² closely and cost 12× less per step
    target_fraction = target_macs / conv_macs(model, x)
    base = conv_macs(model, probe)
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    pruner = tp.pruner.MagnitudePruner(model, probe, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.9, iterative_steps=90, ignored_layers=ignored,
                                       round_to=None)
    for _ in range(90):
        if conv_macs(model, probe) <= target_fraction * base:
            break
        pruner.step()
    return model.eval(), conv_macs(model, probe) / base


def sessions_for(model_name: str, protocol: str, x: torch.Tensor, workdir: Path, peer: bool):
    model_fn = getattr(torchvision.models, model_name)
    torch.manual_seed(0)
    dense = model_fn().eval()
    prepared = swpfx.prepare(dense, (x[:1],))
    synthetic_skeletons_(prepared, protocol, threshold=THRESHOLD, seed=0)
    variants = {"dense": dense}
    for lowering in ("never", "auto", "always"):
        variants[f"swpfx-{lowering}"] = convert(prepared, threshold=THRESHOLD, lowering=lowering)
    base = conv_macs(dense, x)
    target = stripe_macs(variants["swpfx-never"], x)
    info = {"mac_ratio": base / target, "never_mac_ratio": base / conv_macs(variants["swpfx-never"], x)}
    if peer:
        torch.manual_seed(0)
        pruned, fraction = torch_pruning_peer(model_fn, x, target)
        variants["torch-pruning"] = pruned
        info["peer_mac_ratio"] = 1 / fraction
    sessions = {}
    for name, model in variants.items():
        path = workdir / f"{model_name}_{protocol}_{name}.onnx"
        export_onnx(model, (x,), path, dynamic_batch=False)
        sessions[name] = ort_session(path.read_bytes())
    return sessions, info, variants


def layer_subgraph(gm, source: str):
    """The nodes computing conv ``source`` in a converted graph (dense conv or lowered subgraph) as a GraphModule."""
    from torch import fx

    members = [n for n in gm.graph.nodes if n.meta.get("swpfx", {}).get("conv") == source
               and n.meta["swpfx"].get("role") in ("conv", "lowered_conv")]
    if not members:
        return None, None
    graph, env = fx.Graph(), {}
    member_set = set(members)
    external = next(a for n in members for a in n.all_input_nodes if a not in member_set)
    env[external] = graph.placeholder("x")
    for n in members:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[members[-1]])
    return fx.GraphModule(gm, graph), tuple(external.meta["tensor_meta"].shape)


def per_layer(model_name: str, protocol: str, rounds: int) -> None:
    """Each stripe conv of the model alone: dense original conv vs swpfx (auto) subgraph, both in ORT."""
    from torch.fx.passes.shape_prop import ShapeProp

    x = torch.randn(1, 3, 224, 224)
    torch.manual_seed(0)
    dense = getattr(torchvision.models, model_name)().eval()
    prepared = swpfx.prepare(dense, (x,))
    synthetic_skeletons_(prepared, protocol, threshold=THRESHOLD, seed=0)
    auto = convert(prepared, threshold=THRESHOLD, lowering="auto")
    ShapeProp(auto).propagate(x)
    shapes = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(i[0].shape)))
             for n, m in dense.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        dense(x)
    for h in hooks:
        h.remove()
    traced = torch.fx.symbolic_trace(dense)
    traced_users = {n.target: next(iter(n.users)).target for n in traced.graph.nodes
                    if n.op == "call_module" and len(n.users) == 1}
    print(f"\n### Per-layer ORT latency, {model_name} batch 1, {protocol} masks, lowering='auto' "
          f"(ms, median of {rounds} interleaved rounds)\n")
    print("Dense: the original conv (+ the BatchNorm/ReLU the lowering absorbed); swpfx: the converted graph's "
          "nodes for that conv (smaller dense conv, or lowered subgraph).\n")
    print("| conv | dense | swpfx | form | speed-up |")
    print("|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for name in swpfx.skeletons(prepared):
        layer, in_shape = layer_subgraph(auto, name)
        if layer is None:
            continue
        forms = {n.meta["swpfx"].get("lowering", "dense") for n in layer.graph.nodes if "swpfx" in n.meta}
        parts = {n.meta["swpfx"].get("part", "") for n in layer.graph.nodes if "swpfx" in n.meta}
        original = torch.nn.Sequential(dense.get_submodule(name))
        follower = traced_users.get(name)
        if any(p.endswith("_bn") for p in parts):  # BN (and ReLU) moved into the lowered subgraph
            original.append(dense.get_submodule(follower))
            if any(p.endswith("_relu") for p in parts):
                original.append(torch.nn.ReLU())
        original.eval()
        xs = {"dense": torch.randn(shapes[name]), "swpfx": torch.randn(in_shape)}
        sessions = {k: ort_session(onnx_bytes(m, xs[k])) for k, m in (("dense", original), ("swpfx", layer))}
        t = time_sessions(sessions, xs, rounds=rounds, blocks=3)
        totals[0] += t["dense"]
        totals[1] += t["swpfx"]
        print(f"| {name} | {t['dense'] * 1e3:.3f} | {t['swpfx'] * 1e3:.3f} | {'/'.join(sorted(forms))} | "
              f"{t['dense'] / t['swpfx']:.2f} |", flush=True)
    print(f"| **sum** | {totals[0] * 1e3:.2f} | {totals[1] * 1e3:.2f} | | {totals[0] / totals[1]:.2f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "vgg16"])
    parser.add_argument("--protocols", nargs="+", default=["random", "structured"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--per-layer", action="store_true", help="only the per-layer ResNet-18 tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.per_layer:
        for protocol in args.protocols:
            per_layer("resnet18", protocol, args.rounds)
        return
    print(f"\n### End-to-end ONNX Runtime latency (ms, median of {args.rounds} interleaved rounds, 2 threads)\n")
    print("MAC ratio: dense MACs / swpfx MACs counting only kept stripes; speed-up: dense / variant; "
          "realised: speed-up / MAC ratio.\n")
    print("| model | protocol | batch | dense | swpfx never | swpfx auto | swpfx always | Torch-Pruning | "
          "MAC ratio (swpfx / peer) | speed-up never / auto / always / peer | realised auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            for protocol in args.protocols:
                for batch in args.batch:
                    x = torch.randn(batch, 3, 224, 224)
                    sessions, info, _ = sessions_for(model_name, protocol, x, Path(tmp), not args.no_peer)
                    t = time_sessions(sessions, x, rounds=args.rounds, blocks=3)
                    ms = {k: v * 1e3 for k, v in t.items()}
                    su = {k: t["dense"] / v for k, v in t.items()}
                    peer = f"{ms['torch-pruning']:.2f}" if "torch-pruning" in ms else "–"
                    peer_su = f"{su['torch-pruning']:.2f}" if "torch-pruning" in su else "–"
                    peer_mr = f"{info['peer_mac_ratio']:.2f}" if "peer_mac_ratio" in info else "–"
                    print(f"| {model_name} | {protocol} | {batch} | {ms['dense']:.2f} | {ms['swpfx-never']:.2f} | "
                          f"{ms['swpfx-auto']:.2f} | {ms['swpfx-always']:.2f} | {peer} | "
                          f"{info['mac_ratio']:.2f} / {peer_mr} | {su['swpfx-never']:.2f} / {su['swpfx-auto']:.2f} / "
                          f"{su['swpfx-always']:.2f} / {peer_su} | {su['swpfx-auto'] / info['mac_ratio']:.2f} |",
                          flush=True)


if __name__ == "__main__":
    main()

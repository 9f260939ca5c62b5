"""Every graph-rewriting pass and analysis of passes/ returns a PassResult-shaped result (graph_module, modified)."""

from __future__ import annotations

import torch
import torchvision

from swpfx.passes.analyze_channels import analyze_channels
from swpfx.passes.count_costs import count_costs
from swpfx.passes.fold_batchnorm_into_sums import fold_batchnorm_into_sums
from swpfx.passes.fold_skeletons import fold_skeletons
from swpfx.passes.insert_skeletons import insert_skeletons
from swpfx.passes.lower_stripe_convs import lower_stripe_convs
from swpfx.passes.measure_channel_similarity import measure_channel_similarity
from swpfx.passes.pass_result import PassResult
from swpfx.passes.remove_channels import remove_channels
from swpfx.tracing import trace


def test_each_pass_returns_its_graph_module_and_whether_it_changed_it():
    x = torch.randn(1, 3, 32, 32)
    gm = trace(torchvision.models.resnet18(num_classes=10).eval())
    results = {"insert_skeletons": insert_skeletons(gm)}
    names = list(results["insert_skeletons"].skeletons)
    masks = {n: torch.ones(gm.get_parameter(results["insert_skeletons"].skeletons[n]).shape, dtype=torch.bool)
             for n in names}
    masks[names[1]][:8] = False  # 8 dead filters in one conv
    results["fold_skeletons"] = fold_skeletons(gm, masks)
    results["analyze_channels"] = analyze_channels(gm, (x,))
    first_conv = next(n.name for n in gm.graph.nodes if n.op == "call_module" and "conv" in n.name)
    results["measure_channel_similarity"] = measure_channel_similarity(gm, [first_conv], [x.repeat(2, 1, 1, 1)])
    dead = {n.name: list(range(8)) for n in gm.graph.nodes if n.meta.get("swpfx", {}).get("conv") == names[1]}
    results["remove_channels"] = remove_channels(gm, (x,), dead, fold_constants=True)
    results["fold_batchnorm_into_sums"] = fold_batchnorm_into_sums(gm)
    results["lower_stripe_convs"] = lower_stripe_convs(gm, "never")
    results["count_costs"] = count_costs(gm, (x,))
    for name, result in results.items():
        assert result.graph_module is gm, name
        assert isinstance(result.modified, bool), name
    assert isinstance(results["fold_skeletons"], PassResult)
    assert results["insert_skeletons"].modified and results["fold_skeletons"].modified
    assert results["remove_channels"].modified and results["remove_channels"].removed
    assert not results["analyze_channels"].modified and not results["count_costs"].modified
    assert not results["measure_channel_similarity"].modified
    assert results["measure_channel_similarity"].similarity[first_conv].shape == (64, 64)
    assert not results["lower_stripe_convs"].modified  # lowering="never" keeps every conv
    gm.graph.lint()

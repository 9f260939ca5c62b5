"""convert(prepared, flops_target=...): the cut meets the budget, closely, scale-invariantly."""

from __future__ import annotations

import pytest
import torch
import torchvision

import swpfx
from swpfx.budget import masks_pruning, pruning_order
from swpfx.importance import normalize_per_layer
from swpfx.convert import convert
from swpfx.cost import cost


@pytest.fixture(scope="module")
def prepared_and_input():
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(num_classes=10).features[:12].eval()  # 4 convs, plain chain + one pool
    x = torch.randn(1, 3, 16, 16)
    prepared = swpfx.prepare(model, (x,)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in swpfx.skeletons(prepared).values():
            s.copy_(torch.rand(s.shape, generator=g))
    return prepared, x


@pytest.mark.parametrize("target,lowering", [(0.5, "never"), (0.6, "always")])
def test_flops_target_is_met_and_close(prepared_and_input, target, lowering):
    prepared, x = prepared_and_input
    deployed = convert(prepared, flops_target=target, lowering=lowering)
    ratio = cost(deployed, (x,)).flops / cost(prepared, (x,)).flops
    assert ratio <= target
    assert ratio >= target - 0.05, f"cut too deep: {ratio:.3f} for target {target}"
    cut = deployed.meta["swpfx"]["cut"]
    assert cut["flops_target"] == target and cut["flops_ratio"] == pytest.approx(ratio)


def test_filter_granularity_meets_the_target_by_removing_whole_filters(prepared_and_input):
    prepared, x = prepared_and_input
    deployed = convert(prepared, flops_target=0.5, lowering="never", granularity="filter", channel_multiple=1)
    ratio = cost(deployed, (x,)).flops / cost(prepared, (x,)).flops
    assert 0.45 <= ratio <= 0.5
    assert deployed.meta["swpfx"]["cut"]["granularity"] == "filter"
    # a filter either keeps all its stripes (the skeletons have no exact zeros) or is dead (zero weights,
    # kept only where its channel is pinned)
    for node in deployed.graph.nodes:
        mask = node.meta.get("swpfx", {}).get("mask")
        if mask is None:
            continue
        partial = ~mask.flatten(1).all(1)
        weight = deployed.get_submodule(node.target).weight
        assert bool((weight[partial] == 0).all()), node.name


def test_bad_granularity_is_rejected(prepared_and_input):
    with pytest.raises(ValueError, match="granularity"):
        convert(prepared_and_input[0], flops_target=0.5, granularity="channel")


def test_layer_scores_are_invariant_to_a_layers_scale():
    skels = {"a": torch.rand(4, 3, 3), "b": torch.rand(8, 3, 3)}
    scaled = {"a": skels["a"] * 0.01, "b": skels["b"]}
    for name in skels:
        assert torch.allclose(normalize_per_layer(skels)[name], normalize_per_layer(scaled)[name])


@pytest.mark.parametrize("granularity", ["stripe", "filter"])
def test_pruning_order_starts_by_keeping_everything(prepared_and_input, granularity):
    ranks, always, units = pruning_order(prepared_and_input[0], granularity)
    assert all(bool(m.all()) for m in masks_pruning(ranks, always, 0).values())
    assert not any(bool(m.any()) for m in masks_pruning(ranks, always, units).values())


def test_unreachable_target_is_a_clear_error(prepared_and_input):
    prepared, _ = prepared_and_input
    with pytest.raises(ValueError, match="not reachable"):
        convert(prepared, flops_target=0.001, lowering="never")


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, float("nan")])
def test_bad_targets_are_rejected(prepared_and_input, bad):
    with pytest.raises(ValueError, match="flops_target"):
        convert(prepared_and_input[0], flops_target=bad)

"""convert(prepared, flops_target=...): the cut meets the budget, closely, scale-invariantly."""

from __future__ import annotations

import importlib

import pytest
import torch
import torchvision

import swpfx
from helpers import BLOCK, RUNTIME_MODEL, masked_reference, randomize_batchnorm_, scripted_timing
from swpfx.budget import (UnreachableTarget, block_removals, channel_groups, importance_scores,
                          masks_for_latency_target, masks_pruning, pruning_order, snapped_ladders)
from swpfx.convert import convert
from swpfx.cost import cost
from swpfx.estimate import ConversionEstimate, predict_graph
from swpfx.importance import normalize_per_layer
from swpfx.kernels import stripe_conv


@torch.no_grad()
def uniform_skeletons_(prepared, generator: torch.Generator) -> None:
    """Fill every skeleton with ``torch.rand`` values (uniform in [0, 1), float32 draws), in place."""
    for s in swpfx.skeletons(prepared).values():
        s.copy_(torch.rand(s.shape, generator=generator))


@pytest.fixture(scope="module")
def prepared_and_input():
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(num_classes=10).features[:12].eval()  # 4 convs, plain chain + one pool
    x = torch.randn(1, 3, 16, 16)
    prepared = swpfx.prepare(model, (x,)).eval()
    uniform_skeletons_(prepared, torch.Generator().manual_seed(0))
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
        torch.testing.assert_close(normalize_per_layer(skels)[name], normalize_per_layer(scaled)[name],
                                   rtol=1e-5, atol=1e-8)  # torch.allclose's defaults


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


# ---------------------------------------------------------------- latency_target


@pytest.fixture(scope="module")
def resnet_prepared():
    g = torch.Generator().manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.bias.uniform_(-1, 1, generator=g)
    x = torch.randn(1, 3, 64, 64, generator=g)
    prepared = swpfx.prepare(model, (x,)).eval()
    uniform_skeletons_(prepared, g)
    return prepared, x


@pytest.mark.parametrize("target", [0.7, 0.45])
def test_latency_target_is_met_on_the_runtime_models_prediction(resnet_prepared, target):
    prepared, x = resnet_prepared
    deployed = convert(prepared, latency_target=target, runtime_model=RUNTIME_MODEL, channel_multiple=BLOCK)
    cut = deployed.meta["swpfx"]["cut"]
    dense = ConversionEstimate(prepared, (x,), "auto", BLOCK, RUNTIME_MODEL).estimate(
        {n: torch.ones_like(s, dtype=torch.bool) for n, s in swpfx.skeletons(prepared).items()}).seconds
    predicted = predict_graph(deployed, RUNTIME_MODEL)
    assert predicted / dense <= target
    assert predicted / dense == pytest.approx(cut["latency_ratio"], rel=1e-9)
    assert cut["granularity"] in cut["candidates"] and cut["candidates"][cut["granularity"]]["meets_target"]
    # the winner keeps at least as much importance as removing filters alone would
    assert cut["candidates"][cut["granularity"]]["kept_importance"] >= cut["candidates"]["filter"]["kept_importance"]
    assert len(cut["decisions"]) == 20 and swpfx.cut_table(deployed).count("\n") == 21


def test_latency_target_stays_exact(resnet_prepared, monkeypatch):
    prepared, _ = resnet_prepared
    searches = []

    def recorded_search(*args, **kwargs):  # the real search, run once: the masks convert applied are the reference's
        searches.append(masks_for_latency_target(*args, **kwargs))
        return searches[-1]

    # swpfx.convert is the function; the search is looked up in the module of that name
    monkeypatch.setattr(importlib.import_module("swpfx.convert"), "masks_for_latency_target", recorded_search)
    deployed = convert(prepared, latency_target=0.5, runtime_model=RUNTIME_MODEL, channel_multiple=BLOCK)
    ((chosen, cut),) = searches
    assert deployed.meta["swpfx"]["cut"] is cut
    reference = masked_reference(prepared, threshold=-1.0)  # nothing zeroed by threshold: apply the cut's masks
    with torch.no_grad():
        for name, s in swpfx.skeletons(reference).items():
            s.mul_(chosen[name].to(s.dtype))
    y = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(deployed(y), reference(y), atol=1e-4, rtol=1e-4)
    deployed.graph.lint()


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, float("nan"), True])
def test_bad_latency_targets_are_rejected(resnet_prepared, bad):
    with pytest.raises(ValueError, match="latency_target must be a fraction"):
        convert(resnet_prepared[0], latency_target=bad, runtime_model=RUNTIME_MODEL)


def test_unreachable_latency_target_names_the_closest_reachable_value(resnet_prepared):
    with pytest.raises(ValueError, match=r"not reachable.*closest reachable value is 0\.\d+"):
        convert(resnet_prepared[0], latency_target=0.01, runtime_model=RUNTIME_MODEL)


def closest_reachable(prepared, x) -> float:
    with pytest.raises(UnreachableTarget) as unreachable:
        masks_for_latency_target(prepared, 0.01, "auto", (x,), RUNTIME_MODEL, BLOCK)
    return unreachable.value.closest


def test_the_deepest_latency_cut_leaves_every_conv_a_block_of_filters(prepared_and_input):
    prepared, x = prepared_and_input  # a plain chain: a conv without filters would cut the network's only path
    closest = closest_reachable(prepared, x)
    masks, report = masks_for_latency_target(prepared, closest, "auto", (x,), RUNTIME_MODEL, BLOCK)
    assert report["latency_ratio"] <= closest
    for name, mask in masks.items():
        assert int(mask.flatten(1).any(1).sum()) >= min(BLOCK, len(mask)), name


def test_measure_reaimed_past_reach_converts_the_fastest_cut(resnet_prepared, monkeypatch):
    prepared, x = resnet_prepared
    closest = closest_reachable(prepared, x)
    scripted_timing(monkeypatch, lambda r: 3.0 * r)  # far slower than predicted: the re-aim is out of reach
    with pytest.warns(UserWarning, match="no conversion measured within latency_target=0.6"):
        deployed = convert(prepared, latency_target=0.6, runtime_model=RUNTIME_MODEL, channel_multiple=BLOCK,
                           measure=3)
    rounds = deployed.meta["swpfx"]["cut"]["measured"]
    assert 0.6 / 3.0 < closest  # the second round's aim is out of reach ...
    assert len(rounds) == 2 and rounds[1]["predicted_target"] == pytest.approx(closest)  # ... so it cuts deepest
    assert deployed.meta["swpfx"]["cut"]["measured_ratio"] == pytest.approx(3.0 * rounds[1]["predicted"])


def test_latency_target_excludes_the_other_cuts(resnet_prepared):
    for other in ({"flops_target": 0.5}, {"threshold": 0.1}):
        with pytest.raises(ValueError, match="mutually exclusive"):
            convert(resnet_prepared[0], latency_target=0.5, runtime_model=RUNTIME_MODEL, **other)
    with pytest.raises(ValueError, match="lowering='auto'"):
        convert(resnet_prepared[0], latency_target=0.5, lowering="never")


def test_measured_latency_target_converts_again_with_the_target_over_the_miss(resnet_prepared, monkeypatch):
    prepared, x = resnet_prepared
    timed = scripted_timing(monkeypatch, lambda r: 1.12 * r)  # the runtime model under-predicts this graph by 12 %
    deployed = convert(prepared, latency_target=0.6, runtime_model=RUNTIME_MODEL, channel_multiple=BLOCK, measure=3)
    cut = deployed.meta["swpfx"]["cut"]
    rounds = cut["measured"]
    assert len(rounds) == len(timed) == 2 and rounds[0]["predicted_target"] == 0.6  # a constant miss: met at once
    assert rounds[0]["measured"] > 0.6  # the prediction alone misses
    for before, after in zip(rounds, rounds[1:]):
        assert after["predicted_target"] == pytest.approx(0.6 * before["predicted"] / before["measured"])
    assert cut["measured_ratio"] <= 0.6 and cut["latency_ratio"] == pytest.approx(cut["measured_ratio"] / 1.12)
    assert timed[-1] is deployed
    y = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    masked = convert(prepared, threshold=0.0, lowering="never")  # nothing pruned: the cut must change the function
    with torch.no_grad():
        assert not torch.allclose(deployed(y), masked(y), atol=1e-3)


def test_measured_latency_target_warns_when_no_round_meets_it(resnet_prepared, monkeypatch):
    prepared, _ = resnet_prepared
    scripted_timing(monkeypatch, lambda r: 0.9)  # whatever is cut, it measures 0.9 of dense
    with pytest.warns(UserWarning, match=r"no conversion measured within latency_target=0.6 in \d rounds"):
        deployed = convert(prepared, latency_target=0.6, runtime_model=RUNTIME_MODEL, channel_multiple=BLOCK,
                           measure=2)
    rounds = deployed.meta["swpfx"]["cut"]["measured"]
    assert len(rounds) == 2 and rounds[1]["predicted_target"] < rounds[0]["predicted_target"]
    assert deployed.meta["swpfx"]["cut"]["measured_ratio"] == pytest.approx(0.9)


@pytest.mark.skipif(not stripe_conv.is_available(), reason=f"fused stripe kernel unavailable: "
                    f"{stripe_conv.unavailable_reason()}")
def test_measured_fused_latency_target_times_the_dense_model_on_the_kernel(resnet_prepared, monkeypatch):
    from swpfx.fused_runtime_model import FusedRuntimeModel
    from swpfx.kernels.fused_conv import FusedStripeConv2d

    prepared, _ = resnet_prepared
    pricing = FusedRuntimeModel()
    timed = []

    def torch_and_ort_latencies(torch_models, onnx_paths, example_inputs, threads=2, **kwargs):
        dense, converted = torch_models["dense"], torch_models["converted"]
        assert not onnx_paths and sum(isinstance(m, FusedStripeConv2d) for m in dense.modules()) == 20
        timed.append(converted)
        return {"dense": 10.0, "converted": 10.0 * 1.1 * predict_graph(converted, pricing) / predict_graph(dense, pricing)}

    monkeypatch.setattr(importlib.import_module("swpfx.timing"), "torch_and_ort_latencies", torch_and_ort_latencies)
    deployed = convert(prepared, latency_target=0.6, lowering="fused", runtime_model=pricing, measure=2)
    rounds = deployed.meta["swpfx"]["cut"]["measured"]
    assert len(rounds) == 2 and rounds[0]["measured"] > 0.6 >= rounds[1]["measured"] and timed[-1] is deployed


def test_measure_needs_a_latency_target_and_a_round_count(resnet_prepared):
    with pytest.raises(ValueError, match="measure checks a latency_target"):
        convert(resnet_prepared[0], threshold=0.1, runtime_model=RUNTIME_MODEL, measure=2)
    with pytest.raises(ValueError, match="measure must be a number of rounds"):
        convert(resnet_prepared[0], latency_target=0.6, runtime_model=RUNTIME_MODEL, measure=-1)


def test_snapped_ladders_keep_each_filters_steps_in_order():
    scores = torch.rand(16, 3, 3, generator=torch.Generator().manual_seed(0))
    step, step_scores = snapped_ladders(scores)
    assert bool((step_scores[:, 1:] >= step_scores[:, :-1]).all())
    assert bool((step[:, 1, 1] == 2).all()) and int((step == 1).sum()) == 16 * 2
    kept_after_first = step >= 1  # a 1×3 or 3×1 line through the centre
    rows, cols = kept_after_first.any(2).sum(1), kept_after_first.any(1).sum(1)
    assert bool(((rows == 1) | (cols == 1)).all())


def test_snapped_order_prunes_filters_into_lines_then_centres(prepared_and_input):
    prepared, _ = prepared_and_input
    ranks, always, units = pruning_order(prepared, "snapped")
    for count in (units // 3, 2 * units // 3):
        for mask in masks_pruning(ranks, always, count).values():
            kept = mask.flatten(1).sum(1)
            assert set(kept.tolist()) <= {0, 1, 3, 9}


@pytest.fixture(scope="module")
def residual_estimate():
    from swpfx.data import residual_bn_cnn

    g = torch.Generator().manual_seed(1)
    model = randomize_batchnorm_(residual_bn_cnn(widths=(16, 32, 48)), g).eval()
    x = torch.randn(8, 1, 28, 28, generator=g)
    prepared = swpfx.prepare(model, (x[:1],)).eval()
    uniform_skeletons_(prepared, g)
    return prepared, ConversionEstimate(prepared, (x[:1],), "auto", BLOCK, RUNTIME_MODEL, batch=8)


def test_channel_groups_join_the_convs_a_residual_add_couples(residual_estimate):
    _, estimator = residual_estimate
    groups = sorted((sorted({n for filters in g for n, _ in filters}), len(g)) for g in channel_groups(estimator))
    assert groups == [(["blocks.0.conv1"], 16), (["blocks.0.conv2", "stem.0"], 16), (["blocks.1.conv1"], 32),
                      (["blocks.1.conv2", "blocks.1.shortcut.0"], 32), (["blocks.2.conv1"], 48),
                      (["blocks.2.conv2", "blocks.2.shortcut.0"], 48)]


def test_block_removals_prune_one_block_of_one_layer_group_per_step(residual_estimate):
    prepared, estimator = residual_estimate
    scores = importance_scores(prepared)
    full = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    dense = estimator.estimate(full).seconds
    steps = block_removals(estimator, scores, full, 0.6 * dense, block=BLOCK)
    seconds = [s for _, s in steps]
    assert seconds[0] == dense and seconds[-1] <= 0.6 * dense < seconds[-2]
    assert all(b < a for a, b in zip(seconds, seconds[1:]))
    groups = channel_groups(estimator)
    group_convs = [sorted({n for filters in g for n, _ in filters}) for g in groups]
    for (before, _), (after, after_seconds) in zip(steps, steps[1:]):
        lost = {n: int(before[n].flatten(1).any(1).sum() - after[n].flatten(1).any(1).sum()) for n in before}
        changed = sorted(n for n, k in lost.items() if k)
        assert len({lost[n] for n in changed}) == 1 and lost[changed[0]] in (BLOCK, 2 * BLOCK), lost
        assert len(changed) == 1 or changed in group_convs, changed  # one conv, or one whole coupled group
        assert all(torch.equal(after[n], before[n] & after[n]) for n in before)  # nothing is given back
        assert estimator.estimate(after).seconds == pytest.approx(after_seconds)
        for group in groups:  # every group keeps a block of channels that some conv still produces
            assert sum(any(bool(after[n][f].any()) for n, f in filters) for filters in group) >= BLOCK


def test_latency_search_tries_block_removal_and_the_winner_keeps_the_most_importance(resnet_prepared):
    prepared, x = resnet_prepared
    _, report = masks_for_latency_target(prepared, 0.5, "auto", (x,), RUNTIME_MODEL, BLOCK)
    candidates = report["candidates"]
    assert "blocks" in candidates and any(name.startswith("blocks+") for name in candidates)
    assert not any(name.startswith("filter/ms+") for name in candidates)  # block removal is the mixes' prefix
    best = max(c["kept_importance"] for c in candidates.values() if c["meets_target"])
    assert candidates[report["granularity"]]["kept_importance"] == best

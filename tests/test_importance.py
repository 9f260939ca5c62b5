"""Scale-free stripe importance, the gradual training rule, the sparsity report and tie-free budgets (issue 10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import swpfx
from helpers import randomize_batchnorm_, randomize_skeletons_, relative_error
from swpfx.budget import masks_pruning, pruning_order
from swpfx.importance import normalize_per_layer, stripe_ranks, stripe_sites


def bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 3, padding=1), nn.ReLU(),   # no BN after the last conv
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


@pytest.fixture
def prepared(generator):
    model = randomize_batchnorm_(bn_net(), generator).eval()
    prepared = swpfx.prepare(model, (torch.randn(1, 3, 8, 8),)).eval()
    randomize_skeletons_(prepared, generator)
    return prepared


def test_the_following_batchnorm_is_found(prepared):
    sites = stripe_sites(prepared)
    assert sites["0"].batchnorm is prepared.get_submodule("1")
    assert sites["3"].batchnorm is prepared.get_submodule("4")
    assert sites["6"].batchnorm is None


@pytest.mark.parametrize("scale", [1e-3, 0.37, 25.0])
def test_importance_is_invariant_to_a_function_preserving_rescale(prepared, scale):
    """Scaling filter 2's skeleton by s and its BN statistics to match leaves output and importance unchanged."""
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    bn = prepared.get_submodule("4")
    bn.eps = 0.0  # with ε > 0 the rescaled net differs by O(ε / var); the variances here are positive
    before_out, before = prepared(x), swpfx.stripe_importance(prepared)
    with torch.no_grad():
        swpfx.skeletons(prepared)["3"][2] *= scale
        conv_bias = prepared.get_submodule("3").bias[2].item()
        bn.running_mean[2] = scale * (bn.running_mean[2] - conv_bias) + conv_bias  # z = s·(W x) + b
        bn.running_var[2] *= scale ** 2
    after_out, after = prepared(x), swpfx.stripe_importance(prepared)
    assert relative_error(after_out, before_out) < 1e-4
    for name in before:
        assert relative_error(after[name], before[name]) < 1e-6, name


def test_importance_is_linear_in_the_skeleton_without_batchnorm(prepared):
    before = swpfx.stripe_importance(prepared)["6"]
    with torch.no_grad():
        swpfx.skeletons(prepared)["6"][1] *= 3.0
    after = swpfx.stripe_importance(prepared)["6"]
    torch.testing.assert_close(after[1], 3.0 * before[1])
    torch.testing.assert_close(after[0], before[0])


def test_importance_formula(prepared):
    skel = swpfx.skeletons(prepared)["0"].detach()
    weight = prepared.get_submodule("0").weight.detach()
    bn = prepared.get_submodule("1")
    expected = skel.abs() * weight.norm(dim=1) * (bn.weight.abs() / (bn.running_var + bn.eps).sqrt())[:, None, None]
    torch.testing.assert_close(swpfx.stripe_importance(prepared)["0"], expected)


def test_scale_free_penalty_gradient_matches_finite_differences(generator):
    model = randomize_batchnorm_(bn_net(), generator).double().eval()
    prepared = swpfx.prepare(model).double()
    randomize_skeletons_(prepared, generator)
    skel = swpfx.skeletons(prepared)["3"]
    penalty = swpfx.skeleton_penalty(prepared, alpha=0.3, rule="scale_free")
    (grad,) = torch.autograd.grad(penalty, skel)
    eps = 1e-6
    for index in [(0, 0, 0), (5, 1, 2), (7, 2, 2)]:
        with torch.no_grad():
            skel[index] += eps
            up = swpfx.skeleton_penalty(prepared, 0.3, rule="scale_free").item()
            skel[index] -= 2 * eps
            down = swpfx.skeleton_penalty(prepared, 0.3, rule="scale_free").item()
            skel[index] += eps
        assert grad[index].item() == pytest.approx((up - down) / (2 * eps), rel=1e-6)


def test_ranks_are_a_total_order_even_on_ties():
    scores = {"a": torch.ones(4, 3, 3), "b": torch.ones(2, 1, 1)}
    ranks = stripe_ranks(scores)
    flat = torch.cat([r.flatten() for r in ranks.values()])
    assert sorted(flat.tolist()) == list(range(38))


def test_per_layer_normalisation_is_invariant_to_a_layers_scale():
    scores = {"a": torch.rand(4, 3, 3), "b": torch.rand(8, 3, 3)}
    scaled = {"a": scores["a"] * 0.01, "b": scores["b"]}
    for name in scores:
        torch.testing.assert_close(normalize_per_layer(scores)[name], normalize_per_layer(scaled)[name])


def test_pruning_order_starts_by_keeping_everything_and_ends_with_nothing(prepared):
    ranks, always, units = pruning_order(prepared)
    assert all(bool(m.all()) for m in masks_pruning(ranks, always, 0).values())
    assert not any(bool(m.any()) for m in masks_pruning(ranks, always, units).values())
    kept = [sum(int(m.sum()) for m in masks_pruning(ranks, always, k).values()) for k in range(0, units + 1, 7)]
    assert kept == [units - k for k in range(0, units + 1, 7)]  # exactly one stripe per step


# ---------------------------------------------------------------- the gradual rule


def test_gradual_rule_zeroes_the_scheduled_fraction_of_least_important_stripes(prepared):
    total = sum(s.numel() for s in swpfx.skeletons(prepared).values())
    importance = normalize_per_layer(swpfx.stripe_importance(prepared))  # the default scope ranks within layers
    zero = swpfx.regularize_skeletons_(prepared, sparsity=0.6, progress=1 / 3)  # ramp 2/3: half way, 30 %
    assert zero == int(0.3 * total)
    pruned = torch.cat([(s == 0).flatten() for s in swpfx.skeletons(prepared).values()])
    scores = torch.cat([s.flatten() for s in importance.values()])
    assert scores[pruned].max() <= scores[~pruned].min()
    # the pruned set only grows, and ends at the target
    assert swpfx.regularize_skeletons_(prepared, sparsity=0.6, progress=1.0) == int(0.6 * total)
    now = torch.cat([(s == 0).flatten() for s in swpfx.skeletons(prepared).values()])
    assert bool(now[pruned].all())


def test_gradual_rule_global_scope_ranks_raw_importance_across_layers(prepared):
    importance = swpfx.stripe_importance(prepared)
    swpfx.regularize_skeletons_(prepared, sparsity=0.5, progress=1.0, scope="global")
    pruned = torch.cat([(s == 0).flatten() for s in swpfx.skeletons(prepared).values()])
    scores = torch.cat([s.flatten() for s in importance.values()])
    assert scores[pruned].max() <= scores[~pruned].min()


def test_gradual_rule_layer_scope_prunes_every_layer(prepared):
    swpfx.regularize_skeletons_(prepared, sparsity=0.5, progress=1.0, scope="layer")
    assert all(0 < int((s == 0).sum()) < s.numel() for s in swpfx.skeletons(prepared).values())


def test_gradual_training_on_a_bn_net_prunes_stripes_inside_surviving_filters(generator):
    torch.manual_seed(0)
    prepared = swpfx.prepare(bn_net(), (torch.randn(1, 3, 8, 8),))
    x = torch.randn(64, 3, 8, 8, generator=generator)
    y = (x.mean((1, 2, 3)) > 0).long() * 2 + (x[:, 0, :4].mean((1, 2)) > 0).long()
    opt = torch.optim.SGD(swpfx.param_groups(prepared, 1e-4), lr=0.05, momentum=0.9)
    steps = 30
    for step in range(steps):
        loss = F.cross_entropy(prepared(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        swpfx.regularize_skeletons_(prepared, sparsity=0.5, progress=(step + 1) / steps)
    report = swpfx.sparsity(prepared, threshold=0.0)
    assert report.stripe_fraction == pytest.approx(0.5, abs=1 / report.stripes)
    assert report.pruned_in_surviving >= 0.3 * report.pruned_stripes
    prepared.eval()
    deployed = swpfx.convert(prepared, threshold=0.0, lowering="never")
    assert relative_error(deployed(x), prepared(x)) < 1e-4  # nothing left to lose at conversion


def test_scale_free_penalty_lowers_importance_when_optimised(prepared):
    opt = torch.optim.SGD(list(swpfx.skeletons(prepared).values()), lr=0.1)
    values = []
    for _ in range(5):
        penalty = swpfx.skeleton_penalty(prepared, alpha=1.0, rule="scale_free")
        values.append(penalty.item())
        opt.zero_grad()
        penalty.backward()
        opt.step()
    assert values == sorted(values, reverse=True) and values[-1] < values[0]


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.5}, "sparsity must be a fraction"),
    ({"sparsity": 0.5, "progress": float("nan")}, "progress must be a fraction"),
    ({"sparsity": 0.5, "alpha": 1e-4}, "not both"),
    ({"rule": "gradual", "sparsity": 0.5, "alpha": 1e-4}, "takes sparsity and progress"),
    ({"rule": "reference", "alpha": 1e-4, "threshold": 0.1, "sparsity": 0.5}, "not sparsity"),
    ({"rule": "magic"}, "rule must be one of"),
    ({"sparsity": 0.5, "scope": "conv"}, "scope must be"),
])
def test_bad_rule_arguments(prepared, kwargs, match):
    with pytest.raises(ValueError, match=match):
        swpfx.regularize_skeletons_(prepared, **kwargs)


def test_importance_rejects_unknown_rules(prepared):
    with pytest.raises(ValueError, match="rule must be one of"):
        swpfx.stripe_importance(prepared, rule="l2")
    with pytest.raises(ValueError, match="rule must be one of"):
        swpfx.skeleton_penalty(prepared, 1e-4, rule="l2")


# ---------------------------------------------------------------- sparsity report agrees with convert


def test_sparsity_report_agrees_with_what_convert_removes(prepared):
    with torch.no_grad():
        skels = swpfx.skeletons(prepared)
        skels["0"][:3] = 0.0          # three dead filters
        skels["3"][:, 0] = 0.02       # top row below the threshold everywhere
        skels["3"][5] = 0.0
    report = swpfx.sparsity(prepared)
    deployed = swpfx.convert(prepared, lowering="never", channel_multiple=1)
    removed = deployed.meta["swpfx"]["removed_filters"]
    assert report.dead_filters == sum(removed.values()) == 4
    kept = sum(int(n.meta["swpfx"]["mask"].sum()) for n in deployed.graph.nodes
               if n.op == "call_module" and "mask" in n.meta.get("swpfx", {}))
    assert kept == report.stripes - report.pruned_stripes
    row = {r.name: r for r in report.rows}["3"]
    assert (row.pruned_stripes, row.dead_filters, row.pruned_in_surviving) == (7 * 3 + 9, 1, 21)
    assert "TOTAL" in str(report) and report.to_dict()["totals"]["dead_filters"] == 4


# ---------------------------------------------------------------- budgets on a freshly prepared model


@pytest.mark.parametrize("granularity", ["stripe", "filter"])
def test_budget_on_a_fresh_model_lands_within_five_percent(granularity):
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), 0).eval()
    x = torch.randn(1, 3, 32, 32)
    prepared = swpfx.prepare(model, (x,))   # skeletons all 1: every |I| ties
    for target in (0.5, 0.8):
        deployed = swpfx.convert(prepared, flops_target=target, lowering="never", granularity=granularity)
        ratio = swpfx.cost(deployed, (x,)).flops / swpfx.cost(prepared, (x,)).flops
        assert 0.95 * target <= ratio <= target, (granularity, target, ratio)


def test_filter_budget_after_gradual_training_keeps_what_it_needs():
    """Stripes zeroed in training are not counted as FLOPs the budget still has to remove (regression)."""
    from swpfx.demo import demo_cnn

    torch.manual_seed(0)
    x = torch.randn(1, 1, 28, 28)
    prepared = swpfx.prepare(randomize_batchnorm_(demo_cnn(), 0).eval(), (x,))
    swpfx.regularize_skeletons_(prepared, sparsity=0.6, progress=1.0)
    # the zeroed stripes alone leave ~0.35 of the FLOPs (whole filters died); ask for less
    for lowering in ("never", "auto"):
        deployed = swpfx.convert(prepared, flops_target=0.25, granularity="filter", lowering=lowering, channel_multiple=1)
        ratio = swpfx.cost(deployed, (x,)).flops / swpfx.cost(prepared, (x,)).flops
        assert 0.95 * 0.25 <= ratio <= 0.25, (lowering, ratio)
        assert deployed.meta["swpfx"]["cut"]["kept_stripes"] > 0

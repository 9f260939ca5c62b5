"""BudgetPruner: training keeps the budget's cut, so convert(threshold=0) meets the target and cuts nothing more."""

import copy

import pytest
import torch

import swpfx
from helpers import BLOCK, RUNTIME_MODEL, randomize_batchnorm_, scripted_timing
from swpfx.budget_pruner import BudgetPruner
from swpfx.data import residual_bn_cnn
from swpfx.estimate import predict_graph

X = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
FIXED = {"runtime_model": RUNTIME_MODEL, "channel_multiple": BLOCK}  # cuts independent of this machine's CPU


def prepared_net(seed: int = 0):
    torch.manual_seed(seed)
    model = residual_bn_cnn()
    randomize_batchnorm_(model, seed)
    return swpfx.prepare(model, (X[:1],))


def train_like(prepared, pruner, steps: int = 6, seed: int = 0) -> None:
    """Stand-in for training: perturb every weight between pruner steps, as an optimizer would."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in prepared.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        pruner.step(step / steps)


@pytest.mark.parametrize("target", [0.7, 0.45])
def test_converted_model_meets_the_latency_target_with_nothing_more_cut(target):
    prepared = prepared_net()
    pruner = BudgetPruner(prepared, latency_target=target, example_inputs=(X,), **FIXED,
                          updates=3, ramp=0.5)
    train_like(prepared, pruner)
    assert pruner.done_updates == 3
    assert pruner.report["latency_target"] == pytest.approx(target)
    deployed = swpfx.convert(prepared, threshold=0.0, example_inputs=(X,), **FIXED)
    dense = swpfx.convert(prepared_net(), threshold=0.0, example_inputs=(X,), **FIXED)
    ratio = predict_graph(deployed, RUNTIME_MODEL, batch=16) / predict_graph(dense, RUNTIME_MODEL, batch=16)
    assert ratio <= target
    again = swpfx.convert(prepared, latency_target=target, example_inputs=(X,), **FIXED)
    cut = again.meta["swpfx"]["cut"]
    assert cut["pruned_units"] in (0, [0, 0]) or cut["kept_stripes"] == deployed_kept(prepared)
    assert cut["kept_stripes"] == deployed_kept(prepared)
    prepared.eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(X), prepared(X), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(again(X), prepared(X), rtol=1e-4, atol=1e-4)
    deployed.graph.lint()


def deployed_kept(prepared) -> int:
    return int(sum(int((s != 0).sum()) for s in swpfx.skeletons(prepared).values()))


def test_flops_target_is_met_by_the_trained_zeros():
    prepared = prepared_net(1)
    pruner = BudgetPruner(prepared, flops_target=0.5, example_inputs=(X[:1],), **FIXED,
                          granularity="filter", updates=2)
    train_like(prepared, pruner, seed=1)
    deployed = swpfx.convert(prepared, threshold=0.0, example_inputs=(X[:1],), **FIXED)
    dense_flops = swpfx.cost(prepared, (X[:1],)).flops
    assert swpfx.cost(deployed, (X[:1],)).flops <= 0.5 * dense_flops
    assert swpfx.cost(deployed, (X[:1],)).flops == pytest.approx(pruner.report["flops_ratio"] * dense_flops)


def test_the_cut_tightens_along_the_ramp_and_holds_between_updates():
    prepared = prepared_net(2)
    pruner = BudgetPruner(prepared, latency_target=0.5, example_inputs=(X,), **FIXED,
                          updates=4, ramp=0.8)
    assert [pruner.scheduled_target(k) for k in range(1, 5)] == pytest.approx([0.875, 0.75, 0.625, 0.5])
    assert [pruner.due_updates(p) for p in (0.0, 0.19, 0.2, 0.61, 0.8, 1.0)] == [0, 0, 1, 3, 4, 4]
    ratios, zeros = [], []
    for progress in (0.2, 0.4, 0.6, 0.8):
        zeros.append(pruner.step(progress))
        ratios.append(pruner.report["latency_ratio"])
        assert ratios[-1] <= pruner.scheduled_target(pruner.done_updates)
    assert ratios == sorted(ratios, reverse=True) and zeros[-1] > zeros[0]
    with torch.no_grad():  # between updates the cut is re-applied, value and gradient
        skels = swpfx.skeletons(prepared)
        for s in skels.values():
            s.fill_(1.0)
            s.grad = torch.ones_like(s)
    assert pruner.step(0.9) == sum(int((~m).sum()) for m in pruner.masks.values())
    assert all(bool((s.grad[~pruner.masks[n]] == 0).all()) for n, s in skels.items())


def zeroed_in_a_dense_conv(seed: int = 3):
    prepared = prepared_net(seed)
    with torch.no_grad():
        swpfx.skeletons(prepared)["blocks.2.conv2"][:, 0, 0] = 0.0  # a conv that stays dense at target 1
    return prepared


def test_nested_cuts_keep_the_zeros_of_the_last_one():
    pruner = BudgetPruner(zeroed_in_a_dense_conv(), latency_target=0.9, example_inputs=(X,), **FIXED, nested=True)
    masks, _ = pruner.cut(1.0)
    assert not bool(masks["blocks.2.conv2"][:, 0, 0].any())
    assert all(bool(m.all()) for n, m in masks.items() if n != "blocks.2.conv2")
    prepared = prepared_net(4)
    pruner = BudgetPruner(prepared, latency_target=0.5, example_inputs=(X,), **FIXED, updates=4, ramp=0.8,
                          nested=True)
    earlier = None
    for step in range(1, 9):  # weights move between updates; no stripe pruned by one cut returns in a later one
        with torch.no_grad():
            for p in prepared.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(step)))
        pruner.step(step / 8)
        if earlier is not None:
            assert all(bool((pruner.masks[n] <= m).all()) for n, m in earlier.items())
        if pruner.masks is not None:
            earlier = {n: m.clone() for n, m in pruner.masks.items()}
    assert pruner.done_updates == 4


def test_free_cuts_give_back_zeros_the_new_cut_does_not_need():
    prepared = zeroed_in_a_dense_conv()
    pruner = BudgetPruner(prepared, latency_target=0.9, example_inputs=(X,), **FIXED, nested=False)
    masks, _ = pruner.cut(1.0)
    assert all(bool(m.all()) for m in masks.values())
    deployed = swpfx.convert(copy.deepcopy(prepared), latency_target=1.0, example_inputs=(X,), **FIXED)
    assert deployed.meta["swpfx"]["cut"]["kept_stripes"] < deployed.meta["swpfx"]["cut"]["total_stripes"]


@pytest.mark.parametrize("kwargs, message", [
    ({}, "give exactly one of latency_target and flops_target"),
    ({"latency_target": 0.5, "flops_target": 0.5}, "give exactly one"),
    ({"latency_target": 0.0}, "latency_target must be a fraction in \\(0, 1\\]"),
    ({"flops_target": float("nan")}, "flops_target must be a fraction"),
    ({"latency_target": 0.5, "ramp": 0}, "ramp must be a fraction"),
    ({"latency_target": 0.5, "updates": 0}, "updates must be a positive int"),
    ({"latency_target": 0.5, "lowering": "never"}, None),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    prepared = prepared_net()
    if message is None:  # a latency budget needs the runtime model to choose forms: refused before training
        with pytest.raises(ValueError, match="latency_target needs lowering='auto'"):
            BudgetPruner(prepared, example_inputs=(X,), **FIXED, **kwargs)
        return
    with pytest.raises(ValueError, match=f"swpfx.BudgetPruner: {message}"):
        BudgetPruner(prepared, example_inputs=(X,), **FIXED, **kwargs)


def test_progress_out_of_range_and_unprepared_models_are_refused():
    pruner = BudgetPruner(prepared_net(), latency_target=0.5, example_inputs=(X,), **FIXED)
    with pytest.raises(ValueError, match="progress must be a fraction in \\[0, 1\\]"):
        pruner.step(1.5)
    with pytest.raises((TypeError, ValueError), match="BudgetPruner"):
        BudgetPruner(residual_bn_cnn(), latency_target=0.5, example_inputs=(X,), **FIXED)


def test_an_unreachable_target_is_refused_before_training_with_the_closest_value():
    with pytest.raises(ValueError, match=r"latency_target=0.01 is not reachable .* closest reachable value is 0\.\d+"):
        BudgetPruner(prepared_net(), latency_target=0.01, example_inputs=(X,), **FIXED)


def test_measure_aims_training_at_the_cut_that_measures_within_the_target(monkeypatch):
    timed = scripted_timing(monkeypatch, lambda r: 1.2 * r, batch=16)  # this graph measures 20 % over its prediction
    prepared = prepared_net()
    pruner = BudgetPruner(prepared, latency_target=0.6, example_inputs=(X,), **FIXED, updates=3, ramp=0.5,
                          measure=3)
    rounds = pruner.measured
    assert len(rounds) == len(timed) == 2 and rounds[0]["predicted_target"] == 0.6 < rounds[0]["measured"]
    assert rounds[1]["predicted_target"] == pytest.approx(0.6 * rounds[0]["predicted"] / rounds[0]["measured"])
    assert rounds[1]["measured"] <= 0.6 and pruner.target == rounds[1]["predicted_target"] < 0.6 / 1.2 + 0.02
    first_aim = pruner.target
    train_like(prepared, pruner)
    assert [a["update"] for a in pruner.aims] == [0, 3]  # at construction, then at the last cut on trained weights
    assert pruner.aims[1]["rounds"][0]["predicted_target"] == first_aim and pruner.measured == pruner.aims[1]["rounds"]
    assert pruner.aims[1]["target"] == pruner.target and pruner.measured[-1]["measured"] <= 0.6
    assert pruner.report["latency_target"] == pruner.target
    deployed = swpfx.convert(prepared, latency_target=pruner.target, example_inputs=(X,), **FIXED)
    assert deployed_kept(prepared) == deployed.meta["swpfx"]["cut"]["kept_stripes"]  # training zeroed the cut
    dense = swpfx.convert(prepared_net(), threshold=0.0, example_inputs=(X,), **FIXED)
    predicted = predict_graph(deployed, RUNTIME_MODEL, batch=16) / predict_graph(dense, RUNTIME_MODEL, batch=16)
    assert 1.2 * predicted <= 0.6  # what the scripted machine would measure


def test_measure_warns_in_the_pruners_name_when_no_round_meets_the_target(monkeypatch):
    scripted_timing(monkeypatch, lambda r: 0.9, batch=16)
    with pytest.warns(UserWarning, match=r"swpfx.BudgetPruner: no conversion measured within latency_target=0.6"):
        pruner = BudgetPruner(prepared_net(), latency_target=0.6, example_inputs=(X,), **FIXED, measure=2)
    assert len(pruner.measured) == 2 and pruner.target == pruner.measured[0]["predicted_target"]  # the first was fastest


@pytest.mark.parametrize("kwargs, message", [
    ({"flops_target": 0.5, "measure": 2}, "measure checks a latency_target"),
    ({"latency_target": 0.5, "measure": -1}, "measure must be a number of rounds"),
    ({"latency_target": 0.5, "measure": True}, "measure must be a number of rounds"),
])
def test_measure_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"swpfx.BudgetPruner: {message}"):
        BudgetPruner(prepared_net(), example_inputs=(X,), **FIXED, **kwargs)

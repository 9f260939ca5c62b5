"""Channels removed through grouped (non-depthwise) convs, keeping every group the same size."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from torch import nn

import swpfx
from helpers import masked_reference, randomize_batchnorm_, relative_error
from random_cnns import build, example_input, grouped_net_specs
from swpfx.convert import convert
from swpfx.masks import random_stripe_mask
from swpfx.passes.analyze_channels import analyze_channels
from swpfx.passes.remove_channels import group_removal_targets, plan_removal, remove_channels
from swpfx.synthetic import skeletons_from_masks_
from swpfx.tracing import trace

THRESHOLD = 0.05
TOL = 1e-4


def check_exact(prepared, deployed, sizes, channels=3, tol=TOL):
    reference = masked_reference(prepared)
    for size in sizes:
        x = torch.randn(2, channels, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            err = relative_error(deployed(x), reference(x))
        assert err <= tol, f"relative error {err:.2e} at {size}"


def grouped_convs(model):
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels}


# ---------------------------------------------------------------- the planning rule (pure)


def test_group_targets_remove_the_smallest_common_count():
    removed_in = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    removed_out = np.array([[1, 0], [1, 1], [0, 0]], dtype=bool)
    whole, n_in, n_out = group_removal_targets(removed_in, removed_out)
    assert whole.tolist() == [False, False, False] and (n_in, n_out) == (1, 0)


def test_group_targets_drop_whole_groups_and_keep_one():
    removed_in = np.array([[1, 1], [1, 1], [1, 0]], dtype=bool)
    removed_out = np.array([[1, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
    whole, n_in, n_out = group_removal_targets(removed_in, removed_out)
    assert whole.tolist() == [True, False, False] and (n_in, n_out) == (1, 1)
    everything = np.ones((2, 2), dtype=bool)
    whole, n_in, n_out = group_removal_targets(everything, np.ones((2, 3), dtype=bool))
    assert whole.tolist() == [False, True] and (n_in, n_out) == (1, 2)  # one group stays, non-empty


# ---------------------------------------------------------------- a hand-made block


class GroupedBlock(nn.Module):
    """1×1 (16) -> BN -> ReLU -> 3×3 grouped (groups=4, 16 -> 16) -> BN -> ReLU -> 1×1 -> BN -> pooled Linear."""

    def __init__(self, groups=4, stride=1):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.b = nn.Conv2d(16, 16, 3, stride=stride, padding=1, groups=groups)
        self.bn_b = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.bn_c = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(self.bn_c(self.c(x)).mean((2, 3)))


def convert_with_dead(model, dead: dict[str, list[int]], size=10):
    randomize_batchnorm_(model.eval(), 0)
    x = torch.randn(2, 3, size, size)
    prepared = swpfx.prepare(model, (x,)).eval()
    with torch.no_grad():
        for name, filters in dead.items():
            swpfx.skeletons(prepared)[name][filters] = 0.0
    return prepared, convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)


def test_equal_dead_inputs_per_group_are_removed():
    prepared, deployed = convert_with_dead(GroupedBlock(), {"a": [0, 5, 9, 14]})  # one per group of 4
    b = deployed.get_submodule("b")
    assert (b.in_channels, b.out_channels, b.groups) == (12, 16, 4)
    assert deployed.get_submodule("a").out_channels == 12
    deployed.graph.lint()
    check_exact(prepared, deployed, [(10, 10), (13, 7), (24, 24)])


def test_unequal_dead_counts_remove_the_common_count():
    # group 0 has two dead inputs, the others one: one per group goes, the extra dead one stays
    prepared, deployed = convert_with_dead(GroupedBlock(), {"a": [0, 1, 5, 9, 14], "b": [2, 3, 6, 8, 13]})
    b = deployed.get_submodule("b")
    assert (b.in_channels, b.out_channels, b.groups) == (12, 12, 4)
    assert deployed.get_submodule("c").in_channels == 12
    check_exact(prepared, deployed, [(10, 10), (11, 11)])


def test_a_whole_dead_group_goes():
    # group 2: all inputs (a's filters 8-11) and all outputs (b's filters 8-11) dead
    prepared, deployed = convert_with_dead(GroupedBlock(), {"a": [8, 9, 10, 11], "b": [8, 9, 10, 11]})
    b = deployed.get_submodule("b")
    assert (b.in_channels, b.out_channels, b.groups) == (12, 12, 3)
    check_exact(prepared, deployed, [(10, 10), (15, 9)])


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_dead_grouped_filters_fold_their_constants(groups):
    """b's dead filters emit BN-shift constants that c (and the zero-padded b inputs) must absorb."""
    model = GroupedBlock(groups, stride=2)
    per = 16 // groups
    dead_b = [g * per + (g % per) for g in range(groups)]  # one per group, different positions
    prepared, deployed = convert_with_dead(model, {"a": [g * per for g in range(groups)], "b": dead_b})
    b = deployed.get_submodule("b")
    assert (b.in_channels, b.out_channels, b.groups) == (16 - groups, 16 - groups, groups)
    check_exact(prepared, deployed, [(10, 10), (9, 9), (17, 12)])


def test_plan_keeps_groups_equal():
    gm = trace(GroupedBlock().eval())
    analysis = analyze_channels(gm, (torch.randn(1, 3, 8, 8),))
    a = next(n for n in analysis.producers if n.name == "a")
    removed = plan_removal(analysis, {a: [0, 1, 2, 5, 6]})  # group 0: 3, group 1: 2, others 0
    assert removed == set()
    assert "a" not in analysis.independent_convs()  # not free for Central Filter's per-channel choice


def test_plain_removal_through_a_grouped_conv():
    model = GroupedBlock().eval()
    gm = trace(copy.deepcopy(model))
    x = torch.randn(1, 3, 8, 8)
    result = remove_channels(gm, (x,), {"b": [1, 5, 9, 13]}, strict=True)
    assert result.removed == {"b": 4}
    b = gm.get_submodule("b")
    assert b.groups == 4 and b.out_channels == 12
    kept = [o for o in range(16) if o not in (1, 5, 9, 13)]
    assert torch.equal(b.weight, model.b.weight[kept])
    gm.graph.lint()


# ---------------------------------------------------------------- torchvision grouped models


def per_group_dead_masks(prepared, seed):
    """Random masks (10 % dead) plus, in every grouped conv and its producer, the same filter dead in each group."""
    g = torch.Generator().manual_seed(seed)
    masks = {name: random_stripe_mask(*s.shape, keep=0.35, dead=0.1, generator=g)
             for name, s in swpfx.skeletons(prepared).items()}
    for name, conv in grouped_convs(prepared).items():
        per_out = conv.out_channels // conv.groups
        dead = torch.arange(conv.groups) * per_out + seed % per_out
        masks[name][dead] = False
        se_gate = name.replace(".f.b.0", ".f.se.fc2")  # RegNetY: the SE scale multiplies these channels
        if se_gate in masks:
            masks[se_gate][dead] = False
    return masks, g


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf"])
def test_torchvision_grouped_models_shrink_exactly(name):
    model = randomize_batchnorm_(torchvision.models.get_model(name, weights=None).eval(), 0)
    x = torch.randn(1, 3, 64, 64)
    prepared = swpfx.prepare(model, (x,)).eval()
    masks, g = per_group_dead_masks(prepared, seed=1)
    skeletons_from_masks_(prepared, masks, THRESHOLD, g)
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    deployed.graph.lint()
    before, after = grouped_convs(model), grouped_convs(deployed)
    shrunk = [n for n in before if after[n].out_channels < before[n].out_channels]
    assert len(shrunk) == len(before), "every grouped conv loses its per-group dead filters"
    assert all(after[n].groups == before[n].groups for n in before)
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in model.parameters())
    check_exact(prepared, deployed, [(64, 64), (77, 77)])


# ---------------------------------------------------------------- random nets with groups 2, 4, 8


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_random_grouped_nets_convert_exactly(groups):
    shrunk = []

    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(grouped_net_specs(groups))
    def check(spec):
        model = build(spec)
        x = example_input(spec)
        prepared = swpfx.prepare(model, (x,)).eval()
        gen = torch.Generator().manual_seed(spec.height * 31 + spec.width)
        masks = {}
        for name, skel in swpfx.skeletons(prepared).items():
            conv = prepared.get_submodule(name)
            mask = random_stripe_mask(*skel.shape, keep=0.35, dead=0.3, generator=gen)
            if conv.groups > 1:  # and one filter dead in every group, so grouped convs can shrink
                mask[torch.arange(conv.groups) * (conv.out_channels // conv.groups)] = False
            masks[name] = mask
        skeletons_from_masks_(prepared, masks, THRESHOLD, gen)
        before = grouped_convs(model)
        for lowering in ("never", "always"):
            deployed = convert(prepared, THRESHOLD, lowering=lowering, channel_multiple=1)
            deployed.graph.lint()
            check_exact(prepared, deployed, [(spec.height, spec.width), (spec.height + 3, spec.width + 1)],
                        channels=spec.in_channels)
        deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
        after = {n: deployed.get_submodule(n) for n in before}
        assert all(after[n].groups <= before[n].groups for n in before)
        shrunk.extend(n for n in before if after[n].out_channels < before[n].out_channels)

    check()
    assert shrunk, "no grouped conv lost a channel in any example"

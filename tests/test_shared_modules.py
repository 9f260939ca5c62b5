"""A conv (with its BN) called more than once stays one module through convert, pruned jointly at every call."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import swpfx
from helpers import masked_reference, randomize_batchnorm_, relative_error
from random_cnns import build, example_input, shared_net_specs
from swpfx.masks import random_stripe_mask
from swpfx.synthetic import skeletons_from_masks_
from swpfx.convert import convert
from swpfx.passes.analyze_channels import analyze_channels
from swpfx.passes.channel_rules import RULES, Channelwise
from swpfx.passes.graph_utils import PassError
from swpfx.passes.remove_channels import remove_channels
from swpfx.tracing import trace

THRESHOLD = 0.05
TOL = 1e-5


def unit(c_in, c_out, kernel=3):
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.BatchNorm2d(c_out), nn.ReLU())


class Siamese(nn.Module):
    """Block ``s1`` called on the two halves of the stem's output."""

    def __init__(self):
        super().__init__()
        self.stem = unit(3, 32)
        self.s1 = unit(16, 16)
        self.head = nn.Conv2d(32, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, 1)
        return self.fc(self.head(torch.cat([self.s1(a), self.s1(b)], 1)).mean((2, 3)))


class Reused(nn.Module):
    """Block ``s`` called on two different producers' channels, and on its own output: s(a(x)) + s(s(b(x)))."""

    def __init__(self, kernel=3):
        super().__init__()
        self.a, self.b, self.s = unit(3, 8), unit(3, 8), unit(8, 8, kernel)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc((self.s(self.a(x)) + self.s(self.s(self.b(x)))).mean((2, 3)))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def prepared_with_dead(model, dead, size=12):
    randomize_batchnorm_(model.eval(), torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    prepared = swpfx.prepare(model, (x,)).eval()
    with torch.no_grad():
        for name, filters in dead.items():
            swpfx.skeletons(prepared)[name][filters] = 0.0
    return prepared


def check_exact(prepared, deployed, sizes=((12, 12), (17, 13))):
    reference = masked_reference(prepared, THRESHOLD)
    for seed, size in enumerate(sizes):
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(10 + seed))
        with torch.no_grad():
            err = relative_error(deployed(x), reference(x))
        assert err <= TOL, f"relative error {err:.2e} at {size}"


def targets_of(gm, path_prefix):
    return {n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(path_prefix)}


def conv_paths(gm, conv):
    """Module paths the calls of source conv ``conv`` run."""
    return {n.target for n in gm.graph.nodes if n.meta.get("swpfx", {}).get("role") == "conv"
            and n.meta["swpfx"]["conv"] == conv}


def roles(gm):
    return [n.meta.get("swpfx", {}).get("role") for n in gm.graph.nodes]


def test_siamese_block_stays_one_module_when_nothing_is_pruned():
    model = Siamese()
    deployed = convert(prepared_with_dead(model, {}), THRESHOLD, lowering="never")
    deployed.graph.lint()
    assert n_params(deployed) == n_params(model)
    assert targets_of(deployed, "s1.") == {"s1.0", "s1.1", "s1.2"}
    assert sum(n.target == "s1.0" for n in deployed.graph.nodes) == 2


def test_siamese_block_loses_its_dead_filters_at_both_calls():
    model = Siamese()
    prepared = prepared_with_dead(model, {"s1.0": [1, 4, 7], "stem.0": [0, 17]})
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    deployed.graph.lint()
    assert n_params(deployed) < n_params(model)
    assert targets_of(deployed, "s1.") == {"s1.0", "s1.1", "s1.2"}
    assert deployed.get_submodule("s1.0").out_channels == 13 and deployed.get_submodule("s1.1").num_features == 13
    assert deployed.get_submodule("head").in_channels == 26
    assert deployed.get_submodule("stem.0").out_channels == 32  # its halves feed a split: pinned
    check_exact(prepared, deployed)


@pytest.mark.parametrize("kernel", [3, 1])
def test_block_reused_on_different_inputs_removes_only_channels_dead_everywhere(kernel):
    """Channel c of s's input is a's c and b's c and s's own c: it goes only if dead in all three.

    The removed inputs' constants differ per call (a's, b's, s's own): with zero padding each call
    gets its ones-map conv; a 1×1 s gets a constant add per call, its bias stays shared.
    """
    model = Reused(kernel)
    prepared = prepared_with_dead(model, {"a.0": [0, 1, 2, 5], "b.0": [0, 1, 3, 5], "s.0": [0, 1, 5, 6]})
    deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
    deployed.graph.lint()
    assert n_params(deployed) <= n_params(model)
    assert conv_paths(deployed, "s.0") == {"s.0"} and targets_of(deployed, "s.1") == {"s.1"}
    assert [deployed.get_submodule(p).out_channels for p in ("a.0", "b.0", "s.0")] == [5, 5, 5]
    if kernel == 3:
        assert roles(deployed).count("dead_channel_conv") >= 2
    else:
        assert roles(deployed).count("dead_channel_conv") == 0
        shifts = [n for n in deployed.graph.nodes if n.op == "get_attr" and "dead_channels_shift" in n.target]
        assert len(shifts) >= 2
    assert deployed.get_submodule("s.0").in_channels == 5
    check_exact(prepared, deployed)


def test_analysis_joins_the_channels_of_every_call():
    gm = trace(Reused().eval())
    analysis = analyze_channels(gm, (torch.randn(1, 3, 8, 8),))
    producers = {n.name: n for n in analysis.producers}
    classes = {name: analysis.classes_of(node).tolist() for name, node in producers.items()}
    assert classes["a_0"] == classes["b_0"] == classes["s_0"] == classes["s_3"] == classes["s_6"]
    assert [set(g) for g in analysis.coupled_groups()] == [{"a_0", "s_0", "b_0", "s_3", "s_6"}]


def test_a_channel_requested_at_one_call_only_stays():
    gm = trace(Siamese().eval())
    x = torch.randn(1, 3, 8, 8)
    result = remove_channels(gm, (x,), {"s1_0": [2]})
    assert result.removed == {} and gm.get_submodule("s1.0").out_channels == 16
    with pytest.raises(PassError, match="remove_channels.*channel 2 cannot be removed"):
        remove_channels(gm, (x,), {"s1_0": [2]}, strict=True)
    result = remove_channels(gm, (x,), {"s1_0": [2], "s1_3": [2]}, strict=True)
    assert result.removed == {"s1_0": 1, "s1_3": 1} and result.duplicated == []
    assert gm.get_submodule("s1.0").out_channels == 15 and targets_of(gm, "s1.0") == {"s1.0"}
    gm.graph.lint()


# ---------------------------------------------------------------- uses that need different modules


class Tagged(nn.Module):
    """A user's channel-wise leaf without tensors that records its width (so each width is another module)."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x):
        return x


class TaggedRule(Channelwise):
    def slice(self, module, kept):
        return None if kept.out is None else Tagged(len(kept.out))


class TwoWidths(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.tag = Tagged(6)
        self.c, self.d = nn.Conv2d(6, 2, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return (self.c(self.tag(self.a(x))) + self.d(self.tag(self.b(x)))).mean((2, 3))


def test_calls_needing_different_modules_get_copies_and_are_reported(monkeypatch):
    monkeypatch.setitem(RULES, Tagged, TaggedRule())
    model = TwoWidths().eval()
    x = torch.randn(2, 3, 6, 6)
    gm = trace(model, leaf_modules=[Tagged])
    result = remove_channels(gm, (x,), {"a": [0, 1], "b": [3]}, strict=True)
    gm.graph.lint()
    assert result.duplicated == ["tag -> tag_1"]
    assert [gm.get_submodule(t).channels for t in ("tag", "tag_1")] == [4, 5]
    with torch.no_grad():
        model.a.weight[[0, 1]] = 0.0
        model.a.bias[[0, 1]] = 0.0
        model.b.weight[3] = 0.0
        model.b.bias[3] = 0.0
        assert relative_error(gm(x), model(x)) <= TOL


# ---------------------------------------------------------------- random nets calling a conv twice


def test_random_nets_with_shared_convs_keep_them_shared_and_exact():
    """Random dead filters (30 %) in nets that call a conv unit twice (siamese halves, two inputs, u(u(x)))."""
    shrunk = []

    @settings(max_examples=30, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(shared_net_specs())
    def check(spec):
        model = build(spec)
        x = example_input(spec)
        prepared = swpfx.prepare(model, (x,)).eval()
        gen = torch.Generator().manual_seed(spec.height * 31 + spec.width)
        masks = {name: random_stripe_mask(*skel.shape, keep=0.35, dead=0.3, generator=gen)
                 for name, skel in swpfx.skeletons(prepared).items()}
        skeletons_from_masks_(prepared, masks, THRESHOLD, gen)
        deployed = convert(prepared, THRESHOLD, lowering="never", channel_multiple=1)
        deployed.graph.lint()
        calls: dict[str, list] = {}
        for node in deployed.graph.nodes:
            if node.meta.get("swpfx", {}).get("role") == "conv":
                calls.setdefault(node.meta["swpfx"]["conv"], []).append(node)
        assert all(len({n.target for n in nodes}) == 1 for nodes in calls.values()), "a shared conv was duplicated"
        assert n_params(deployed) <= n_params(model)
        shrunk.extend(name for name, nodes in calls.items() if len(nodes) > 1
                      and deployed.get_submodule(nodes[0].target).out_channels < model.get_submodule(name).out_channels)
        reference = masked_reference(prepared, THRESHOLD)
        sizes = [(spec.height, spec.width)] + ([(spec.height + 3, spec.width + 1)] if spec.head != "flatten" else [])
        for size in sizes:
            x = torch.randn(2, spec.in_channels, *size, generator=torch.Generator().manual_seed(sum(size)))
            with torch.no_grad():
                err = relative_error(deployed(x), reference(x))
            assert err <= 1e-4, f"relative error {err:.2e} at {size}"

    check()
    assert shrunk, "no shared conv lost a channel in any example"

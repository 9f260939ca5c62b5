"""fold_skeletons: skeletons merged into plain, masked Conv2d modules."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import swpfx
from helpers import ConvCalledTwice, randomize_batchnorm_, randomize_skeletons_, relative_error
from swpfx.passes.fold_skeletons import fold_skeletons, masked_weight, stripe_masks
from swpfx.passes.graph_utils import PassError


def test_stripe_masks_threshold_is_inclusive():
    skel = torch.tensor([[[0.05, 0.0500001, -0.2]]])
    assert stripe_masks({"c": skel}, 0.05)["c"].tolist() == [[[False, True, True]]]


def test_masked_weight_zeroes_whole_stripes():
    w = torch.randn(2, 3, 2, 2)
    mask = torch.tensor([[[True, False], [False, True]], [[False, False], [True, False]]])
    out = masked_weight(w, mask)
    for o in range(2):
        for i in range(2):
            for j in range(2):
                expected = w[o, :, i, j] if mask[o, i, j] else torch.zeros(3)
                assert torch.equal(out[o, :, i, j], expected)


def check_fold_equals_masked_prepared(model: nn.Module, x: torch.Tensor, generator: torch.Generator,
                                      threshold: float = 0.4):
    """Prepare ``model``, draw skeletons in [0, 1) and zero those ``<= threshold``; fold with those masks.

    The folded graph must lint and equal the prepared model with the zeroed skeletons.
    Returns ``(folded, masks)``.
    """
    prepared = swpfx.prepare(model, (x,)).eval()
    skels = randomize_skeletons_(prepared, generator, low=0.0, high=1.0)
    with torch.no_grad():
        masks = stripe_masks(skels, threshold)
        for s in skels.values():
            s.masked_fill_(s.abs() <= threshold, 0.0)
        expected = prepared(x)
        folded = fold_skeletons(prepared, masks).graph_module
        actual = folded(x)
    folded.graph.lint()
    assert relative_error(actual, expected) <= 1e-6
    return folded, masks


class Options(nn.Module):
    def __init__(self):
        super().__init__()
        self.reflect = nn.Conv2d(3, 6, (3, 2), padding=1, padding_mode="reflect", bias=False)
        self.same = nn.Conv2d(6, 6, 3, padding="same", dilation=2, groups=3)
        self.bn = nn.BatchNorm2d(6)
        self.strided = nn.Conv2d(6, 4, 5, stride=2, padding=2, padding_mode="circular")

    def forward(self, x):
        return self.strided(torch.relu(self.bn(self.same(self.reflect(x)))))


def test_fold_equals_masked_prepared_model_with_all_conv_options():
    g = torch.Generator().manual_seed(0)
    model = randomize_batchnorm_(Options().eval(), g)
    x = torch.randn(2, 3, 12, 12, generator=g)
    folded, masks = check_fold_equals_masked_prepared(model, x, g)
    convs = [n for n in folded.graph.nodes if n.op == "call_module" and isinstance(folded.get_submodule(n.target), nn.Conv2d)]
    assert [n.target for n in convs] == ["reflect", "same", "strided"]
    assert all(folded.get_submodule(n.target).padding_mode == "zeros" for n in convs)
    assert sum(n.target is torch.nn.functional.pad for n in folded.graph.nodes) == 2  # reflect, circular
    assert not [n for n, _ in folded.named_parameters() if "skeleton" in n]
    for n in convs:
        assert torch.equal(n.meta["swpfx"]["mask"], masks[n.meta["swpfx"]["conv"]])


def test_mask_of_wrong_shape_is_an_error_naming_the_pass():
    prepared = swpfx.prepare(torchvision.models.resnet18())
    masks = stripe_masks(swpfx.skeletons(prepared), 0.05)
    masks["layer1.0.conv1"] = masks["layer1.0.conv1"][:10]
    with pytest.raises(PassError, match="fold_skeletons.*layer1.0.conv1"):
        fold_skeletons(prepared, masks)


def test_a_conv_called_twice_stays_one_module():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    folded, _ = check_fold_equals_masked_prepared(ConvCalledTwice().eval(), x, g)
    convs = [n for n in folded.graph.nodes if n.op == "call_module"]
    assert [n.target for n in convs] == ["conv", "conv"]
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 1

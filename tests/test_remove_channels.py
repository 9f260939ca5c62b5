"""remove_channels: slicing producers, channel-wise ops and consumers; merges; strictness."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from helpers import randomize_batchnorm_, relative_error
from swpfx.passes.analyze_channels import analyze_channels
from swpfx.passes.graph_utils import PassError
from swpfx.passes.remove_channels import plan_removal, remove_channels
from swpfx.tracing import trace


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 16, 3)

    def forward(self, x):
        y = self.b(torch.relu(self.bn(self.a(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 4), 1))


def test_merge_into_compensates_a_duplicated_channel_exactly():
    """Channel 5 is an exact copy of channel 2: merging it into 2 leaves the output unchanged."""
    g = torch.Generator().manual_seed(0)
    model = randomize_batchnorm_(Chain().eval(), g)
    with torch.no_grad():
        for t in (model.a.weight, model.a.bias, model.bn.weight, model.bn.bias, model.bn.running_mean, model.bn.running_var):
            t[5] = t[2]
    x = torch.randn(2, 3, 8, 8, generator=g)
    expected = model(x)
    gm = trace(model)
    remove_channels(gm, (x,), {"a": [5]}, merge_into={"a": {5: 2}}, strict=True)
    assert gm.get_submodule("a").out_channels == 5 and gm.get_submodule("b").in_channels == 5
    with torch.no_grad():
        assert relative_error(gm(x), expected) <= 1e-6


def test_plain_removal_slices_flatten_columns_of_the_linear():
    model = Chain().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = trace(model)
    remove_channels(gm, (x,), {"b": [0, 4]}, strict=True)
    fc = gm.get_submodule("fc")
    assert fc.in_features == 3 * 16
    assert torch.equal(fc.weight, model.fc.weight[:, 16:64])
    gm.graph.lint()


def test_strict_refuses_coupled_channels_with_the_reason():
    gm = trace(torchvision.models.resnet18().eval())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(PassError, match="remove_channels.*layer1_0_conv2"):
        remove_channels(gm, (x,), {"layer1_0_conv2": [0]}, strict=True)


def test_non_strict_keeps_what_cannot_go_and_stays_exact():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = trace(model)
    result = remove_channels(gm, (x,), {"layer1_0_conv2": [0], "layer1_0_conv1": [1, 2]})
    assert result.removed == {"layer1_0_conv1": 2}
    assert gm.get_submodule("layer1.0.conv2").out_channels == 64


def test_a_node_never_loses_all_its_channels():
    gm = trace(Chain().eval())
    x = torch.randn(1, 3, 8, 8)
    analysis = analyze_channels(gm, (x,))
    a = next(n for n in analysis.producers if n.name == "a")
    removed = plan_removal(analysis, {a: range(6)})
    assert len(removed) == 5


def test_unknown_node_name_is_a_key_error():
    gm = trace(Chain().eval())
    with pytest.raises(KeyError, match="nope"):
        remove_channels(gm, (torch.randn(1, 3, 8, 8),), {"nope": [0]})


def test_batchnorm1d_after_flatten_keeps_the_columns_of_kept_channels():
    """flatten -> BatchNorm1d -> Linear: the BN is sliced by columns (H·W per channel), not by channels."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.BatchNorm1d(16),
                          nn.Linear(16, 2)).eval()
    randomize_batchnorm_(model, g)
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.0
    x = torch.randn(2, 3, 8, 8, generator=g)
    gm = trace(model)
    result = remove_channels(gm, (x,), {"_0": [1]}, fold_constants=True, strict=True)
    gm.graph.lint()
    assert result.removed == {"_0": 1}
    assert gm.get_submodule("4").num_features == 12 and gm.get_submodule("5").in_features == 12
    with torch.no_grad():
        assert relative_error(gm(x), model(x)) <= 1e-5

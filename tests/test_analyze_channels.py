"""Channel-dependency analysis: which conv output channels are coupled, pinned or free."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from swpfx.passes.analyze_channels import analyze_channels
from swpfx.tracing import trace


def analysis_of(model, size=32):
    gm = trace(model.eval())
    return analyze_channels(gm, (torch.randn(1, 3, size, size),))


def test_resnet18_inner_convs_are_independent_and_block_outputs_coupled():
    analysis = analysis_of(torchvision.models.resnet18())
    independent = set(analysis.independent_convs())
    assert {f"layer{i}_{j}_conv1" for i in range(1, 5) for j in range(2)} == independent
    groups = [set(g) for g in analysis.coupled_groups()]
    # layer1's residual stream couples the stem with both blocks' second convs
    assert {"conv1", "layer1_0_conv2", "layer1_1_conv2"} in groups
    # layer2 starts a new stream at its downsample conv
    assert {"layer2_0_conv2", "layer2_0_downsample_0", "layer2_1_conv2"} in groups


def test_densenet_concats_keep_every_conv_independent():
    analysis = analysis_of(torchvision.models.densenet121())
    assert len(analysis.independent_convs()) == len(analysis.producers) == 120


def test_depthwise_couples_its_producer():
    analysis = analysis_of(torchvision.models.mobilenet_v2())
    groups = [set(g) for g in analysis.coupled_groups()]
    assert {"features_2_conv_0_0", "features_2_conv_1_0"} in groups  # expand 1x1 + depthwise 3x3


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle
        return self.b(y)


def test_channel_shuffle_pins_its_input():
    analysis = analysis_of(Shuffle())
    assert analysis.independent_convs() == []
    blocked = analysis.blocked_classes()
    a = next(n for n in analysis.producers if n.name == "a")
    assert all(int(c) in blocked for c in analysis.classes_of(a))


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Conv2d(3, 1, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.a(x) * torch.sigmoid(self.gate(x)))  # (N,1,H,W) attention map


def test_broadcast_across_channels_is_not_channelwise():
    analysis = analysis_of(Broadcast())
    assert "a" not in analysis.independent_convs()


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.b(y * s)


def test_squeeze_excite_scale_couples_with_its_features():
    analysis = analysis_of(SqueezeExcite())
    assert [set(g) for g in analysis.coupled_groups()] == [{"a", "fc2"}]
    assert analysis.independent_convs() == ["fc1"]


def test_graph_output_pins_channels():
    analysis = analysis_of(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert analysis.independent_convs() == []
    assert "output" in next(iter(analysis.reasons.values())) or analysis.pinned.any()


def test_analysis_needs_shapes():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(Exception, match="analyze_channels"):
        analyze_channels(gm, (torch.randn(1, 5, 8, 8),))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.c = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).mean((2, 3))


def test_grouped_conv_is_a_producer_with_group_constraints():
    analysis = analysis_of(Grouped())
    b = next(n for n in analysis.producers if n.name == "b")
    grouped = analysis.grouped[b]
    assert grouped.groups == 4 and grouped.inputs.width == 8 and grouped.outputs.width == 12
    assert not analysis.blocked_classes() & set(analysis.classes_of(b).tolist())  # removable (in equal counts)
    assert analysis.independent_convs() == []  # but not freely, one channel at a time
    assert "c" not in analysis.independent_convs() and len(analysis.group_constrained_classes) == 20


def test_ones_map_reads_only_the_shape():
    class OnesMap(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 3, padding=1)
            self.k = nn.Conv2d(1, 4, 3, padding=1, bias=False)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return (self.b(y) + self.k(torch.ones_like(y[:, :1]))).mean((2, 3))

    analysis = analysis_of(OnesMap())
    assert "a" in analysis.independent_convs()

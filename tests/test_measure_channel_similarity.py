"""Tests for passes.measure_channel_similarity (streamed per-image Pearson similarity of conv channels)."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from helpers import randomize_batchnorm_
from swpfx.passes.measure_channel_similarity import (
    ChannelCorrelationSum,
    feature_map_node,
    measure_channel_similarity,
    pearson_per_image,
    pearson_sum,
)
from swpfx.tracing import trace




class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        y = torch.relu(y) + y  # bn2 has two users: the chain stops at bn2
        return self.fc(self.pool(y).flatten(1))


def node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


# ---------------------------------------------------------------- pure math


def test_pearson_matches_numpy_per_image():
    x = torch.randn(3, 7, 5, 6, generator=torch.Generator().manual_seed(1))
    corr = pearson_per_image(x)
    assert corr.shape == (3, 7, 7) and corr.dtype == torch.float64
    for b in range(3):
        ref = np.corrcoef(x[b].reshape(7, -1).double().numpy())
        np.testing.assert_allclose(corr[b].numpy(), ref, atol=1e-12)


def test_pearson_degenerate_map_conventions():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(1, 6, 4, 4, generator=g)
    maps[0, 0] = 0.0  # all zero
    maps[0, 1] = 0.0  # all zero
    maps[0, 2] = 3.0  # constant, not zero
    maps[0, 4] = 5.0  # constant, not zero
    maps[0, 5] = 2 * maps[0, 3] + 1  # affine copy of the random channel 3
    c = pearson_per_image(maps)[0]
    assert c[0, 1] == 1.0  # both all-zero
    assert c[0, 2] == 1.0 and c[2, 4] == 1.0  # both constant (the reference checks this first)
    assert c[0, 3] == -1.0 and c[3, 1] == -1.0  # exactly one all-zero
    assert c[2, 3] == 0.0 and c[3, 4] == 0.0  # constant vs varying: undefined, taken as 0 (no NaN)
    assert abs(float(c[3, 5]) - 1.0) < 1e-12
    assert torch.equal(c.diagonal(), torch.ones(6, dtype=torch.float64))
    assert torch.equal(c, c.T)
    assert torch.isfinite(c).all()


def test_pearson_sum_equals_sum_of_per_image_matrices_with_degenerate_maps():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(5, 7, 4, 3, generator=g)
    x[0, 1] = 0.0
    x[0, 2] = 0.0
    x[1, 3] = 2.0
    x[2] = 0.0  # a whole image of zero maps
    x[3, 4] = 0.0
    x[3, 5] = 3.0
    x[4, 6] = x[4, 0] * 3
    expected = pearson_per_image(x).sum(0)
    torch.testing.assert_close(pearson_sum(x), expected, rtol=0, atol=1e-12)
    assert torch.equal(pearson_sum(x).diagonal(), torch.full((7,), 5.0, dtype=torch.float64))


def test_correlation_sum_averages_over_images_not_batches():
    x = torch.randn(7, 4, 5, 5, generator=torch.Generator().manual_seed(3))
    one, many = ChannelCorrelationSum(4), ChannelCorrelationSum(4)
    one.update(x)
    for part in (x[:1], x[1:5], x[5:]):
        many.update(part)
    expected = pearson_per_image(x).mean(dim=0)
    torch.testing.assert_close(one.similarity(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(many.similarity(), expected, rtol=0, atol=1e-12)
    assert many.images == 7


def test_correlation_sum_chunks_large_maps(monkeypatch):
    import swpfx.passes.measure_channel_similarity as mcs

    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(mcs, "CHUNK_ELEMENTS", 48)  # one image per chunk
    chunked = ChannelCorrelationSum(3)
    chunked.update(x)
    torch.testing.assert_close(chunked.similarity(), pearson_per_image(x).mean(dim=0), rtol=0, atol=1e-12)


def test_correlation_sum_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"\(B, 4, \.\.\.\)"):
        ChannelCorrelationSum(4).update(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="no images"):
        ChannelCorrelationSum(4).similarity()


# ---------------------------------------------------------------- graph queries


def test_feature_map_follows_single_user_channelwise_chain():
    gm = trace(ConvBnRelu())
    assert feature_map_node(gm, node(gm, "conv1")).name == "relu1"
    assert feature_map_node(gm, node(gm, "conv2")).name == "bn2"  # bn2 has two users


def test_feature_map_in_resnet_block():
    gm = trace(torchvision.models.resnet18())
    assert feature_map_node(gm, node(gm, "layer1_0_conv1")).name == "layer1_0_relu"
    assert feature_map_node(gm, node(gm, "layer1_0_conv2")).name == "layer1_0_bn2"  # then the residual add


# ---------------------------------------------------------------- the analysis


def test_measure_matches_eager_post_activation_maps():
    torch.manual_seed(5)
    model = randomize_batchnorm_(ConvBnRelu(), 0).eval()
    batches = [torch.randn(3, 3, 8, 8), (torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    gm = trace(model)
    code_before = gm.code
    result = measure_channel_similarity(gm, ["conv1", "conv2"], batches).similarity

    with torch.no_grad():
        xs = torch.cat([batches[0], batches[1][0]])
        relu1 = model.relu1(model.bn1(model.conv1(xs)))
        bn2 = model.bn2(model.conv2(relu1))
    torch.testing.assert_close(result["conv1"], pearson_per_image(relu1).mean(0), rtol=0, atol=1e-10)
    torch.testing.assert_close(result["conv2"], pearson_per_image(bn2).mean(0), rtol=0, atol=1e-10)
    assert gm.code == code_before  # analysis only
    gm.graph.lint()
    assert node(gm, "conv1").meta["swpfx"]["feature_map"] == "relu1"
    assert node(gm, "conv1").meta["swpfx"]["channel_similarity"] is result["conv1"]


def test_measure_runs_in_eval_mode_and_restores_training_flag():
    model = randomize_batchnorm_(ConvBnRelu(), 0).train()
    gm = trace(model)
    x = torch.randn(4, 3, 8, 8)
    before = gm.bn1.running_mean.clone()
    result = measure_channel_similarity(gm, ["conv1"], [x]).similarity
    assert gm.training
    assert torch.equal(gm.bn1.running_mean, before)  # BN statistics untouched
    with torch.no_grad():
        model.eval()
        expected = pearson_per_image(model.relu1(model.bn1(model.conv1(x)))).mean(0)
    torch.testing.assert_close(result["conv1"], expected, rtol=0, atol=1e-10)


def test_memory_does_not_grow_with_batches():
    """Only the N×N sums are kept, and every batch is released before the next is read."""
    gm = trace(randomize_batchnorm_(ConvBnRelu(), 0).eval())
    released: list[weakref.ref] = []

    def batches(n):
        for i in range(n):
            # streaming: everything but the batch just handed out is already freed
            assert sum(r() is not None for r in released) <= 1, f"batch {i}: earlier batches are still held"
            x = torch.randn(2, 3, 8, 8)
            released.append(weakref.ref(x))
            yield x

    import swpfx.passes.measure_channel_similarity as mcs

    sizes = {}
    for n in (2, 20):
        held = []
        original = mcs.ChannelCorrelationSum.__init__

        def spy(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            held.append(self)

        mcs.ChannelCorrelationSum.__init__ = spy
        try:
            measure_channel_similarity(gm, ["conv1", "conv2"], batches(n))
        finally:
            mcs.ChannelCorrelationSum.__init__ = original
        sizes[n] = sum(s.nbytes() for s in held)
        assert [s.images for s in held] == [2 * n, 2 * n]
        released.clear()
    assert sizes[2] == sizes[20] == (6 * 6 + 5 * 5) * 8


def test_calibration_data_errors():
    gm = trace(ConvBnRelu())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="empty"):
        measure_channel_similarity(gm, ["conv1"], [], (x,))
    with pytest.raises(ValueError, match="empty"):
        measure_channel_similarity(gm, ["conv1"], [torch.randn(0, 3, 8, 8)], (x,))
    with pytest.raises(TypeError, match="first item is the input"):
        measure_channel_similarity(gm, ["conv1"], ["not a tensor"], (x,))
    with pytest.raises(TypeError, match="not one tensor"):
        measure_channel_similarity(gm, ["conv1"], torch.randn(2, 3, 8, 8), (x,))
    with pytest.raises(TypeError, match="iterable"):
        measure_channel_similarity(gm, ["conv1"], 3, (x,))
    with pytest.raises(ValueError, match="batch 1 has shape"):
        measure_channel_similarity(gm, ["conv1"], [torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)], (x,))
    with pytest.raises(ValueError, match="not a Conv2d"):
        measure_channel_similarity(gm, ["bn1"], [x], (x,))


def test_dataloader_batches_work():
    data = torch.utils.data.TensorDataset(torch.randn(10, 3, 8, 8), torch.arange(10))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    gm = trace(randomize_batchnorm_(ConvBnRelu(), 0).eval())
    result = measure_channel_similarity(gm, ["conv1"], loader).similarity
    assert result["conv1"].shape == (6, 6)
    assert torch.isfinite(result["conv1"]).all()

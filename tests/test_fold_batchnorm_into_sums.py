"""passes/fold_batchnorm_into_sums.py: a BatchNorm after conv + ones-map conv folds into both, exactly."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

import swpfx
from swpfx.passes.fold_batchnorm_into_sums import SUM_ROLE, fold_batchnorm_into_sums
from swpfx.pipeline import convert_with_masks

from tests.test_estimate import random_masks, randomize_batchnorm


def _batchnorms(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d))


def test_convert_folds_the_batchnorm_after_every_ones_map_sum_exactly():
    g = torch.Generator().manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet18(num_classes=10), g)
    x = torch.randn(1, 3, 48, 48, generator=g)
    prepared = swpfx.prepare(model, (x,))
    masks = random_masks(prepared, g, dead_fraction=0.4)
    built, removal = convert_with_masks(prepared, masks, "never", (x,), 1)
    assert removal.bias_maps
    for node in built.graph.nodes:  # no sum is left feeding a BatchNorm
        if node.meta.get("swpfx", {}).get("role") == SUM_ROLE and node.op == "call_function" and len(node.users) == 1:
            user = next(iter(node.users))
            assert not (user.op == "call_module" and isinstance(built.get_submodule(user.target), nn.BatchNorm2d))
    assert _batchnorms(built) < _batchnorms(prepared)
    reference = copy.deepcopy(prepared).eval()
    with torch.no_grad():
        for name, s in swpfx.skeletons(reference).items():
            s.mul_(masks[name].to(s.dtype))
    for size in (48, 37):
        y = torch.randn(2, 3, size, size, generator=g)
        torch.testing.assert_close(built(y), reference(y), atol=1e-4, rtol=1e-4)
    built.graph.lint()


def test_a_shared_or_training_batchnorm_is_left_alone():
    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.dead, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = torch.add(self.conv(x), self.dead(torch.ones_like(x[:, :1])))
            return self.bn(y)

    for training in (True, False):
        gm = torch.fx.symbolic_trace(Sum().train(training))
        add = next(n for n in gm.graph.nodes if n.target is torch.add)
        add.meta["swpfx"] = {"role": SUM_ROLE}
        if not training:  # a second user of the sum: folding would change it
            with gm.graph.inserting_after(add):
                extra = gm.graph.call_function(torch.relu, (add,))
            out = next(n for n in gm.graph.nodes if n.op == "output")
            out.args = ((out.args[0], extra),)
            gm.recompile()
        result = fold_batchnorm_into_sums(gm)
        assert result.folded == 0 and not result.modified

"""passes/modes.eval_mode: evaluate in eval mode, then give every submodule back its *own* training flag.

The model trains with one BatchNorm frozen in eval mode; whatever runs it in eval
mode (cost, accuracy, shape recording, similarity measurement, Central Filter)
must hand it back exactly so, not with every submodule reset to the root's flag.
"""

from __future__ import annotations

import torch
from torch import fx, nn

import swpfx
from helpers import randomize_batchnorm_
from swpfx.data import accuracy
from swpfx.passes.measure_channel_similarity import measure_channel_similarity
from swpfx.passes.modes import eval_mode
from swpfx.tracing import trace


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.bn2(self.conv2(x))))


def frozen_bn_net() -> nn.Module:
    model = randomize_batchnorm_(Net(), 0).train()
    model.bn1.eval()  # frozen statistics inside a training model
    return model


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def expected_flags(model: nn.Module) -> dict[str, bool]:
    return {name: name != "bn1" for name, _ in model.named_modules()}


def test_eval_mode_restores_each_submodule_flag():
    model = frozen_bn_net()
    before = flags(model)
    assert before == expected_flags(model)
    with eval_mode(model):
        assert not any(flags(model).values())
    assert flags(model) == before


def test_eval_mode_restores_flags_after_an_exception_and_for_replaced_modules():
    model = frozen_bn_net()
    try:
        with eval_mode(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert flags(model) == expected_flags(model)
    gm = fx.symbolic_trace(frozen_bn_net())
    with eval_mode(gm):  # a graph edit replaces bn1 and bn2 (the new modules copy the current, eval, flag)
        gm.bn1, gm.bn2 = nn.BatchNorm2d(8).eval(), nn.BatchNorm2d(8).eval()
    assert flags(gm) == {name: name != "bn1" for name, _ in gm.named_modules()}


def test_library_functions_hand_back_the_frozen_batchnorm():
    x = torch.randn(4, 3, 8, 8)
    model = frozen_bn_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    swpfx.cost(model, (x,))
    assert flags(model) == expected_flags(model)
    accuracy(model, x, torch.zeros(4, dtype=torch.long))
    assert flags(model) == expected_flags(model)
    prepared = swpfx.prepare(model, (x,))  # records shapes in eval mode
    assert flags(model) == expected_flags(model)
    assert prepared.training and not prepared.get_submodule("bn1").training and prepared.get_submodule("bn2").training

    gm = trace(model)
    measure_channel_similarity(gm, ["conv1"], [x])
    assert flags(gm) == flags(model) == expected_flags(model)

    pruned = swpfx.central_filter(model, [x], {"conv1": 0.25}, (x,))
    assert flags(model) == expected_flags(model)
    assert pruned.training and not pruned.bn1.training and pruned.bn2.training  # bn1 was replaced, still frozen
    for key, value in model.state_dict().items():  # nothing ran in train mode: statistics untouched
        assert torch.equal(value, state[key]), key

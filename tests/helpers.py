"""Shared test helpers: seeded non-trivial BatchNorm, error metrics, conv counting, skeleton folding, a fixed runtime model."""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from swpfx.estimate import predict_graph
from swpfx.runtime_model import RuntimeModel

CONV2D_FUNCTIONS = (torch.conv2d, torch.nn.functional.conv2d)

# Fixed coefficients (the shipped defaults, not this machine's calibration) and a fixed NCHWc block, so
# that budget cuts do not depend on the machine's CPU. Pass ``channel_multiple=BLOCK`` as well:
# convert and BudgetPruner otherwise round channel counts to this CPU's block.
BLOCK = 16
RUNTIME_MODEL = RuntimeModel(block=BLOCK)


@torch.no_grad()
def randomize_batchnorm_(model: nn.Module, generator: torch.Generator | int) -> nn.Module:
    """Give every BatchNorm random running stats (positive variance) and random affine params, in place.

    So that a rewrite that drops or misplaces a BN is never an identity by accident.
    ``generator`` may be a seed. Returns ``model``.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    for module in model.modules():
        if not isinstance(module, nn.modules.batchnorm._NormBase):
            continue
        if module.running_mean is not None:
            n = module.running_mean.numel()
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) * 0.9 + 0.6)
        if module.weight is not None:
            n = module.weight.numel()
            module.weight.copy_(torch.rand(n, generator=generator) * 0.9 + 0.6)
            module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|`` (the max-norm relative error), as a float."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.detach().abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual.detach() - expected.detach()).abs().max() / scale)


def flat_outputs(out) -> list[torch.Tensor]:
    """Tensors of a model output (a tensor, a tuple/list or a namedtuple such as GoogLeNetOutputs)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in flat_outputs(o)]


class Conv2dCounter(TorchFunctionMode):
    """Counts ``conv2d`` calls (and the distinct weight tensors they use) while active."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.weight_ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONV2D_FUNCTIONS:
            self.calls += 1
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            self.weight_ids.add(id(weight))
        return func(*args, **kwargs)


class ConvCalledTwice(nn.Module):
    """One ``Conv2d(4, 4, 3, padding=1)`` applied twice, a ReLU between: a conv module shared by two call sites."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def count_executed_convs(model: nn.Module, *inputs) -> Conv2dCounter:
    """Run ``model(*inputs)`` without grad and return the conv2d counter."""
    with torch.no_grad(), Conv2dCounter() as counter:
        model(*inputs)
    return counter


@torch.no_grad()
def randomize_skeletons_(prepared, generator: torch.Generator, low: float = 0.25, high: float = 1.75) -> dict:
    """Fill every skeleton with uniform values in [low, high); returns ``swpfx.skeletons(prepared)``."""
    import swpfx

    skels = swpfx.skeletons(prepared)
    for s in skels.values():
        s.copy_(torch.rand(s.shape, generator=generator, dtype=torch.float64).to(s.dtype) * (high - low) + low)
    return skels


@torch.no_grad()
def fold_skeletons_(model: nn.Module, skels: dict) -> nn.Module:
    """Multiply each skeleton into the weight of the conv it belongs to (``W ← W ⊙ I[:, None]``), in place.

    The reference for a prepared model with non-trivial skeletons: the original
    model whose conv weights carry the skeleton. Keys are conv qualified names.
    """
    for name, skel in skels.items():
        conv = model.get_submodule(name)
        conv.weight.mul_(skel.to(conv.weight.dtype).unsqueeze(1))
    return model


class SkeletonInjector(TorchFunctionMode):
    """While active, multiplies the weight of the k-th ``conv2d`` call by the k-th skeleton (``W_eff ⊙ I[:, None]``).

    An independent reference for a prepared model: run the *original* model under
    it, with the skeletons in execution order.
    """

    def __init__(self, skeletons):
        super().__init__()
        self.pending = list(skeletons)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in CONV2D_FUNCTIONS:
            skel = self.pending.pop(0)
            if len(args) > 1:
                args = (args[0], args[1] * skel.unsqueeze(1), *args[2:])
            else:
                kwargs["weight"] = kwargs["weight"] * skel.unsqueeze(1)
        return func(*args, **kwargs)


def state_fingerprint(model: nn.Module) -> dict[str, tuple]:
    """``{state_dict key: (dtype, shape, blake2b digest of the bytes)}``: an exact, low-memory snapshot.

    Compare two fingerprints to check a model's parameters and buffers were not
    modified, without holding a second copy of a large model.
    """
    import hashlib

    out = {}
    for key, tensor in model.state_dict().items():
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[key] = (tensor.dtype, tuple(tensor.shape), hashlib.blake2b(data, digest_size=16).hexdigest())
    return out


def masked_reference(prepared, threshold: float = 0.05):
    """A copy of ``prepared`` (eval mode) with every stripe ``convert(threshold)`` prunes set to zero: what it must equal."""
    import copy

    import swpfx

    ref = copy.deepcopy(prepared).eval()
    with torch.no_grad():
        for s in swpfx.skeletons(ref).values():
            s.masked_fill_(s.abs() <= threshold, 0.0)
    return ref


def scripted_timing(monkeypatch, measured_of, batch: int | None = None):
    """Make the measurements of ``convert(measure=...)`` (and ``BudgetPruner(measure=...)``) deterministic: the
    converted model measures ``measured_of(predicted ratio at batch)`` of dense (ONNX Runtime's timing);
    returns the list of timed converted models."""
    timing = importlib.import_module("swpfx.timing")
    timed = []

    def latencies(models, example_inputs, threads=2, **kwargs):
        dense, converted = models["dense"], models["converted"]
        assert str(dense).endswith("dense.onnx")  # the dense model is exported once, not per round
        timed.append(converted)
        dense_seconds = predict_graph(dense_graph[0], RUNTIME_MODEL, batch)
        predicted = predict_graph(converted, RUNTIME_MODEL, batch) / dense_seconds
        return {"dense": 10.0, "converted": 10.0 * measured_of(predicted)}

    dense_graph = []
    convert_module = importlib.import_module("swpfx.convert")
    build_dense = convert_module.build_dense
    monkeypatch.setattr(convert_module, "build_dense", lambda *a: dense_graph.append(build_dense(*a)) or dense_graph[-1])
    monkeypatch.setattr(timing, "latencies", latencies)
    return timed

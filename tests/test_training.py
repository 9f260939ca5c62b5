"""Training with skeletons: penalty, per-step regulariser, optimizer groups, dtype/device, state, modes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import swpfx
from helpers import randomize_batchnorm_, randomize_skeletons_, relative_error


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


@pytest.fixture
def problem(generator):
    x = torch.randn(8, 3, 8, 8, generator=generator)
    y = torch.randint(0, 4, (8,), generator=generator)
    return x, y


def test_penalty_value_and_gradient_is_alpha_sign(generator):
    prepared = swpfx.prepare(small_net())
    skels = randomize_skeletons_(prepared, generator, low=-1.0, high=1.0)
    with torch.no_grad():
        skels["3"][0, 0, 0] = 0.0  # sign(0) = 0: the subgradient at 0
    alpha = 3e-3
    penalty = swpfx.skeleton_penalty(prepared, alpha)
    expected = alpha * sum(s.detach().abs().sum() for s in skels.values())
    assert torch.allclose(penalty, expected, rtol=1e-6, atol=0)
    penalty.backward()
    for s in skels.values():
        assert torch.equal(s.grad, alpha * torch.sign(s.detach()))
    assert skels["3"].grad[0, 0, 0] == 0
    # ordinary parameters get no gradient from the penalty
    assert all(p.grad is None for n, p in prepared.named_parameters() if not n.endswith("skeleton"))


def test_penalty_and_regulariser_reject_bad_arguments():
    prepared = swpfx.prepare(small_net())
    with pytest.raises(ValueError, match="alpha must be a non-negative number"):
        swpfx.skeleton_penalty(prepared, -1.0)
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        swpfx.regularize_skeletons_(prepared, alpha=1e-5, threshold=-0.1)
    with pytest.raises(ValueError, match="expected a model returned by swpfx.prepare"):
        swpfx.skeleton_penalty(small_net(), 1e-5)


def test_gradients_reach_weights_and_skeletons(problem):
    x, y = problem
    prepared = swpfx.prepare(small_net()).train()
    F.cross_entropy(prepared(x), y).backward()
    for name, p in prepared.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert set(swpfx.skeletons(prepared)) == {"0", "3", "5"}


def test_skeleton_gradient_is_sum_over_input_channels_of_weight_times_weight_gradient(problem):
    """dL/dI[o,i,j] = Σ_c dL/dW_eff[o,c,i,j] · W[o,c,i,j] (chain rule through W ⊙ I)."""
    x, y = problem
    model = small_net().train()
    prepared = swpfx.prepare(model).train()
    F.cross_entropy(prepared(x), y).backward()
    F.cross_entropy(model(x), y).backward()  # same computation at I = 1: dL/dW_eff = model's dL/dW
    for name, skel in swpfx.skeletons(prepared).items():
        w = model.get_submodule(name).weight
        expected = (w.grad * w.detach()).sum(dim=1)
        assert relative_error(skel.grad, expected) <= 1e-5


def test_one_sgd_step_lowers_the_loss(problem):
    x, y = problem
    prepared = swpfx.prepare(small_net()).train()
    opt = torch.optim.SGD(swpfx.param_groups(prepared, weight_decay=1e-4), lr=0.05)

    def loss() -> torch.Tensor:
        return F.cross_entropy(prepared(x), y) + swpfx.skeleton_penalty(prepared, alpha=1e-4)

    before = loss()
    before.backward()
    skel_before = {k: s.detach().clone() for k, s in swpfx.skeletons(prepared).items()}
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < before - 1e-4
    assert all(not torch.equal(s, skel_before[k]) for k, s in swpfx.skeletons(prepared).items())


def test_regularize_skeletons_adds_subgradient_and_zeroes_small_stripes(problem, generator):
    x, y = problem
    prepared = swpfx.prepare(small_net()).train()
    skels = randomize_skeletons_(prepared, generator, low=-1.0, high=1.0)
    threshold, alpha = 0.3, 1e-2
    F.cross_entropy(prepared(x), y).backward()
    grads = {k: s.grad.clone() for k, s in skels.items()}
    values = {k: s.detach().clone() for k, s in skels.items()}
    dead = {k: v.abs() <= threshold for k, v in values.items()}
    n_dead = sum(int(d.sum()) for d in dead.values())
    assert 0 < n_dead < sum(v.numel() for v in values.values())

    assert swpfx.regularize_skeletons_(prepared, alpha=alpha, threshold=threshold) == n_dead
    for k, s in skels.items():
        assert torch.equal(s.detach()[dead[k]], torch.zeros(int(dead[k].sum())))
        assert torch.equal(s.grad[dead[k]], torch.zeros(int(dead[k].sum())))
        live = ~dead[k]
        assert torch.equal(s.detach()[live], values[k][live])
        assert torch.allclose(s.grad[live], (grads[k] + alpha * torch.sign(values[k]))[live], rtol=0, atol=1e-7)


def test_regularize_skeletons_without_backward_creates_gradients():
    prepared = swpfx.prepare(small_net())
    assert swpfx.regularize_skeletons_(prepared, alpha=0.5, threshold=0.0) == 0
    assert all(torch.equal(s.grad, torch.full_like(s, 0.5)) for s in swpfx.skeletons(prepared).values())


def test_param_groups_exempt_skeletons_from_weight_decay():
    prepared = swpfx.prepare(small_net())
    groups = swpfx.param_groups(prepared, weight_decay=5e-4)
    skeleton_ids = {id(s) for s in swpfx.skeletons(prepared).values()}
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert {id(p) for p in groups[1]["params"]} == skeleton_ids
    assert not skeleton_ids & {id(p) for p in groups[0]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(prepared.parameters()))
    # with SGD, weight decay would move a skeleton whose gradient is zero; here it must not
    opt = torch.optim.SGD(groups, lr=1.0)
    for p in prepared.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(s, torch.ones_like(s)) for s in swpfx.skeletons(prepared).values())


@torch.no_grad()
def test_skeletons_follow_weight_dtype(generator):
    model = randomize_batchnorm_(small_net(), generator).double().eval()
    x = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    prepared = swpfx.prepare(model, (x,))
    assert all(s.dtype == torch.float64 for s in swpfx.skeletons(prepared).values())
    out = prepared(x)
    assert out.dtype == torch.float64
    assert relative_error(out, model(x)) <= 1e-12
    assert prepared.meta["swpfx"]["input_specs"] == [((2, 3, 8, 8), torch.float64)]


def test_skeletons_follow_weight_device():
    with torch.device("meta"):
        model = small_net()
    prepared = swpfx.prepare(model)
    assert all(s.device.type == "meta" for s in swpfx.skeletons(prepared).values())
    assert prepared(torch.empty(2, 3, 8, 8, device="meta")).shape == (2, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@torch.no_grad()
def test_skeletons_follow_weight_cuda(generator):
    model = small_net().cuda().eval()
    x = torch.randn(2, 3, 8, 8, generator=generator).cuda()
    prepared = swpfx.prepare(model, (x,))
    assert all(s.is_cuda for s in swpfx.skeletons(prepared).values())
    assert relative_error(prepared(x), model(x)) <= 1e-5


def test_frozen_conv_gets_a_frozen_skeleton():
    model = small_net()
    model[0].weight.requires_grad_(False)
    skels = swpfx.skeletons(swpfx.prepare(model))
    assert not skels["0"].requires_grad and skels["3"].requires_grad


@torch.no_grad()
def test_state_dict_round_trips_into_a_fresh_prepare(generator):
    model = randomize_batchnorm_(small_net(), generator).eval()
    x = torch.randn(2, 3, 8, 8, generator=generator)
    trained = swpfx.prepare(model, (x,))
    randomize_skeletons_(trained, generator)
    for p in trained.parameters():
        p.add_(0.01 * torch.randn(p.shape, generator=generator))
    state = trained.state_dict()
    assert {k for k in state if k.endswith("skeleton")} == {"0.skeleton", "3.skeleton", "5.skeleton"}

    fresh = swpfx.prepare(model, (x,))
    assert not torch.equal(fresh(x), trained(x))
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(x), trained(x))
    assert all(torch.equal(a, b) for a, b in zip(swpfx.skeletons(fresh).values(), swpfx.skeletons(trained).values()))


def test_train_and_eval_modes_propagate(problem, generator):
    x, _ = problem
    model = randomize_batchnorm_(small_net(), generator).train()
    stats = model[1].running_mean.clone()
    prepared = swpfx.prepare(model, (x[:1],))
    assert prepared.training and prepared.get_submodule("1").training
    # the example forward of prepare must not update the (copied) BatchNorm statistics
    assert torch.equal(prepared.get_submodule("1").running_mean, stats)
    prepared.eval()
    assert not any(m.training for m in prepared.modules())
    with torch.no_grad():
        assert relative_error(prepared(x), model.eval()(x)) <= 1e-5
    prepared.train()
    prepared(x)  # train mode: BN updates its statistics
    assert not torch.equal(prepared.get_submodule("1").running_mean, stats)
    assert prepared.get_submodule("1").num_batches_tracked == 1

    mixed = small_net().train()
    mixed[1].eval()  # e.g. a frozen BN
    prepared = swpfx.prepare(mixed)
    assert prepared.training and not prepared.get_submodule("1").training
    assert not swpfx.prepare(small_net().eval()).training


@torch.no_grad()
def test_deepcopy_of_prepared_model(generator):
    model = randomize_batchnorm_(small_net(), generator).eval()
    x = torch.randn(2, 3, 8, 8, generator=generator)
    prepared = swpfx.prepare(model, (x,))
    randomize_skeletons_(prepared, generator)
    clone = copy.deepcopy(prepared)
    assert swpfx.is_prepared(clone)
    assert torch.equal(clone(x), prepared(x))
    for a, b in zip(swpfx.skeletons(clone).values(), swpfx.skeletons(prepared).values()):
        assert a is not b and torch.equal(a, b)
    swpfx.skeletons(clone)["0"].zero_()
    assert swpfx.skeletons(prepared)["0"].abs().sum() > 0
    assert [n.meta.get("swpfx") for n in clone.graph.nodes] == [n.meta.get("swpfx") for n in prepared.graph.nodes]


def test_works_under_distributed_data_parallel(problem, tmp_path):
    import torch.distributed as dist

    x, y = problem
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        prepared = swpfx.prepare(small_net()).train()
        ddp = nn.parallel.DistributedDataParallel(prepared)
        loss = F.cross_entropy(ddp(x), y) + swpfx.skeleton_penalty(prepared, 1e-4)
        loss.backward()
        assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in swpfx.skeletons(prepared).values())
    finally:
        dist.destroy_process_group()

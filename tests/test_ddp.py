"""A prepared model trains under DistributedDataParallel (2 CPU processes, gloo on loopback)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import swpfx

WORLD = 2
STEPS = 4
ALPHA = 1e-2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def train_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: same initial model, its own data, skeleton penalty, no weight decay on skeletons."""
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        prepared = swpfx.prepare(small_cnn(), (torch.randn(1, 3, 12, 12),))
        ddp = DDP(prepared)
        opt = torch.optim.SGD(swpfx.param_groups(prepared, weight_decay=1e-4), lr=0.1, momentum=0.9)
        data = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
        for _ in range(STEPS):
            x = torch.randn(8, 3, 12, 12, generator=data)
            y = torch.randint(0, 4, (8,), generator=data)
            loss = F.cross_entropy(ddp(x), y) + swpfx.skeleton_penalty(prepared, alpha=ALPHA)
            opt.zero_grad()
            loss.backward()
            opt.step()
        skels = {f"skeleton/{k}": v.detach().clone() for k, v in swpfx.skeletons(prepared).items()}
        params = {f"param/{k}": v.detach().clone() for k, v in prepared.named_parameters()}
        save_file({**skels, **params}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_prepared_model_trains_under_ddp(tmp_path):
    from safetensors.torch import load_file

    mp.spawn(train_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    skeleton_keys = [k for k in ranks[0] if k.startswith("skeleton/")]
    assert len(skeleton_keys) == 2 and ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between ranks"
    for key in skeleton_keys:
        moved = (ranks[0][key] - 1.0).abs().max().item()
        assert moved > 1e-3, f"{key} did not train (max |I - 1| = {moved:.2e})"

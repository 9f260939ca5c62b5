"""Shared pytest fixtures for swpfx."""

from __future__ import annotations

import os

import pytest
import torch

# `make test` runs `pytest -n 2` on 2 cores: one intra-op thread per worker avoids oversubscription.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (model init, dropout)."""
    torch.manual_seed(0)


@pytest.fixture
def generator() -> torch.Generator:
    """A seeded CPU generator for test data (inputs, BN stats, skeletons)."""
    return torch.Generator().manual_seed(1234)

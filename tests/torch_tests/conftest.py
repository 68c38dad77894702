"""Fixtures shared by the strategy-level tests (the root conftest provides ``device`` and
``base_generator`` and switches Triton's interpreter on when there is no GPU)."""

import pytest
import torch
import torch.nn as nn


@pytest.fixture
def small_tensor(base_generator) -> torch.Tensor:
    """An 8x4 tensor for detailed inspection."""
    return torch.randn(8, 4, generator=base_generator)


@pytest.fixture
def medium_tensor(base_generator) -> torch.Tensor:
    """A 64x32 tensor for rank tests."""
    return torch.randn(64, 32, generator=base_generator)


@pytest.fixture
def simple_mlp(device) -> nn.Module:
    """A small MLP 4 -> 8 -> 2 on the test device, fixed initialisation."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)


@pytest.fixture
def eggroll_strategy(simple_mlp):
    """An EggrollStrategy (sigma 0.1, lr 0.05, rank 2, SGD) set up on ``simple_mlp``."""
    from evotorch_eggroll import EggrollStrategy

    return EggrollStrategy(sigma=0.1, lr=0.05, rank=2, optimizer="sgd").setup(simple_mlp)

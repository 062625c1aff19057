"""Shared builders for the tests: small, seeded models and data."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def small_cnn(num_classes: int = 4) -> nn.Sequential:
    """Convs of 3->16, 16->32 and 32->8 output channels, in nested containers."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()),
        nn.Conv2d(32, 8, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def learnable_data(n: int = 256, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with a 4-way label: label bit k shifts channel k by +-1."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    shift = torch.stack([y % 2, y // 2], dim=1).float() * 2 - 1  # (n, 2) in {-1, +1}
    x = torch.randn(n, 3, size, size, generator=gen)
    x[:, :2] += shift[:, :, None, None]
    return x, y


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

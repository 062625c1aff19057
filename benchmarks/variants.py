"""The models the benchmarks compare, and the saved-for-backward measure they share.

Every variant is a deep copy of one base model:

- :func:`with_composer_se`: Composer's own ``SqueezeExciteConv2d`` around the given convs;
- :func:`with_our_se`: this package's SE after the same convs (``include=`` their names),
  folded into the next BatchNorm or not;
- :func:`with_our_block_se`: this package's ``placement='block'`` (the paper's place);
- :func:`with_plain_block_se`: the paper's place written plainly, as timm's
  ``seresnet`` does: a separate SE module after the branch's last BatchNorm
  (``x * sigmoid(conv(relu(conv(mean(x)))))``), so autograd keeps the normalised map.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from composer_se import apply_squeeze_excite  # noqa: E402
from composer_se.placement import find_sites  # noqa: E402

__all__ = ['PlainSE', 'chosen_convs', 'saved_bytes', 'with_composer_se', 'with_our_block_se', 'with_our_se',
           'with_plain_block_se']


def chosen_convs(model: nn.Module, rule: str, min_channels: int) -> list[str]:
    """Names of the plain convs with ``min(in, out)`` (``rule='composer'``) or ``out`` (``'out'``) at least
    ``min_channels``."""
    return [
        name for name, m in model.named_modules() if type(m) is nn.Conv2d and
        (min(m.in_channels, m.out_channels) if rule == 'composer' else m.out_channels) >= min_channels
    ]


def with_composer_se(model: nn.Module, names: list[str], latent: int) -> nn.Module:
    """Composer's own SqueezeExciteConv2d wrapped around exactly ``names``."""
    from composer.algorithms.squeeze_excite.squeeze_excite import SqueezeExciteConv2d
    model = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition('.')
        parent = model.get_submodule(parent_name)
        setattr(parent, child, SqueezeExciteConv2d.from_conv2d(getattr(parent, child), 0, latent_channels=latent))
    return model


def with_our_se(model: nn.Module, names: list[str], latent: int, fold: bool = True) -> nn.Module:
    model = copy.deepcopy(model)
    report = apply_squeeze_excite(model, latent_channels=latent, min_channels=1, include=names, fold_batchnorm=fold)
    assert report.names == names, (report.names, names)
    return model


def with_our_block_se(model: nn.Module, ratio: float = 1 / 16) -> nn.Module:
    model = copy.deepcopy(model)
    apply_squeeze_excite(model, latent_channels=ratio, min_channels=1, placement='block')
    return model


class PlainSE(nn.Module):
    """SE as timm's ``SEModule`` writes it: 1x1 convs with biases on the pooled map, a sigmoid gate."""

    def __init__(self, channels: int, latent: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, latent, 1)
        self.fc2 = nn.Conv2d(latent, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def with_plain_block_se(model: nn.Module, ratio: float = 1 / 16) -> nn.Module:
    """A :class:`PlainSE` after the last module of every registered residual branch (``bn3`` of a Bottleneck)."""
    model = copy.deepcopy(model)
    for site in find_sites(model, 'block'):
        parent_name, _, child = site.names[0].rpartition('.')
        setattr(model.get_submodule(parent_name), child,
                nn.Sequential(site.module, PlainSE(site.channels, max(1, round(site.channels * ratio)))))
    return model


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """Bytes of the unique storages autograd saves for backward in one training forward: all, and non-parameter."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(storages.values()), sum(n for ptr, n in storages.items() if ptr not in params)

"""The Squeeze-and-Excitation block (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018).

For a feature map ``u`` of shape ``(N, C, H, W)``::

    z = mean over H, W of u                      # squeeze: (N, C)
    s = gate(W2 @ relu(W1 @ z + b1) + b2)        # excitation: (N, C)
    y = u * s[:, :, None, None]                  # scale

``W1`` maps ``C`` to ``L`` channels and ``W2`` maps ``L`` back to ``C``; ``L`` is
``latent_channels``, the width of the hidden layer. The paper's equation has no biases; like torchvision's and
timm's SE layers, ours has them (``b1``, ``b2``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['DEFAULT_LATENT_CHANNELS', 'GATE_INITS', 'SqueezeExcite2d', 'block_params', 'excite']

#: ``latent_channels`` where none is given: the SE modules', and the settings' default.
DEFAULT_LATENT_CHANNELS = 64

#: Accepted values of ``init``: ``'default'`` is the paper's block with PyTorch's
#: default ``Linear`` initialisation; ``'identity'`` makes the block an exact identity
#: at initialisation (see :class:`SqueezeExcite2d`).
GATE_INITS = ('default', 'identity')


def block_params(channels: int, latent_channels: int) -> int:
    """The parameters of a block with ``C = channels`` and ``L = latent_channels``: ``2 * C * L + L + C``."""
    return 2 * channels * latent_channels + latent_channels + channels


def excite(squeezed: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
           b2: Optional[torch.Tensor], gate_scale: torch.Tensor) -> torch.Tensor:
    """The SE gate ``gate_scale * sigmoid(W2 relu(W1 z + b1) + b2)`` for squeezed features ``z`` (N, C)."""
    return torch.sigmoid(F.linear(F.relu(F.linear(squeezed, w1, b1)), w2, b2)) * gate_scale


class SqueezeExcite2d(nn.Module):
    """Squeeze-and-Excitation block on an ``(N, C, H, W)`` tensor.

    Works on NCHW and channels_last inputs (the output keeps the input's memory
    format), under autocast (the output has the input's dtype), and for any batch
    and spatial size.

    Args:
        channels (int): ``C``, the number of channels of the input (and output).
        latent_channels (int): ``L``, the width of the hidden layer: ``W1`` is
            ``C -> L`` and ``W2`` is ``L -> C``.
        init (str, optional): ``'default'``: the gate is ``sigmoid``, as in the paper,
            and both layers use PyTorch's default ``Linear`` initialisation.
            ``'identity'``: the gate is ``2 * sigmoid``, with values in ``(0, 2)``, and
            ``W2`` and ``b2`` start at zero, so the block returns its input unchanged
            until training moves them (``2 * sigmoid(0) == 1`` exactly). Use it to add
            SE to a pretrained network without changing what it computes. The gate's
            scale is the buffer ``gate_scale`` (1 or 2), so it travels with the state
            dict. Default: ``'default'``.
    """

    def __init__(self, channels: int, latent_channels: int, init: str = 'default'):
        super().__init__()
        if init not in GATE_INITS:
            raise ValueError(f'init must be one of {GATE_INITS}, got {init!r}')
        self.channels = channels
        self.latent_channels = latent_channels
        self.init = init
        self.fc1 = nn.Linear(channels, latent_channels)
        self.fc2 = nn.Linear(latent_channels, channels)
        # A buffer, so that the state dict carries the gate: identity-init weights loaded
        # into a default-init block keep their meaning.
        self.register_buffer('gate_scale', torch.tensor(2.0 if init == 'identity' else 1.0))
        if init == 'identity':
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean((2, 3)))[:, :, None, None].to(x.dtype)

    def gate(self, squeezed: torch.Tensor) -> torch.Tensor:
        """The per-channel scale ``s`` (N, C) for squeezed features ``z`` (N, C)."""
        return excite(squeezed, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.gate_scale)

    def extra_repr(self) -> str:
        return f'{self.channels}, latent_channels={self.latent_channels}, init={self.init!r}'


def convert_(module: nn.Module, base: type, channels: int, block: SqueezeExcite2d, cls: type) -> nn.Module:
    """Changes ``module``'s class from exactly ``base`` to ``cls`` and makes ``block`` its ``se`` submodule."""
    if type(module) is not base:
        raise TypeError(f'convert_ needs exactly a torch.nn.{base.__name__}, got {type(module).__qualname__}')
    if block.channels != channels:
        raise ValueError(f'the SE block has {block.channels} channels but the module has {channels} output channels')
    module.__class__ = cls
    module.add_module('se', block)
    return module

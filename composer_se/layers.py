"""Squeeze-and-Excitation modules, in plain PyTorch.

This module imports only ``torch``: a model that contains these layers can be saved,
scripted, exported or served without Composer or ``composer_se.algorithm``.

The block (Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018), for a
feature map ``u`` of shape ``(N, C, H, W)``::

    z = mean over H, W of u                      # squeeze: (N, C)
    s = gate(W2 @ relu(W1 @ z + b1) + b2)        # excitation: (N, C)
    y = u * s[:, :, None, None]                  # scale

``W1`` maps ``C`` to ``L`` channels and ``W2`` maps ``L`` back to ``C``; ``L`` is the
latent (hidden) width. The paper's equation has no biases; like torchvision's and
timm's SE layers, ours has them (``b1``, ``b2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['GATE_INITS', 'SqueezeExcite2d', 'SqueezeExciteBatchNorm2d', 'SqueezeExciteConv2d']

#: Accepted values of ``init``: ``'default'`` is the paper's block with PyTorch's
#: default ``Linear`` initialisation; ``'identity'`` makes the block an exact identity
#: at initialisation (see :class:`SqueezeExcite2d`).
GATE_INITS = ('default', 'identity')


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
        squeezed = x.mean((2, 3))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(squeezed)))) * self.gate_scale
        return x * gate[:, :, None, None].to(x.dtype)

    def extra_repr(self) -> str:
        return f'{self.channels}, latent_channels={self.latent_channels}, init={self.init!r}'


def _convert(module: nn.Module, base: type, channels: int, block: SqueezeExcite2d, cls: type):
    """Changes ``module``'s class from exactly ``base`` to ``cls`` and makes ``block`` its ``se`` submodule."""
    if type(module) is not base:
        raise TypeError(f'convert_ needs exactly a torch.nn.{base.__name__}, got {type(module).__qualname__}')
    if block.channels != channels:
        raise ValueError(f'the SE block has {block.channels} channels but the module has {channels} output channels')
    module.__class__ = cls
    module.add_module('se', block)
    return module


class SqueezeExciteConv2d(nn.Conv2d):
    """A :class:`torch.nn.Conv2d` followed by a :class:`SqueezeExcite2d` block.

    It *is* a ``Conv2d``: the convolution's parameters keep their names (``weight``,
    ``bias``) and the block lives in the submodule ``se``. So a state dict saved from
    the plain convolution loads into this module with ``strict=False``, and the only
    missing keys are ``se.*``.

    Construct it like a ``Conv2d`` plus the SE arguments, or turn an existing
    ``Conv2d`` into one in place with :meth:`convert_`.

    Args:
        *args: positional arguments of :class:`torch.nn.Conv2d`.
        latent_channels (int): ``L``, the hidden width of the SE block. Default: ``64``.
        init (str, optional): the SE block's ``init``; see :class:`SqueezeExcite2d`.
            Default: ``'default'``.
        **kwargs: keyword arguments of :class:`torch.nn.Conv2d`.
    """

    def __init__(self, *args, latent_channels: int = 64, init: str = 'default', **kwargs):
        super().__init__(*args, **kwargs)
        self.se = SqueezeExcite2d(self.out_channels, latent_channels, init=init).to(
            device=self.weight.device,
            dtype=self.weight.dtype,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.se(self._conv_forward(input, self.weight, self.bias))

    @classmethod
    def convert_(cls, conv: nn.Conv2d, block: SqueezeExcite2d) -> 'SqueezeExciteConv2d':
        """Turns ``conv`` into a :class:`SqueezeExciteConv2d` in place and returns it.

        The object stays the same: its parameters (the very ``Parameter`` objects an
        optimizer may hold), buffers, hooks, training flag and every place the model
        refers to it are untouched; only its class changes and ``block`` becomes its
        ``se`` submodule. ``conv`` must be exactly a ``torch.nn.Conv2d`` (a subclass
        may override ``forward``, which this would silently drop), and ``block`` must
        have ``conv.out_channels`` channels.
        """
        return _convert(conv, nn.Conv2d, conv.out_channels, block, cls)


class SqueezeExciteBatchNorm2d(nn.BatchNorm2d):
    """A :class:`torch.nn.BatchNorm2d` followed by a :class:`SqueezeExcite2d` block.

    This is where the paper puts SE in a residual block: after the branch's last
    BatchNorm, before the addition with the shortcut. Like
    :class:`SqueezeExciteConv2d`, it *is* the original module: ``weight``, ``bias``,
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` keep their names and
    the block is the submodule ``se``. The normalisation follows ``BatchNorm2d``
    exactly (training and eval, ``momentum=None``, ``track_running_stats``); it is
    written out with ``F.batch_norm`` so that the module stays scriptable.

    Args:
        num_features (int): ``C``, as for ``BatchNorm2d``.
        latent_channels (int): ``L``, the hidden width of the SE block. Default: ``64``.
        init (str, optional): the SE block's ``init``; see :class:`SqueezeExcite2d`.
            Default: ``'default'``.
        **kwargs: the other arguments of :class:`torch.nn.BatchNorm2d`.
    """

    def __init__(self, num_features: int, latent_channels: int = 64, init: str = 'default', **kwargs):
        super().__init__(num_features, **kwargs)
        self.se = SqueezeExcite2d(num_features, latent_channels, init=init).to(device=kwargs.get('device'),
                                                                               dtype=kwargs.get('dtype'))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        normalised = F.batch_norm(
            input,
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        return self.se(normalised)

    @classmethod
    def convert_(cls, norm: nn.BatchNorm2d, block: SqueezeExcite2d) -> 'SqueezeExciteBatchNorm2d':
        """Turns ``norm`` into a :class:`SqueezeExciteBatchNorm2d` in place and returns it.

        As :meth:`SqueezeExciteConv2d.convert_`: same object, parameters, buffers and
        hooks; ``norm`` must be exactly a ``torch.nn.BatchNorm2d`` and ``block`` must
        have ``norm.num_features`` channels.
        """
        return _convert(norm, nn.BatchNorm2d, norm.num_features, block, cls)

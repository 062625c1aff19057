"""A ``Conv2d`` followed by an SE block, as one module that keeps the conv's parameter names."""

from __future__ import annotations

import torch
from torch import nn

from composer_se.layers.block import DEFAULT_LATENT_CHANNELS, SqueezeExcite2d, convert_

__all__ = ['SqueezeExciteConv2d']


class SqueezeExciteConv2d(nn.Conv2d):
    """A :class:`torch.nn.Conv2d` followed by a :class:`~composer_se.layers.SqueezeExcite2d` block.

    It *is* a ``Conv2d``: the convolution's parameters keep their names (``weight``,
    ``bias``) and the block lives in the submodule ``se``. So a state dict saved from
    the plain convolution loads into this module with ``strict=False``, and the only
    missing keys are ``se.*``.

    Construct it like a ``Conv2d`` plus the SE arguments, or turn an existing
    ``Conv2d`` into one in place with :meth:`convert_`. After
    :func:`~composer_se.batchnorm.fold_into_batch_norm_`, the BatchNorm it feeds applies
    the block and the conv returns its output before SE (see ``folded_into_norm``).

    Args:
        *args: positional arguments of :class:`torch.nn.Conv2d`.
        latent_channels (int): ``L``, the SE block's hidden layer width. Default: ``64``.
        init (str, optional): the SE block's ``init``; see
            :class:`~composer_se.layers.SqueezeExcite2d`. Default: ``'default'``.
        **kwargs: keyword arguments of :class:`torch.nn.Conv2d`.
    """

    def __init__(self, *args, latent_channels: int = DEFAULT_LATENT_CHANNELS, init: str = 'default', **kwargs):
        super().__init__(*args, **kwargs)
        self.se = SqueezeExcite2d(self.out_channels, latent_channels, init=init).to(
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        self.folded_into_norm = False

    #: ``True`` once :func:`~composer_se.batchnorm.fold_into_batch_norm_` has handed the
    #: block to the BatchNorm that this conv feeds: the conv then returns its plain
    #: output and that BatchNorm applies the block (except under TorchScript and
    #: tracing, where the conv does). Set on each instance too, where TorchScript looks.
    folded_into_norm = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = self._conv_forward(input, self.weight, self.bias)
        if self.folded_into_norm and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return out
        return self.se(out)

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
        converted = convert_(conv, nn.Conv2d, conv.out_channels, block, cls)
        converted.folded_into_norm = False
        return converted

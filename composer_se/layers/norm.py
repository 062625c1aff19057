"""A ``BatchNorm2d`` followed by an SE block (the paper's place, at the end of a residual branch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composer_se.layers.block import SqueezeExcite2d, convert_

__all__ = ['ScriptableBatchNorm2d', 'SqueezeExciteBatchNorm2d']


class ScriptableBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose normalisation is a method that TorchScript can compile."""

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        """Exactly ``BatchNorm2d.forward``: training and eval, ``momentum=None``, ``track_running_stats``."""
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if keep_stats else None,
            self.running_var if keep_stats else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )


class SqueezeExciteBatchNorm2d(ScriptableBatchNorm2d):
    """A :class:`torch.nn.BatchNorm2d` followed by a :class:`~composer_se.layers.SqueezeExcite2d` block.

    This is where the paper puts SE in a residual block: after the branch's last
    BatchNorm, before the addition with the shortcut. Like
    :class:`~composer_se.layers.SqueezeExciteConv2d`, it *is* the original module:
    ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked``
    keep their names and the block is the submodule ``se``. The normalisation follows
    ``BatchNorm2d`` exactly (training and eval, ``momentum=None``,
    ``track_running_stats``); it is written out with ``F.batch_norm`` so that the module
    stays scriptable.

    Args:
        num_features (int): ``C``, as for ``BatchNorm2d``.
        latent_channels (int): ``L``, the hidden width of the SE block. Default: ``64``.
        init (str, optional): the SE block's ``init``; see
            :class:`~composer_se.layers.SqueezeExcite2d`. Default: ``'default'``.
        **kwargs: the other arguments of :class:`torch.nn.BatchNorm2d`.
    """

    def __init__(self, num_features: int, latent_channels: int = 64, init: str = 'default', **kwargs):
        super().__init__(num_features, **kwargs)
        self.se = SqueezeExcite2d(num_features, latent_channels, init=init).to(device=kwargs.get('device'),
                                                                               dtype=kwargs.get('dtype'))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.se(self._normalise(input))

    @classmethod
    def convert_(cls, norm: nn.BatchNorm2d, block: SqueezeExcite2d) -> 'SqueezeExciteBatchNorm2d':
        """Turns ``norm`` into a :class:`SqueezeExciteBatchNorm2d` in place and returns it.

        As :meth:`SqueezeExciteConv2d.convert_`: same object, parameters, buffers and
        hooks; ``norm`` must be exactly a ``torch.nn.BatchNorm2d`` and ``block`` must
        have ``norm.num_features`` channels.
        """
        return convert_(norm, nn.BatchNorm2d, norm.num_features, block, cls)

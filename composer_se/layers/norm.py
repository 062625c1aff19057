"""A ``BatchNorm2d`` followed by an SE block (the paper's place, at the end of a residual branch)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from composer_se.fused import affine, batch_norm_squeeze_excite, runs_triton
from composer_se.layers.block import SqueezeExcite2d, convert_

__all__ = ['ScriptableBatchNorm2d', 'SqueezeExciteBatchNorm2d']


class ScriptableBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose normalisation is a method that TorchScript can compile."""

    def _batch_norm_arguments(self) -> tuple[float, bool, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """What ``BatchNorm2d.forward`` gives ``F.batch_norm``, and its count of the batch.

        Returns the momentum (``momentum=None``: the cumulative average), whether batch
        statistics normalise, and the running mean and variance to update (training) or
        to normalise with (eval), or ``None``. Counts the batch in ``num_batches_tracked``
        as ``BatchNorm2d`` does.
        """
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_stats = not self.training or self.track_running_stats
        return (momentum, use_batch_stats, self.running_mean if keep_stats else None,
                self.running_var if keep_stats else None)

    def _running_affine(self, running_mean: torch.Tensor,
                        running_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, shift)`` per channel such that normalising with these statistics is ``u * k + shift``."""
        k = torch.rsqrt(running_var + self.eps)
        if self.weight is None:
            return k, -running_mean * k
        k = k * self.weight
        return k, self.bias - running_mean * k

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        """Exactly ``BatchNorm2d.forward``: training and eval, ``momentum=None``, ``track_running_stats``."""
        self._check_input_dim(input)
        momentum, use_batch_stats, running_mean, running_var = self._batch_norm_arguments()
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                            self.eps)


class SqueezeExciteBatchNorm2d(ScriptableBatchNorm2d):
    """A :class:`torch.nn.BatchNorm2d` followed by a :class:`~composer_se.layers.SqueezeExcite2d` block.

    This is where the paper puts SE in a residual block: after the branch's last
    BatchNorm, before the addition with the shortcut. Like
    :class:`~composer_se.layers.SqueezeExciteConv2d`, it *is* the original module:
    ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked``
    keep their names and the block is the submodule ``se``. The normalisation follows
    ``BatchNorm2d`` exactly (training and eval, ``momentum=None``,
    ``track_running_stats``).

    In eager mode, normalisation and SE are one affine map per (n, c) of the input
    (:func:`~composer_se.fused.batch_norm_squeeze_excite`): one pass for the statistics,
    one for the output, the same passes as ``BatchNorm2d`` alone, and nothing of the
    normalised map is kept for backward (the backward pass recomputes it from the input,
    which BatchNorm keeps anyway). Under ``torch.compile`` with Triton (CUDA) it is the
    same in training, as the custom operator ``composer_se::batch_norm_squeeze_excite``
    (one call in the graph). Under ``torch.compile`` on CPU, TorchScript and tracing it is
    ``se(batch_norm(input))`` in plain operations (``F.batch_norm``, which keeps the
    module scriptable), which the compiler fuses.

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
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self.se(self._normalise(input))
        return self._fused(input)

    @torch.jit.unused
    def _fused(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and not runs_triton(input):
            return self.se(self._normalise(input))  # plain operations, which the compiler fuses
        self._check_input_dim(input)
        momentum, use_batch_stats, running_mean, running_var = self._batch_norm_arguments()
        if use_batch_stats:
            return batch_norm_squeeze_excite(input, self, self.se, momentum, running_mean, running_var)
        # Running statistics: bn(u) = k u + shift per channel, squeezed to k mean_hw(u) + shift.
        k, shift = self._running_affine(running_mean, running_var)
        s = self.se.gate((input.mean((2, 3), dtype=k.dtype) * k + shift).to(self.se.fc1.weight.dtype))
        return affine(input, s * k, s * shift)

    @classmethod
    def convert_(cls, norm: nn.BatchNorm2d, block: SqueezeExcite2d) -> 'SqueezeExciteBatchNorm2d':
        """Turns ``norm`` into a :class:`SqueezeExciteBatchNorm2d` in place and returns it.

        As :meth:`SqueezeExciteConv2d.convert_`: same object, parameters, buffers and
        hooks; ``norm`` must be exactly a ``torch.nn.BatchNorm2d`` and ``block`` must
        have ``norm.num_features`` channels.
        """
        return convert_(norm, nn.BatchNorm2d, norm.num_features, block, cls)

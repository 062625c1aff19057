"""The folded twin of timm's ``BatchNormAct2d``: SE, normalisation, then timm's drop and activation.

timm's EfficientNets, RegNets and many other CNNs follow their convolutions with
``timm.layers.BatchNormAct2d``, a ``BatchNorm2d`` subclass whose ``forward`` normalises
exactly as ``BatchNorm2d`` does and then applies two submodules, ``drop`` and ``act``.
Folding an SE block into it therefore changes only the normalisation step:
``act(drop(norm(se(u))))``, with ``norm(se(u))`` computed in one pass as for a plain
BatchNorm (:class:`~composer_se.batchnorm.FoldedSqueezeExciteBatchNorm2d`).

This module imports timm. :func:`~composer_se.batchnorm.fold.folded_type` loads it only
when it meets a ``BatchNormAct2d``, which means timm is already in use; the rest of
:mod:`composer_se.batchnorm` stays torch-only.
"""

from __future__ import annotations

import torch
from timm.layers.norm_act import BatchNormAct2d

from composer_se.batchnorm.modules import FoldedSqueezeExciteBatchNorm2d

__all__ = ['FoldedSqueezeExciteBatchNormAct2d']


class FoldedSqueezeExciteBatchNormAct2d(FoldedSqueezeExciteBatchNorm2d, BatchNormAct2d):
    """timm's ``BatchNormAct2d`` that applies the SE block of the convolution feeding it.

    Made by :func:`~composer_se.batchnorm.fold_into_batch_norm_` from an exact
    ``BatchNormAct2d``: still an instance of it, with the same parameters, buffers and
    ``drop`` / ``act`` submodules under the same names. It computes
    ``act(drop(norm(se(u))))``: the SE block and the normalisation as
    :class:`~composer_se.batchnorm.FoldedSqueezeExciteBatchNorm2d` computes them (in eager
    mode one pass; under TorchScript and tracing the conv applies its block and the
    normalisation is plain), then what ``BatchNormAct2d.forward`` applies after its
    normalisation.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._folded_normalise(input)))

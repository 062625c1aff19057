"""The folded module: a ``BatchNorm2d`` that applies the SE block of the conv feeding it.

timm's ``BatchNormAct2d`` has its folded twin in :mod:`composer_se.folding.norm_act`,
which imports timm and is loaded only when such a norm is folded.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from composer_se.fused import affine, runs_triton, squeeze_excite_batch_norm
from composer_se.layers import SqueezeExciteConv2d
from composer_se.layers.norm import ScriptableBatchNorm2d

__all__ = ['FoldedSqueezeExciteBatchNorm2d', 'broken_folds', 'can_fold', 'fold_into_batch_norm_', 'folded_type']


class FoldedSqueezeExciteBatchNorm2d(ScriptableBatchNorm2d):
    """A ``BatchNorm2d`` that applies the SE block of the convolution feeding it.

    Made by :func:`fold_into_batch_norm_`; it computes ``norm(se(u))`` for the conv
    output ``u`` without materialising ``se(u)``:

    - training (batch statistics): one read of ``u`` for its per-(n, c) mean and
      variance, then one affine pass, with the backward pass of
      :func:`~composer_se.fused.squeeze_excite_batch_norm`; autograd keeps ``u`` for
      backward, as the plain BatchNorm does, and nothing of SE's size;
    - eval (running statistics): ``u * (s * gamma / sigma) + shift``, one mean and
      one affine pass;
    - under ``torch.compile``: in training with Triton (CUDA), the custom operator
      ``composer_se::squeeze_excite_batch_norm``, the same passes as one call in the
      graph; on CPU, ``norm(se(u))`` written plainly, which the compiler fuses;
    - under TorchScript and tracing, the conv applies its block and this is a plain
      ``BatchNorm2d``.

    Its parameters and buffers are those of the ``BatchNorm2d`` it was, under the same
    names; the SE block stays registered under the conv (``conv.se``) and is only
    referenced from here, so state dicts and optimizer groups are unchanged.
    """

    __jit_ignored_attributes__ = ['_folded_se']  # a reference to the conv's block, used only in eager mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._squeeze_excite_normalise(input)

    def _squeeze_excite_normalise(self, input: torch.Tensor) -> torch.Tensor:
        """``norm(se(input))``: the folded pass, or plain normalisation where the conv applied its block."""
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._normalise(input)  # the conv applied its SE block
        return self._fold(input)

    @torch.jit.unused
    def _fold(self, input: torch.Tensor) -> torch.Tensor:
        se = self._folded_se
        if torch.compiler.is_compiling() and not runs_triton(input):
            return self._normalise(se(input))  # plain operations, which the compiler fuses
        self._check_input_dim(input)
        momentum, use_batch_stats, running_mean, running_var = self._batch_norm_arguments()
        if use_batch_stats:
            return squeeze_excite_batch_norm(input, se, self, momentum, running_mean, running_var)
        k, shift = self._running_affine(running_mean, running_var)
        return affine(input, se.gate(input.mean((2, 3), dtype=k.dtype).to(se.fc1.weight.dtype)) * k, shift)


def _timm_batch_norm_act() -> Optional[type]:
    """timm's ``BatchNormAct2d`` if timm has been imported (this never imports timm), else ``None``."""
    norm_act = sys.modules.get('timm.layers.norm_act')
    return getattr(norm_act, 'BatchNormAct2d', None)


def folded_type(norm: nn.Module) -> Optional[type]:
    """The folded class that ``norm`` becomes, or ``None`` if its type cannot be folded into.

    Exactly ``torch.nn.BatchNorm2d`` becomes :class:`FoldedSqueezeExciteBatchNorm2d`, and
    exactly timm's ``BatchNormAct2d`` (a BatchNorm followed by drop and activation)
    becomes :class:`~composer_se.folding.norm_act.FoldedSqueezeExciteBatchNormAct2d`,
    whose module imports timm and is loaded only here. Other subclasses may change the
    normalisation, so they are not folded into.
    """
    if type(norm) is nn.BatchNorm2d:
        return FoldedSqueezeExciteBatchNorm2d
    batch_norm_act = _timm_batch_norm_act()
    if batch_norm_act is not None and type(norm) is batch_norm_act:
        from composer_se.folding.norm_act import FoldedSqueezeExciteBatchNormAct2d
        return FoldedSqueezeExciteBatchNormAct2d
    return None


def can_fold(norm: nn.Module, channels: int) -> bool:
    """Whether :func:`fold_into_batch_norm_` accepts ``norm`` after a conv with ``channels`` outputs."""
    return (folded_type(norm) is not None and norm.num_features == channels and norm.affine and
            norm.track_running_stats and norm.running_mean is not None)


def fold_into_batch_norm_(conv: SqueezeExciteConv2d, norm: nn.BatchNorm2d) -> FoldedSqueezeExciteBatchNorm2d:
    """Moves the application of ``conv.se`` into ``norm``, in place, and returns ``norm``.

    Only valid when ``norm`` is the sole consumer of ``conv``'s output (surgery checks
    this on the traced graph): the conv then returns its plain output and ``norm``
    (now a :class:`FoldedSqueezeExciteBatchNorm2d`, the same object) computes
    ``norm(conv.se(u))`` in one pass. ``norm`` must be exactly an affine
    ``BatchNorm2d``, or timm's ``BatchNormAct2d``, with running statistics, with
    ``conv.out_channels`` features (see :func:`folded_type`). Parameter and buffer names
    do not change.
    """
    if not isinstance(conv, SqueezeExciteConv2d) or conv.folded_into_norm:
        raise TypeError(f'fold_into_batch_norm_ needs a SqueezeExciteConv2d not yet folded, got {conv!r}')
    if not can_fold(norm, conv.out_channels):
        raise TypeError(f'fold_into_batch_norm_ needs exactly an affine torch.nn.BatchNorm2d (or timm\'s '
                        f'BatchNormAct2d) with running statistics and {conv.out_channels} features, got {norm!r}')
    norm.__class__ = folded_type(norm)
    object.__setattr__(norm, '_folded_se', conv.se)  # a reference, not a submodule: the block stays conv.se
    conv.folded_into_norm = True
    return norm


def broken_folds(model: nn.Module) -> list[str]:
    """Names of the SE convs in ``model`` whose block was folded into a BatchNorm that is no longer in it.

    Such a conv returns its output before SE and nothing applies the block: something
    replaced the BatchNorm after surgery folded the block into it.
    """
    folded = {id(m._folded_se) for m in model.modules() if isinstance(m, FoldedSqueezeExciteBatchNorm2d)}
    return [
        name for name, m in model.named_modules()
        if isinstance(m, SqueezeExciteConv2d) and m.folded_into_norm and id(m.se) not in folded
    ]

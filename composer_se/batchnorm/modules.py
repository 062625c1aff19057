"""The BatchNorms that apply an SE block in their own pass: folded after a conv, or at the end of a residual branch.

Both are :class:`SqueezeExciteNorm`, a ``BatchNorm2d`` whose ``forward`` runs
:func:`~composer_se.batchnorm.function.se_batch_norm` (training) or
:func:`~composer_se.batchnorm.function.se_batch_norm_eval` (running statistics) with its
block, SE first or second; they differ in where the block comes from and in that order.
timm's ``BatchNormAct2d`` has its folded twin in :mod:`composer_se.batchnorm.norm_act`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from composer_se.batchnorm.backend import compiles_triton
from composer_se.batchnorm.function import plain_se_batch_norm, se_batch_norm, se_batch_norm_eval
from composer_se.layers.block import DEFAULT_LATENT_CHANNELS, SqueezeExcite2d, convert_

__all__ = ['FoldedSqueezeExciteBatchNorm2d', 'SqueezeExciteBatchNorm2d', 'SqueezeExciteNorm', 'normalise']


class SqueezeExciteNorm(nn.BatchNorm2d):
    """A ``BatchNorm2d`` that applies an SE block in its own pass: SE then normalisation (``se_first``), or the other
    way round.

    In eager mode, with batch statistics: one read of the input for its per-(n, c) mean
    and variance and one affine pass, with the hand-written backward pass of
    :mod:`~composer_se.batchnorm.passes`; autograd keeps the input, as a plain BatchNorm
    does, and nothing of SE's size. With running statistics, where no gradient is asked
    for: one read for the squeeze and one affine pass. Under ``torch.compile`` with Triton
    (CUDA), training is the operator of :mod:`~composer_se.batchnorm.compiled`, whose
    kernels the compiler sees; everywhere else under the compiler (CPU; eval), and in
    eval where a gradient is asked for, it is the block and ``F.batch_norm`` written
    plainly (:meth:`_plain`); so it is while the block has forward hooks, so that they see
    it run, and for an empty batch. Under ``torch.fx`` the block is a call of its module
    and the normalisation one call of :func:`normalise`. The normalisation follows
    ``BatchNorm2d`` exactly (training and eval, ``momentum=None``, ``track_running_stats``).
    """

    #: SE then BatchNorm (``True``) or BatchNorm then SE.
    se_first = True

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

    def _normalise(self, input: torch.Tensor) -> torch.Tensor:
        """Exactly ``BatchNorm2d.forward``, as a method TorchScript compiles: training and eval, ``momentum=None``,
        ``track_running_stats``."""
        self._check_input_dim(input)
        momentum, use_batch_stats, running_mean, running_var = self._batch_norm_arguments()
        return F.batch_norm(input, running_mean, running_var, self.weight, self.bias, use_batch_stats, momentum,
                            self.eps)

    @torch.jit.unused
    def _se_batch_norm(self, input: torch.Tensor, se: SqueezeExcite2d) -> torch.Tensor:
        """The block ``se`` and the normalisation, in this module's order, in one pass where it can be."""
        if isinstance(input, torch.fx.Proxy):
            return self._traced(input, se)
        self._check_input_dim(input)
        momentum, use_batch_stats, running_mean, running_var = self._batch_norm_arguments()
        if se._forward_hooks or se._forward_pre_hooks:  # the block runs as a module, so that its hooks see it
            return self._plain(input, se, momentum, use_batch_stats, running_mean, running_var)
        compiling = torch.compiler.is_compiling()
        if use_batch_stats:
            if compiling and not compiles_triton(input):
                return self._plain(input, se, momentum, True, running_mean, running_var)
            return se_batch_norm(input, se, self, self.se_first, momentum, running_mean, running_var)
        if compiling or (torch.is_grad_enabled() and (input.requires_grad or _any_requires_grad(se, self))):
            return self._plain(input, se, momentum, False, running_mean, running_var)
        return se_batch_norm_eval(input, se, self, self.se_first, running_mean, running_var)

    @torch.jit.unused
    def _traced(self, input: torch.fx.Proxy, se: SqueezeExcite2d) -> torch.fx.Proxy:
        """What ``torch.fx`` records: the block as a call of its own module (so that a feature tap on ``conv.se``
        returns what SE gives), and the normalisation as one call, :func:`normalise`, of this module, which it reads
        when the traced graph runs (training or eval, ``momentum=None``), as a leaf ``BatchNorm2d`` would be."""
        tracer = input.tracer
        norm = tracer.create_proxy('get_attr', tracer.path_of_module(self), (), {})
        if self.se_first:
            input = se(input)
        out = normalise(norm, input)
        return out if self.se_first else se(out)

    def _plain(self, input: torch.Tensor, se: SqueezeExcite2d, momentum: float, use_batch_stats: bool,
               running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor]) -> torch.Tensor:
        """The block and ``F.batch_norm`` in plain operations, which the compiler fuses and autograd differentiates."""
        return plain_se_batch_norm(input, se, self, self.se_first, use_batch_stats, momentum, running_mean,
                                   running_var)


def normalise(norm: SqueezeExciteNorm, input: torch.Tensor) -> torch.Tensor:
    """``norm``'s normalisation alone, exactly ``BatchNorm2d.forward``: one call in a ``torch.fx`` graph."""
    return norm._normalise(input)


torch.fx.wrap('normalise')


def _any_requires_grad(se: nn.Module, norm: nn.Module) -> bool:
    return any(p is not None and p.requires_grad for p in (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias,
                                                            norm.weight, norm.bias))


class FoldedSqueezeExciteBatchNorm2d(SqueezeExciteNorm):
    """A ``BatchNorm2d`` that applies the SE block of the convolution feeding it: ``norm(se(u))`` for its input ``u``.

    Made by :func:`~composer_se.batchnorm.fold_into_batch_norm_`; computes ``norm(se(u))``
    without materialising ``se(u)`` (see :class:`SqueezeExciteNorm`). Under TorchScript
    and tracing the conv applies its block and this is a plain ``BatchNorm2d``. Its
    parameters and buffers are those of the ``BatchNorm2d`` it was, under the same names;
    the SE block stays registered under the conv (``conv.se``) and is only referenced
    from here, so state dicts and optimizer groups are unchanged.
    """

    __jit_ignored_attributes__ = ['_folded_se']  # a reference to the conv's block, used only in eager mode
    se_first = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._folded_normalise(input)

    def _folded_normalise(self, input: torch.Tensor) -> torch.Tensor:
        """``norm(se(input))``; a method of its own, which timm's folded ``BatchNormAct2d`` also calls."""
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._normalise(input)  # the conv applied its SE block
        return self._se_batch_norm(input, self._folded_se)


class SqueezeExciteBatchNorm2d(SqueezeExciteNorm):
    """A :class:`torch.nn.BatchNorm2d` followed by a :class:`~composer_se.layers.SqueezeExcite2d` block.

    This is where the paper puts SE in a residual block: after the branch's last
    BatchNorm, before the addition with the shortcut. Like
    :class:`~composer_se.layers.SqueezeExciteConv2d`, it *is* the original module:
    ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``num_batches_tracked``
    keep their names and the block is the submodule ``se``. It computes ``se(norm(u))`` in
    one pass (see :class:`SqueezeExciteNorm`); nothing of the normalised map is kept for
    backward, which recomputes it from the input (as In-Place ABN does). Under TorchScript
    and tracing it is ``se(batch_norm(input))`` in plain operations.

    Args:
        num_features (int): ``C``, as for ``BatchNorm2d``.
        latent_channels (int): ``L``, the SE block's hidden layer width. Default: ``64``.
        init (str, optional): the SE block's ``init``; see
            :class:`~composer_se.layers.SqueezeExcite2d`. Default: ``'default'``.
        **kwargs: the other arguments of :class:`torch.nn.BatchNorm2d`.
    """

    se_first = False

    def __init__(self, num_features: int, latent_channels: int = DEFAULT_LATENT_CHANNELS, init: str = 'default',
                 **kwargs):
        super().__init__(num_features, **kwargs)
        self.se = SqueezeExcite2d(num_features, latent_channels, init=init).to(device=kwargs.get('device'),
                                                                               dtype=kwargs.get('dtype'))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self.se(self._normalise(input))
        return self._se_batch_norm(input, self.se)

    @classmethod
    def convert_(cls, norm: nn.BatchNorm2d, block: SqueezeExcite2d) -> 'SqueezeExciteBatchNorm2d':
        """Turns ``norm`` into a :class:`SqueezeExciteBatchNorm2d` in place and returns it.

        As :meth:`SqueezeExciteConv2d.convert_`: same object, parameters, buffers and
        hooks; ``norm`` must be exactly a ``torch.nn.BatchNorm2d`` and ``block`` must
        have ``norm.num_features`` channels.
        """
        return convert_(norm, nn.BatchNorm2d, norm.num_features, block, cls)

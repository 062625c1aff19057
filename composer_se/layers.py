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

from composer_se.fused import affine, excite, squeeze_excite_batch_norm

__all__ = [
    'GATE_INITS',
    'FoldedSqueezeExciteBatchNorm2d',
    'SqueezeExcite2d',
    'SqueezeExciteBatchNorm2d',
    'SqueezeExciteConv2d',
    'can_fold',
    'fold_into_batch_norm_',
]

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
        return x * self.gate(x.mean((2, 3)))[:, :, None, None].to(x.dtype)

    def gate(self, squeezed: torch.Tensor) -> torch.Tensor:
        """The per-channel scale ``s`` (N, C) for squeezed features ``z`` (N, C)."""
        return excite(squeezed, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.gate_scale)

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
    ``Conv2d`` into one in place with :meth:`convert_`. After
    :func:`fold_into_batch_norm_`, the BatchNorm it feeds applies the block and the
    conv returns its output before SE (see ``folded_into_norm``).

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

    #: ``True`` once :func:`fold_into_batch_norm_` has handed the block to the BatchNorm
    #: that this conv feeds: the conv then returns its plain output and that BatchNorm
    #: applies the block (except under TorchScript and tracing, where the conv does).
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
        return _convert(conv, nn.Conv2d, conv.out_channels, block, cls)


class _BatchNorm2d(nn.BatchNorm2d):
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


class SqueezeExciteBatchNorm2d(_BatchNorm2d):
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
        return self.se(self._normalise(input))

    @classmethod
    def convert_(cls, norm: nn.BatchNorm2d, block: SqueezeExcite2d) -> 'SqueezeExciteBatchNorm2d':
        """Turns ``norm`` into a :class:`SqueezeExciteBatchNorm2d` in place and returns it.

        As :meth:`SqueezeExciteConv2d.convert_`: same object, parameters, buffers and
        hooks; ``norm`` must be exactly a ``torch.nn.BatchNorm2d`` and ``block`` must
        have ``norm.num_features`` channels.
        """
        return _convert(norm, nn.BatchNorm2d, norm.num_features, block, cls)


class FoldedSqueezeExciteBatchNorm2d(_BatchNorm2d):
    """A ``BatchNorm2d`` that applies the SE block of the convolution feeding it.

    Made by :func:`fold_into_batch_norm_`; it computes ``norm(se(u))`` for the conv
    output ``u`` without materialising ``se(u)``:

    - training (batch statistics): one read of ``u`` for its per-(n, c) mean and
      variance, then one affine pass, with the backward pass of
      :mod:`composer_se.fused`; autograd keeps ``u`` for backward, as the plain
      BatchNorm does, and nothing of SE's size;
    - eval (running statistics): ``u * (s * gamma / sigma) + shift``, one mean and
      one affine pass;
    - under ``torch.compile``: ``norm(se(u))`` written plainly, which the compiler fuses;
    - under TorchScript and tracing, the conv applies its block and this is a plain
      ``BatchNorm2d``.

    Its parameters and buffers are those of the ``BatchNorm2d`` it was, under the same
    names; the SE block stays registered under the conv (``conv.se``) and is only
    referenced from here, so state dicts and optimizer groups are unchanged.
    """

    __jit_ignored_attributes__ = ['_folded_se']  # a reference to the conv's block, used only in eager mode

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or torch.jit.is_tracing():
            return self._normalise(input)  # the conv applied its SE block
        return self._fold(input)

    @torch.jit.unused
    def _fold(self, input: torch.Tensor) -> torch.Tensor:
        se = self._folded_se
        if torch.compiler.is_compiling():
            return self._normalise(se(input))
        self._check_input_dim(input)
        if self.training:
            return squeeze_excite_batch_norm(input, se, self)
        inv_std = self.weight * torch.rsqrt(self.running_var + self.eps)
        scale = se.gate(input.mean((2, 3), dtype=inv_std.dtype).to(se.fc1.weight.dtype)) * inv_std
        return affine(input, scale, self.bias - self.running_mean * inv_std)


def can_fold(norm: nn.Module, channels: int) -> bool:
    """Whether :func:`fold_into_batch_norm_` accepts ``norm`` after a conv with ``channels`` outputs."""
    return (type(norm) is nn.BatchNorm2d and norm.num_features == channels and norm.affine and
            norm.track_running_stats and norm.running_mean is not None)


def fold_into_batch_norm_(conv: SqueezeExciteConv2d, norm: nn.BatchNorm2d) -> FoldedSqueezeExciteBatchNorm2d:
    """Moves the application of ``conv.se`` into ``norm``, in place, and returns ``norm``.

    Only valid when ``norm`` is the sole consumer of ``conv``'s output (surgery checks
    this on the traced graph): the conv then returns its plain output and ``norm``
    (now a :class:`FoldedSqueezeExciteBatchNorm2d`, the same object) computes
    ``norm(conv.se(u))`` in one pass. ``norm`` must be exactly an affine
    ``BatchNorm2d`` with running statistics, with ``conv.out_channels`` features.
    Parameter and buffer names do not change.
    """
    if not isinstance(conv, SqueezeExciteConv2d) or conv.folded_into_norm:
        raise TypeError(f'fold_into_batch_norm_ needs a SqueezeExciteConv2d not yet folded, got {conv!r}')
    if not can_fold(norm, conv.out_channels):
        raise TypeError(f'fold_into_batch_norm_ needs exactly an affine torch.nn.BatchNorm2d with running statistics '
                        f'and {conv.out_channels} features, got {norm!r}')
    norm.__class__ = FoldedSqueezeExciteBatchNorm2d
    object.__setattr__(norm, '_folded_se', conv.se)  # a reference, not a submodule: the block stays conv.se
    conv.folded_into_norm = True
    return norm

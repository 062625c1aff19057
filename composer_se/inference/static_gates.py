"""SE blocks whose gate hardly depends on the input, replaced by their mean gate: a fixed per-channel scale.

A block's output is ``u * g(mean(u))``. Where ``g`` stays within ``tolerance`` of its
mean ``s`` on the inputs measured (:func:`~composer_se.gate_statistics`,
``max_deviation``), the block becomes ``u * s``, and that scale goes where it costs
nothing:

- SE after a conv (``placement='conv'``, folded into the BatchNorm or not): into the
  conv's weight and bias, ``conv(x) * s``. The BatchNorm after it, if any, then sees
  what it saw, so its running statistics stay right, in eval and in training;
- SE after a BatchNorm (``placement='block'``): into the BatchNorm's weight and bias;
- a block anywhere else (as :func:`~composer_se.fuse_for_inference` leaves it): a
  :class:`ChannelScale` in its place.

The block's module is then gone from the model, and with it the squeeze, the MLP and,
in the first two cases, the scaling pass. Folded on its worst case (``max_deviation``),
no output of the block moves on the inputs it saw by more than ``tolerance`` times its
input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from composer_se.batchnorm import FoldedSqueezeExciteBatchNorm2d, SqueezeExciteBatchNorm2d, unfold_batch_norm_
from composer_se.gates import GateStatistics, gate_statistics
from composer_se.inference.fuse import registrations, scale_rows
from composer_se.layers import SqueezeExcite2d, SqueezeExciteConv2d

__all__ = ['MEASURES', 'ChannelScale', 'StaticGate', 'StaticGateReport', 'fold_static_gates']

#: What ``tolerance`` bounds (fields of :class:`~composer_se.gates.GateStatistics`): the worst case over images and
#: channels, the largest per-channel standard deviation over images, or that standard deviation averaged over channels.
MEASURES = ('max_deviation', 'max_input_dependence', 'input_dependence')


class ChannelScale(nn.Module):
    """Multiplies channel ``c`` of an ``(N, C, H, W)`` tensor by ``scale[c]``: an SE block's fixed gate where no conv
    or BatchNorm can take it (see :func:`fold_static_gates`)."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale.detach().clone(), requires_grad=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input * self.scale.to(input.dtype)[:, None, None]

    def extra_repr(self) -> str:
        return f'{self.scale.numel()}'


@dataclass(frozen=True)
class StaticGate:
    """One block replaced by its mean gate."""

    block: str  #: the block's name, e.g. ``'layer4.0.conv2.se'``
    into: str  #: where its gate went: ``'conv'`` (weight and bias), ``'batchnorm'`` (weight and bias) or ``'scale'``
    max_deviation: float  #: the gate's largest departure from its mean on the inputs measured
    input_dependence: float  #: see :class:`~composer_se.gates.GateStatistics`
    params_removed: int  #: the block's, less the ``ChannelScale``'s where ``into`` is ``'scale'``
    #: per image, at the size measured: the squeeze's and (unless ``into`` is ``'scale'``) the scaling's one FLOP per
    #: element, and the MLP's multiply-adds as 2 FLOPs each
    flops_removed: int


@dataclass(frozen=True)
class StaticGateReport:
    """What :func:`fold_static_gates` replaced and what it kept."""

    tolerance: float
    measure: str  #: what ``tolerance`` bounded, one of :data:`MEASURES`
    folded: tuple[StaticGate, ...]
    kept: tuple[tuple[str, str], ...]  #: (block, why it was kept)
    statistics: dict[str, GateStatistics]  #: every block's, as measured before folding

    @property
    def params_removed(self) -> int:
        return sum(gate.params_removed for gate in self.folded)

    @property
    def flops_removed(self) -> int:
        return sum(gate.flops_removed for gate in self.folded)


def _fold(model: nn.Module, block: SqueezeExcite2d, scale: torch.Tensor) -> Optional[str]:
    """Replaces ``block`` by the fixed gate ``scale`` (float64); returns where it went, or ``None`` if it cannot."""
    owner, attribute = registrations(model, block)[0]
    if isinstance(owner, SqueezeExciteConv2d) and attribute == 'se':
        if owner.folded_into_norm:
            norm = next(m for m in model.modules()
                        if isinstance(m, FoldedSqueezeExciteBatchNorm2d) and m._folded_se is block)
            unfold_batch_norm_(owner, norm)
        scale_rows(owner.weight, scale)
        if owner.bias is not None:
            scale_rows(owner.bias, scale)
        del owner._modules['se']
        owner.__dict__.pop('folded_into_norm', None)
        owner.__class__ = nn.Conv2d
        return 'conv'
    if isinstance(owner, SqueezeExciteBatchNorm2d) and attribute == 'se':
        if not owner.affine:
            return None
        scale_rows(owner.weight, scale)
        scale_rows(owner.bias, scale)
        del owner._modules['se']
        owner.__class__ = nn.BatchNorm2d
        return 'batchnorm'
    setattr(owner, attribute, ChannelScale(scale.to(block.fc2.weight.dtype)))
    return 'scale'


def _flops(stats: GateStatistics, block: SqueezeExcite2d, into: str) -> int:
    elements = stats.channels * stats.spatial[0] * stats.spatial[1]
    mlp = 2 * block.fc1.weight.numel() + 2 * block.fc2.weight.numel()
    return elements * (1 if into == 'scale' else 2) + mlp


def fold_static_gates(model: nn.Module, dataloader: Iterable, tolerance: float, max_batches: Optional[int] = None,
                      *, measure: str = 'max_deviation') -> StaticGateReport:
    """Replaces, in place, each SE block whose gate stays within ``tolerance`` of its mean on ``dataloader``'s inputs
    by that mean, folded into the conv or BatchNorm it follows (see :mod:`~composer_se.inference.static_gates`).

    The gates are measured as :func:`~composer_se.gate_statistics` measures them (eval
    mode, no gradients, the model's training flags restored); a block is folded when
    its ``measure`` is at most ``tolerance``, in the gate's units (``(0, 1)``, or
    ``(0, 2)`` for ``init='identity'``). With ``'max_deviation'`` (the default) that bounds
    the change of each folded block's output on the inputs it saw while measured (with
    blocks before it folded as well it sees slightly different ones, so the model's
    output has no such bound: check the accuracy); ``'max_input_dependence'`` and
    ``'input_dependence'`` bound the typical variation (a standard deviation) instead and
    let a block fold whose gate swings on a few inputs. A gate fixed by construction
    folds exactly; give it a tolerance of float rounding (``1e-6``), as the rows of a
    batch can round it differently in the last bit. The folded model has no module for
    those blocks; it scripts, traces, exports and loads its own state dict as any model
    of plain layers does. Fold a copy to keep the blocks.

    Raises:
        TypeError: ``model`` is not a module, or a batch has a type
            :func:`~composer_se.gate_statistics` cannot read.
        ValueError: ``tolerance`` is not a finite number of at least 0, ``model`` has
            no SE block, or the dataloader gave no batch.
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < float('inf'):
        raise ValueError(f'tolerance must be a finite number >= 0 (the largest departure of a gate from its mean, in '
                         f'the gate\'s units), got {tolerance!r}')
    if measure not in MEASURES:
        raise ValueError(f'measure must be one of {MEASURES}, got {measure!r}')
    statistics = gate_statistics(model, dataloader, max_batches, per_class=False)
    blocks = dict(model.named_modules())
    folded, kept = [], []
    for name, stats in statistics.items():
        block = blocks[name]
        value = getattr(stats, measure)
        if value > tolerance:
            kept.append((name, f'its {measure} is {value:.3g} > {tolerance:g}'))
            continue
        params = sum(p.numel() for p in block.parameters())
        into = _fold(model, block, stats.mean.double().to(block.fc2.weight.device))
        if into is None:
            kept.append((name, 'the BatchNorm it follows has no affine weight and bias to take its gate'))
            continue
        added = stats.channels if into == 'scale' else 0  # the ChannelScale's own
        folded.append(StaticGate(name, into, stats.max_deviation, stats.input_dependence, params - added,
                                 _flops(stats, block, into)))
    return StaticGateReport(float(tolerance), measure, tuple(folded), tuple(kept), statistics)

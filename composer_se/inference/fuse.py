"""Each conv and the BatchNorm after it as one conv, for inference, with SE kept exact.

In eval a BatchNorm is a per-channel affine map, ``norm(v) = a * v + c`` with
``a = weight / sqrt(running_var + eps)`` and ``c = bias - a * running_mean``. Fusing it
into the conv before it is usual, and exact, where nothing sits between the two. An SE
block between them (SE after the conv, folded into the BatchNorm or not) is not linear,
but it commutes with a per-channel scale: for ``u`` the conv's output and ``g`` the gate
of the block's squeeze ``mean(u)``,

    norm(se(u)) = a * u * g(mean(u)) + c = u' * g'(mean(u')) + c,   u' = a * u,

where ``g'`` is ``g`` with the columns of the block's first layer divided by ``a``
(``mean(u') = a * mean(u)``). So the scale moves into the conv's weight and bias, the
columns of the block's first layer take ``1 / a``, and the shift ``c`` becomes a bias
after the gate (:class:`ChannelBias`). A channel with ``a = 0`` cannot move its scale
that way; such a pair is left as it is and the report says so. SE after the BatchNorm
(the paper's place) stays after it: the BatchNorm fuses into the conv as usual.

Tools that fuse by pattern refuse SE models or, fusing a conv with its BatchNorm by hand
(``torch.nn.utils.fuse_conv_bn_eval``, then the BatchNorm made an ``Identity``), drop a
block folded into the BatchNorm without a word; this module is the way that keeps SE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from composer_se.batchnorm import FoldedSqueezeExciteBatchNorm2d, SqueezeExciteBatchNorm2d, batch_norm_consumers
from composer_se.batchnorm.fold import timm_batch_norm_act
from composer_se.layers import SqueezeExcite2d, SqueezeExciteConv2d

__all__ = ['ChannelBias', 'FusedConv', 'FusionReport', 'fuse_for_inference', 'registrations', 'scale_rows']


class ChannelBias(nn.Module):
    """Adds ``bias[c]`` to channel ``c`` of an ``(N, C, H, W)`` tensor: a BatchNorm's shift, left after the gate of
    the SE block between it and its conv when its scale moved into the conv (see :func:`fuse_for_inference`)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input + self.bias.to(input.dtype)[:, None, None]

    def extra_repr(self) -> str:
        return f'{self.bias.numel()}'


@dataclass(frozen=True)
class FusedConv:
    """One conv that took the BatchNorm after it."""

    conv: str  #: the conv's name, e.g. ``'layer4.0.conv1'``
    norm: str  #: the BatchNorm's name; the module there is now what remains of it (see :func:`fuse_for_inference`)
    se: str  #: where an SE block sits: ``'between'`` conv and BatchNorm, ``'after'`` the BatchNorm, or ``'none'``


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse_for_inference` fused, and what it left and why."""

    fused: tuple[FusedConv, ...]
    unfused: tuple[tuple[str, str], ...]  #: BatchNorms after a conv left as they are: (name, reason)
    #: why the model's graph could not be read (only BatchNorms with a folded SE block were fused then), or ``None``
    untraced: Optional[str] = None

    @property
    def num_fused(self) -> int:
        return len(self.fused)


def _batch_norm_acts() -> tuple[type, ...]:
    """timm's ``BatchNormAct2d`` and its folded twin, where timm is in use."""
    batch_norm_act = timm_batch_norm_act()
    if batch_norm_act is None:
        return ()
    from composer_se.batchnorm.norm_act import FoldedSqueezeExciteBatchNormAct2d
    return batch_norm_act, FoldedSqueezeExciteBatchNormAct2d


def _why_not(conv: nn.Module, norm: nn.Module, scale: Optional[torch.Tensor]) -> Optional[str]:
    """Why ``conv`` and ``norm`` cannot be fused exactly, or ``None``."""
    if type(conv) not in (nn.Conv2d, SqueezeExciteConv2d):
        return f'the conv is a {type(conv).__name__}, whose forward may not be a plain convolution'
    if type(norm) not in (nn.BatchNorm2d, FoldedSqueezeExciteBatchNorm2d, SqueezeExciteBatchNorm2d,
                          *_batch_norm_acts()):
        return f'the BatchNorm is a {type(norm).__name__}, whose forward may not be a plain normalisation'
    if scale is None:
        return 'the BatchNorm has no running statistics: it normalises each batch with its own, even in eval'
    if isinstance(conv, SqueezeExciteConv2d):
        zero = int((scale == 0).sum())
        if zero:
            return (f'the BatchNorm\'s scale is zero in {zero} of {scale.numel()} channels, so it cannot move through '
                    f'the SE block between it and the conv')
    return None


def _affine(norm: nn.BatchNorm2d) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(a, c)`` of ``norm`` in eval, ``norm(v) = a * v + c``, in float64; ``(None, None)`` without running
    statistics."""
    if norm.running_mean is None or norm.running_var is None:
        return None, None
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -scale * norm.running_mean.double()
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale, shift


def _remains(norm: nn.BatchNorm2d, shift: Optional[torch.Tensor]) -> nn.Module:
    """What replaces ``norm`` once its scale is in the conv: the shift left after an SE block, the block of a
    BatchNorm followed by SE, and timm's drop and activation, in that order."""
    parts: list[nn.Module] = []
    if shift is not None:
        parts.append(ChannelBias(shift.to(norm.weight.dtype if norm.weight is not None else norm.running_mean.dtype)))
    if isinstance(norm, SqueezeExciteBatchNorm2d):
        parts.append(norm.se)
    if isinstance(norm, _batch_norm_acts()):
        parts += [norm.drop, norm.act]
    if not parts:
        return nn.Identity()
    return parts[0] if len(parts) == 1 else nn.Sequential(*parts)


@torch.no_grad()
def _fuse(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> Optional[torch.Tensor]:
    """Moves ``scale`` (and, with no SE block between, ``shift``) into ``conv``; returns the shift left, if any."""
    scale_rows(conv.weight, scale)
    between = isinstance(conv, SqueezeExciteConv2d)
    bias = torch.zeros_like(scale) if conv.bias is None else conv.bias.double()
    bias = bias * scale if between else bias * scale + shift
    if conv.bias is not None:
        conv.bias.copy_(bias)
    elif not between:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    if not between:
        return None
    block: SqueezeExcite2d = conv.se
    block.fc1.weight.copy_(block.fc1.weight.double() / scale[None, :])
    conv.folded_into_norm = False  # the conv applies its block again; what follows it is no BatchNorm
    return shift


@torch.no_grad()
def scale_rows(tensor: torch.Tensor, scale: torch.Tensor) -> None:
    """Multiplies row ``i`` of ``tensor`` (along its first dimension) by ``scale[i]``, in place, in float64."""
    tensor.copy_(tensor.double() * scale.view(-1, *[1] * (tensor.dim() - 1)))


def registrations(model: nn.Module, module: nn.Module) -> list[tuple[nn.Module, str]]:
    """Each ``(parent, name)`` under which ``model`` registers ``module``."""
    return [(parent, name) for parent in model.modules() for name, child in parent._modules.items() if child is module]


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Puts ``new`` wherever ``model`` registers ``old``."""
    for parent, name in registrations(model, old):
        setattr(parent, name, new)


def _folded_pairs(model: nn.Module) -> dict[int, nn.BatchNorm2d]:
    """conv -> BatchNorm for each BatchNorm that applies a folded SE block, found without the graph."""
    convs = {id(m.se): m for m in model.modules() if isinstance(m, SqueezeExciteConv2d)}
    return {id(convs[id(norm._folded_se)]): norm for norm in model.modules()
            if isinstance(norm, FoldedSqueezeExciteBatchNorm2d) and id(norm._folded_se) in convs}


def fuse_for_inference(model: nn.Module) -> FusionReport:
    """Fuses, in place, each conv of ``model`` with the BatchNorm its output goes to alone, for inference, exactly.

    ``model`` must be in eval mode: the fused model computes what it computed in eval
    (up to rounding) and cannot train as it did. A conv and its BatchNorm with an SE
    block between them (``placement='conv'``, folded or not) become the conv with the
    scale moved into it and into the block's first layer, followed by the block and a
    :class:`ChannelBias` (the module registered where the BatchNorm was); with SE after
    the BatchNorm (``placement='block'``) the module there becomes the SE block itself;
    with no SE, an ``nn.Identity``. timm's ``BatchNormAct2d`` keeps its drop and
    activation after what remains. See :mod:`~composer_se.inference.fuse` for the
    arithmetic. Pairs are read from the traced graph, as folding reads them; a pair of
    other conv or BatchNorm types, without running statistics, or with an SE block
    between and a zero BatchNorm scale, is left as it is and named in the report.

    To keep the model for training, fuse a copy: ``fused = copy.deepcopy(model).eval()``.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
        ValueError: ``model`` (or one of its modules) is in training mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f'fuse_for_inference takes a torch.nn.Module, got {type(model).__name__}: {model!r:.80}')
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f'fuse_for_inference fuses a model in eval mode, and {len(training)} modules are in training '
                         f'mode (first: {training[0]}); call model.eval() first (on a copy to keep training the model)')
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    modules = {id(m): m for m in model.modules()}
    pairs, untraced = batch_norm_consumers(model)
    if untraced is not None:
        pairs = _folded_pairs(model)
    fused, unfused = [], []
    for conv_id, norm in pairs.items():
        conv = modules[conv_id]
        scale, shift = _affine(norm)
        reason = _why_not(conv, norm, scale)
        if reason is not None:
            unfused.append((names[id(norm)], reason))
            continue
        se = 'between' if isinstance(conv, SqueezeExciteConv2d) else (
            'after' if isinstance(norm, SqueezeExciteBatchNorm2d) else 'none')
        left = _fuse(conv, scale, shift)
        fused.append(FusedConv(names[conv_id], names[id(norm)], se))
        _replace(model, norm, _remains(norm, left))
    return FusionReport(tuple(fused), tuple(unfused), untraced)

"""Folding a conv's SE block into the BatchNorm it feeds: which BatchNorms can take one, the fold, and its checks.

Which convs feed a BatchNorm alone is read from the model's traced graph
(:mod:`~composer_se.batchnorm.graph`); this module changes the modules.
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from composer_se.batchnorm.modules import FoldedSqueezeExciteBatchNorm2d
from composer_se.layers import SqueezeExciteConv2d

__all__ = [
    'broken_folds', 'can_fold', 'fold_into_batch_norm_', 'folded_type', 'timm_batch_norm_act', 'unfold_batch_norm_'
]


def timm_batch_norm_act() -> Optional[type]:
    """timm's ``BatchNormAct2d`` if timm has been imported (this never imports timm), else ``None``."""
    norm_act = sys.modules.get('timm.layers.norm_act')
    return getattr(norm_act, 'BatchNormAct2d', None)


def folded_type(norm: nn.Module) -> Optional[type]:
    """The folded class that ``norm`` becomes, or ``None`` if its type cannot be folded into.

    Exactly ``torch.nn.BatchNorm2d`` becomes :class:`FoldedSqueezeExciteBatchNorm2d`, and
    exactly timm's ``BatchNormAct2d`` (a BatchNorm followed by drop and activation)
    becomes :class:`~composer_se.batchnorm.norm_act.FoldedSqueezeExciteBatchNormAct2d`,
    whose module imports timm and is loaded only here, when timm is in use. Other
    subclasses may change the normalisation, so they are not folded into.
    """
    if type(norm) is nn.BatchNorm2d:
        return FoldedSqueezeExciteBatchNorm2d
    batch_norm_act = timm_batch_norm_act()
    if batch_norm_act is not None and type(norm) is batch_norm_act:
        from composer_se.batchnorm.norm_act import FoldedSqueezeExciteBatchNormAct2d
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


def unfold_batch_norm_(conv: SqueezeExciteConv2d, norm: FoldedSqueezeExciteBatchNorm2d) -> nn.BatchNorm2d:
    """Undoes :func:`fold_into_batch_norm_`, in place: ``conv`` applies its block again and ``norm`` is again the
    ``BatchNorm2d`` (or timm ``BatchNormAct2d``) it was, the same object; returns ``norm``."""
    if not isinstance(norm, FoldedSqueezeExciteBatchNorm2d) or norm._folded_se is not getattr(conv, 'se', None):
        raise TypeError(f'unfold_batch_norm_ needs a BatchNorm holding the folded block of {conv!r}, got {norm!r}')
    batch_norm_act = timm_batch_norm_act()
    norm.__class__ = batch_norm_act if batch_norm_act is not None and isinstance(norm, batch_norm_act) else (
        nn.BatchNorm2d)
    del norm.__dict__['_folded_se']
    conv.folded_into_norm = False
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

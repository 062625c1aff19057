"""SE folded into the BatchNorm that follows its conv: one pass for SE and normalisation.

- :mod:`~composer_se.folding.modules`: the folded BatchNorm and how a block is folded
  (its arithmetic is :func:`composer_se.fused.squeeze_excite_batch_norm`);
- :mod:`~composer_se.folding.graph`: which convs feed a BatchNorm and nothing else.

Like :mod:`composer_se.layers`, it imports only ``torch`` (and timm's own module,
:mod:`~composer_se.folding.norm_act`, only to fold into timm's ``BatchNormAct2d``).
"""

from composer_se.folding.graph import batch_norm_consumers, fold_targets
from composer_se.folding.modules import FoldedSqueezeExciteBatchNorm2d, broken_folds, can_fold, fold_into_batch_norm_

__all__ = [
    'FoldedSqueezeExciteBatchNorm2d',
    'batch_norm_consumers',
    'broken_folds',
    'can_fold',
    'fold_into_batch_norm_',
    'fold_targets',
]

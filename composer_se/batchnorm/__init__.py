"""SE inside a BatchNorm: the BatchNorm that applies an SE block in its own pass, and everything it takes.

A block folded into the BatchNorm after its conv (SE then normalisation) and a block at
the end of a residual branch (normalisation then SE, the paper's place) are one idea:
the BatchNorm computes the block's gate from the statistics it reads anyway, and applies
SE and the normalisation as one affine map per (n, c).

- :mod:`~composer_se.batchnorm.modules`: the two BatchNorms, one ``forward`` each, over a
  shared base; :mod:`~composer_se.batchnorm.norm_act`, timm's ``BatchNormAct2d`` folded;
- :mod:`~composer_se.batchnorm.fold` and :mod:`~composer_se.batchnorm.graph`: folding a
  conv's block into its BatchNorm (and back), and which convs feed a BatchNorm alone (the fx trace);
- :mod:`~composer_se.batchnorm.function`: what the modules call, in training (an
  autograd function in eager mode) and in eval; :mod:`~composer_se.batchnorm.backend`,
  whether its passes run as Triton kernels or torch operations;
- :mod:`~composer_se.batchnorm.torch_passes`: the arithmetic (its derivation is that
  module's docstring) and its passes, forward, backward and eval, in torch operations
  (CPU); :mod:`~composer_se.batchnorm.triton_passes`: the same passes as Triton kernels
  (CUDA), which :mod:`~composer_se.batchnorm.launch` launches;
- :mod:`~composer_se.batchnorm.compiled`: the form ``torch.compile`` sees, the operators
  ``composer_se::se_batch_norm`` and its backward, registered when that module is
  imported (the compiler's first SE BatchNorm imports it; import it before loading a
  program exported with them). Registering them imports Triton and, on newer torch,
  Inductor, so nothing else imports it.

It imports only ``torch``: Triton when a CUDA tensor first arrives (or a Triton driver
that takes CPU tensors is active), timm when a timm norm is folded.
"""

from composer_se.batchnorm.backend import runs_triton
from composer_se.batchnorm.fold import broken_folds, can_fold, fold_into_batch_norm_, folded_type, unfold_batch_norm_
from composer_se.batchnorm.function import se_batch_norm, se_batch_norm_eval
from composer_se.batchnorm.graph import batch_norm_consumers, fold_targets
from composer_se.batchnorm.modules import FoldedSqueezeExciteBatchNorm2d, SqueezeExciteBatchNorm2d, SqueezeExciteNorm

__all__ = [
    'FoldedSqueezeExciteBatchNorm2d',
    'SqueezeExciteBatchNorm2d',
    'SqueezeExciteNorm',
    'batch_norm_consumers',
    'broken_folds',
    'can_fold',
    'fold_into_batch_norm_',
    'fold_targets',
    'folded_type',
    'runs_triton',
    'se_batch_norm',
    'se_batch_norm_eval',
    'unfold_batch_norm_',
]

"""SE and a BatchNorm in one pass over the activation: the arithmetic and its kernels.

It imports only ``torch``; :mod:`~composer_se.fused.triton_ops` (Triton) is imported the
first time a CUDA tensor reaches these functions.

- :mod:`~composer_se.fused.passes`: the arithmetic of SE then BatchNorm (a block folded
  into the BatchNorm after its conv) and BatchNorm then SE (a block at the end of a
  residual branch), and their forward and hand-written backward passes;
- :mod:`~composer_se.fused.function`: the functions the modules call, autograd functions
  in eager mode and, under ``torch.compile``, the custom operators of
  :mod:`~composer_se.fused.operators`;
- :mod:`~composer_se.fused.torch_ops` and :mod:`~composer_se.fused.triton_ops`: their
  steps as torch operations (CPU) and as Triton kernels (CUDA).
"""

from composer_se.fused.function import affine, batch_norm_squeeze_excite, squeeze_excite_batch_norm
from composer_se.fused.passes import kernels_for, runs_triton

__all__ = ['affine', 'batch_norm_squeeze_excite', 'kernels_for', 'runs_triton', 'squeeze_excite_batch_norm']

"""Squeeze-and-Excitation modules in plain PyTorch.

This package imports only ``torch`` (and :mod:`composer_se.fused`, whose Triton kernels
are imported only when a CUDA tensor reaches them): a model that holds these layers can
be saved, unpickled, scripted, exported or served without Composer or torchvision.
"""

from composer_se.layers.block import GATE_INITS, SqueezeExcite2d, excite
from composer_se.layers.conv import SqueezeExciteConv2d
from composer_se.layers.norm import SqueezeExciteBatchNorm2d

__all__ = ['GATE_INITS', 'SqueezeExcite2d', 'SqueezeExciteBatchNorm2d', 'SqueezeExciteConv2d', 'excite']

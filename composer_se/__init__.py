"""Squeeze-and-Excitation for MosaicML Composer: a drop-in algorithm and a functional API."""

from composer_se.algorithm import SqueezeExcite
from composer_se.layers import SqueezeExcite2d, SqueezeExciteBatchNorm2d, SqueezeExciteConv2d
from composer_se.placement import register_residual_block
from composer_se.surgery import AddedBlock, SqueezeExciteReport, apply_squeeze_excite

__all__ = [
    'AddedBlock',
    'SqueezeExcite',
    'SqueezeExcite2d',
    'SqueezeExciteBatchNorm2d',
    'SqueezeExciteConv2d',
    'SqueezeExciteReport',
    'apply_squeeze_excite',
    'register_residual_block',
]

__version__ = '0.1.0'

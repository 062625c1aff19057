"""Squeeze-and-Excitation modules in plain PyTorch: the block, and a conv followed by one.

This package imports only ``torch``: a model that holds these layers can be saved,
unpickled, scripted, exported or served without Composer or torchvision. The BatchNorms
that apply a block in their own pass are in :mod:`composer_se.batchnorm`.
"""

from composer_se.layers.block import DEFAULT_LATENT_CHANNELS, GATE_INITS, SqueezeExcite2d, block_params, excite
from composer_se.layers.conv import SqueezeExciteConv2d

__all__ = ['DEFAULT_LATENT_CHANNELS', 'GATE_INITS', 'SqueezeExcite2d', 'SqueezeExciteConv2d', 'block_params', 'excite']

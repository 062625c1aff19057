"""Squeeze-and-Excitation for MosaicML Composer: a drop-in algorithm and a functional API.

The package has three layers:

- :mod:`composer_se.layers` and :mod:`composer_se.folding`: the SE modules, in plain
  PyTorch (a saved, scripted or exported SE model needs only them);
- the surgery that puts SE into a model, and its Composer algorithm
  (:mod:`~composer_se.surgery`, :mod:`~composer_se.algorithm`, :mod:`~composer_se.plan`);
- :mod:`composer_se.recipes`: YAML recipes, run with ``composer -m composer_se.train``.

The names below are loaded when first used, so that importing the torch-only layers
(``import composer_se.layers``, or unpickling an SE model) does not import Composer.
When Composer is already imported, importing this package also lets Composer's
checkpoint loader rebuild this package's algorithm.
"""

from __future__ import annotations

import importlib
import sys

__all__ = [
    'AddedBlock',
    'SqueezeExcite',
    'SqueezeExcite2d',
    'SqueezeExciteBatchNorm2d',
    'SqueezeExciteConv2d',
    'SqueezeExciteReport',
    'SqueezeExciteSettings',
    'apply_squeeze_excite',
    'register_attention_module',
    'register_residual_block',
]

__version__ = '0.1.0'

#: public name -> the module that defines it
_HOMES = {
    'AddedBlock': 'composer_se.surgery',
    'SqueezeExcite': 'composer_se.algorithm',
    'SqueezeExcite2d': 'composer_se.layers',
    'SqueezeExciteBatchNorm2d': 'composer_se.layers',
    'SqueezeExciteConv2d': 'composer_se.layers',
    'SqueezeExciteReport': 'composer_se.surgery',
    'SqueezeExciteSettings': 'composer_se.settings',
    'apply_squeeze_excite': 'composer_se.surgery',
    'register_attention_module': 'composer_se.placement',
    'register_residual_block': 'composer_se.placement',
}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if 'composer.algorithms' in sys.modules:  # Composer is in use: make our checkpoints loadable by name
    importlib.import_module('composer_se.algorithm')

"""Squeeze-and-Excitation for MosaicML Composer: a drop-in algorithm and a functional API.

The package has three layers:

- :mod:`composer_se.layers` and :mod:`composer_se.batchnorm`: the SE modules, and the
  BatchNorms that apply a block in their own pass, in plain PyTorch (a saved, scripted
  or exported SE model needs only them); :mod:`composer_se.inference`, an SE model for
  deployment (each conv fused with its BatchNorm, SE kept), torch-only as well;
- the surgery that puts SE into a model and the planner that costs it, torch-only too
  (:mod:`~composer_se.surgery`, :mod:`~composer_se.plan`), and the Composer algorithm
  and callback around them (:mod:`~composer_se.algorithm`,
  :mod:`~composer_se.callbacks`), with what they need of Composer's inside in
  :mod:`composer_se.composer_plumbing`;
- :mod:`composer_se.recipes`: YAML recipes, run with ``composer -m composer_se.train``.

The names below are loaded when first used: importing the package, or its torch-only
layers (``import composer_se.layers``, or unpickling an SE model), imports no Composer.
Composer can rebuild our algorithm from a checkpoint once
:class:`~composer_se.SqueezeExcite` has been imported.
"""

from __future__ import annotations

import importlib

__all__ = [
    'AddedBlock',
    'CheckpointError',
    'GateMonitor',
    'NoEffectWarning',
    'SqueezeExcite',
    'SqueezeExcite2d',
    'SqueezeExciteBatchNorm2d',
    'SqueezeExciteConv2d',
    'SqueezeExciteReport',
    'SqueezeExciteSettings',
    'apply_squeeze_excite',
    'fold_static_gates',
    'fuse_for_inference',
    'gate_statistics',
    'plan_squeeze_excite',
    'register_attention_module',
    'register_residual_block',
]

__version__ = '0.1.0'

#: public name -> the module that defines it
_HOMES = {
    'AddedBlock': 'composer_se.surgery',
    'CheckpointError': 'composer_se.checkpoints',
    'GateMonitor': 'composer_se.callbacks',
    'NoEffectWarning': 'composer_se.surgery',
    'SqueezeExcite': 'composer_se.algorithm',
    'SqueezeExcite2d': 'composer_se.layers',
    'SqueezeExciteBatchNorm2d': 'composer_se.batchnorm',
    'SqueezeExciteConv2d': 'composer_se.layers',
    'SqueezeExciteReport': 'composer_se.surgery',
    'SqueezeExciteSettings': 'composer_se.settings',
    'apply_squeeze_excite': 'composer_se.surgery',
    'fold_static_gates': 'composer_se.inference',
    'fuse_for_inference': 'composer_se.inference',
    'gate_statistics': 'composer_se.gates',
    'plan_squeeze_excite': 'composer_se.plan',
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

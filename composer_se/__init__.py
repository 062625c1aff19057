"""Squeeze-and-Excitation for MosaicML Composer: a drop-in algorithm and a functional API.

The package has three layers:

- :mod:`composer_se.layers` and :mod:`composer_se.batchnorm`: the SE modules, and the
  BatchNorms that apply a block in their own pass, in plain PyTorch (a saved, scripted
  or exported SE model needs only them); :mod:`composer_se.inference`, an SE model for
  deployment (each conv fused with its BatchNorm, SE kept), torch-only as well;
- the surgery that puts SE into a model, and its Composer algorithm
  (:mod:`~composer_se.surgery`, :mod:`~composer_se.algorithm`, :mod:`~composer_se.plan`);
- :mod:`composer_se.recipes`: YAML recipes, run with ``composer -m composer_se.train``.

The names below are loaded when first used, so that importing the torch-only layers
(``import composer_se.layers``, or unpickling an SE model) does not import Composer.
Importing this package also lets Composer's checkpoint loader rebuild this package's
algorithm from a checkpoint, whether Composer is imported before or after it: the
algorithm registers itself with Composer as soon as both are loaded.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = [
    'AddedBlock',
    'GateMonitor',
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
    'register_attention_module',
    'register_residual_block',
]

__version__ = '0.1.0'

#: public name -> the module that defines it
_HOMES = {
    'AddedBlock': 'composer_se.surgery',
    'GateMonitor': 'composer_se.callbacks',
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


class _ComposerEntry:
    """``composer.algorithms.composer_se`` until our algorithm module is imported: it imports it when asked.

    Composer's checkpoint loader evaluates ``composer_se.SqueezeExcite(...)`` under
    ``composer.algorithms``; importing :mod:`composer_se.algorithm` then replaces this
    entry with its own (see :func:`composer_se.checkpoint_guard.register_with_composer`).
    """

    def __getattr__(self, name: str):
        if name != 'SqueezeExcite':
            raise AttributeError(name)
        return importlib.import_module('composer_se.algorithm').SqueezeExcite


def _register_with_composer() -> None:
    algorithms = importlib.import_module('composer.algorithms')
    if not hasattr(algorithms, 'composer_se'):
        algorithms.composer_se = _ComposerEntry()


class _ThenRegister(importlib.abc.Loader):
    """Loads the ``composer`` package with its own loader, then registers our entry with it."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _register_with_composer()


class _RegisterWhenComposerLoads(importlib.abc.MetaPathFinder):
    """Meets the first import of ``composer`` and has :class:`_ThenRegister` load it; then leaves."""

    def find_spec(self, fullname, path, target=None):
        if fullname != 'composer':
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


if 'composer' in sys.modules:  # Composer is in use: make our checkpoints loadable by name now
    _register_with_composer()
elif not any(isinstance(finder, _RegisterWhenComposerLoads) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenComposerLoads())

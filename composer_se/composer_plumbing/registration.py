"""How Composer's checkpoint loader finds our algorithm: a repr prefix and one entry under ``composer.algorithms``.

A Composer checkpoint lists its algorithms as ``(class __qualname__, {'repr': ...})``.
On load, for a name found in ``composer.algorithms`` whose class is
``required_on_load`` (``SqueezeExcite`` is: Composer's own), Composer evaluates
``'algorithms.' + repr``. Our class shares that name, so its repr carries
:data:`REPR_PREFIX` and :func:`register` puts our factory at
``composer.algorithms.composer_se.SqueezeExcite``: Composer rebuilds *our* algorithm
from our checkpoints, never its own. :mod:`composer_se.algorithm` registers itself
when it is imported. Composer is imported by :func:`register` and
:func:`registered_factory`, not by this module: the prefix and :func:`call_in_repr` need
only Python.
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Callable, Optional

__all__ = ['NAMESPACE', 'REPR_PREFIX', 'call_in_repr', 'register', 'registered_factory']

#: The attribute of ``composer.algorithms`` that our algorithm's repr names.
NAMESPACE = 'composer_se'
#: What our algorithm's repr starts with, before its ``SqueezeExcite(...)`` call.
REPR_PREFIX = f'{NAMESPACE}.'


def _algorithms():
    return importlib.import_module('composer.algorithms')


def register(factory: Callable[..., Any]) -> None:
    """Makes Composer's checkpoint loader build our algorithm with ``factory``."""
    setattr(_algorithms(), NAMESPACE, types.SimpleNamespace(SqueezeExcite=factory))


def registered_factory() -> Optional[Callable[..., Any]]:
    """The factory Composer's checkpoint loader would call now, or ``None`` before any :func:`register`."""
    entry = getattr(_algorithms(), NAMESPACE, None)
    return None if entry is None else entry.SqueezeExcite


def call_in_repr(text: Any) -> Optional[str]:
    """The ``SqueezeExcite(...)`` call in an algorithm repr a checkpoint records, or ``None`` if it is not ours."""
    if isinstance(text, str) and text.startswith(REPR_PREFIX + 'SqueezeExcite('):
        return text[len(REPR_PREFIX):]
    return None

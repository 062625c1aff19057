"""What Composer's own modules look like from outside: the network inside its model, the conv its SE wraps.

Neither imports Composer."""

from __future__ import annotations

import sys

from torch import nn

__all__ = ['has_composers_squeeze_excite', 'network_of']


def network_of(model: nn.Module) -> nn.Module:
    """The module whose names ``include`` / ``exclude`` refer to: the network inside a ``ComposerClassifier``.

    Any other model is its own network. A model can only be a ``ComposerClassifier``
    once Composer is imported, so this never imports it.
    """
    models = sys.modules.get('composer.models')
    classifier = getattr(models, 'ComposerClassifier', None)
    return model.module if classifier is not None and isinstance(model, classifier) else model


def has_composers_squeeze_excite(module: nn.Module) -> bool:
    """Whether ``module`` is a conv that Composer's own ``SqueezeExciteConv2d`` already follows with SE.

    Composer marks such a conv with the attribute ``_already_squeeze_excited``.
    """
    return bool(getattr(module, '_already_squeeze_excited', False))

"""The network inside a Composer model, found without importing Composer."""

from __future__ import annotations

import sys

from torch import nn

__all__ = ['network_of']


def network_of(model: nn.Module) -> nn.Module:
    """The module whose names ``include`` / ``exclude`` refer to: the network inside a ``ComposerClassifier``.

    Any other model is its own network. A model can only be a ``ComposerClassifier``
    once Composer is imported, so this never imports it.
    """
    models = sys.modules.get('composer.models')
    classifier = getattr(models, 'ComposerClassifier', None)
    return model.module if classifier is not None and isinstance(model, classifier) else model

"""What a Composer checkpoint holds, where: the model's state dict and the algorithms it records.

``torch.save`` of Composer's ``State`` is a dict whose ``'state'`` entry holds ``'model'``
(the state dict of the ``ComposerModel``; a ``ComposerClassifier`` prefixes its network's
keys with ``module.``) and ``'algorithms'`` (``(class __qualname__, {'repr': ...})`` pairs).
Imports no Composer.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from composer_se.checkpoints import CheckpointError
from composer_se.composer_plumbing.registration import call_in_repr

__all__ = ['CLASSIFIER_PREFIX', 'is_composer_checkpoint', 'model_state_of', 'saved_squeeze_excite']

#: What a ``ComposerClassifier``'s state dict keys put before its network's.
CLASSIFIER_PREFIX = 'module.'


def is_composer_checkpoint(checkpoint: Any) -> bool:
    """Whether ``checkpoint`` (a loaded file) has a model state dict where Composer puts one."""
    state = checkpoint.get('state') if isinstance(checkpoint, dict) else None
    return isinstance(state, dict) and isinstance(state.get('model'), Mapping)


def model_state_of(checkpoint: Any, name: str) -> Mapping[str, Any]:
    """The model's state dict inside a Composer checkpoint; else a CheckpointError naming ``name`` and what it holds."""
    if not is_composer_checkpoint(checkpoint):
        keys = ', '.join(map(str, list(checkpoint)[:5])) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f'{name} is not a Composer checkpoint: it has no state/model entry (found: {keys})')
    return checkpoint['state']['model']


def saved_squeeze_excite(checkpoint: Any) -> Optional[str]:
    """The ``SqueezeExcite(...)`` call that a Composer checkpoint records, or ``None`` when it has none."""
    state = checkpoint.get('state') if isinstance(checkpoint, dict) else None
    algorithms = state.get('algorithms') if isinstance(state, dict) else None
    for entry in algorithms if isinstance(algorithms, list) else []:
        record = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
        call = call_in_repr(record.get('repr') if isinstance(record, dict) else None)
        if call is not None:
            return call
    return None

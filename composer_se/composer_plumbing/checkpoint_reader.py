"""Replacing, for a while, the function Composer's Trainer reads checkpoint files with.

Composer 0.32 reads every checkpoint it loads (``load_path``, ``autoresume``) through
the private ``composer.utils.checkpoint._torch_load_with_validation(path,
map_location)``, after its own opt-in ``_ensure_valid_checkpoint(path)``. The recipes
read checkpoints their own way (safely, and checked against the model) by putting a
function in its place while the Trainer is built.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

__all__ = ['composer_reads_checkpoints_with']

#: The private function of ``composer.utils.checkpoint`` that reads a checkpoint file.
READER = '_torch_load_with_validation'


@contextlib.contextmanager
def composer_reads_checkpoints_with(read: Callable[[str, Any], Any]) -> Iterator[None]:
    """Within it, Composer reads each checkpoint file as ``read(path, map_location)``.

    Composer's own validation hook, where it has one, still runs first, and ``read`` is
    given the path it returns, as Composer's own reader is. A version of
    Composer without the function this replaces is an error, not a silent no-op.
    """
    from composer.utils import checkpoint as composer_checkpoint

    original = getattr(composer_checkpoint, READER, None)
    if original is None:
        raise RuntimeError(f'composer.utils.checkpoint.{READER} is gone: this version of Composer is not one '
                           f'composer-se supports (mosaicml 0.32)')

    def load(path, map_location='cpu'):
        validate = getattr(composer_checkpoint, '_ensure_valid_checkpoint', None)
        if validate is not None:  # Composer's own opt-in validation hook, which returns the path to read
            path = validate(path)
        return read(path, map_location)

    setattr(composer_checkpoint, READER, load)
    try:
        yield
    finally:
        setattr(composer_checkpoint, READER, original)

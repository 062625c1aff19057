"""Reading checkpoint files without running code from them.

:func:`read_checkpoint` reads what ``torch.save`` wrote with ``torch.load(weights_only=True)``:
tensors, plain containers and the few value types Composer stores (numpy arrays and
dtypes of random states, ``datetime.timedelta``, torch's version string) are accepted,
anything else is refused, so nothing in the file can run code. The zip archive's
checksums are verified first, so a file cut short by a kill or damaged in a copy is
reported as such instead of being loaded.
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import zipfile
import zlib
from typing import Any, Optional

import numpy as np
import torch
from torch.torch_version import TorchVersion

from composer_se.checkpoints import CheckpointError

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

__all__ = ['SAFE_GLOBALS', 'read_checkpoint']

#: The non-tensor types a Composer checkpoint holds: numpy random states (arrays and
#: their dtypes), wall-clock durations and torch's version string.
SAFE_GLOBALS = [
    _reconstruct, np.ndarray, np.dtype, datetime.timedelta, TorchVersion,
    *(type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                  np.uint64, np.float16, np.float32, np.float64)),
]

def _damaged(name: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f'{name} is damaged or not a PyTorch checkpoint ({reason}). A file cut short while it was written '
        f'(a run killed while saving) or damaged in a copy looks like this; load an earlier checkpoint of the run '
        f'instead, or delete this one.',
    )


def read_checkpoint(path: str | os.PathLike, map_location: str = 'cpu', *, name: Optional[str] = None) -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True``.

    Args:
        path: the file.
        map_location: as for ``torch.load``. Default: ``'cpu'``.
        name: how messages refer to the file. Default: ``'checkpoint <path>'``.

    Raises:
        CheckpointError: the file does not exist, fails its zip checksums or cannot be
            unpickled (damaged), or holds objects other than tensors, plain containers
            and :data:`SAFE_GLOBALS` (unsafe: loading it could run code).
    """
    shown = name or f'checkpoint {path}'
    if not os.path.isfile(path):
        raise CheckpointError(f'{shown} does not exist or is not a file')
    try:
        if zipfile.is_zipfile(path):  # torch.save's format; torch.load itself skips the checksums
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise _damaged(shown, f'checksum mismatch in {bad}')
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise _damaged(shown, f'{type(error).__name__}: {error}') from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        found = re.search(r'GLOBAL ([\w.]+)', text) or re.search(r"got <class '([\w.]+)'>", text)
        if found is None:  # not a pickle of objects at all: garbage, or cut short
            # torch's own line reads "... WeightsUnpickler error: <what>", after advice meant for torch's own bugs
            line = next((line for line in text.splitlines() if 'WeightsUnpickler error:' in line), None)
            reason = (line.split('WeightsUnpickler error:', 1)[1].strip() if line else
                      text.splitlines()[0] if text else 'no detail')
            raise _damaged(shown, f'UnpicklingError: {reason}') from None
        raise CheckpointError(
            f'{shown} holds a reference to {found.group(1)}; loading it could run code from the file, so it is not '
            f'loaded (only tensors, plain containers and the numpy, datetime and torch-version values that Composer '
            f'stores are accepted). If you trust the file, re-save its weights as a state dict, '
            f'torch.save(model.state_dict(), PATH), and load that.',
        ) from None
    except Exception as error:  # torch reports damage as RuntimeError, EOFError, KeyError, ...
        reason = str(error).splitlines()[0] if str(error) else 'no detail'
        raise _damaged(shown, f'{type(error).__name__}: {reason}') from None

"""Checkpoints: read them without running code, check them against the model, resume after a kill.

Composer writes a checkpoint with ``torch.save`` as a plain dict,
``{'state': {'model': ..., 'optimizers': ..., 'algorithms': ...}, 'rng': ...}``.

- :func:`read_checkpoint` reads one with ``torch.load(weights_only=True)``: tensors,
  plain containers and the few value types Composer stores (numpy arrays and dtypes
  of random states, ``datetime.timedelta``, torch's version string) are accepted,
  anything else is refused, so nothing in the file can run code. The zip archive's
  checksums are verified first, so a file cut short by a kill or damaged in a copy is
  reported as such instead of being loaded.
- :func:`find_mismatch` compares a checkpoint's model state with a model, with
  attention to SE blocks (a ``<module>.se`` submodule that is a
  :class:`~composer_se.layers.SqueezeExcite2d`); :func:`check_model_state` turns the
  first difference into a :class:`CheckpointError` that names the layer, the two
  shapes and what to do.
- :func:`composer_loads_safely` makes Composer's checkpoint loader do both, before
  any tensor is copied into the model. The recipe runner (``composer_se.train``)
  builds its ``Trainer`` inside it.
- :func:`guard_se_loading` is what :class:`~composer_se.SqueezeExcite` installs on
  the network it changes while the Trainer loads a checkpoint: a ``load_state_dict``
  pre-hook that refuses a state dict whose SE blocks differ from the model's (a
  checkpoint saved without SE, or with other ``latent_channels``, ``min_channels``,
  ``include``/``exclude`` or ``placement``), before anything is copied.
- :func:`prepare_autoresume` makes a save folder that a killed run left behind
  resumable: checkpoint files newer than the one ``latest-rank0.pt`` points to are
  moved into ``<save_folder>/orphaned-checkpoints/``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import re
import weakref
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import nn
from torch.torch_version import TorchVersion

from composer_se.layers import SqueezeExcite2d

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

__all__ = [
    'CheckpointError',
    'Mismatch',
    'ORPHANS_FOLDER',
    'check_model_state',
    'checkpoint_files',
    'composer_loads_safely',
    'find_mismatch',
    'guard_se_loading',
    'prepare_autoresume',
    'read_checkpoint',
    'saved_squeeze_excite',
]

#: The non-tensor types a Composer checkpoint holds: numpy random states (arrays and
#: their dtypes), wall-clock durations and torch's version string.
SAFE_GLOBALS = [
    _reconstruct, np.ndarray, np.dtype, datetime.timedelta, TorchVersion,
    *(type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                                  np.uint64, np.float16, np.float32, np.float64)),
]

#: Composer's default checkpoint file name (``ep{epoch}-ba{batch}-rank{rank}.pt``) and latest link.
CHECKPOINT_NAME = re.compile(r'^ep(\d+)-ba(\d+)-rank(\d+)\.pt$')
LATEST_LINK = 'latest-rank0.pt'
#: Where :func:`prepare_autoresume` moves the checkpoint files that a resumed run must not see.
ORPHANS_FOLDER = 'orphaned-checkpoints'


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, unsafe to load or does not fit the model; the message says what to do."""


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
            reason = next((line.strip() for line in text.splitlines() if 'WeightsUnpickler error' in line),
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


def model_state_of(checkpoint: Any, name: str) -> Mapping[str, Any]:
    """The model's state dict inside a Composer checkpoint."""
    state = checkpoint.get('state') if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get('model'), Mapping):
        keys = ', '.join(map(str, list(checkpoint)[:5])) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f'{name} is not a Composer checkpoint: it has no state/model entry (found: {keys})')
    return state['model']


def saved_squeeze_excite(checkpoint: Any) -> Optional[str]:
    """The ``SqueezeExcite(...)`` call that a Composer checkpoint records, or ``None`` when it has none."""
    state = checkpoint.get('state') if isinstance(checkpoint, dict) else None
    algorithms = state.get('algorithms') if isinstance(state, dict) else None
    for entry in algorithms if isinstance(algorithms, list) else []:
        text = entry[1].get('repr', '') if isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(
            entry[1], dict) else ''
        if isinstance(text, str) and text.startswith('composer_se.SqueezeExcite('):
            return text[len('composer_se.'):]
    return None


# --- comparing a state dict with a model --------------------------------------------------------------------------


@dataclass
class Mismatch:
    """The first difference between a checkpoint's model state and a model.

    ``kind`` is ``'no_se_saved'`` (the model has SE blocks, the checkpoint none),
    ``'no_se_model'`` (the reverse), ``'se'`` (both have SE blocks, which differ) or
    ``'other'`` (any other entry). ``layer`` is the module at fault (for SE, the module
    that carries the block), ``key`` the first differing state-dict entry, ``detail``
    the difference in words, with the shapes, and ``count`` the number of differing
    entries.
    """

    kind: str
    layer: str
    key: str
    detail: str
    count: int


def _se_block_of(key: str, modules: Mapping[str, nn.Module]) -> Optional[str]:
    """The SE block (``'<host>.se'``) that state-dict entry ``key`` belongs to, or None.

    A ``se`` component counts when the model has no module of that name (the
    checkpoint's block) or has one of ours there; a model's own module called ``se``
    (torchvision's RegNet has some) is an ordinary layer.
    """
    parts = key.split('.')
    for index in range(len(parts) - 1):
        if parts[index] == 'se':
            block = '.'.join(parts[:index + 1])
            owner = modules.get(block)
            if owner is None or isinstance(owner, SqueezeExcite2d):
                return block
    return None


def _host(block: str) -> str:
    return block.rsplit('.', 1)[0] if '.' in block else '(the root module)'


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _block_summary(state: Mapping[str, Any], block: str) -> str:
    """``'0.se.fc1.weight (4, 16)'``: the block's first matrix, which shows its width."""
    entries = [(k, v) for k, v in state.items() if k.startswith(block + '.')]
    shown = next(((k, v) for k, v in entries if isinstance(v, torch.Tensor) and v.ndim >= 2), entries[0])
    return f'{shown[0]} {_shape(shown[1])}'


def find_mismatch(saved: Mapping[str, Any], model: nn.Module, *, partial: bool = False) -> Optional[Mismatch]:
    """The first difference between state dict ``saved`` and ``model``'s, or ``None``.

    With ``partial=False`` every entry and shape must agree. With ``partial=True`` (a
    state dict that may hold part of the model) only SE blocks count: where ``saved``
    holds a module's own entries it must hold the module's SE block, with the same
    shapes, and it may not bring an SE block to a module of the model that has none.
    Differences are looked for in the model's order, then in the checkpoint's; SE
    blocks come before other entries.
    """
    modules = dict(model.named_modules())
    expected = model.state_dict()
    blocks = {name for name, module in modules.items() if isinstance(module, SqueezeExcite2d)}
    saved_blocks = {block for block in (_se_block_of(k, modules) for k in saved) if block is not None}

    def covered(block: str) -> bool:  # does `saved` hold the entries of the block's host module?
        host = _host(block) + '.'
        return any(k.startswith(host) and _se_block_of(k, modules) is None for k in saved)

    differences: list[tuple[Optional[str], str, str]] = []  # (SE block or None, key, detail)
    for key, value in expected.items():
        block = _se_block_of(key, modules)
        if key in saved:
            if _shape(saved[key]) != _shape(value):
                differences.append((block, key, f'{key} is {_shape(saved[key])} in the checkpoint and {_shape(value)} '
                                                f'in the model'))
        elif block is not None and (not partial or covered(block)):
            detail = (f'the model has an SE block there ({_block_summary(expected, block)}) and the checkpoint has '
                      f'none' if block not in saved_blocks else f'{key} {_shape(value)} is missing from the checkpoint')
            differences.append((block, key, detail))
        elif block is None and not partial:
            differences.append((None, key, f'{key} {_shape(value)} is missing from the checkpoint'))
    for key, value in saved.items():
        if key in expected:
            continue
        block = _se_block_of(key, modules)
        if block is not None and (not partial or _host(block) in modules):
            detail = (f'the checkpoint has an SE block there ({_block_summary(saved, block)}) and the model has none'
                      if block not in blocks else f'the checkpoint has {key} {_shape(value)}, which the model lacks')
            differences.append((block, key, detail))
        elif block is None and not partial:
            differences.append((None, key, f'the checkpoint has {key} {_shape(value)}, which the model lacks'))
    if not differences:
        return None
    block, key, detail = next((d for d in differences if d[0] is not None), differences[0])
    if block is None:
        kind, layer = 'other', key.rsplit('.', 1)[0] if '.' in key else key
    else:
        kind, layer = 'se', _host(block)
        if blocks and not saved_blocks:
            kind = 'no_se_saved'
        elif saved_blocks and not blocks:
            kind = 'no_se_model'
    return Mismatch(kind, layer, key, detail, len(differences))


def _mismatch_message(mismatch: Mismatch, source: str, saved_call: Optional[str], current_call: Optional[str],
                      style: str) -> str:
    recipe = style == 'recipe'
    where = f'{source} does not fit the model: at layer {mismatch.layer}, {mismatch.detail} ({mismatch.count} ' \
            f'entries differ)'
    if mismatch.kind == 'no_se_saved':
        fix = ('To fine-tune that model with SE, pass the file as model.weights instead of checkpoint.load_path: its '
               'weights are loaded before SE is added, and the SE blocks start from their initialisation. If this '
               'is the save folder of a run without SE, give the SE run its own checkpoint.save_folder'
               if recipe else
               'To fine-tune that model with SE, load its weights into the model before the Trainer adds SE '
               '(model.load_state_dict(...)) and leave load_path unset; the SE blocks then start from their '
               'initialisation')
        return f'{where}. The checkpoint was saved without SqueezeExcite, and resuming needs the same model. {fix}.'
    if mismatch.kind == 'no_se_model':
        saved_as = saved_call or 'SqueezeExcite(...)'
        fix = (f'add algorithms.squeeze_excite with the arguments of {saved_as}' if recipe else
               f'add the algorithm: Trainer(..., algorithms=[{saved_as}])')
        return f'{where}. The checkpoint was saved with {saved_as} and this model has no SE blocks: {fix}.'
    if mismatch.kind == 'se':
        saved_as = f'saved with {saved_call}' if saved_call else 'saved with other SqueezeExcite arguments'
        now = f' and this run uses {current_call}' if current_call else ''
        fix = ('set algorithms.squeeze_excite to the arguments of the run that saved it, or give a different run its '
               'own checkpoint.save_folder' if recipe else
               'build the Trainer with the SqueezeExcite arguments of the run that saved it')
        return (f'{where}. The checkpoint was {saved_as}{now} (latent_channels sets the shapes; min_channels, '
                f'include, exclude and placement decide which layers have SE blocks). To load it, {fix}.')
    fix = ('use the model settings (model.name, model.num_classes) of the run that saved it' if recipe else
           'build the same model as the run that saved it')
    return f'{where}. The checkpoint was saved from a different model; {fix}.'


def check_model_state(saved: Mapping[str, Any], model: nn.Module, *, source: str, saved_call: Optional[str] = None,
                      current_call: Optional[str] = None, partial: bool = False, style: str = 'trainer') -> None:
    """Raises :class:`CheckpointError` naming the first difference found by :func:`find_mismatch`.

    ``source`` names the checkpoint in the message; ``saved_call`` and
    ``current_call`` are the ``SqueezeExcite(...)`` calls of the run that saved it and
    of this one, when known; ``style`` (``'recipe'`` or ``'trainer'``) picks how the
    fix is worded.
    """
    mismatch = find_mismatch(saved, model, partial=partial)
    if mismatch is not None:
        raise CheckpointError(_mismatch_message(mismatch, source, saved_call, current_call, style))


@contextlib.contextmanager
def composer_loads_safely(model: nn.Module, *, source: str, current_call: Optional[str] = None,
                          style: str = 'recipe') -> Iterator[None]:
    """Within it, Composer reads checkpoints with :func:`read_checkpoint` and checks them against ``model``.

    Build the ``Trainer`` inside it. Composer's loader (``torch.load`` with
    ``weights_only=False``) is replaced by :func:`read_checkpoint`, and the
    checkpoint's model state must match ``model`` entry for entry
    (:func:`check_model_state`) before Composer copies anything into it. ``source``
    names the checkpoint in messages (Composer reads a temporary copy of it).
    """
    from composer.utils import checkpoint as composer_checkpoint

    original = getattr(composer_checkpoint, '_torch_load_with_validation', None)
    if original is None:
        raise RuntimeError('composer.utils.checkpoint._torch_load_with_validation is gone: this version of Composer '
                           'is not one composer-se supports (mosaicml 0.32)')

    def load(path, map_location='cpu'):
        validate = getattr(composer_checkpoint, '_ensure_valid_checkpoint', None)
        if validate is not None:  # Composer's own opt-in validation hook
            validate(path)
        checkpoint = read_checkpoint(path, map_location, name=source)
        check_model_state(model_state_of(checkpoint, source), model, source=source,
                          saved_call=saved_squeeze_excite(checkpoint), current_call=current_call, style=style)
        return checkpoint

    composer_checkpoint._torch_load_with_validation = load
    try:
        yield
    finally:
        composer_checkpoint._torch_load_with_validation = original


# --- the SqueezeExcite algorithm's guard ---------------------------------------------------------------------------

_guards: 'weakref.WeakKeyDictionary[nn.Module, Any]' = weakref.WeakKeyDictionary()  # network -> hook handle
_saved_call: list[str] = []  # the SqueezeExcite(...) of the checkpoint Composer is loading, when it records one


def note_saved_call(call: str) -> None:
    """Remembers the ``SqueezeExcite(...)`` that the checkpoint being loaded records, for the guard's message."""
    _saved_call[:] = [call]


def guard_se_loading(network: nn.Module, current_call: Optional[str] = None, *, enable: bool = True) -> None:
    """Makes ``network.load_state_dict`` refuse state dicts whose SE blocks differ from ``network``'s.

    :class:`~composer_se.SqueezeExcite` enables it at ``Event.BEFORE_LOAD`` and
    disables it at ``Event.AFTER_LOAD``, the two events around the Trainer's checkpoint
    loading (``load_path``, ``autoresume``), so it guards exactly what Composer loads.
    The check is a ``load_state_dict`` pre-hook, so it runs before anything is copied:
    the model is left as it was. It compares with :func:`find_mismatch`
    (``partial=True``): a state dict that holds a module's weights must hold that
    module's SE block, with the same shapes, and may not bring SE blocks where the
    network has none. ``current_call`` is the ``SqueezeExcite(...)`` that built the
    blocks, for messages. Enabling twice adds one hook.
    """
    _saved_call.clear()
    handle = _guards.pop(network, None)
    if handle is not None:
        handle.remove()
    if enable:
        _guards[network] = network.register_load_state_dict_pre_hook(_SEGuard(current_call))


class _SEGuard:
    """The pre-hook of :func:`guard_se_loading` (a class, so that a guarded model can still be pickled)."""

    def __init__(self, current_call: Optional[str]):
        self.current_call = current_call

    def __call__(self, module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        saved = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        saved_call = _saved_call[0] if _saved_call else None
        _saved_call.clear()
        check_model_state(saved, module, source='the state dict loaded into this SE model', saved_call=saved_call,
                          current_call=self.current_call, partial=True, style='trainer')


# --- resuming after a kill -----------------------------------------------------------------------------------------


def checkpoint_files(folder: str | os.PathLike) -> list[tuple[int, str]]:
    """``(batch, file name)`` of the checkpoint files Composer wrote in ``folder``, oldest first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(2)), name) for name in os.listdir(folder) if (m := CHECKPOINT_NAME.match(name))]
    return sorted(found)


def _intact(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError):
        return False


def prepare_autoresume(folder: str | os.PathLike) -> tuple[Optional[str], list[str]]:
    """Makes save folder ``folder`` resumable by Composer's autoresume; call it on one process only.

    Composer writes ``ep{E}-ba{B}-rank0.pt``, then points ``latest-rank0.pt`` at it.
    A run killed in between leaves a checkpoint file newer than the link (complete,
    or cut short), and Composer's resumed run then stops, as that file "may conflict
    with a future checkpoint". So:

    - with a link: every checkpoint file newer than its target is moved into
      ``folder/orphaned-checkpoints/`` (never deleted);
    - without a link (killed between Composer removing and re-creating it, or during
      the first save): the link is re-created to the newest checkpoint whose zip
      checksums pass, and newer files are moved aside; with none intact, all are moved
      aside and the run starts over.

    A link to a file that does not exist is an error. A link made by hand to a file
    of another name, or a plain file in the link's place, is left as it is (Composer
    loads what it points to).

    Returns:
        The checkpoint the run will resume from (``None`` for a fresh start) and one
        line per thing done, for the user.

    Raises:
        CheckpointError: ``latest-rank0.pt`` points to a file that does not exist.
    """
    folder = Path(folder)
    files = checkpoint_files(folder)
    link = folder / LATEST_LINK
    notes: list[str] = []
    if link.is_symlink():
        target = folder / os.readlink(link)
        if not target.is_file():
            raise CheckpointError(
                f'{link} points to {target}, which does not exist, so autoresume cannot continue the run. Restore '
                f'that file, or delete {link} to start the run over (its other checkpoints are then set aside).',
            )
        match = CHECKPOINT_NAME.match(target.name)
        if match is None or target.parent.resolve() != folder.resolve():
            return str(target), notes
        resumed_batch, resumed = int(match.group(2)), str(target)
    elif link.exists():  # a plain file where the link belongs: Composer loads it as it is
        return str(link), notes
    else:
        resumed_batch, resumed = -1, None
        for batch, name in reversed(files):
            if name.endswith('-rank0.pt') and _intact(folder / name):
                os.symlink(name, link)
                resumed_batch, resumed = batch, str(folder / name)
                notes.append(f'{link} was missing; it now points to {name}, the newest intact checkpoint')
                break
    orphans = [name for batch, name in files if batch > resumed_batch]
    if orphans:
        aside = folder / ORPHANS_FOLDER
        aside.mkdir(exist_ok=True)
        for name in orphans:
            destination, copy = aside / name, 1
            while destination.exists():
                destination, copy = aside / f'{name}.{copy}', copy + 1
            os.replace(folder / name, destination)
        notes.append(f'moved {len(orphans)} checkpoint file(s) newer than the one autoresume continues from, left by '
                     f'a run killed while saving, into {aside}: {", ".join(orphans)}')
    return resumed, notes

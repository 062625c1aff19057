"""Comparing a state dict with an SE model: the first difference, in words.

:func:`find_mismatch` compares a state dict (a checkpoint's model state, or part of
one) with a model, with attention to SE blocks (a ``<module>.se`` submodule that is a
:class:`~composer_se.layers.SqueezeExcite2d`); :func:`check_model_state` turns the first
difference into a :class:`CheckpointError` that names the layer, the two shapes and
what to do. The advice speaks to a user of Composer's ``Trainer``
(:data:`TRAINER_WORDING`); the recipe runner passes its own wording.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import nn

from composer_se.layers import SqueezeExcite2d

__all__ = ['TRAINER_WORDING', 'CheckpointError', 'Mismatch', 'Wording', 'advice', 'check_model_state', 'describe',
           'find_mismatch']


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, unsafe to load or does not fit the model; the message says what to do."""


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


#: How messages name the root module, where it is itself a block's host (a lone conv with SE).
ROOT_MODULE = '(the root module)'


def _host(block: str) -> str:
    return block.rsplit('.', 1)[0] if '.' in block else ROOT_MODULE


def _prefix(host: str) -> str:
    """The prefix of the host module's state dict keys: ``'layer1.0.conv1.'``, or ``''`` for the root module."""
    return '' if host == ROOT_MODULE else host + '.'


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _block_summary(state: Mapping[str, Any], block: str) -> str:
    """``'0.se.fc1.weight (4, 16)'``: the block's first matrix, whose shape shows its latent_channels."""
    entries = [(k, v) for k, v in state.items() if k.startswith(block + '.')]
    shown = next(((k, v) for k, v in entries if isinstance(v, torch.Tensor) and v.ndim >= 2), entries[0])
    return f'{shown[0]} {_shape(shown[1])}'


def find_mismatch(saved: Mapping[str, Any], model: nn.Module, *, partial: bool = False) -> Optional[Mismatch]:
    """The first difference between state dict ``saved`` and ``model``'s, or ``None``.

    With ``partial=False`` every entry and shape must agree. With ``partial=True`` (a
    state dict that may hold part of the model) only SE blocks count: where ``saved``
    holds a module's own entries it must hold the module's SE block, with the same
    shapes, and it may not bring an SE block to a module of the model that has none.
    Differences are looked for in the model's order, then in the checkpoint's. The first
    difference outside SE blocks is reported where there is one: a model of another
    architecture or other channel counts differs in its own layers, and its SE blocks
    differ only as a consequence. SE is named only where the two differ in their SE
    blocks alone.
    """
    modules = dict(model.named_modules())
    expected = model.state_dict()
    blocks = {name for name, module in modules.items() if isinstance(module, SqueezeExcite2d)}
    saved_blocks = {block for block in (_se_block_of(k, modules) for k in saved) if block is not None}

    def covered(block: str) -> bool:  # does `saved` hold the entries of the block's host module?
        host = _prefix(_host(block))
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
    hosts = {*modules, ROOT_MODULE}  # where a block of the checkpoint may sit in the model
    for key, value in saved.items():
        if key in expected:
            continue
        block = _se_block_of(key, modules)
        if block is not None and (not partial or _host(block) in hosts):
            detail = (f'the checkpoint has an SE block there ({_block_summary(saved, block)}) and the model has none'
                      if block not in blocks else f'the checkpoint has {key} {_shape(value)}, which the model lacks')
            differences.append((block, key, detail))
        elif block is None and not partial:
            differences.append((None, key, f'the checkpoint has {key} {_shape(value)}, which the model lacks'))
    if not differences:
        return None
    block, key, detail = next((d for d in differences if d[0] is None), differences[0])
    if block is None:
        kind, layer = 'other', key.rsplit('.', 1)[0] if '.' in key else key
    else:
        kind, layer = 'se', _host(block)
        if blocks and not saved_blocks:
            kind = 'no_se_saved'
        elif saved_blocks and not blocks:
            kind = 'no_se_model'
    return Mismatch(kind, layer, key, detail, len(differences))


def describe(mismatch: Mismatch, source: str) -> str:
    """Where ``source`` and the model differ, in one sentence without advice."""
    return (f'{source} does not fit the model: at layer {mismatch.layer}, {mismatch.detail} ({mismatch.count} entries '
            f'differ)')


@dataclass(frozen=True)
class Wording:
    """What to tell the user for each kind of :class:`Mismatch`, in the terms of the API they use.

    ``no_se_model`` and ``se`` are templates: ``{saved}`` is the ``SqueezeExcite(...)`` the
    checkpoint records.
    """

    no_se_saved: str  #: how to fine-tune a model saved without SE
    no_se_model: str  #: how to add the algorithm the checkpoint was saved with
    se: str  #: how to load a checkpoint saved with other SE arguments
    other: str  #: how to load a checkpoint of another model


#: For a user of Composer's ``Trainer``, naming its arguments.
TRAINER_WORDING = Wording(
    no_se_saved='load its weights into the model before the Trainer adds SE (model.load_state_dict(...)) and leave '
    'load_path unset; the SE blocks then start from their initialisation',
    no_se_model='add the algorithm: Trainer(..., algorithms=[{saved}])',
    se='build the Trainer with the SqueezeExcite arguments of the run that saved it',
    other='build the same model as the run that saved it',
)


def advice(mismatch: Mismatch, saved_call: Optional[str], current_call: Optional[str], wording: Wording) -> str:
    """What the user should do about ``mismatch``, after :func:`describe`."""
    if mismatch.kind == 'no_se_saved':
        return (f'The checkpoint was saved without SqueezeExcite, and resuming needs the same model. To fine-tune that '
                f'model with SE, {wording.no_se_saved}.')
    if mismatch.kind == 'no_se_model':
        saved_as = saved_call or 'SqueezeExcite(...)'
        return (f'The checkpoint was saved with {saved_as} and this model has no SE blocks: '
                f'{wording.no_se_model.format(saved=saved_as)}.')
    if mismatch.kind == 'se' and saved_call is not None and saved_call == current_call:
        return (f'The checkpoint was saved with the SqueezeExcite arguments of this run, so the models differ '
                f'before SE was added; {wording.other}.')
    if mismatch.kind == 'se':
        saved_as = f'saved with {saved_call}' if saved_call else 'saved with other SqueezeExcite arguments'
        now = f' and this run uses {current_call}' if current_call else ''
        return (f'The checkpoint was {saved_as}{now} (latent_channels sets the shapes; min_channels, include, exclude '
                f'and placement decide which layers have SE blocks). To load it, {wording.se}.')
    return f'The checkpoint was saved from a different model; {wording.other}.'


def check_model_state(saved: Mapping[str, Any], model: nn.Module, *, source: str, saved_call: Optional[str] = None,
                      current_call: Optional[str] = None, partial: bool = False,
                      wording: Wording = TRAINER_WORDING) -> None:
    """Raises :class:`CheckpointError` naming the first difference found by :func:`find_mismatch`.

    ``source`` names the checkpoint in the message; ``saved_call`` and
    ``current_call`` are the ``SqueezeExcite(...)`` calls of the run that saved it and
    of this one, when known; ``wording`` says what to do in the caller's terms.
    """
    mismatch = find_mismatch(saved, model, partial=partial)
    if mismatch is not None:
        raise CheckpointError(f'{describe(mismatch, source)}. {advice(mismatch, saved_call, current_call, wording)}')

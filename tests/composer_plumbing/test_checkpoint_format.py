"""composer_se/composer_plumbing/checkpoint_format.py: where a Composer checkpoint keeps the model and its algorithms."""

from __future__ import annotations

import pytest
import torch

from composer_se.checkpoints import CheckpointError
from composer_se.composer_plumbing.checkpoint_format import (CLASSIFIER_PREFIX, is_composer_checkpoint, model_state_of,
                                                             saved_squeeze_excite)

OURS = ('SqueezeExcite', {'repr': 'composer_se.SqueezeExcite(latent_channels=4)'})
BLUR = ('BlurPool', {'repr': 'BlurPool(replace_convs=True)'})


def checkpoint_with(algorithms=None) -> dict:
    """What ``torch.save`` of Composer's State holds, cut to the entries read here."""
    state = {'model': {CLASSIFIER_PREFIX + '0.weight': torch.zeros(3, 4)}}
    if algorithms is not None:
        state['algorithms'] = algorithms
    return {'state': state, 'rng': []}


def test_a_composer_checkpoint_is_one_with_a_model_state_dict_under_state():
    assert is_composer_checkpoint(checkpoint_with([OURS]))
    assert is_composer_checkpoint({'state': {'model': {}}})
    for other in ({'0.weight': torch.zeros(1)}, {'state': {'model': 'weights'}}, {'state': []}, [checkpoint_with()], None):
        assert not is_composer_checkpoint(other)


def test_model_state_of_a_file_that_is_not_a_composer_checkpoint_names_what_it_found():
    checkpoint = checkpoint_with()
    assert model_state_of(checkpoint, 'c') is checkpoint['state']['model']
    with pytest.raises(CheckpointError, match=r'^weights.pt is not a Composer checkpoint: it has no state/model entry '
                                              r'\(found: 0.weight, 0.bias\)$'):
        model_state_of({'0.weight': torch.zeros(1), '0.bias': torch.zeros(1)}, 'weights.pt')
    with pytest.raises(CheckpointError, match=r'\(found: list\)$'):
        model_state_of([1, 2], 'weights.pt')
    with pytest.raises(CheckpointError, match=r'\(found: state\)$'):
        model_state_of({'state': {'model': 'not a state dict'}}, 'weights.pt')


def test_saved_squeeze_excite_finds_our_call_and_nothing_else():
    assert saved_squeeze_excite(checkpoint_with([BLUR, OURS])) == 'SqueezeExcite(latent_channels=4)'
    composers_own = ('SqueezeExcite', {'repr': 'SqueezeExcite(latent_channels=64)'})
    assert saved_squeeze_excite(checkpoint_with([composers_own])) is None
    assert saved_squeeze_excite(checkpoint_with([BLUR])) is None
    assert saved_squeeze_excite(checkpoint_with([])) is None
    assert saved_squeeze_excite(checkpoint_with()) is None
    assert saved_squeeze_excite(checkpoint_with([('SqueezeExcite', 'composer_se.SqueezeExcite()')])) is None
    assert saved_squeeze_excite({'weight': torch.zeros(1)}) is None
    assert saved_squeeze_excite([OURS]) is None

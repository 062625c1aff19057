"""composer_se/composer_plumbing/checkpoint_guard.py: the SqueezeExcite algorithm's checkpoint guard, through
Composer's Trainer."""

from __future__ import annotations

import re
from pathlib import Path

import composer.algorithms
import pytest
import torch
from composer import Trainer
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composer_se import SqueezeExcite
from composer_se.checkpoints import CheckpointError
from tests.helpers import learnable_data, make_trainer, small_cnn


def test_trainer_checkpoint_with_other_se_blocks_is_refused_and_the_model_is_untouched(tmp_path):
    """The Trainer API: SqueezeExcite's guard refuses before anything is copied into the model."""
    saved = make_trainer([SqueezeExcite(latent_channels=4, min_channels=16)], save_folder=str(tmp_path / 'se'),
                         save_interval='1ep', max_duration='1ep')
    saved.fit()
    plain = make_trainer([], save_folder=str(tmp_path / 'plain'), save_interval='1ep', max_duration='1ep')
    plain.fit()
    cases = [
        (8, 16, 'se', 'at layer 0, 0.se.fc1.weight is (4, 16) in the checkpoint and (8, 16) in the model'),
        (4, 32, 'se', 'at layer 0, the checkpoint has an SE block there (0.se.fc1.weight (4, 16)) and the model has '
         'none'),
        (4, 16, 'plain', 'at layer 0, the model has an SE block there (0.se.fc1.weight (4, 16)) and the checkpoint '
         'has none'),
    ]
    for latent, minimum, source, message in cases:
        model = ComposerClassifier(small_cnn(), num_classes=4)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CheckpointError, match=re.escape(message)) as info:
            Trainer(model=model, train_dataloader=DataLoader(TensorDataset(*learnable_data()), batch_size=32),
                    max_duration='1ep', algorithms=[SqueezeExcite(latent_channels=latent, min_channels=minimum)],
                    load_path=str(tmp_path / source / 'ep1-ba8-rank0.pt'), device='cpu', progress_bar=False)
        after = model.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())  # not half-loaded
        # The refused load never reaches Event.AFTER_LOAD: the guard removed itself all the same.
        assert not model.module._load_state_dict_pre_hooks
        assert composer.algorithms.composer_se.SqueezeExcite is SqueezeExcite
        if source == 'se':
            assert 'The checkpoint was saved with SqueezeExcite(latent_channels=4, min_channels=16' in str(info.value)
        else:
            assert 'load its weights into the model before the Trainer adds SE' in str(info.value)


def test_a_checkpoint_of_another_width_names_the_layer_that_differs_not_se(tmp_path):
    """The same SqueezeExcite arguments, a first conv 24 wide instead of 16: the error names the conv's own weight
    with both shapes and says the models differ; the SE blocks, which differ only as a consequence, are not blamed."""
    algorithm = dict(latent_channels=4, min_channels=16)
    make_trainer([SqueezeExcite(**algorithm)], save_folder=str(tmp_path), save_interval='1ep', max_duration='1ep').fit()
    wider = small_cnn()
    wider[0], wider[1], wider[3][0] = nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.Conv2d(24, 32, 3)
    with pytest.raises(CheckpointError) as info:
        Trainer(model=ComposerClassifier(wider, num_classes=4), max_duration='1ep', device='cpu', progress_bar=False,
                train_dataloader=DataLoader(TensorDataset(*learnable_data()), batch_size=32),
                algorithms=[SqueezeExcite(**algorithm)], load_path=str(tmp_path / 'ep1-ba8-rank0.pt'))
    message = str(info.value)
    assert 'at layer 0, 0.weight is (16, 3, 3, 3) in the checkpoint and (24, 3, 3, 3) in the model' in message
    assert 'The checkpoint was saved from a different model; build the same model as the run that saved it' in message
    assert 'SqueezeExcite(' not in message


def test_a_load_that_fails_elsewhere_leaves_no_wrapper_behind_the_next_guard(tmp_path):
    """A load that stops before Event.AFTER_LOAD for another reason (here a missing file) keeps its guard's wrapper
    registered; the next guard wraps Composer's factory beneath it and restores that factory, not the stale wrapper."""
    with pytest.raises(FileNotFoundError):
        make_trainer([SqueezeExcite(latent_channels=4, min_channels=16)], load_path=str(tmp_path / 'missing.pt'))
    assert composer.algorithms.composer_se.SqueezeExcite is not SqueezeExcite  # the failed load's guard is still on
    saved = make_trainer([SqueezeExcite(latent_channels=4, min_channels=16)], save_folder=str(tmp_path / 'se'),
                         save_interval='1ep', max_duration='1ep')
    saved.fit()
    make_trainer([], load_path=str(tmp_path / 'se' / 'ep1-ba8-rank0.pt'))  # adds, guards and loads our algorithm
    assert composer.algorithms.composer_se.SqueezeExcite is SqueezeExcite


#: Checkpoints saved by earlier code, each by ``make_trainer([SqueezeExcite(latent_channels=4, min_channels=16)],
#: groups=True)`` after one epoch: by version 0.1.0 (commit 647d801, before the package was first reorganised), and
#: by commit d63d828 (main on 2026-12-03, before the Composer plumbing moved into composer_se/composer_plumbing/).
EARLIER_CHECKPOINTS = ['se_small_cnn_v0.1.0.pt', 'se_small_cnn_d63d828.pt']


@pytest.mark.parametrize('name', EARLIER_CHECKPOINTS)
def test_a_checkpoint_saved_by_earlier_code_still_loads(name):
    path = Path(__file__).parents[1] / 'data' / name
    saved = torch.load(path, weights_only=False)
    assert saved['state']['algorithms'][0][1]['repr'] == (
        "composer_se.SqueezeExcite(latent_channels=4, min_channels=16, include=(), exclude=(), init='default', "
        "placement='conv', fold_batchnorm=True)")
    trainer = make_trainer([SqueezeExcite(latent_channels=4, min_channels=16)], groups=True, load_path=str(path))
    assert int(trainer.state.timestamp.epoch) == 1
    state = trainer.state.model.state_dict()
    assert state.keys() == saved['state']['model'].keys()
    assert all(torch.equal(state[key], value) for key, value in saved['state']['model'].items())
    trainer.fit()  # and it trains on
    assert int(trainer.state.timestamp.epoch) == 2

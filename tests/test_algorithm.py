"""composer_se/algorithm.py: the SqueezeExcite Composer algorithm, outside a Trainer."""

from __future__ import annotations

import logging
from unittest.mock import Mock

import pytest
import torch
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Algorithm, Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger
from composer.models import ComposerClassifier

import composer_se
from composer_se import SqueezeExcite, SqueezeExciteConv2d
from tests.helpers import no_decay_groups, small_cnn


def make_state(optimizers=None) -> State:
    model = ComposerClassifier(small_cnn(), num_classes=4)
    if optimizers == 'groups':
        optimizers = torch.optim.SGD(no_decay_groups(model), lr=0.1)
    return State(model=model, rank_zero_seed=0, run_name='test', device=DeviceCPU(), optimizers=optimizers)


def test_is_a_composer_algorithm_required_on_load():
    algorithm = SqueezeExcite()
    assert isinstance(algorithm, Algorithm)
    assert SqueezeExcite.required_on_load() is True
    assert (algorithm.latent_channels, algorithm.min_channels, algorithm.init) == (64, 128, 'default')


@pytest.mark.parametrize('event', list(Event))
def test_matches_init_fit_and_eval_start_and_checkpoint_loading(event):
    expected = (Event.INIT, Event.FIT_START, Event.EVAL_START, Event.BEFORE_LOAD, Event.AFTER_LOAD)
    assert SqueezeExcite().match(event, make_state()) == (event in expected)


@pytest.mark.parametrize('value', [1, 'yes', None])
def test_fold_batchnorm_must_be_a_bool(value):
    with pytest.raises(ValueError, match=f'fold_batchnorm must be True or False, got {value!r}'):
        SqueezeExcite(fold_batchnorm=value)


def test_apply_does_surgery_with_the_states_optimizers_and_logs(caplog):
    state = make_state('groups')
    logger = Mock(spec=Logger)
    algorithm = SqueezeExcite(latent_channels=4, min_channels=16)
    with caplog.at_level(logging.INFO, logger='composer_se'):
        algorithm.apply(Event.INIT, state, logger)

    convs = [n for n, m in state.model.named_modules() if isinstance(m, SqueezeExciteConv2d)]
    assert convs == ['module.0', 'module.3.0']
    added = (2 * 16 * 4 + 4 + 16) + (2 * 32 * 4 + 4 + 32)  # 2CL + L + C for C = 16 and 32, L = 4
    logger.log_hyperparameters.assert_called_once_with({
        'squeeze_excite/num_squeeze_excite_layers': 2,
        'squeeze_excite/num_params_added': added,
    })
    records = [r for r in caplog.records if r.name == 'composer_se.algorithm']
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert f'added 2 SE blocks ({added:,} parameters) to ComposerClassifier' in records[0].getMessage()
    opt_ids = {id(p) for g in state.optimizers[0].param_groups for p in g['params']}
    assert {id(p) for p in state.model.parameters()} == opt_ids


def test_apply_with_nothing_to_do_warns_as_composer_does_and_logs_zero():
    """In a Trainer, "no effect" is Composer's NoEffectWarning (not the functional API's); other warnings pass as
    they are."""
    state = make_state()
    logger = Mock(spec=Logger)
    with pytest.warns(NoEffectWarning, match='largest out_channels in the model is 32') as caught:
        SqueezeExcite(min_channels=512).apply(Event.INIT, state, logger)
    assert [w.category for w in caught] == [NoEffectWarning]
    logger.log_hyperparameters.assert_called_once_with({
        'squeeze_excite/num_squeeze_excite_layers': 0,
        'squeeze_excite/num_params_added': 0,
    })


def test_other_surgery_warnings_reach_the_trainer_as_they_are():
    state = make_state()
    with pytest.warns(UserWarning, match='their hidden layer is wider than what it squeezes') as caught:
        SqueezeExcite(latent_channels=1000, min_channels=16).apply(Event.INIT, state, Mock(spec=Logger))
    assert [w.category for w in caught] == [UserWarning]


def test_repr_shows_hyperparameters_and_rebuilds_the_algorithm():
    algorithm = SqueezeExcite(latent_channels=0.25, min_channels=256.0, include='layer3', exclude=['*.downsample*'],
                              init='identity')
    text = repr(algorithm)
    assert text == ("composer_se.SqueezeExcite(latent_channels=0.25, min_channels=256, include=('layer3',), "
                    "exclude=('*.downsample*',), init='identity', placement='conv', fold_batchnorm=True)")
    rebuilt = eval(text, {'composer_se': composer_se})
    assert type(rebuilt) is SqueezeExcite and repr(rebuilt) == text
    assert algorithm.state_dict() == {'repr': text}


def test_numpy_scalars_become_plain_numbers_in_the_repr():
    np = pytest.importorskip('numpy')
    algorithm = SqueezeExcite(latent_channels=np.float64(0.25), min_channels=np.int64(64))
    assert repr(algorithm).startswith('composer_se.SqueezeExcite(latent_channels=0.25, min_channels=64,')
    assert type(SqueezeExcite(latent_channels=np.int64(32)).latent_channels) is int


def test_patterns_name_the_network_inside_a_composer_classifier():
    import torchvision
    model = ComposerClassifier(torchvision.models.resnet18(num_classes=4), num_classes=4)
    state = State(model=model, rank_zero_seed=0, run_name='test', device=DeviceCPU(),
                  optimizers=torch.optim.SGD(model.parameters(), lr=0.1))
    logger = Mock(spec=Logger)
    SqueezeExcite(latent_channels=8, min_channels=1, include=['layer4'], exclude='*.downsample*').apply(
        Event.INIT, state, logger)
    convs = [n for n, m in state.model.named_modules() if isinstance(m, SqueezeExciteConv2d)]
    assert convs == ['module.layer4.0.conv1', 'module.layer4.0.conv2', 'module.layer4.1.conv1', 'module.layer4.1.conv2']

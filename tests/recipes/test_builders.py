"""composer_se/recipes/builders.py: the algorithms, optimizers, schedulers and loggers a recipe names."""

from __future__ import annotations

import pytest
from composer.core import Callback

from composer_se.recipes.builders import ALGORITHMS, build_algorithms
from composer_se.recipes.config import load_recipe
from composer_se.recipes.run import build_trainer
from tests.recipes.helpers import DEMO, SHRINK, fit, se_blocks


def test_composes_with_composers_algorithms(tmp_path):
    algorithms = [
        'algorithms.channels_last={}', 'algorithms.label_smoothing.smoothing=0.1', 'algorithms.blurpool={}',
        'algorithms.ema={}', 'algorithms.mixup.alpha=0.2', 'algorithms.progressive_resizing={}',
        'algorithms.selective_backprop={}'
    ]
    trainer = fit(DEMO, 'model.name=resnet20', *algorithms)
    names = [type(a).__name__ for a in trainer.state.algorithms]
    assert names == ['ChannelsLast', 'LabelSmoothing', 'BlurPool', 'EMA', 'MixUp', 'ProgressiveResizing',
                     'SelectiveBackprop', 'SqueezeExcite']  # SE last: after BlurPool has replaced the strided convs
    blocks = se_blocks(trainer)
    assert len(blocks) == 7 and 'module.layer3.0.conv1.conv' in blocks  # inside BlurPool's BlurConv2d


class _LearningRates(Callback):
    def __init__(self):
        self.seen = []

    def batch_start(self, state, logger):
        self.seen.append(state.optimizers[0].param_groups[0]['lr'])


def test_nesterov_momentum_and_the_linear_decay_schedule(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(load_recipe(DEMO, [
        *SHRINK, 'model.name=resnet20', 'optimizer.name=sgd', 'optimizer.nesterov=true', 'optimizer.lr=0.1',
        'scheduler.name=linear_decay_with_warmup', 'scheduler.t_warmup=0.25dur', 'max_duration=8ba',
        'data.synthetic_train_samples=64'
    ]))
    rates = _LearningRates()
    trainer.state.callbacks.append(rates)
    trainer.fit()
    assert trainer.state.optimizers[0].param_groups[0]['nesterov'] is True
    # Up to the peak over 2 of the 8 batches, then down towards 0 at batch 8; Composer steps the schedule after
    # each batch, so batch t + 1 trains with the factor of time t, and batch 0 with that of time 0. Where the
    # warm-up would give 0 (time 0), the recipe's scheduler gives the factor of time 1.
    factor = [t / 2 if t < 2 else 1 - (t - 2) / 6 for t in range(8)]
    factor[0] = factor[1]
    assert rates.seen == pytest.approx([0.1 * factor[0]] + [0.1 * f for f in factor[:7]])


def test_every_registered_algorithm_builds():
    required = {
        'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1.0},
        'stochastic_depth': {'target_layer_name': 'ResNetBottleneck'},
    }
    built = build_algorithms({name: required.get(name, {}) for name in ALGORITHMS})
    assert sorted(type(a).__name__ for a in built) == sorted(cls.__name__ for cls in ALGORITHMS.values())
    assert type(built[-1]).__name__ == 'SqueezeExcite'
    assert build_algorithms({'squeeze_excite': None}) == []


def test_file_and_tensorboard_loggers_write(tmp_path):
    fit(DEMO, 'model.name=resnet20', f'loggers.file={tmp_path}/log-{{rank}}.txt', f'loggers.tensorboard={tmp_path}/tb')
    assert 'squeeze_excite/num_squeeze_excite_layers' in (tmp_path / 'log-0.txt').read_text()
    assert list((tmp_path / 'tb').rglob('events.out.tfevents.*'))

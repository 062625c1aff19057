"""composer_se/callbacks.py: GateMonitor in a real Trainer, what it logs, when, and that the steps it does not log
run as without it."""

from __future__ import annotations

import pytest
import torch
from composer import Callback, Trainer
from composer.core import DataSpec
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from composer_se import GateMonitor, SqueezeExcite
from composer_se.gates import _Tally
from composer_se.layers import SqueezeExcite2d
from tests.helpers import learnable_data, make_trainer, small_cnn

STATISTICS = ('mean', 'input_dependence', 'max_input_dependence', 'near_zero', 'near_one')


class CountForwards(Callback):
    """Counts the network's forward passes, and fails if an SE block has a hook during a training step's forward."""

    def __init__(self):
        self.forwards = 0

    def fit_start(self, state, logger):
        state.model.module.register_forward_pre_hook(lambda *_: setattr(self, 'forwards', self.forwards + 1))

    def after_forward(self, state, logger):
        assert not any(m._forward_hooks for m in state.model.modules() if isinstance(m, SqueezeExcite2d))


def run(callbacks: list) -> tuple:
    x, y = learnable_data(64, seed=1)
    counter, memory = CountForwards(), InMemoryLogger()
    torch.manual_seed(0)  # the model is built before the Trainer seeds
    trainer = make_trainer([SqueezeExcite(latent_channels=4, min_channels=16)], max_duration='2ep',
                           callbacks=[counter, *callbacks], loggers=[memory], eval_interval='1ep',
                           eval_dataloader=DataLoader(TensorDataset(x, y), batch_size=16))
    trainer.fit()
    return trainer, counter.forwards, memory.data


def test_the_monitor_logs_every_block_at_its_interval_and_each_evaluation_and_changes_no_step():
    trainer, forwards, logged = run([GateMonitor(interval='4ba', eval_batches=3)])
    plain, plain_forwards, _ = run([])
    blocks = ['module.0.se', 'module.3.0.se']  # small_cnn's two convs with at least 16 outputs
    for label in ('train', 'eval'):
        for block in blocks:
            for statistic in STATISTICS:
                assert f'se_gates/{label}/{block}/{statistic}' in logged
    counts = {key: len(values) for key, values in logged.items() if key.startswith('se_gates/')}
    assert all(count == (4 if '/train/' in key else 2) for key, count in counts.items())  # 16 batches, 2 evaluations
    train_steps = [int(t.batch) for t, _ in logged['se_gates/train/module.0.se/input_dependence']]
    assert train_steps == [4, 8, 12, 16]  # 8 batches an epoch
    assert forwards == plain_forwards + 4 + 2 * 3  # one forward per train log, 3 per evaluation
    mean = [value for _, value in logged['se_gates/eval/module.0.se/mean']]
    assert all(0 < value < 1 for value in mean)
    # The weights and running statistics are those of the same run without the monitor.
    for (name, value), reference in zip(trainer.state.model.state_dict().items(),
                                        plain.state.model.state_dict().values()):
        assert torch.equal(value, reference), name


def test_without_an_interval_or_eval_batches_the_monitor_runs_nothing():
    _, forwards, logged = run([GateMonitor(interval=None, eval_batches=0)])
    _, plain_forwards, _ = run([])
    assert forwards == plain_forwards and not any(key.startswith('se_gates/') for key in logged)


def test_a_model_without_se_is_an_error_at_fit_start_and_bad_arguments_are_named():
    trainer = make_trainer([], callbacks=[GateMonitor(interval=1)])
    with pytest.raises(ValueError, match='holds no SE block'):
        trainer.fit()
    for bad in (0, '0ba', '2ep', 1.5, True):
        with pytest.raises(ValueError, match=f'interval must be a positive number of batches .*, got {bad!r}'):
            GateMonitor(interval=bad)
    with pytest.raises(ValueError, match='eval_batches must be an integer >= 0, got -1'):
        GateMonitor(eval_batches=-1)
    with pytest.raises(ValueError, match=r'near must be in \[0, 0.5\), got 0.5'):
        GateMonitor(near=0.5)


def test_the_monitor_measures_each_batch_as_the_model_saw_it(monkeypatch):
    """After Composer's microbatch transforms (here: a crop to 4x4), for each training microbatch's last and each
    evaluation microbatch: not the raw 8x8 batch Composer puts back in state.batch at BATCH_END."""
    sizes = []
    add = _Tally.add
    monkeypatch.setattr(_Tally, 'add', lambda self, input, labels: (sizes.append(input.shape[-1]),
                                                                     add(self, input, labels)))
    x, y = learnable_data(64)
    crop = lambda batch: (batch[0][:, :, :4, :4], batch[1])  # noqa: E731
    torch.manual_seed(0)
    model = ComposerClassifier(small_cnn(), num_classes=4)
    trainer = Trainer(
        model=model, optimizers=torch.optim.SGD(model.parameters(), lr=0.05),
        train_dataloader=DataSpec(DataLoader(TensorDataset(x, y), batch_size=32), microbatch_transforms=crop),
        eval_dataloader=DataSpec(DataLoader(TensorDataset(x, y), batch_size=32), microbatch_transforms=crop),
        device_train_microbatch_size=16, max_duration='2ba', eval_interval='2ba', device='cpu', progress_bar=False,
        algorithms=[SqueezeExcite(latent_channels=4, min_channels=16)], log_to_console=False,
        callbacks=[GateMonitor(interval=1, eval_batches=2)])
    trainer.fit()
    # 2 blocks: 2 training batches (each its last microbatch of 16) and 2 evaluation batches
    assert sizes == [4] * (2 * 2 + 2 * 2)

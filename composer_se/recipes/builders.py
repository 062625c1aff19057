"""Recipe sections -> Composer objects: optimizer, scheduler, algorithms, loggers."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any, Optional

import torch
from composer import algorithms as ca
from composer.core import Algorithm
from composer.loggers import FileLogger, LoggerDestination
from composer.optim import (ComposerScheduler, ConstantScheduler, CosineAnnealingWithWarmupScheduler, DecoupledAdamW,
                            DecoupledSGDW, LinearWithWarmupScheduler, MultiStepWithWarmupScheduler)
from torch import nn

from composer_se.algorithm import SqueezeExcite
from composer_se.settings import SqueezeExciteSettings
from composer_se.recipes.config import LoggersConfig, OptimizerConfig, RecipeError, SchedulerConfig

__all__ = ['ALGORITHMS', 'build_algorithms', 'build_loggers', 'build_optimizer', 'build_scheduler']

#: Names a recipe's ``algorithms`` section accepts. Composer's own SqueezeExcite is not
#: among them: ``squeeze_excite`` is this package's.
ALGORITHMS: dict[str, type[Algorithm]] = {
    'squeeze_excite': SqueezeExcite,
    'augmix': ca.AugMix,
    'blurpool': ca.BlurPool,
    'channels_last': ca.ChannelsLast,
    'colout': ca.ColOut,
    'cutmix': ca.CutMix,
    'cutout': ca.CutOut,
    'ema': ca.EMA,
    'gradient_clipping': ca.GradientClipping,
    'label_smoothing': ca.LabelSmoothing,
    'layer_freezing': ca.LayerFreezing,
    'mixup': ca.MixUp,
    'progressive_resizing': ca.ProgressiveResizing,
    'randaugment': ca.RandAugment,
    'sam': ca.SAM,
    'selective_backprop': ca.SelectiveBackprop,
    'stochastic_depth': ca.StochasticDepth,
    'swa': ca.SWA,
}

OPTIMIZERS = {
    'decoupled_sgdw': DecoupledSGDW,
    'sgd': torch.optim.SGD,
    'decoupled_adamw': DecoupledAdamW,
    'adamw': torch.optim.AdamW,
}
SCHEDULERS = ('constant', 'multistep_with_warmup', 'cosine_decay_with_warmup', 'linear_decay_with_warmup')


def _choice_error(what: str, value: str, choices) -> RecipeError:
    close = difflib.get_close_matches(value, list(choices), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ''
    return RecipeError(f'unknown {what} {value!r}.{hint} Choose one of: {", ".join(sorted(choices))}.')


def build_optimizer(config: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer over ``model``'s parameters; with ``no_decay_norm_and_bias``, 1-D parameters
    (norm scales and shifts, biases) form a second group without weight decay."""
    if config.name not in OPTIMIZERS:
        raise _choice_error('optimizer.name', config.name, OPTIMIZERS)
    params: Any = list(model.parameters())
    if config.no_decay_norm_and_bias:
        params = [
            {'params': [p for p in params if p.ndim > 1]},
            {'params': [p for p in params if p.ndim <= 1], 'weight_decay': 0.0},
        ]
    kwargs: dict[str, Any] = {'lr': config.lr, 'weight_decay': config.weight_decay}
    if config.name in ('decoupled_sgdw', 'sgd'):
        kwargs['momentum'] = config.momentum
        kwargs['nesterov'] = config.nesterov
    return OPTIMIZERS[config.name](params, **kwargs)


class _BatchAhead:
    """A training state seen one batch later: what a scheduler reads (the timestamp) moved on, the rest as it is."""

    def __init__(self, state):
        self._state = state
        self.timestamp = state.timestamp.to_next_batch()

    def __getattr__(self, name: str):
        return getattr(self._state, name)


class NoZeroWarmup:
    """A Composer scheduler whose learning rate is never exactly zero at the start of its warm-up.

    Composer's warm-ups start at zero, and the first two batches of a run both get the
    multiplier of batch 0 (it is evaluated again at the end of that batch), so a run of
    two batches trains nothing. Where ``scheduler`` gives 0, this gives the value of the
    next batch instead: the warm-up starts one step in; everything else is unchanged.
    """

    def __init__(self, scheduler: ComposerScheduler):
        self.scheduler = scheduler

    def __call__(self, state, ssr: float = 1.0) -> float:
        multiplier = self.scheduler(state, ssr)
        return multiplier if multiplier != 0 else self.scheduler(_BatchAhead(state), ssr)


def build_scheduler(config: SchedulerConfig) -> ComposerScheduler:
    """The recipe's scheduler; those with a warm-up never start at a learning rate of zero (:class:`NoZeroWarmup`)."""
    if config.name == 'constant':
        return ConstantScheduler()
    if config.name == 'multistep_with_warmup':
        scheduler = MultiStepWithWarmupScheduler(t_warmup=config.t_warmup, milestones=list(config.milestones),
                                                 gamma=config.gamma)
    elif config.name == 'cosine_decay_with_warmup':
        scheduler = CosineAnnealingWithWarmupScheduler(t_warmup=config.t_warmup, alpha_f=config.alpha_f)
    elif config.name == 'linear_decay_with_warmup':
        scheduler = LinearWithWarmupScheduler(t_warmup=config.t_warmup, alpha_f=config.alpha_f)
    else:
        raise _choice_error('scheduler.name', config.name, SCHEDULERS)
    return NoZeroWarmup(scheduler)


def build_algorithms(config: dict[str, Optional[dict[str, Any]]]) -> list[Algorithm]:
    """One algorithm per entry of the recipe's ``algorithms`` section; ``null`` entries are left out.

    They keep the section's order, except that ``squeeze_excite`` goes last: it must run
    after the algorithms that replace convolutions (of those a recipe can name, BlurPool).
    """
    built = []
    for name, kwargs in config.items():
        if kwargs is None:
            continue
        if name not in ALGORITHMS:
            raise _choice_error('algorithm', name, ALGORITHMS)
        cls = ALGORITHMS[name]
        if cls is SqueezeExcite:
            parameters = [field.name for field in dataclasses.fields(SqueezeExciteSettings)]
        else:
            parameters = [p for p in inspect.signature(cls.__init__).parameters if p != 'self']
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            raise RecipeError(f'algorithms.{name} has no argument(s) {", ".join(unknown)}; '
                              f'it takes: {", ".join(parameters)}')
        try:
            built.append(cls(**kwargs))
        except (TypeError, ValueError) as error:
            raise RecipeError(f'algorithms.{name}: {error}') from None
    return sorted(built, key=lambda algorithm: isinstance(algorithm, SqueezeExcite))


def build_loggers(config: LoggersConfig) -> list[LoggerDestination]:
    loggers: list[LoggerDestination] = []
    if config.file:
        loggers.append(FileLogger(filename=config.file, capture_stdout=False, capture_stderr=False))
    if config.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise RecipeError("loggers.tensorboard needs the tensorboard package: pip install 'composer-se[tensorboard]'"
                              ) from None
        from composer.loggers import TensorboardLogger
        loggers.append(TensorboardLogger(log_dir=config.tensorboard))
    return loggers

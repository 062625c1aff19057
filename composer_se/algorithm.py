"""The :class:`SqueezeExcite` Composer algorithm: SE surgery at ``Event.INIT``, and its checks."""

from __future__ import annotations

import logging
from typing import Any, Optional

from composer.algorithms.warnings import NoEffectWarning as ComposerNoEffectWarning
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from composer_se.batchnorm import broken_folds
from composer_se.composer_plumbing.checkpoint_guard import CheckpointGuard
from composer_se.composer_plumbing.models import network_of
from composer_se.composer_plumbing.registration import REPR_PREFIX, register
from composer_se.settings import SqueezeExciteSettings, settings_from
from composer_se.surgery import add_squeeze_excite

__all__ = ['SqueezeExcite']

log = logging.getLogger(__name__)

#: Composer algorithms that replace Conv2d modules with new ones at Event.INIT. An SE conv
#: is a Conv2d, so one of these running after SqueezeExcite would discard its SE block.
#: (GhostBatchNorm is not one of them for BatchNorms: it wraps each BatchNorm, ours
#: included, and calls it once per ghost batch, so SE blocks in or folded into
#: BatchNorms keep working.)
CONV_REPLACING_ALGORITHMS = ('BlurPool', 'Factorize')


class SqueezeExcite(Algorithm):
    """Adds Squeeze-and-Excitation blocks to the model at ``Event.INIT``.

    A thin wrapper around :func:`~composer_se.surgery.apply_squeeze_excite`. With
    ``placement='conv'`` a conv gets a block when its **output** channel count is
    ``>= min_channels`` and its module name passes ``include`` / ``exclude``; with
    ``placement='block'`` the last BatchNorm of each qualifying residual branch gets one.
    The new parameters join the optimizer param group of their conv's weight (the
    branch's last conv for ``'block'``). Hyperparameters are checked here (they become a
    :class:`~composer_se.settings.SqueezeExciteSettings`, :attr:`settings`), so a bad
    value fails when the algorithm is built, not when the Trainer starts. Where
    :func:`~composer_se.surgery.apply_squeeze_excite` would give its
    :class:`~composer_se.surgery.NoEffectWarning`, the Trainer gets Composer's own
    ``NoEffectWarning``, as from Composer's algorithms.

    Module names in ``include`` / ``exclude`` are those of the user's network: for a
    ``ComposerClassifier``, the module it wraps (``'layer3'``, not ``'module.layer3'``);
    for any other ``ComposerModel``, the model itself.

    With ``placement='conv'``, algorithms that replace convolutions at ``Event.INIT``
    (Composer's ``BlurPool`` and ``Factorize``) must come *before* it in the Trainer's
    ``algorithms``, so that SE goes after the convolutions they leave; the other order is
    an error, since they would drop the SE blocks. Composer's ``GhostBatchNorm`` may come
    in either order: it wraps each BatchNorm (ours included) and calls it once per ghost
    batch. At ``Event.FIT_START`` and at each ``Event.EVAL_START`` it checks that every
    BatchNorm a block was folded into is still in the model: something that replaces
    BatchNorms, such as ``SyncBatchNorm.convert_sync_batchnorm``, or a conv and BatchNorm
    fused by hand (``torch.nn.utils.fuse_conv_bn_eval`` with the BatchNorm then made an
    ``Identity``), would skip those blocks; ``composer_se.fuse_for_inference`` fuses them
    and keeps SE.

    It logs ``squeeze_excite/num_squeeze_excite_layers`` (blocks added) and
    ``squeeze_excite/num_params_added`` as hyperparameters.

    Checkpoints: the model changes shape, so :meth:`required_on_load` is ``True``, and
    Composer's convention holds: a Trainer that loads a checkpoint made with this
    algorithm but was not given it warns ``Automatically adding required_on_load
    algorithm composer_se.SqueezeExcite(...)``, builds this algorithm (never Composer's
    own ``SqueezeExcite``) from the arguments the checkpoint records, applies it and
    loads; ``load_exclude_algorithms=['SqueezeExcite']`` leaves it out. (Composer finds
    this class once it is imported: ``from composer_se import SqueezeExcite``.) A state
    dict whose SE blocks differ from the model's (saved without SE, or with other
    arguments) is refused by the Trainer's checkpoint loading before anything is copied,
    with a :class:`~composer_se.checkpoints.CheckpointError` naming the first differing
    layer and the two shapes (see
    :class:`~composer_se.composer_plumbing.checkpoint_guard.CheckpointGuard`).

    Args:
        latent_channels, min_channels, include, exclude, init, placement, fold_batchnorm:
            positional or by keyword, the fields of
            :class:`~composer_se.settings.SqueezeExciteSettings`, in its order, which
            documents each; or all of them at once as ``settings`` (not both).

    Example:
        >>> from composer_se import SqueezeExcite
        >>> SqueezeExcite(latent_channels=64, min_channels=512, include=['layer3', 'layer4'])
        composer_se.SqueezeExcite(latent_channels=64, min_channels=512, include=('layer3', 'layer4'), exclude=(), init='default', placement='conv', fold_batchnorm=True)
    """

    def __init__(self, *args: Any, settings: Optional[SqueezeExciteSettings] = None, **kwargs: Any):
        self.settings = settings_from(settings, *args, **kwargs)
        self._guard: Optional[CheckpointGuard] = None

    def __getattr__(self, name: str):
        # The settings' fields read as the algorithm's own (algorithm.min_channels, ...).
        settings = self.__dict__.get('settings')
        if settings is not None and name in SqueezeExciteSettings.__dataclass_fields__:
            return getattr(settings, name)
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')

    def __repr__(self) -> str:
        # Prefixed so that Composer's checkpoint loader reaches this class and not its own
        # SqueezeExcite (see composer_se.composer_plumbing.registration).
        return f'{REPR_PREFIX}{self.settings.call()}'

    @staticmethod
    def required_on_load() -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.EVAL_START, Event.BEFORE_LOAD, Event.AFTER_LOAD)

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        if event == Event.BEFORE_LOAD:  # the Trainer loads checkpoints between the two
            if self._guard is None:
                self._guard = CheckpointGuard(network_of(state.model), self.settings.call())
            self._guard.enable()
        elif event == Event.AFTER_LOAD:
            if self._guard is not None:
                self._guard.disable()
        elif event in (Event.FIT_START, Event.EVAL_START):
            self._check_folds(state)
        elif event == Event.INIT:
            self._apply_surgery(state, logger)
        return None

    def _check_folds(self, state: State) -> None:
        broken = broken_folds(state.model)
        if broken:
            raise RuntimeError(
                f'The BatchNorms that apply the SE blocks of {", ".join(broken)} were replaced after SqueezeExcite '
                f'ran, so those blocks would be skipped. Run whatever replaces BatchNorms before SqueezeExcite, '
                f'use SqueezeExcite(..., fold_batchnorm=False), or, to fuse convs with their BatchNorms for '
                f'inference, composer_se.fuse_for_inference(model), which keeps the SE blocks.',
            )

    def _apply_surgery(self, state: State, logger: Logger) -> None:
        algorithms = list(state.algorithms)
        later = algorithms[algorithms.index(self) + 1:] if self in algorithms and self.placement == 'conv' else []
        replacers = [type(a).__name__ for a in later if type(a).__name__ in CONV_REPLACING_ALGORITHMS]
        if replacers:
            raise ValueError(
                f'{", ".join(replacers)} comes after SqueezeExcite in the Trainer\'s algorithms. It replaces convs '
                f'with new modules, which would silently drop SE blocks; list SqueezeExcite after it.',
            )
        report = add_squeeze_excite(network_of(state.model), self.settings, state.optimizers,
                                    no_effect=ComposerNoEffectWarning)  # in a Trainer, Composer's warning
        log.info(
            f'SqueezeExcite added {report.num_blocks} SE blocks ({report.num_params:,} parameters) to '
            f'{type(state.model).__name__} with {self!r}.',
        )
        logger.log_hyperparameters({
            'squeeze_excite/num_squeeze_excite_layers': report.num_blocks,
            'squeeze_excite/num_params_added': report.num_params,
        })


register(SqueezeExcite)

"""The :class:`SqueezeExcite` Composer algorithm: SE surgery at ``Event.INIT``."""

from __future__ import annotations

import logging
import types
from typing import Optional

import composer.algorithms
from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from composer_se.checkpoints import guard_se_loading, note_saved_call
from composer_se.surgery import Patterns, apply_squeeze_excite, broken_folds, network_of, validate_hyperparameters

__all__ = ['SqueezeExcite']

log = logging.getLogger(__name__)

#: Composer algorithms that replace Conv2d modules with new ones at Event.INIT. An SE conv
#: is a Conv2d, so one of these running after SqueezeExcite would discard its SE block.
CONV_REPLACING_ALGORITHMS = ('BlurPool', 'Factorize')
#: Composer algorithms that replace BatchNorm2d modules at Event.INIT: after SqueezeExcite,
#: they would discard the BatchNorms that SE blocks are folded into.
NORM_REPLACING_ALGORITHMS = ('GhostBatchNorm',)


class SqueezeExcite(Algorithm):
    """Adds Squeeze-and-Excitation blocks after qualifying ``Conv2d`` modules at ``Event.INIT``.

    A thin wrapper around :func:`~composer_se.surgery.apply_squeeze_excite`, which
    documents every argument: a conv gets a block when its **output** channel count is
    ``>= min_channels`` and its module name passes ``include`` / ``exclude``; the new
    parameters join the optimizer param group of their conv's weight. Hyperparameters
    are checked here, so a bad value fails when the algorithm is built, not when the
    Trainer starts.

    Module names in ``include`` / ``exclude`` are those of the user's network: for a
    ``ComposerClassifier``, the module it wraps (``'layer3'``, not ``'module.layer3'``);
    for any other ``ComposerModel``, the model itself.

    With ``placement='conv'``, algorithms that replace convolutions at ``Event.INIT``
    (Composer's ``BlurPool`` and ``Factorize``) must come *before* it in the Trainer's
    ``algorithms``, so that SE goes after the convolutions they leave; the other order is
    an error, since they would drop the SE blocks. With ``fold_batchnorm=True``, the same
    holds for Composer's ``GhostBatchNorm``, which replaces BatchNorms.

    It logs ``squeeze_excite/num_squeeze_excite_layers`` (blocks added) and
    ``squeeze_excite/num_params_added`` as hyperparameters.

    Checkpoints: the model changes shape, so :meth:`required_on_load` is ``True``. A
    Trainer that loads a checkpoint made with this algorithm must be given the same
    algorithm; without it, loading fails with an error saying which ``SqueezeExcite``
    to add. Composer's own ``SqueezeExcite`` is never built in its place. A state dict
    whose SE blocks differ from the model's (saved without SE, or with other
    arguments) is refused by the Trainer's checkpoint loading before anything is
    copied, with a :class:`~composer_se.checkpoints.CheckpointError` naming the first
    differing layer and the two shapes (see
    :func:`~composer_se.checkpoints.guard_se_loading`).

    Args:
        latent_channels (int | float, optional): hidden width ``L`` of each block, or a
            fraction in ``(0, 1)`` of the conv's output channels. Default: ``64``.
        min_channels (int, optional): minimum ``out_channels`` of a conv that gets a
            block. Default: ``128``.
        include (str | Sequence[str], optional): module-name patterns; only convs in
            matching modules get blocks. Default: ``None`` (all).
        exclude (str | Sequence[str], optional): module-name patterns to leave out.
            Default: ``None``.
        init (str, optional): ``'default'`` or ``'identity'`` (output-preserving).
            Default: ``'default'``.
        placement (str, optional): ``'conv'`` (after each qualifying conv, as in
            Composer's method card) or ``'block'`` (at the end of each residual branch,
            as in the paper's SE-ResNet). Default: ``'conv'``.
        fold_batchnorm (bool, optional): where a conv's output goes only to a
            BatchNorm, that BatchNorm applies the SE block in the same pass as its
            normalisation: same result, no extra activation kept for backward, less
            time (see :func:`~composer_se.surgery.apply_squeeze_excite`).
            Default: ``True``.

    Example:
        >>> from composer_se import SqueezeExcite
        >>> SqueezeExcite(latent_channels=64, min_channels=512, include=['layer3', 'layer4'])
        composer_se.SqueezeExcite(latent_channels=64, min_channels=512, include=('layer3', 'layer4'), exclude=(), init='default', placement='conv', fold_batchnorm=True)
    """

    def __init__(
        self,
        latent_channels: float = 64,
        min_channels: int = 128,
        include: Patterns = None,
        exclude: Patterns = None,
        init: str = 'default',
        placement: str = 'conv',
        fold_batchnorm: bool = True,
    ):
        (self.latent_channels, self.min_channels, self.include, self.exclude, self.init,
         self.placement) = validate_hyperparameters(latent_channels, min_channels, include, exclude, init, placement)
        if not isinstance(fold_batchnorm, bool):
            raise ValueError(f'fold_batchnorm must be True or False, got {fold_batchnorm!r}')
        self.fold_batchnorm = fold_batchnorm
        self._recreated_from_checkpoint = False

    def _call(self) -> str:
        """The constructor call that rebuilds this algorithm."""
        return (
            f'SqueezeExcite(latent_channels={self.latent_channels!r}, min_channels={self.min_channels!r}, '
            f'include={self.include!r}, exclude={self.exclude!r}, init={self.init!r}, placement={self.placement!r}, '
            f'fold_batchnorm={self.fold_batchnorm!r})'
        )

    def __repr__(self) -> str:
        # Qualified so that Composer's checkpoint loader, which evaluates this string
        # under ``composer.algorithms``, reaches this class and not its own
        # SqueezeExcite (see ``_register_for_checkpoint_loading`` below).
        return f'composer_se.{self._call()}'

    @staticmethod
    def required_on_load() -> bool:
        return True

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BEFORE_LOAD, Event.AFTER_LOAD)

    def apply(self, event: Event, state: State, logger: Logger) -> Optional[int]:
        if event in (Event.BEFORE_LOAD, Event.AFTER_LOAD):  # the Trainer loads checkpoints between the two
            guard_se_loading(network_of(state.model), self._call(), enable=event == Event.BEFORE_LOAD)
            return None
        if event == Event.FIT_START:
            broken = broken_folds(state.model)
            if broken:
                raise RuntimeError(
                    f'The BatchNorms that apply the SE blocks of {", ".join(broken)} were replaced after SqueezeExcite '
                    f'ran, so those blocks would be skipped. Run whatever replaces BatchNorms before SqueezeExcite, '
                    f'or use SqueezeExcite(..., fold_batchnorm=False).',
                )
            return None
        if self._recreated_from_checkpoint:
            raise RuntimeError(
                f'This checkpoint was trained with {self!r}, but the Trainer loading it does not use it, so its '
                f'model has no SE blocks for the checkpoint\'s SE weights. Add the algorithm: '
                f'`from composer_se import SqueezeExcite` and '
                f'`Trainer(..., algorithms=[{self._call()}])`.',
            )
        algorithms = list(state.algorithms)
        later = algorithms[algorithms.index(self) + 1:] if self in algorithms and self.placement == 'conv' else []
        replacing = CONV_REPLACING_ALGORITHMS + (NORM_REPLACING_ALGORITHMS if self.fold_batchnorm else ())
        replacers = [type(a).__name__ for a in later if type(a).__name__ in replacing]
        if replacers:
            raise ValueError(
                f'{", ".join(replacers)} comes after SqueezeExcite in the Trainer\'s algorithms. It replaces convs '
                f'or BatchNorms with new modules, which would silently drop SE blocks; list SqueezeExcite after it.',
            )
        report = apply_squeeze_excite(
            network_of(state.model),
            latent_channels=self.latent_channels,
            min_channels=self.min_channels,
            optimizers=state.optimizers,
            include=self.include,
            exclude=self.exclude,
            init=self.init,
            placement=self.placement,
            fold_batchnorm=self.fold_batchnorm,
        )
        log.info(
            f'SqueezeExcite added {report.num_blocks} SE blocks ({report.num_params:,} parameters) to '
            f'{type(state.model).__name__} with {self!r}.',
        )
        logger.log_hyperparameters({
            'squeeze_excite/num_squeeze_excite_layers': report.num_blocks,
            'squeeze_excite/num_params_added': report.num_params,
        })


def _recreate_from_checkpoint(**kwargs) -> SqueezeExcite:
    algorithm = SqueezeExcite(**kwargs)
    algorithm._recreated_from_checkpoint = True
    note_saved_call(algorithm._call())  # for the message if the Trainer's SE blocks differ from the checkpoint's
    return algorithm


def _register_for_checkpoint_loading() -> None:
    """Makes Composer's checkpoint loader resolve our algorithm to this class.

    A Composer checkpoint lists its algorithms as ``(class __qualname__, {'repr': ...})``.
    On load, for a name found in ``composer.algorithms`` whose class is
    ``required_on_load``, Composer evaluates ``'algorithms.' + repr`` and, unless the
    Trainer already has an algorithm of the resulting type, applies the result to the
    model. Our class shares the name ``SqueezeExcite`` with Composer's, so with a plain
    repr Composer would build and apply *its own* SqueezeExcite from our checkpoint.

    Our repr is ``composer_se.SqueezeExcite(...)`` and this registers
    ``composer.algorithms.composer_se.SqueezeExcite`` to build our class, flagged as
    re-created: if the Trainer has our algorithm, Composer sees the type is present and
    does nothing; if not, applying the re-created one raises an error telling the user
    to add it. Without ``composer_se`` imported, the evaluation fails and Composer only
    warns, naming ``composer_se.SqueezeExcite(...)``; it still never builds its own.
    """
    composer.algorithms.composer_se = types.SimpleNamespace(SqueezeExcite=_recreate_from_checkpoint)


_register_for_checkpoint_loading()

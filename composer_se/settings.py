"""The SE hyperparameters, once: :class:`SqueezeExciteSettings` holds, defaults and checks them.

The algorithm, :func:`~composer_se.surgery.apply_squeeze_excite`, the planner, the
``composer-se plan`` command and recipes all take one of these, or its fields as
arguments in its order, which become one; this class's docstring is where each is
described.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from composer_se.layers.block import DEFAULT_LATENT_CHANNELS, GATE_INITS

__all__ = ['DEFAULTS', 'PLACEMENTS', 'UNSET', 'Patterns', 'SqueezeExciteSettings', 'resolve_latent_channels',
           'settings_from']

#: ``placement`` values: after qualifying convolutions, or at the end of residual branches.
PLACEMENTS = ('conv', 'block')

Patterns = Union[str, Sequence[str], None]


def _is_real_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _patterns(argument: str, patterns: Patterns) -> tuple[str, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = (patterns,)
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f'{argument} must be None, a non-empty string or a list of non-empty strings (glob patterns '
            f'on module names such as "layer3.*"), got {patterns!r}',
        )
    return tuple(patterns)


def _latent_channels(value: Any) -> float:
    if not _is_real_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f'latent_channels must be an integer >= 1 (the hidden layer width) or a fraction in (0, 1) '
            f'of each conv\'s output channels, got {value!r}',
        )
    if value >= 1:
        if value != int(value):
            raise ValueError(
                f'latent_channels >= 1 must be a whole number (the hidden layer width); fractions must lie in (0, 1); '
                f'got {value!r}',
            )
        return int(value)
    return float(value)  # a plain float, also for numpy scalars, so the repr rebuilds it


def _min_channels(value: Any) -> int:
    if not _is_real_number(value) or not math.isfinite(value) or value < 1 or value != int(value):
        raise ValueError(
            f'min_channels must be a whole number >= 1 (SE goes after every Conv2d with at least this many '
            f'output channels), got {value!r}',
        )
    return int(value)


@dataclass(frozen=True)
class SqueezeExciteSettings:
    """Where SE blocks go and what they are; checked and normalised when built.

    Whole-number floats (``64.0``, as YAML may give them) become ints, a fraction stays
    a plain ``float``, and patterns become tuples. A bad value is a :class:`ValueError`
    naming it and what is allowed.

    Args:
        latent_channels (int | float, optional): ``L``, the width of each block's hidden
            layer. An integer ``>= 1`` is ``L`` itself; a float in ``(0, 1)`` is a fraction of the
            channels the block scales, rounded (half to even), at least 1 (``1/16`` is
            the paper's reduction ratio 16). Default: ``64``.
        min_channels (int, optional): a module gets a block only if its output has at
            least this many channels. Default: ``128``.
        include (str | Sequence[str], optional): fnmatch patterns on dotted module
            names; if given, a module qualifies only if its name or the name of a
            module containing it matches one (``'layer3'`` and ``'layer3.*'`` both
            select everything in ``layer3``). Default: ``()`` (every module).
        exclude (str | Sequence[str], optional): patterns of the same kind; a module
            whose name or container matches one is left alone. Default: ``()``.
        init (str, optional): ``'default'`` (the paper's sigmoid gate) or
            ``'identity'`` (output-preserving; see
            :class:`~composer_se.layers.SqueezeExcite2d`). Default: ``'default'``.
        placement (str, optional): ``'conv'`` (after each qualifying conv, as in
            Composer's method card) or ``'block'`` (at the end of each residual branch,
            as in the paper's SE-ResNet). Default: ``'conv'``.
        fold_batchnorm (bool, optional): with ``placement='conv'``, where a chosen conv's
            output goes to a ``BatchNorm2d`` and nowhere else (read from the model's
            ``torch.fx`` trace), that BatchNorm applies the conv's block together with
            its normalisation, in one pass over the activation and without keeping a
            second copy of it for backward
            (:class:`~composer_se.batchnorm.FoldedSqueezeExciteBatchNorm2d`): the same
            result up to rounding, with the same parameter names and param groups.
            ``False`` keeps every block inside its conv. Default: ``True``.
    """

    latent_channels: float = DEFAULT_LATENT_CHANNELS
    min_channels: int = 128
    include: Patterns = ()
    exclude: Patterns = ()
    init: str = 'default'
    placement: str = 'conv'
    fold_batchnorm: bool = True

    def __post_init__(self):
        normalised = {
            'latent_channels': _latent_channels(self.latent_channels),
            'min_channels': _min_channels(self.min_channels),
        }
        if not isinstance(self.init, str) or self.init not in GATE_INITS:
            raise ValueError(f'init must be one of {GATE_INITS}, got {self.init!r}')
        if not isinstance(self.placement, str) or self.placement not in PLACEMENTS:
            raise ValueError(f'placement must be one of {PLACEMENTS}, got {self.placement!r}')
        normalised['include'] = _patterns('include', self.include)
        normalised['exclude'] = _patterns('exclude', self.exclude)
        if not isinstance(self.fold_batchnorm, bool):
            raise ValueError(f'fold_batchnorm must be True or False, got {self.fold_batchnorm!r}')
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def of(cls, settings: 'SqueezeExciteSettings | None' = None, **changes: Any) -> 'SqueezeExciteSettings':
        """``settings`` (or the defaults) with ``changes`` applied and checked."""
        return dataclasses.replace(settings or DEFAULTS, **changes)

    def qualifies(self, channels: int) -> bool:
        """Whether a module whose output has ``channels`` channels is wide enough for a block."""
        return channels >= self.min_channels

    def latent_channels_for(self, channels: int) -> int:
        """``L`` for a block that scales ``channels`` channels (see :func:`resolve_latent_channels`)."""
        return resolve_latent_channels(self.latent_channels, channels)

    @property
    def folds(self) -> bool:
        """Whether blocks are folded into BatchNorms: ``fold_batchnorm`` with ``placement='conv'``."""
        return self.fold_batchnorm and self.placement == 'conv'

    def call(self) -> str:
        """The ``SqueezeExcite(...)`` call that builds the algorithm with these settings."""
        arguments = ', '.join(f'{field.name}={getattr(self, field.name)!r}' for field in dataclasses.fields(self))
        return f'SqueezeExcite({arguments})'


#: The defaults, written once.
DEFAULTS = SqueezeExciteSettings()


def resolve_latent_channels(latent_channels: float, out_channels: int) -> int:
    """``L``, the hidden layer width of the SE block after a conv with ``out_channels`` outputs.

    A value ``>= 1`` is ``L`` itself; a value in ``(0, 1)`` is a fraction of
    ``out_channels``, rounded with Python's ``round`` (half to even) and at least 1.
    Assumes ``latent_channels`` was checked by :class:`SqueezeExciteSettings`.
    """
    if latent_channels >= 1:
        return int(latent_channels)
    return max(1, round(latent_channels * out_channels))


class _Unset:
    """The default of an SE argument that a function also takes as ``settings``: not given."""

    def __repr__(self) -> str:
        return '<the SqueezeExciteSettings default>'


#: What ``apply_squeeze_excite`` and the planner take as an SE argument's default, so that
#: an argument passed explicitly (even with its default value) is told from one left out.
UNSET = _Unset()


def settings_from(settings: Optional[SqueezeExciteSettings], *args: Any, **arguments: Any) -> SqueezeExciteSettings:
    """``settings``, or ``SqueezeExciteSettings(*args, **arguments)``; not both.

    Keyword arguments that are :data:`UNSET` count as not given.
    """
    given = {key: value for key, value in arguments.items() if value is not UNSET}
    if settings is None:
        return SqueezeExciteSettings(*args, **given)
    if not isinstance(settings, SqueezeExciteSettings):
        raise TypeError(f'settings must be a SqueezeExciteSettings, got {type(settings).__name__}')
    if args or given:
        shown = ', '.join(sorted(given)) if given else 'positional arguments'
        raise TypeError(f'pass the SE arguments either as settings or one by one, not both (got settings and {shown})')
    return settings

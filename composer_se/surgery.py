"""Model surgery that adds Squeeze-and-Excitation after qualifying convolutions.

:func:`apply_squeeze_excite` is the functional API. It decides which convolutions get
an SE block, turns each into a :class:`~composer_se.layers.SqueezeExciteConv2d` in
place, registers the new parameters with the optimizers, and returns a
:class:`SqueezeExciteReport` of what it added.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from composer.algorithms.warnings import NoEffectWarning
from torch import nn
from torch.optim import Optimizer

from composer_se.layers import GATE_INITS, SqueezeExcite2d, SqueezeExciteConv2d

__all__ = [
    'AddedBlock',
    'SqueezeExciteReport',
    'apply_squeeze_excite',
    'resolve_latent_channels',
    'validate_hyperparameters',
]

Patterns = Union[str, Sequence[str], None]


@dataclass(frozen=True)
class AddedBlock:
    """One SE block added by :func:`apply_squeeze_excite`."""

    name: str  #: the convolution's module name, e.g. ``'layer4.0.conv2'``
    in_channels: int
    out_channels: int
    latent_channels: int  #: ``L``, the block's hidden width
    num_params: int  #: parameters the block adds: ``2 * C * L + L + C``


@dataclass(frozen=True)
class SqueezeExciteReport:
    """What one call of :func:`apply_squeeze_excite` did.

    ``skipped`` lists, as ``(name, reason)``, the convolutions that the channel and
    name rules selected but that got no new block: those that already have one
    (ours or Composer's), and subclasses of ``Conv2d``, whose own ``forward`` the
    conversion would drop.
    """

    added: tuple[AddedBlock, ...]
    skipped: tuple[tuple[str, str], ...]

    @property
    def num_blocks(self) -> int:
        return len(self.added)

    @property
    def num_params(self) -> int:
        return sum(block.num_params for block in self.added)

    @property
    def names(self) -> list[str]:
        return [block.name for block in self.added]


def _is_real_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def resolve_latent_channels(latent_channels: float, out_channels: int) -> int:
    """The hidden width ``L`` of the SE block after a conv with ``out_channels`` outputs.

    A value ``>= 1`` is the width itself; a value in ``(0, 1)`` is a fraction of
    ``out_channels``, rounded with Python's ``round`` (half to even) and at least 1.
    Assumes ``latent_channels`` has passed :func:`validate_hyperparameters`.
    """
    if latent_channels >= 1:
        return int(latent_channels)
    return max(1, round(latent_channels * out_channels))


def _validate_patterns(argument: str, patterns: Patterns) -> tuple[str, ...]:
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


def validate_hyperparameters(
    latent_channels: float,
    min_channels: int,
    include: Patterns = None,
    exclude: Patterns = None,
    init: str = 'default',
) -> tuple[float, int, tuple[str, ...], tuple[str, ...], str]:
    """Checks the SE hyperparameters and returns them normalised.

    Whole-number floats (``64.0``, as YAML may give them) become ints, pattern
    arguments become tuples. Raises :class:`ValueError` naming the bad value and
    what is allowed.
    """
    if not _is_real_number(latent_channels) or not math.isfinite(latent_channels) or latent_channels <= 0:
        raise ValueError(
            f'latent_channels must be an integer >= 1 (the hidden width) or a fraction in (0, 1) '
            f'of each conv\'s output channels, got {latent_channels!r}',
        )
    if latent_channels >= 1:
        if latent_channels != int(latent_channels):
            raise ValueError(
                f'latent_channels >= 1 must be a whole number (the hidden width); fractions must lie in (0, 1); '
                f'got {latent_channels!r}',
            )
        latent_channels = int(latent_channels)
    else:
        latent_channels = float(latent_channels)  # a plain float, also for numpy scalars, so the repr rebuilds it
    if (
        not _is_real_number(min_channels) or not math.isfinite(min_channels) or min_channels < 1 or
        min_channels != int(min_channels)
    ):
        raise ValueError(
            f'min_channels must be a whole number >= 1 (SE goes after every Conv2d with at least this many '
            f'output channels), got {min_channels!r}',
        )
    if not isinstance(init, str) or init not in GATE_INITS:
        raise ValueError(f'init must be one of {GATE_INITS}, got {init!r}')
    return (
        latent_channels,
        int(min_channels),
        _validate_patterns('include', include),
        _validate_patterns('exclude', exclude),
        init,
    )


def _wrapper_types() -> dict[type, str]:
    """Wrappers that surgery must not reach through: they hold their own view of the parameters."""
    from torch._dynamo.eval_frame import OptimizedModule
    wrappers: dict[type, str] = {OptimizedModule: 'torch.compile'}
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.nn.parallel import DistributedDataParallel
        wrappers[DistributedDataParallel] = 'DistributedDataParallel'
        wrappers[FullyShardedDataParallel] = 'FullyShardedDataParallel'
        try:
            from torch.distributed.fsdp import FSDPModule  # fully_shard, torch >= 2.6
            wrappers[FSDPModule] = 'FSDP (fully_shard)'
        except ImportError:
            pass
    return wrappers


def _check_not_wrapped(model: nn.Module) -> None:
    wrappers = _wrapper_types()
    for name, module in model.named_modules():
        for wrapper, label in wrappers.items():
            if isinstance(module, wrapper):
                where = f' (module {name!r})' if name else ''
                raise TypeError(
                    f'apply_squeeze_excite needs the bare model, but it is wrapped by {label}{where}. Apply SE '
                    f'before wrapping (the SqueezeExcite algorithm runs at Event.INIT, before Composer wraps the '
                    f'model), or pass the wrapped model\'s inner module.',
                )


def _ancestry(name: str) -> list[str]:
    """``'a.b.c'`` -> ``['a', 'a.b', 'a.b.c']``; the root module (``''``) has none."""
    parts = name.split('.') if name else []
    return ['.'.join(parts[:i + 1]) for i in range(len(parts))]


def _matches(names: Sequence[str], patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(candidate, pattern)
               for name in names
               for candidate in _ancestry(name)
               for pattern in patterns)


def _check_patterns_match(model: nn.Module, argument: str, patterns: Sequence[str]) -> None:
    names = [name for name, _ in model.named_modules(remove_duplicate=False) if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            top = sorted({name.split('.')[0] for name in names})
            raise ValueError(
                f'{argument} pattern {pattern!r} matches no module name in the model; its top-level modules are '
                f'{top}. Patterns are fnmatch globs on dotted module names, e.g. "layer3" or "layer3.*".',
            )


def _as_optimizers(optimizers: Union[Optimizer, Sequence[Optimizer], None]) -> tuple[Optimizer, ...]:
    if optimizers is None:
        return ()
    if isinstance(optimizers, Optimizer):
        return (optimizers,)
    return tuple(optimizers)


def _param_index(optimizers: Sequence[Optimizer]) -> dict[int, list[tuple[dict, str]]]:
    """For each parameter held by ``optimizers`` (by ``id``): the groups holding it, each with its name there.

    A group built from ``named_parameters()`` keeps ``'param_names'`` beside ``'params'``;
    elsewhere the name is ``None``.
    """
    index: dict[int, list[tuple[dict, str]]] = {}
    for opt in optimizers:
        for group in opt.param_groups:
            names = group.get('param_names', [None] * len(group['params']))
            for param, name in zip(group['params'], names):
                index.setdefault(id(param), []).append((group, name))
    return index


def apply_squeeze_excite(
    model: nn.Module,
    latent_channels: float = 64,
    min_channels: int = 128,
    optimizers: Union[Optimizer, Sequence[Optimizer], None] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    init: str = 'default',
) -> SqueezeExciteReport:
    """Adds a Squeeze-and-Excitation block after every qualifying ``Conv2d`` of ``model``, in place.

    A :class:`torch.nn.Conv2d` qualifies when its **output** channel count is
    ``>= min_channels`` and its name passes ``include`` / ``exclude``. (Composer's own
    ``apply_squeeze_excite`` tests ``min(in_channels, out_channels)``, which its docs
    do not say; ours follows the method card: output channels only.)

    Each qualifying conv becomes a :class:`~composer_se.layers.SqueezeExciteConv2d` in
    place, so its parameters keep their names and identity (``layer1.0.conv1.weight``
    stays; the block's parameters are ``layer1.0.conv1.se.*``), hooks and shared uses
    survive, and a conv that appears several times in the tree gets one block.
    Applying again adds nothing to convs that already have a block. Everything is
    checked and built before the model is touched: on error the model and the
    optimizers are as they were.

    Args:
        model (torch.nn.Module): the model to modify; not wrapped in DDP, FSDP or
            ``torch.compile``.
        latent_channels (int | float, optional): ``L``, the hidden width of each block.
            An integer ``>= 1`` is the width; a float in ``(0, 1)`` is a fraction of the
            conv's output channels, rounded (half to even), at least 1. Default: ``64``.
        min_channels (int, optional): a conv gets a block only if its ``out_channels``
            is at least this. Default: ``128``.
        optimizers (Optimizer | Sequence[Optimizer], optional): optimizers already
            built over ``model``'s parameters. Each block's parameters join the param
            group that holds its conv's ``weight`` (so they take that group's
            learning rate and weight decay). If the conv's weight is in no group (a
            frozen conv, say) and there is exactly one group in all, they join that
            one; with several groups to choose from this is an error. Optimizers
            built after this call see the new parameters anyway. Default: ``None``.
        include (str | Sequence[str], optional): fnmatch patterns on dotted module
            names; if given, a conv qualifies only if its name or the name of a
            module containing it matches one (``'layer3'`` and ``'layer3.*'`` both
            select everything in ``layer3``). Default: ``None`` (every conv).
        exclude (str | Sequence[str], optional): patterns of the same kind; a conv
            whose name or container matches one is left alone. Default: ``None``.
            A pattern that matches no module name at all is an error (it is almost
            always a typo).
        init (str, optional): ``'default'`` (the paper's sigmoid gate) or
            ``'identity'`` (the model computes exactly what it did before, until
            training changes the blocks); see
            :class:`~composer_se.layers.SqueezeExcite2d`. Default: ``'default'``.

    Returns:
        SqueezeExciteReport: the blocks added (names, widths, parameter counts) and
        the selected convs that were skipped, with the reason.

    Raises:
        ValueError: a bad hyperparameter, a pattern that matches nothing, or SE
            parameters with no param group to join.
        TypeError: ``model`` is wrapped in DDP, FSDP or ``torch.compile``.

    Warns:
        NoEffectWarning: no block was added.
        UserWarning: a selected conv is a ``Conv2d`` subclass and was skipped.

    Example:
        >>> import torch, torchvision
        >>> from composer_se import apply_squeeze_excite
        >>> model = torchvision.models.resnet18()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> report = apply_squeeze_excite(model, latent_channels=64, min_channels=512, optimizers=opt)
        >>> report.names
        ['layer4.0.conv1', 'layer4.0.conv2', 'layer4.0.downsample.0', 'layer4.1.conv1', 'layer4.1.conv2']
        >>> report.num_params  # 5 blocks of 2 * 512 * 64 + 64 + 512
        330560
        >>> model.layer4[1].conv2.se.fc2.bias is opt.param_groups[0]['params'][-1]
        True
    """
    latent_channels, min_channels, include, exclude, init = validate_hyperparameters(
        latent_channels,
        min_channels,
        include,
        exclude,
        init,
    )
    _check_not_wrapped(model)
    _check_patterns_match(model, 'include', include)
    _check_patterns_match(model, 'exclude', exclude)
    optimizers = _as_optimizers(optimizers)
    num_groups = sum(len(opt.param_groups) for opt in optimizers)
    held = _param_index(optimizers)

    # Every name under which each conv instance appears (a shared conv has several).
    conv_names: dict[nn.Conv2d, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Conv2d):
            conv_names.setdefault(module, []).append(name)

    # Plan: decide and build everything before touching the model.
    planned: list[tuple[nn.Conv2d, SqueezeExcite2d, list[tuple[dict, str]], AddedBlock]] = []
    skipped: list[tuple[str, str]] = []
    subclassed: list[str] = []
    for conv, names in conv_names.items():
        if conv.out_channels < min_channels:
            continue
        if include and not _matches(names, include):
            continue
        if exclude and _matches(names, exclude):
            continue
        name = names[0]
        if isinstance(conv, SqueezeExciteConv2d) or getattr(conv, '_already_squeeze_excited', False):
            skipped.append((name, 'already has an SE block'))
            continue
        if type(conv) is not nn.Conv2d:
            skipped.append((name, f'is a {type(conv).__name__}, a Conv2d subclass with behaviour of its own'))
            subclassed.append(f'{name} ({type(conv).__name__})')
            continue
        # Each target group, with the prefix of the block's parameter names there: they
        # follow the group's own name for the conv's weight ('module.0.weight' gives
        # 'module.0.se.fc1.weight', ...).
        groups = [(group, (weight_name or f'{name}.weight')[:-len('weight')])
                  for group, weight_name in held.get(id(conv.weight), [])]
        if optimizers and not groups:
            if num_groups != 1:
                raise ValueError(
                    f'the weight of conv {name!r} is in none of the {num_groups} optimizer param groups, so the '
                    f'group for its SE parameters is ambiguous. Build the optimizer after applying SE, or leave '
                    f'this conv out with exclude=[{name!r}].',
                )
            groups = [(optimizers[0].param_groups[0], f'{name}.' if name else '')]
        width = resolve_latent_channels(latent_channels, conv.out_channels)
        block = SqueezeExcite2d(conv.out_channels, width, init=init)
        block.to(device=conv.weight.device, dtype=conv.weight.dtype)
        block.train(conv.training)
        added = AddedBlock(
            name=name,
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            latent_channels=width,
            num_params=sum(p.numel() for p in block.parameters()),
        )
        planned.append((conv, block, groups, added))

    # Commit: nothing below can fail.
    for conv, block, groups, _ in planned:
        SqueezeExciteConv2d.convert_(conv, block)
        for group, prefix in groups:
            for param_name, param in block.named_parameters():
                group['params'].append(param)
                if 'param_names' in group:
                    group['param_names'].append(f'{prefix}se.{param_name}')

    report = SqueezeExciteReport(added=tuple(item[3] for item in planned), skipped=tuple(skipped))
    if subclassed:
        warnings.warn(
            f'SE was not added after these selected convs, which are Conv2d subclasses whose own forward the '
            f'conversion would drop: {", ".join(subclassed)}',
            UserWarning,
        )
    if not planned:
        warnings.warn(NoEffectWarning(_no_effect_message(conv_names, min_channels, skipped)))
    return report


def _no_effect_message(conv_names: dict[nn.Conv2d, list[str]], min_channels: int, skipped: list) -> str:
    if not conv_names:
        return 'SqueezeExcite added no block: the model has no torch.nn.Conv2d.'
    if skipped:
        return f'SqueezeExcite added no block: the {len(skipped)} selected convs were skipped ({skipped[0][1]}, ...).'
    widest = max(conv.out_channels for conv in conv_names)
    return (
        f'SqueezeExcite added no block: no Conv2d passed the name patterns with out_channels >= min_channels='
        f'{min_channels} (the largest out_channels in the model is {widest}).'
    )

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

from composer_se.graph import batch_norm_consumers
from composer_se.layers import (
    GATE_INITS,
    FoldedSqueezeExciteBatchNorm2d,
    SqueezeExcite2d,
    SqueezeExciteBatchNorm2d,
    SqueezeExciteConv2d,
    can_fold,
    fold_into_batch_norm_,
)
from composer_se.placement import PLACEMENTS, Site, find_sites

__all__ = [
    'AddedBlock',
    'Selection',
    'SqueezeExciteReport',
    'apply_squeeze_excite',
    'broken_folds',
    'fold_targets',
    'network_of',
    'select_sites',
    'resolve_latent_channels',
    'validate_hyperparameters',
]

Patterns = Union[str, Sequence[str], None]


@dataclass(frozen=True)
class AddedBlock:
    """One SE block added by :func:`apply_squeeze_excite`."""

    name: str  #: the name of the module it follows, e.g. ``'layer4.0.conv2'`` or ``'layer4.0.bn3'``
    in_channels: int
    out_channels: int
    latent_channels: int  #: ``L``, the block's hidden width
    num_params: int  #: parameters the block adds: ``2 * C * L + L + C``
    #: the BatchNorm that applies this block in one pass with its normalisation (see
    #: ``fold_batchnorm`` of :func:`apply_squeeze_excite`), or ``None``
    folded_into: Optional[str] = None


@dataclass(frozen=True)
class SqueezeExciteReport:
    """What one call of :func:`apply_squeeze_excite` did.

    ``skipped`` lists, as ``(name, reason)``, the modules that the channel and name
    rules selected but that got no new block: those that already have one (ours or
    Composer's), and subclasses of ``Conv2d`` or ``BatchNorm2d``, whose own ``forward``
    the conversion would drop.
    """

    added: tuple[AddedBlock, ...]
    skipped: tuple[tuple[str, str], ...]
    #: why no block could be folded into a BatchNorm (the model does not trace with
    #: ``torch.fx``), or ``None``
    fold_unavailable: Optional[str] = None

    @property
    def num_blocks(self) -> int:
        return len(self.added)

    @property
    def num_params(self) -> int:
        return sum(block.num_params for block in self.added)

    @property
    def names(self) -> list[str]:
        return [block.name for block in self.added]

    @property
    def num_folded(self) -> int:
        return sum(block.folded_into is not None for block in self.added)


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
    placement: str = 'conv',
) -> tuple[float, int, tuple[str, ...], tuple[str, ...], str, str]:
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
    if not isinstance(placement, str) or placement not in PLACEMENTS:
        raise ValueError(f'placement must be one of {PLACEMENTS}, got {placement!r}')
    return (
        latent_channels,
        int(min_channels),
        _validate_patterns('include', include),
        _validate_patterns('exclude', exclude),
        init,
        placement,
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


def network_of(model: nn.Module) -> nn.Module:
    """The module whose names ``include`` / ``exclude`` refer to: the network inside a ComposerClassifier."""
    from composer.models import ComposerClassifier
    return model.module if isinstance(model, ComposerClassifier) else model


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


@dataclass
class Selection:
    """The outcome of the placement, channel and name rules on a model, before any change."""

    chosen: list[tuple[Site, int]]  #: the sites that get a block, each with its hidden width
    skipped: list[tuple[str, str]]  #: selected sites left alone: (name, reason)
    sites: list[Site]  #: every candidate site of the placement
    unsupported: list[str]  #: skipped sites of a type that cannot be converted, as 'name (Type)'


_CONVERTIBLE = {nn.Conv2d: SqueezeExciteConv2d, nn.BatchNorm2d: SqueezeExciteBatchNorm2d}


def select_sites(
    model: nn.Module,
    latent_channels: float = 64,
    min_channels: int = 128,
    include: Patterns = None,
    exclude: Patterns = None,
    init: str = 'default',
    placement: str = 'conv',
) -> Selection:
    """Applies the rules of :func:`apply_squeeze_excite` to ``model`` without changing it.

    Validates the arguments like :func:`apply_squeeze_excite` and raises the same errors.
    """
    latent_channels, min_channels, include, exclude, init, placement = validate_hyperparameters(
        latent_channels, min_channels, include, exclude, init, placement)
    _check_not_wrapped(model)
    _check_patterns_match(model, 'include', include)
    _check_patterns_match(model, 'exclude', exclude)
    sites = find_sites(model, placement)
    selection = Selection(chosen=[], skipped=[], sites=sites, unsupported=[])
    for site in sites:
        if site.channels < min_channels:
            continue
        if include and not _matches(site.names, include):
            continue
        if exclude and _matches(site.names, exclude):
            continue
        name, module = site.names[0], site.module
        if isinstance(module, tuple(_CONVERTIBLE.values())) or getattr(module, '_already_squeeze_excited', False):
            selection.skipped.append((name, 'already has an SE block'))
        elif type(module) not in _CONVERTIBLE:
            selection.skipped.append((name, f'is a {type(module).__name__}, not exactly a Conv2d or BatchNorm2d'))
            selection.unsupported.append(f'{name} ({type(module).__name__})')
        else:
            selection.chosen.append((site, resolve_latent_channels(latent_channels, site.channels)))
    return selection


def apply_squeeze_excite(
    model: nn.Module,
    latent_channels: float = 64,
    min_channels: int = 128,
    optimizers: Union[Optimizer, Sequence[Optimizer], None] = None,
    include: Patterns = None,
    exclude: Patterns = None,
    init: str = 'default',
    placement: str = 'conv',
    fold_batchnorm: bool = True,
) -> SqueezeExciteReport:
    """Adds Squeeze-and-Excitation blocks to ``model``, in place.

    With ``placement='conv'`` (the default), a block goes after every
    :class:`torch.nn.Conv2d` whose **output** channel count is ``>= min_channels`` and
    whose name passes ``include`` / ``exclude``. (Composer's own
    ``apply_squeeze_excite`` tests ``min(in_channels, out_channels)``, which its docs do
    not say; ours follows the method card: output channels only.) With
    ``placement='block'``, a block goes at the end of the residual branch of every
    registered residual block (see :mod:`composer_se.placement`) whose branch has
    ``>= min_channels`` channels: after the branch's last BatchNorm, before the
    addition, as in the paper's SE-ResNet.

    Each chosen module becomes a :class:`~composer_se.layers.SqueezeExciteConv2d` or
    :class:`~composer_se.layers.SqueezeExciteBatchNorm2d` in place, so its parameters
    keep their names and identity (``layer1.0.conv1.weight`` stays; the block's
    parameters are ``layer1.0.conv1.se.*``), hooks and shared uses survive, and a
    module that appears several times in the tree gets one block. Applying again adds
    nothing where a block already is. Everything is checked and built before the model
    is touched: on error the model and the optimizers are as they were.

    Args:
        model (torch.nn.Module): the model to modify; not wrapped in DDP, FSDP or
            ``torch.compile``.
        latent_channels (int | float, optional): ``L``, the hidden width of each block.
            An integer ``>= 1`` is the width; a float in ``(0, 1)`` is a fraction of the
            channels the block scales, rounded (half to even), at least 1 (``1/16`` is
            the paper's reduction ratio 16). Default: ``64``.
        min_channels (int, optional): a module gets a block only if its output has at
            least this many channels. Default: ``128``.
        optimizers (Optimizer | Sequence[Optimizer], optional): optimizers already
            built over ``model``'s parameters. Each block's parameters join the param
            group that holds its conv's ``weight`` (for ``placement='block'``, the
            branch's last conv), so they take that group's learning rate and weight
            decay. If that weight is in no group (a frozen conv, say) and there is
            exactly one group in all, they join that one; with several groups to
            choose from this is an error. Optimizers built after this call see the new
            parameters anyway. Default: ``None``.
        include (str | Sequence[str], optional): fnmatch patterns on dotted module
            names; if given, a module qualifies only if its name or the name of a
            module containing it matches one (``'layer3'`` and ``'layer3.*'`` both
            select everything in ``layer3``). Default: ``None`` (every module).
        exclude (str | Sequence[str], optional): patterns of the same kind; a module
            whose name or container matches one is left alone. Default: ``None``.
            A pattern that matches no module name at all is an error (it is almost
            always a typo).
        init (str, optional): ``'default'`` (the paper's sigmoid gate) or
            ``'identity'`` (the model computes exactly what it did before, until
            training changes the blocks); see
            :class:`~composer_se.layers.SqueezeExcite2d`. Default: ``'default'``.
        placement (str, optional): ``'conv'`` or ``'block'``. Default: ``'conv'``.
        fold_batchnorm (bool, optional): with ``placement='conv'``, where a chosen conv's
            output goes to a ``BatchNorm2d`` and nowhere else (read from the model's
            ``torch.fx`` trace), the BatchNorm applies the conv's SE block together
            with its normalisation, in one pass over the activation and without
            keeping a second copy of it for backward
            (:class:`~composer_se.layers.FoldedSqueezeExciteBatchNorm2d`). The result
            is the same up to rounding, parameter names and param groups do not change,
            but the conv module alone then returns its output *before* SE (hooks on it
            see that). ``False`` keeps every block inside its conv. A model that does
            not trace gets no folding; the report says why. Default: ``True``.

    Returns:
        SqueezeExciteReport: the blocks added (names, widths, parameter counts) and
        the selected modules that were skipped, with the reason.

    Raises:
        ValueError: a bad hyperparameter or placement, a pattern that matches nothing,
            ``placement='block'`` on a model without a registered residual block, or
            SE parameters with no param group to join.
        TypeError: ``model`` is wrapped in DDP, FSDP or ``torch.compile``.

    Warns:
        NoEffectWarning: no block was added.
        UserWarning: a selected module is a subclass (of ``Conv2d``, say) and was skipped.

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
        >>> paper = apply_squeeze_excite(torchvision.models.resnet18(), 1 / 16, 1, placement='block')
        >>> paper.names[:2]
        ['layer1.0.bn2', 'layer1.1.bn2']
    """
    selection = select_sites(model, latent_channels, min_channels, include, exclude, init, placement)
    if not isinstance(fold_batchnorm, bool):
        raise ValueError(f'fold_batchnorm must be True or False, got {fold_batchnorm!r}')
    folds, fold_unavailable = fold_targets(network_of(model), selection, fold_batchnorm and placement == 'conv')
    module_names = {id(module): name for name, module in model.named_modules()}
    optimizers = _as_optimizers(optimizers)
    num_groups = sum(len(opt.param_groups) for opt in optimizers)
    held = _param_index(optimizers)
    parameters = dict(model.named_parameters(remove_duplicate=False))

    # Plan: decide and build everything before touching the model.
    planned: list[tuple[Site, SqueezeExcite2d, list[tuple[dict, str]], AddedBlock, Optional[nn.Module]]] = []
    for site, width in selection.chosen:
        name = site.names[0]
        se_prefix = f'{name}.se.' if name else 'se.'
        anchor = parameters.get(site.anchor)
        # Each target group, with the names the block's parameters take there: they
        # follow the group's own name for the anchor weight ('module.0.weight' for
        # '0.weight' gives 'module.0.se.fc1.weight', ...).
        groups = []
        for group, group_name in (held.get(id(anchor), []) if anchor is not None else []):
            outer = group_name[:-len(site.anchor)] if group_name and group_name.endswith(site.anchor) else ''
            groups.append((group, outer + se_prefix))
        if optimizers and not groups:
            if num_groups != 1:
                raise ValueError(
                    f'the weight {site.anchor!r} that decides the param group of the SE block at {name!r} is in '
                    f'none of the {num_groups} optimizer param groups, so the group is ambiguous. Build the '
                    f'optimizer after applying SE, or leave this module out with exclude=[{name!r}].',
                )
            groups = [(optimizers[0].param_groups[0], se_prefix)]
        reference = next(iter(site.module.parameters()), None)
        block = SqueezeExcite2d(site.channels, width, init=init)
        if reference is not None:  # an affine=False BatchNorm has none: the block stays on the default device
            block.to(device=reference.device, dtype=reference.dtype)
        block.train(site.module.training)
        norm = folds.get(id(site.module))
        added = AddedBlock(
            name=name,
            in_channels=site.in_channels,
            out_channels=site.channels,
            latent_channels=width,
            num_params=sum(p.numel() for p in block.parameters()),
            folded_into=None if norm is None else module_names[id(norm)],
        )
        planned.append((site, block, groups, added, norm))

    # Commit: nothing below can fail.
    for site, block, groups, _, norm in planned:
        _CONVERTIBLE[type(site.module)].convert_(site.module, block)
        if norm is not None:
            fold_into_batch_norm_(site.module, norm)
        for group, prefix in groups:
            for param_name, param in block.named_parameters():
                group['params'].append(param)
                if 'param_names' in group:
                    group['param_names'].append(prefix + param_name)

    report = SqueezeExciteReport(
        added=tuple(item[3] for item in planned),
        skipped=tuple(selection.skipped),
        fold_unavailable=fold_unavailable,
    )
    if selection.unsupported:
        warnings.warn(
            f'SE was not added after these selected modules, which are subclasses whose own forward the conversion '
            f'would drop: {", ".join(selection.unsupported)}',
            UserWarning,
        )
    if not planned:
        warnings.warn(NoEffectWarning(_no_effect_message(selection, min_channels, placement)))
    return report


def fold_targets(network: nn.Module, selection: Selection,
                 fold: bool = True) -> tuple[dict[int, nn.BatchNorm2d], Optional[str]]:
    """For each chosen conv (by ``id``) whose block would be folded, its BatchNorm; and why none can be, if so.

    ``fold`` is ``fold_batchnorm`` with ``placement='conv'``. A conv's output must go to a
    BatchNorm alone (:func:`~composer_se.graph.batch_norm_consumers`) that
    :func:`~composer_se.layers.can_fold` accepts.
    """
    if not (fold and selection.chosen):
        return {}, None
    consumers, reason = batch_norm_consumers(network)
    folds = {}
    for site, _ in selection.chosen:
        norm = consumers.get(id(site.module))
        if norm is not None and can_fold(norm, site.channels):
            folds[id(site.module)] = norm
    return folds, reason


def broken_folds(model: nn.Module) -> list[str]:
    """Names of the SE convs in ``model`` whose block was folded into a BatchNorm that is no longer in it.

    Such a conv returns its output before SE and nothing applies the block: something
    replaced the BatchNorm after :func:`apply_squeeze_excite` folded the block into it.
    """
    folded = {id(m._folded_se) for m in model.modules() if isinstance(m, FoldedSqueezeExciteBatchNorm2d)}
    return [
        name for name, m in model.named_modules()
        if isinstance(m, SqueezeExciteConv2d) and m.folded_into_norm and id(m.se) not in folded
    ]


def _no_effect_message(selection: Selection, min_channels: int, placement: str) -> str:
    what = 'torch.nn.Conv2d' if placement == 'conv' else 'residual branch'
    if not selection.sites:
        return f'SqueezeExcite added no block: the model has no {what}.'
    if selection.skipped:
        skipped = selection.skipped
        return f'SqueezeExcite added no block: the {len(skipped)} selected modules were skipped ({skipped[0][1]}, ...).'
    widest = max(site.channels for site in selection.sites)
    return (
        f'SqueezeExcite added no block: no {what} passed the name patterns with at least min_channels={min_channels} '
        f'output channels (the largest out_channels in the model is {widest}).'
    )

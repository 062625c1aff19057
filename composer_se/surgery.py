"""Model surgery that adds Squeeze-and-Excitation blocks, in place.

:func:`apply_squeeze_excite` is the functional API, in four steps:

1. **select** (:func:`select_sites`): the placement's candidate modules (convolutions,
   or the ends of residual branches, :mod:`composer_se.placement`) that pass the
   channel and name rules;
2. **prepare**: a :class:`PreparedBlock` for each, with its new SE block built, the
   optimizer param groups it will join and the BatchNorm it will be folded into, if
   any; nothing is changed yet, so any error leaves the model as it was;
3. **commit**: each chosen module becomes a
   :class:`~composer_se.layers.SqueezeExciteConv2d` or
   :class:`~composer_se.layers.SqueezeExciteBatchNorm2d` in place, folded blocks are
   handed to their BatchNorm, and the parameters join their groups; nothing here can
   fail;
4. **report**: a :class:`SqueezeExciteReport` of what was added and skipped.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.optim import Optimizer

from composer_se.batchnorm import (FoldedSqueezeExciteBatchNorm2d, SqueezeExciteBatchNorm2d, fold_into_batch_norm_,
                                   fold_targets)
from composer_se.composer_plumbing.models import has_composers_squeeze_excite, network_of
from composer_se.layers import SqueezeExcite2d, SqueezeExciteConv2d, block_params
from composer_se.optimizer_groups import GroupTarget, as_optimizers, groups_for, join, param_index
from composer_se.placement import Site, find_sites
from composer_se.settings import DEFAULTS, UNSET, Patterns, SqueezeExciteSettings, settings_from

__all__ = [
    'AddedBlock',
    'NoEffectWarning',
    'PreparedBlock',
    'Selection',
    'SqueezeExciteReport',
    'add_squeeze_excite',
    'apply_squeeze_excite',
    'select_sites',
]


class NoEffectWarning(UserWarning):
    """:func:`apply_squeeze_excite` added no block, on a model that had none where its settings put one.

    The :class:`~composer_se.SqueezeExcite` algorithm gives it to a Trainer as
    Composer's own ``NoEffectWarning``, as Composer's algorithms do.
    """


@dataclass(frozen=True)
class AddedBlock:
    """One SE block added by :func:`apply_squeeze_excite`."""

    name: str  #: the name of the module it follows, e.g. ``'layer4.0.conv2'`` or ``'layer4.0.bn3'``
    in_channels: int
    out_channels: int
    latent_channels: int  #: ``L``, the width of the block's hidden layer
    num_params: int  #: parameters the block adds: ``2 * C * L + L + C``
    #: the BatchNorm that applies this block in one pass with its normalisation (see
    #: ``fold_batchnorm`` of :func:`apply_squeeze_excite`), or ``None``
    folded_into: Optional[str] = None


@dataclass(frozen=True)
class SqueezeExciteReport:
    """What one call of :func:`apply_squeeze_excite` did.

    ``skipped`` lists, as ``(name, reason)``, the modules that the channel and name
    rules selected but that got no new block: those that already have one (ours or
    Composer's), convs inside an SE or attention module of the network (the reason
    names its type, e.g. ``'inside an SE or attention module (SqueezeExcitation)'``) or,
    for ``placement='block'``, branch ends of residual blocks that hold one, and
    subclasses of ``Conv2d`` or ``BatchNorm2d``, whose own ``forward`` the conversion
    would drop.
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


@dataclass
class Selection:
    """The outcome of the placement, channel and name rules on a model, before any change."""

    chosen: list[tuple[Site, int]]  #: the sites that get a block, each with its block's latent_channels
    skipped: list[tuple[str, str]]  #: selected sites left alone: (name, reason)
    sites: list[Site]  #: every candidate site of the placement
    unsupported: list[str]  #: skipped sites of a type that cannot be converted, as 'name (Type)'
    #: selected sites whose block differs from what these settings would add: (name, what is there)
    others: list[tuple[str, str]] = dataclasses.field(default_factory=list)


_CONVERTIBLE = {nn.Conv2d: SqueezeExciteConv2d, nn.BatchNorm2d: SqueezeExciteBatchNorm2d}
#: Modules that have (or apply) an SE block of this package's: a BatchNorm a conv's block was folded into counts.
_HAS_A_BLOCK = (SqueezeExciteConv2d, SqueezeExciteBatchNorm2d, FoldedSqueezeExciteBatchNorm2d)
#: the reason in ``SqueezeExciteReport.skipped`` for a module that has a block already
ALREADY_HAS_A_BLOCK = 'already has an SE block'


def _block_there(module: nn.Module, settings: SqueezeExciteSettings, channels: int) -> Optional[str]:
    """What SE of this package ``module`` already has, in words, where it is not what ``settings`` would add there;
    else ``None`` (Composer's own blocks are named in the report's ``skipped``)."""
    folded = isinstance(module, FoldedSqueezeExciteBatchNorm2d)
    if folded:
        block, placement = module._folded_se, 'conv'  # the block of the conv before it, folded into it
    elif isinstance(module, (SqueezeExciteConv2d, SqueezeExciteBatchNorm2d)):
        block, placement = module.se, 'conv' if isinstance(module, SqueezeExciteConv2d) else 'block'
    else:
        return None
    if (placement, block.latent_channels, block.init) == (settings.placement, settings.latent_channels_for(channels),
                                                          settings.init):
        return None
    where = " (its conv's, folded into it)" if folded else ''
    return f"a block of placement='{placement}', latent_channels={block.latent_channels}, init='{block.init}'{where}"


def select_sites(model: nn.Module, settings: SqueezeExciteSettings = DEFAULTS) -> Selection:
    """Applies the placement, channel and name rules of ``settings`` to ``model`` without changing it.

    Raises the errors :func:`apply_squeeze_excite` raises before it changes anything: a
    wrapped model, a pattern that matches no module, ``placement='block'`` without a
    registered residual block.
    """
    _check_not_wrapped(model)
    _check_patterns_match(model, 'include', settings.include)
    _check_patterns_match(model, 'exclude', settings.exclude)
    sites = find_sites(model, settings.placement)
    selection = Selection(chosen=[], skipped=[], sites=sites, unsupported=[])
    for site in sites:
        if not settings.qualifies(site.channels):
            continue
        if settings.include and not _matches(site.names, settings.include):
            continue
        if settings.exclude and _matches(site.names, settings.exclude):
            continue
        name, module = site.names[0], site.module
        if isinstance(module, _HAS_A_BLOCK) or has_composers_squeeze_excite(module):
            selection.skipped.append((name, ALREADY_HAS_A_BLOCK))
            there = _block_there(module, settings, site.channels)
            if there is not None:
                selection.others.append((name, there))
        elif site.attention is not None:
            where = 'inside' if settings.placement == 'conv' else 'in a residual block that already has'
            selection.skipped.append((name, f'{where} an SE or attention module ({site.attention})'))
        elif type(module) not in _CONVERTIBLE:
            selection.skipped.append((name, f'is a {type(module).__name__}, not exactly a Conv2d or BatchNorm2d'))
            selection.unsupported.append(f'{name} ({type(module).__name__})')
        else:
            selection.chosen.append((site, settings.latent_channels_for(site.channels)))
    return selection


@dataclass(frozen=True)
class PreparedBlock:
    """One SE block that :func:`apply_squeeze_excite` will add, decided before anything changes."""

    site: Site  #: the module it goes after
    block: SqueezeExcite2d  #: the new block, built on the module's device and dtype
    groups: tuple[GroupTarget, ...]  #: the optimizer param groups it joins, with its parameter-name prefix there
    norm: Optional[nn.BatchNorm2d]  #: the BatchNorm it will be folded into, or None
    added: AddedBlock  #: what the report says of it


def apply_squeeze_excite(
    model: nn.Module,
    latent_channels: float = UNSET,
    min_channels: int = UNSET,
    *,
    include: Patterns = UNSET,
    exclude: Patterns = UNSET,
    init: str = UNSET,
    placement: str = UNSET,
    fold_batchnorm: bool = UNSET,
    optimizers: Union[Optimizer, Sequence[Optimizer], None] = None,
    settings: Optional[SqueezeExciteSettings] = None,
) -> SqueezeExciteReport:
    """Adds Squeeze-and-Excitation blocks to ``model``, in place.

    With ``placement='conv'`` (the default), a block goes after every
    :class:`torch.nn.Conv2d` whose **output** channel count is ``>= min_channels`` and
    whose name passes ``include`` / ``exclude``. (Composer's own
    ``apply_squeeze_excite`` tests ``min(in_channels, out_channels)``, as its algorithm
    class's docstring states, while its function's docstring says "one of" the two and
    its method card the output channels; ours follows the method card.) With
    ``placement='block'``, a block goes at the end of the residual branch of every
    registered residual block (see :mod:`composer_se.placement`) whose branch has
    ``>= min_channels`` channels: after the branch's last BatchNorm, before the
    addition, as in the paper's SE-ResNet.

    Each chosen module becomes a :class:`~composer_se.layers.SqueezeExciteConv2d` or
    :class:`~composer_se.layers.SqueezeExciteBatchNorm2d` in place, so its parameters
    keep their names and identity (``layer1.0.conv1.weight`` stays; the block's
    parameters are ``layer1.0.conv1.se.*``), hooks and shared uses survive, and a
    module that appears several times in the tree gets one block. Everything is checked
    and built before the model is touched: on error the model and the optimizers are as
    they were.

    No block goes on a conv inside an SE or attention module the network already has
    (torchvision's ``SqueezeExcitation`` in EfficientNet, MobileNetV3 and RegNetY; timm's
    SE, ECA, CBAM, split-attention, ... modules; see
    :func:`~composer_se.placement.register_attention_module`), and ``placement='block'``
    skips residual blocks that hold one. Such modules are listed in the report's
    ``skipped`` with the type of the module that holds them.

    Applying again is idempotent and, as in Composer, a second application is a silent
    no-op: modules that already have a block (ours, or Composer's
    ``SqueezeExciteConv2d``) are skipped, and when nothing was added because of that, no
    warning is given (not even the one for subclasses, which the first application
    gave). A :class:`NoEffectWarning` means the call did
    nothing on a model that had no block where these settings put one: the model has no
    candidate module, none passed the channel and name rules (the message names the
    largest channel count), or every one that passed was skipped for another reason
    (inside an SE or attention module, a subclass); the message says which.

    Args:
        model (torch.nn.Module): the model to modify; not wrapped in DDP, FSDP or
            ``torch.compile``.
        latent_channels, min_channels, include, exclude, init, placement, fold_batchnorm:
            the fields of :class:`~composer_se.settings.SqueezeExciteSettings`, in its
            order, which documents each (the first two also by position, as in
            Composer's function); or all of them at once as ``settings`` (not both).
            A pattern that matches no module name at all is an error (it is almost
            always a typo). Where ``fold_batchnorm`` folds a block, the conv
            module alone returns its output *before* SE (hooks on it see that); a model
            that does not trace with ``torch.fx`` gets no folding, and the report says
            why.
        optimizers (Optimizer | Sequence[Optimizer], optional): optimizers already
            built over ``model``'s parameters. Each block's parameters join the param
            group that holds its conv's ``weight`` (for ``placement='block'``, the
            branch's last conv), so they take that group's learning rate and weight
            decay. If that weight is in no group (a frozen conv, say) and there is
            exactly one group in all, they join that one; with several groups to
            choose from this is an error. Optimizers built after this call see the new
            parameters anyway. Default: ``None``.
        settings (SqueezeExciteSettings, optional): the SE arguments at once.

    Returns:
        SqueezeExciteReport: the blocks added (names, latent_channels, parameters) and
        the selected modules that were skipped, with the reason.

    Raises:
        ValueError: a bad hyperparameter or placement, a pattern that matches nothing,
            ``placement='block'`` on a model without a registered residual block, or
            SE parameters with no param group to join.
        TypeError: ``model`` is wrapped in DDP, FSDP or ``torch.compile``, or is no
            module; more than two SE arguments passed by position (the others, and
            ``optimizers``, are keyword-only).

    Warns:
        NoEffectWarning: no block was added, and none of the selected modules had one
            already (a re-application is silent; see above).
        UserWarning: a selected module is a subclass (of ``Conv2d``, say) and was
            skipped (not on a silent re-application).

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
    settings = settings_from(settings, latent_channels=latent_channels, min_channels=min_channels, include=include,
                             exclude=exclude, init=init, placement=placement, fold_batchnorm=fold_batchnorm)
    return add_squeeze_excite(model, settings, optimizers)


def add_squeeze_excite(model: nn.Module, settings: SqueezeExciteSettings,
                       optimizers: Union[Optimizer, Sequence[Optimizer], None] = None, *,
                       no_effect: type[Warning] = NoEffectWarning) -> SqueezeExciteReport:
    """:func:`apply_squeeze_excite` with the settings as one object, warning ``no_effect`` where it would warn
    :class:`NoEffectWarning` (the :class:`~composer_se.SqueezeExcite` algorithm passes Composer's own)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f'apply_squeeze_excite takes the model as a torch.nn.Module, got {type(model).__name__}: '
                        f'{model!r:.80}')
    selection = select_sites(model, settings)
    optimizers = as_optimizers(optimizers)
    _check_optimizers_hold_the_model(model, optimizers)
    prepared, fold_unavailable = _prepare(model, selection, settings, optimizers)
    for block in prepared:
        _commit(block)
    return _report(prepared, selection, settings, fold_unavailable, no_effect)


def _check_optimizers_hold_the_model(model: nn.Module, optimizers: tuple[Optimizer, ...]) -> None:
    """Optimizers given must hold some of the model's parameters: the SE blocks join their groups."""
    if not optimizers:
        return
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group['params']}
    if not any(id(p) in held for p in model.parameters()):
        groups = sum(len(opt.param_groups) for opt in optimizers)
        raise ValueError(
            f'the optimizer given holds none of the model\'s parameters ({len(held)} parameters in {groups} param '
            f'group{"s" if groups != 1 else ""}, none of them the model\'s), so the SE blocks would train in another '
            f'model\'s optimizer. Pass the optimizer built from this model\'s parameters, or none and build it after '
            f'applying SE.',
        )


def _prepare(model: nn.Module, selection: Selection, settings: SqueezeExciteSettings,
             optimizers: tuple[Optimizer, ...]) -> tuple[list[PreparedBlock], Optional[str]]:
    """Decides and builds every block before the model is touched."""
    chosen_convs = [site.module for site, _ in selection.chosen] if settings.folds else []
    folds, fold_unavailable = fold_targets(network_of(model), chosen_convs)
    module_names = {id(module): name for name, module in model.named_modules()}
    index = param_index(optimizers)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    prepared = []
    for site, latent_channels in selection.chosen:
        name = site.names[0]
        groups = groups_for(name, site.anchor, parameters.get(site.anchor), optimizers, index)
        # The module's device and dtype: its parameters', or an affine=False BatchNorm's running statistics.
        reference = next((t for t in (*site.module.parameters(), *site.module.buffers()) if t.is_floating_point()),
                         None)
        block = SqueezeExcite2d(site.channels, latent_channels, init=settings.init)
        if reference is not None:
            block.to(device=reference.device, dtype=reference.dtype)
        block.train(site.module.training)
        norm = folds.get(id(site.module))
        added = AddedBlock(
            name=name,
            in_channels=site.in_channels,
            out_channels=site.channels,
            latent_channels=latent_channels,
            num_params=block_params(site.channels, latent_channels),
            folded_into=None if norm is None else module_names[id(norm)],
        )
        prepared.append(PreparedBlock(site, block, tuple(groups), norm, added))
    return prepared, fold_unavailable


def _commit(prepared: PreparedBlock) -> None:
    """Puts one prepared block into the model and its param groups; cannot fail."""
    module = prepared.site.module
    _CONVERTIBLE[type(module)].convert_(module, prepared.block)
    if prepared.norm is not None:
        fold_into_batch_norm_(module, prepared.norm)
    join(prepared.block, prepared.groups)


def _report(prepared: list[PreparedBlock], selection: Selection, settings: SqueezeExciteSettings,
            fold_unavailable: Optional[str], no_effect: type[Warning]) -> SqueezeExciteReport:
    """The report, and the warnings: skipped subclasses, no block added; none for a re-application."""
    reapplied = not prepared and any(reason == ALREADY_HAS_A_BLOCK for _, reason in selection.skipped)
    if selection.unsupported and not reapplied:
        warnings.warn(
            f'SE was not added after these selected modules, which are subclasses whose own forward the conversion '
            f'would drop: {", ".join(selection.unsupported)}',
            UserWarning,
        )
    if not prepared and not reapplied:
        warnings.warn(_no_effect_message(selection, settings), no_effect)
    if selection.others:
        shown = '; '.join(f'{name} has {there}' for name, there in selection.others[:3])
        more = f' (and {len(selection.others) - 3} more)' if len(selection.others) > 3 else ''
        warnings.warn(
            f'SE was applied again with other arguments, {settings.call()}: {len(selection.others)} of the modules '
            f'they select already have SE of other arguments and were left as they are: {shown}{more}. '
            f'{f"It added {len(prepared)} blocks elsewhere." if prepared else "It added no block."} To change the SE '
            f'of a model, apply it to the model without SE.',
            UserWarning,
        )
    wider = [block.added for block in prepared if block.added.latent_channels > block.added.out_channels]
    if wider:
        example = wider[0]
        warnings.warn(
            f'latent_channels={settings.latent_channels} is more than the channels of {len(wider)} of the '
            f'{len(prepared)} blocks (for example {example.name}: latent_channels={example.latent_channels} '
            f'for {example.out_channels} channels): their hidden layer is wider than what it squeezes. A fraction '
            f'(latent_channels=1/16) scales it with each block.',
            UserWarning,
        )
    return SqueezeExciteReport(
        added=tuple(block.added for block in prepared),
        skipped=tuple(selection.skipped),
        fold_unavailable=fold_unavailable,
    )


def _no_effect_message(selection: Selection, settings: SqueezeExciteSettings) -> str:
    what = 'torch.nn.Conv2d' if settings.placement == 'conv' else 'residual branch'
    if not selection.sites:
        return f'SqueezeExcite added no block: the model has no {what}.'
    if selection.skipped:
        reasons = Counter(reason for _, reason in selection.skipped)
        shown = '; '.join(f'{reason}: {count}' for reason, count in reasons.most_common(3))
        more = f'; and {len(reasons) - 3} other reasons' if len(reasons) > 3 else ''
        return (f'SqueezeExcite added no block: all {len(selection.skipped)} modules that passed the channel and name '
                f'rules were skipped: {shown}{more}.')
    widest = max(site.channels for site in selection.sites)
    return (
        f'SqueezeExcite added no block: no {what} passed the name patterns with at least '
        f'min_channels={settings.min_channels} output channels (the largest out_channels in the model is {widest}).'
    )

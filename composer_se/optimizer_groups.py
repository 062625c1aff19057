"""Which optimizer param group each new SE block joins, and joining it."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import nn
from torch.optim import Optimizer

__all__ = ['GroupTarget', 'as_optimizers', 'groups_for', 'join', 'param_index']

#: A param group and the prefix that the block's parameter names take in it (for
#: groups built from ``named_parameters()``, which keep ``'param_names'``).
GroupTarget = tuple[dict, str]
#: ``id(parameter)`` -> the groups holding it, each with the parameter's name there (or ``None``).
ParamIndex = dict[int, list[tuple[dict, Optional[str]]]]


def as_optimizers(optimizers: Union[Optimizer, Sequence[Optimizer], None]) -> tuple[Optimizer, ...]:
    if optimizers is None:
        return ()
    if isinstance(optimizers, Optimizer):
        return (optimizers,)
    try:
        given = tuple(optimizers)
    except TypeError:
        given = None
    if given is None or not all(isinstance(o, Optimizer) for o in given):
        raise TypeError(f'optimizers must be a torch.optim.Optimizer, a sequence of them, or None, got '
                        f'{type(optimizers).__name__}: {optimizers!r:.80}')
    return given


def param_index(optimizers: Sequence[Optimizer]) -> ParamIndex:
    """For each parameter held by ``optimizers`` (by ``id``): the groups holding it, each with its name there.

    A group built from ``named_parameters()`` keeps ``'param_names'`` beside ``'params'``;
    elsewhere the name is ``None``.
    """
    index: ParamIndex = {}
    for opt in optimizers:
        for group in opt.param_groups:
            names = group.get('param_names', [None] * len(group['params']))
            for param, name in zip(group['params'], names):
                index.setdefault(id(param), []).append((group, name))
    return index


def groups_for(site_name: str, anchor: str, anchor_param: Optional[nn.Parameter],
               optimizers: Sequence[Optimizer], index: ParamIndex) -> list[GroupTarget]:
    """The groups that the SE block at ``site_name`` joins: those holding its ``anchor`` weight.

    The names of the block's parameters there follow the group's own name for the
    anchor weight (``'module.0.weight'`` for ``'0.weight'`` gives
    ``'module.0.se.fc1.weight'``, ...). If the anchor is in no group and there is
    exactly one group in all, the block joins that one.

    Raises:
        ValueError: the anchor is in no group and there are several to choose from.
    """
    se_prefix = f'{site_name}.se.' if site_name else 'se.'
    targets = []
    for group, group_name in (index.get(id(anchor_param), []) if anchor_param is not None else []):
        outer = group_name[:-len(anchor)] if group_name and group_name.endswith(anchor) else ''
        targets.append((group, outer + se_prefix))
    if optimizers and not targets:
        num_groups = sum(len(opt.param_groups) for opt in optimizers)
        if num_groups != 1:
            raise ValueError(
                f'the weight {anchor!r} that decides the param group of the SE block at {site_name!r} is in '
                f'none of the {num_groups} optimizer param groups, so the group is ambiguous. Build the '
                f'optimizer after applying SE, or leave this module out with exclude=[{site_name!r}].',
            )
        targets = [(optimizers[0].param_groups[0], se_prefix)]
    return targets


def join(block: nn.Module, targets: Sequence[GroupTarget]) -> None:
    """Appends ``block``'s parameters (and names, where the group keeps them) to each target group."""
    for group, prefix in targets:
        for param_name, param in block.named_parameters():
            group['params'].append(param)
            if 'param_names' in group:
                group['param_names'].append(prefix + param_name)

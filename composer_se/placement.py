"""Where SE blocks go: after convolutions, or at the end of residual branches.

``placement='conv'`` (the default, as in Composer's method card) considers every
``torch.nn.Conv2d`` of the model. ``placement='block'`` (as in the paper's SE-ResNet and
timm's ``seresnet50``) considers one module per residual block: the last one of its
residual branch, after which SE scales the branch before it is added to the shortcut.
Which module that is depends on the block type; this module keeps a registry of them,
with torchvision's ``BasicBlock`` and ``Bottleneck`` registered here (the recipes' CIFAR
``BasicBlock`` registers itself where it is defined). Register your own with
:func:`register_residual_block`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchvision
from torch import nn

from composer_se.settings import PLACEMENTS

__all__ = ['Site', 'find_sites', 'register_residual_block', 'registered_blocks']

_BRANCH_ENDS: dict[type, str] = {}


def register_residual_block(block_type: type, branch_end: str) -> None:
    """Tells ``placement='block'`` where the residual branch of ``block_type`` ends.

    Args:
        block_type (type): a ``torch.nn.Module`` subclass (its subclasses are covered too).
        branch_end (str): the dotted name, inside the block, of the module whose output
            is the residual branch just before it is added to the shortcut: ``'bn3'`` for
            torchvision's ``Bottleneck``. It must be a ``Conv2d`` or a ``BatchNorm2d``
            (``find_sites`` raises otherwise).

    Example:
        >>> from torch import nn
        >>> from composer_se.placement import register_residual_block
        >>> class MyBlock(nn.Module):
        ...     def __init__(self, channels):
        ...         super().__init__()
        ...         self.branch = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        ...     def forward(self, x):
        ...         return x + self.branch(x)
        >>> register_residual_block(MyBlock, 'branch.1')
    """
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise TypeError(f'block_type must be a torch.nn.Module subclass, got {block_type!r}')
    if not isinstance(branch_end, str) or not branch_end:
        raise ValueError(f'branch_end must be the dotted name of a submodule, such as "bn3", got {branch_end!r}')
    _BRANCH_ENDS[block_type] = branch_end


def registered_blocks() -> dict[type, str]:
    """The registered residual block types and where their branches end."""
    return dict(_BRANCH_ENDS)


register_residual_block(torchvision.models.resnet.BasicBlock, 'bn2')
register_residual_block(torchvision.models.resnet.Bottleneck, 'bn3')


@dataclass
class Site:
    """A module after which an SE block may go.

    ``names`` are all the names it has in the model (a shared module has several).
    ``anchor`` is the dotted name of the weight whose optimizer param group the SE
    parameters join: the conv's own weight for ``placement='conv'``; for
    ``placement='block'``, the weight of the last ``Conv2d`` of the branch (a
    BatchNorm's weight usually sits in a group without weight decay).
    """

    module: nn.Module
    names: list[str]
    anchor: str
    block_in_channels: int | None = None  #: for placement='block': the residual block's input channels

    @property
    def channels(self) -> int:
        """The channel count of the module's output, which the SE block scales."""
        module = self.module
        return module.out_channels if isinstance(module, nn.Conv2d) else getattr(module, 'num_features', 0)

    @property
    def in_channels(self) -> int:
        """The conv's input channels, or the residual block's for a branch end."""
        if self.block_in_channels is not None:
            return self.block_in_channels
        module = self.module
        return module.in_channels if isinstance(module, nn.Conv2d) else self.channels


def _branch_end(block: nn.Module) -> str | None:
    for block_type in type(block).__mro__:
        if block_type in _BRANCH_ENDS:
            return _BRANCH_ENDS[block_type]
    return None


def find_sites(model: nn.Module, placement: str) -> list[Site]:
    """The candidate modules for ``placement``, in model order, each module once.

    Raises:
        ValueError: ``placement`` is unknown, or ``'block'`` and the model has no
            registered residual block, or a registered block lacks its branch end.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f'placement must be one of {PLACEMENTS}, got {placement!r}')
    sites: dict[nn.Module, Site] = {}

    def add(module: nn.Module, name: str, anchor: str, block_in_channels: int | None = None) -> None:
        if module in sites:
            sites[module].names.append(name)
        else:
            sites[module] = Site(module, [name], anchor, block_in_channels)

    for name, module in model.named_modules(remove_duplicate=False):
        if placement == 'conv':
            if isinstance(module, nn.Conv2d):
                add(module, name, _join(name, 'weight'))
            continue
        branch_end = _branch_end(module)
        if branch_end is None:
            continue
        try:
            end = module.get_submodule(branch_end)
        except AttributeError:
            raise ValueError(
                f'residual block {name!r} ({type(module).__name__}) has no submodule {branch_end!r}, where its '
                f'registration says its branch ends',
            ) from None
        if not isinstance(end, (nn.Conv2d, nn.BatchNorm2d)):
            raise ValueError(
                f'residual block {name!r} ({type(module).__name__}) ends its branch with {branch_end!r}, a '
                f'{type(end).__name__}; SE can follow only a Conv2d or a BatchNorm2d there',
            )
        first_conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        add(end, _join(name, branch_end), _join(name, _branch_anchor(module, branch_end)),
            first_conv.in_channels if first_conv is not None else None)
    if placement == 'block' and not sites:
        known = ', '.join(sorted(f'{t.__module__}.{t.__qualname__}' for t in _BRANCH_ENDS))
        raise ValueError(
            f'placement="block" found no residual block of a known type in {type(model).__name__}. Known types: '
            f'{known}. Register yours with composer_se.register_residual_block(BlockType, "<name of the branch\'s '
            f'last module>"), or use placement="conv" (SE after every qualifying Conv2d), which works on any model.',
        )
    return list(sites.values())


def _join(prefix: str, name: str) -> str:
    return f'{prefix}.{name}' if prefix else name


def _branch_anchor(block: nn.Module, branch_end: str) -> str:
    """The weight of the last Conv2d before ``branch_end`` in ``block``, or the branch end's own weight."""
    anchor = _join(branch_end, 'weight')
    for name, module in block.named_modules():
        if name == branch_end:
            break
        if isinstance(module, nn.Conv2d):
            anchor = _join(name, 'weight')
    return anchor

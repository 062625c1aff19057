"""Where SE blocks go: after convolutions, or at the end of residual branches; and where they never go.

``placement='conv'`` (the default, as in Composer's method card) considers every
``torch.nn.Conv2d`` of the model. ``placement='block'`` (as in the paper's SE-ResNet and
timm's ``seresnet50``) considers one module per residual block: the last one of its
residual branch, after which SE scales the branch before it is added to the shortcut.
Which module that is depends on the block type; this module keeps a registry of them,
with torchvision's ``BasicBlock`` and ``Bottleneck`` registered here (the recipes' CIFAR
``BasicBlock`` registers itself where it is defined). Register your own with
:func:`register_residual_block`.

Many networks already have SE or attention modules of their own (EfficientNet,
MobileNetV3 and RegNetY have SE; timm offers ECA, CBAM, split attention, ...). Their
convolutions compute a gate or an attention map, not features, so no SE block goes on
a conv inside one, and ``placement='block'`` leaves alone a residual block that already
has one. A second registry lists these module types: torchvision's
``SqueezeExcitation`` is registered here; timm's SE and attention modules (see
:data:`TIMM_ATTENTION_MODULES`) and residual blocks are registered the first time sites
are looked for after ``timm`` was imported (a model built by timm implies that), so timm
stays optional and is never imported by this package. Register your own with
:func:`register_attention_module`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Optional

import torchvision
from torch import nn

from composer_se.settings import PLACEMENTS

__all__ = [
    'TIMM_ATTENTION_MODULES',
    'TIMM_RESIDUAL_BLOCKS',
    'Site',
    'find_sites',
    'register_attention_module',
    'register_residual_block',
    'registered_attention_modules',
    'registered_blocks',
]

_BRANCH_ENDS: dict[type, str] = {}
_ATTENTION: dict[type, None] = {}  # an ordered set

#: timm's SE and attention modules whose convolutions SE must not touch, by defining
#: module: the layers that ``timm.layers.create_attn`` builds (and the attention parts
#: of selective-kernel and MobileNetV4 blocks), EfficientNet's and the legacy SENet's SE
#: modules, and HGNet's ESE. Modules or names an older timm lacks are passed over (its
#: models cannot hold them); with the installed timm, the tests check that all exist.
TIMM_ATTENTION_MODULES = {
    'timm.layers.squeeze_excite': ('SEModule', 'EffectiveSEModule', 'SqueezeExciteCl'),
    'timm.layers.eca': ('EcaModule', 'CecaModule'),
    'timm.layers.cbam': ('CbamModule', 'LightCbamModule'),
    'timm.layers.gather_excite': ('GatherExcite',),
    'timm.layers.global_context': ('GlobalContext',),
    'timm.layers.selective_kernel': ('SelectiveKernelAttn',),
    'timm.layers.split_attn': ('SplitAttn',),
    'timm.layers.bottleneck_attn': ('BottleneckAttn',),
    'timm.layers.halo_attn': ('HaloAttn',),
    'timm.layers.lambda_layer': ('LambdaLayer',),
    'timm.layers.non_local_attn': ('NonLocalAttn', 'BatNonLocalAttn'),
    'timm.layers.coord_attn': ('CoordAttn', 'SimpleCoordAttn', 'EfficientLocalAttn', 'StripAttn'),
    'timm.layers.attention2d': ('Attention2d', 'MultiQueryAttention2d', 'MultiQueryAttentionV2'),
    'timm.models._efficientnet_blocks': ('SqueezeExcite',),
    'timm.models.senet': ('SEModule',),
    'timm.models.hgnet': ('EseModule',),
}
#: timm's residual blocks for ``placement='block'``: (module, class, branch end).
TIMM_RESIDUAL_BLOCKS = (('timm.models.resnet', 'BasicBlock', 'bn2'), ('timm.models.resnet', 'Bottleneck', 'bn3'))
_timm_registered = False


def _check_module_type(argument: str, value: object) -> None:
    if not (isinstance(value, type) and issubclass(value, nn.Module)):
        raise TypeError(f'{argument} must be a torch.nn.Module subclass, got {value!r}')


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
    _check_module_type('block_type', block_type)
    if not isinstance(branch_end, str) or not branch_end:
        raise ValueError(f'branch_end must be the dotted name of a submodule, such as "bn3", got {branch_end!r}')
    _BRANCH_ENDS[block_type] = branch_end


def registered_blocks() -> dict[type, str]:
    """The registered residual block types and where their branches end."""
    _register_timm()
    return dict(_BRANCH_ENDS)


def register_attention_module(module_type: type) -> None:
    """Marks ``module_type`` as an SE or attention module that the network already has.

    No SE block goes on a ``Conv2d`` inside such a module (its convolutions compute a
    gate or an attention map, not features), and ``placement='block'`` skips a residual
    block that holds one. Surgery reports those convs (or blocks) in ``skipped`` with the
    module's type. torchvision's ``SqueezeExcitation`` and timm's SE and attention
    modules are registered already.

    Args:
        module_type (type): a ``torch.nn.Module`` subclass (its subclasses are covered too).

    Example:
        >>> import torch
        >>> from composer_se import apply_squeeze_excite
        >>> from composer_se.placement import register_attention_module
        >>> class Gate(torch.nn.Module):
        ...     def __init__(self, channels):
        ...         super().__init__()
        ...         self.fc = torch.nn.Conv2d(channels, channels, 1)
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        >>> register_attention_module(Gate)
        >>> apply_squeeze_excite(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), Gate(8)), 4, 8).skipped
        (('1.fc', 'inside an SE or attention module (Gate)'),)
    """
    _check_module_type('module_type', module_type)
    _ATTENTION[module_type] = None


def registered_attention_modules() -> tuple[type, ...]:
    """The registered SE and attention module types, in the order they were registered."""
    _register_timm()
    return tuple(_ATTENTION)


def _register_timm() -> None:
    """Registers timm's attention modules and residual blocks once timm has been imported (never imports it)."""
    global _timm_registered
    if _timm_registered or sys.modules.get('timm') is None:
        return
    _timm_registered = True
    for module_name, names in TIMM_ATTENTION_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:  # an older timm without this model family
            continue
        for name in names:
            if hasattr(module, name):
                register_attention_module(getattr(module, name))
    for module_name, name, branch_end in TIMM_RESIDUAL_BLOCKS:
        register_residual_block(getattr(importlib.import_module(module_name), name), branch_end)


register_residual_block(torchvision.models.resnet.BasicBlock, 'bn2')
register_residual_block(torchvision.models.resnet.Bottleneck, 'bn3')
register_attention_module(torchvision.ops.misc.SqueezeExcitation)


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
    #: the type name of the registered SE or attention module that the conv is inside
    #: (placement='conv') or that the residual block holds (placement='block'), if any:
    #: such a site gets no block (see :func:`register_attention_module`)
    attention: Optional[str] = None

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


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, tuple(_ATTENTION))


def _enclosing_attention(name: str, modules: dict[str, nn.Module]) -> Optional[str]:
    """The type name of the outermost registered attention module that contains module ``name``, if any."""
    parts = name.split('.') if name else []
    for prefix in ('.'.join(parts[:i]) for i in range(len(parts))):  # '', 'a', 'a.b', ... (not name itself)
        if _is_attention(modules[prefix]):
            return type(modules[prefix]).__name__
    return None


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
    _register_timm()
    sites: dict[nn.Module, Site] = {}
    modules = dict(model.named_modules(remove_duplicate=False))

    def add(module: nn.Module, name: str, anchor: str, block_in_channels: int | None = None,
            attention: Optional[str] = None) -> None:
        if module not in sites:
            sites[module] = Site(module, [], anchor, block_in_channels)
        site = sites[module]
        site.names.append(name)
        site.attention = site.attention or attention  # a module shared with an attention module is left alone

    for name, module in modules.items():
        if placement == 'conv':
            if isinstance(module, nn.Conv2d):
                add(module, name, _join(name, 'weight'), attention=_enclosing_attention(name, modules))
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
        held = next((m for m in module.modules() if _is_attention(m)), None)
        add(end, _join(name, branch_end), _join(name, _branch_anchor(module, branch_end)),
            first_conv.in_channels if first_conv is not None else None,
            type(held).__name__ if held is not None else _enclosing_attention(name, modules))
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
    """The weight of the branch's last Conv2d in ``block``: the branch end itself if it is one, else the last before
    it; the branch end's own weight if the branch has no conv."""
    anchor = _join(branch_end, 'weight')
    for name, module in block.named_modules():
        if isinstance(module, nn.Conv2d):
            anchor = _join(name, 'weight')
        if name == branch_end:
            break
    return anchor

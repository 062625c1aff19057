"""The planner: where SE blocks would go in a model and what they would cost, before training.

:func:`plan_squeeze_excite` applies the same rules as
:func:`~composer_se.surgery.apply_squeeze_excite` (it calls the same selection code)
to a model, runs the model once, in training mode, on a ``meta`` tensor to learn every
feature map's size, and returns a :class:`Plan`: one :class:`BlockCost` per SE block (the
block as the surgery's report would describe it, and its costs), totals against the
unmodified model, and the method card's advice for choosing ``min_channels``.
It works on a copy of the model whose weights are ``meta`` tensors: no weight is
copied, no activation is allocated and nothing is computed, so it is instant even for
large models, and the model itself is left as it was.

Costs per block, for ``C`` channels, ``L = latent_channels`` and an ``H x W`` feature
map, per image:

- parameters: ``2 * C * L + L + C`` (two linear layers with biases);
- FLOPs: ``4 * C * L``, the two matrix products, counted as
  ``torch.utils.flop_counter`` counts them (a multiply-add is 2 FLOPs; the pooling,
  sigmoid and scaling are memory-bound and counted as traffic instead);
- activation traffic: ``3 * C * H * W`` elements: the block reads the feature map once
  to average it and once to scale it, and writes the scaled map. A block applied in one
  pass with its BatchNorm (folded into the BatchNorm after its conv with
  ``fold_batchnorm``, or at the end of a residual branch with ``placement='block'``)
  scales inside the BatchNorm's own pass, so only the read that averages is extra:
  ``C * H * W`` (in evaluation; in training even that read is the BatchNorm's own
  statistics pass);
- kept for backward: ``C * H * W`` elements, the conv output that the scaling needs
  (the BatchNorm after it keeps the scaled map); a block applied with its BatchNorm
  keeps nothing of that size, since the BatchNorm keeps its input anyway.

The model's own traffic is the input plus output bytes of each of its leaf modules,
per image, the same crude measure; the percentages compare like with like.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from composer_se.batchnorm import fold_targets
from composer_se.composer_plumbing.models import network_of
from composer_se.layers import block_params
from composer_se.settings import UNSET, Patterns, SqueezeExciteSettings, settings_from
from composer_se.surgery import AddedBlock, select_sites

__all__ = ['BlockCost', 'Plan', 'format_plan', 'plan_squeeze_excite']

FORMATS = ('table', 'markdown', 'json')
#: The settings that change a plan (``init`` does not), in their order.
PLANNED = tuple(f.name for f in dataclasses.fields(SqueezeExciteSettings) if f.name != 'init')
_BATCH = 2  #: images in the planner's meta batch; FLOPs and traffic grow linearly with it


@dataclass
class BlockCost:
    """One SE block the surgery would add, and what it costs per image."""

    block: AddedBlock  #: the block, as the surgery's report would describe it
    feature_map: tuple[int, int]  #: height and width of the feature map it scales
    flops: int
    traffic_bytes: int  #: activation bytes the block reads and writes per image
    saved_bytes: int  #: activation bytes the block keeps for backward per image (full-size tensors)


@dataclass
class Plan:
    """What :func:`plan_squeeze_excite` found: a :class:`BlockCost` per block, the model's own figures, the settings."""

    rows: list[BlockCost]
    input_size: tuple[int, int]
    bytes_per_element: int
    model_params: int
    model_flops: int  #: per image, as torch.utils.flop_counter counts them
    model_traffic_bytes: int  #: input + output bytes of every leaf module, per image
    largest_channels: int  #: the widest site (conv output or residual branch) in the model
    #: min_channels -> (blocks, parameters added), for each distinct site channel count
    candidates: dict[int, tuple[int, int]] = field(default_factory=dict)
    settings: SqueezeExciteSettings = field(default_factory=SqueezeExciteSettings)
    #: (name, reason) of the modules that passed the channel and name rules but would get no block, as in
    #: the surgery report: inside an SE or attention module of the network, already with a block, a subclass
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return sum(row.block.num_params for row in self.rows)

    @property
    def flops(self) -> int:
        return sum(row.flops for row in self.rows)

    @property
    def traffic_bytes(self) -> int:
        return sum(row.traffic_bytes for row in self.rows)

    @property
    def saved_bytes(self) -> int:
        return sum(row.saved_bytes for row in self.rows)


def _leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are meta tensors (nothing is duplicated)."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device='meta'), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device='meta')
    return copy.deepcopy(model, memo)


def plan_squeeze_excite(
    model: nn.Module,
    input_size: tuple[int, int] = (224, 224),
    latent_channels: float = UNSET,
    min_channels: int = UNSET,
    *,
    include: Patterns = UNSET,
    exclude: Patterns = UNSET,
    init: str = UNSET,
    placement: str = UNSET,
    fold_batchnorm: bool = UNSET,
    bytes_per_element: int = 4,
    settings: Optional[SqueezeExciteSettings] = None,
) -> Plan:
    """What :func:`~composer_se.surgery.apply_squeeze_excite` would add to ``model``, and its cost.

    ``model`` is not changed: the planner works on a copy on the ``meta`` device. For a
    ``ComposerClassifier``, it plans the network inside, as the algorithm does. It runs
    the copy in training mode, as SE trains, so that branches used only in training
    (Inception's and GoogLeNet's auxiliary classifiers) are planned too, on a batch of
    two 3-channel images of ``input_size`` (height, width; two, so that BatchNorm sees
    more than one value per channel); the figures are per image.
    ``bytes_per_element`` is 4 for fp32 activations, 2 for bf16 or fp16. The SE
    arguments are the fields of :class:`~composer_se.settings.SqueezeExciteSettings`, in
    its order, which documents each (the first two also by position), or all at once as
    ``settings`` (not both), as for :func:`~composer_se.surgery.apply_squeeze_excite`
    (``init`` changes no cost).
    """
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f'input_size must be (height, width) with both >= 1, got {input_size!r}')
    if bytes_per_element not in (1, 2, 4, 8):
        raise ValueError(f'bytes_per_element must be 1, 2, 4 or 8, got {bytes_per_element!r}')
    settings = settings_from(settings, latent_channels=latent_channels, min_channels=min_channels, include=include,
                             exclude=exclude, init=init, placement=placement, fold_batchnorm=fold_batchnorm)
    meta = _meta_copy(network_of(model)).train()
    selection = select_sites(meta, settings)
    folds = fold_targets(meta, [site.module for site, _ in selection.chosen] if settings.folds else [])[0]
    names = {id(module): name for name, module in meta.named_modules()}

    shapes: dict[nn.Module, torch.Size] = {}
    traffic = 0

    def record(module: nn.Module, inputs: tuple, output: Any) -> None:
        nonlocal traffic
        if isinstance(output, torch.Tensor):
            shapes.setdefault(module, output.shape)
            if _leaf(module):
                elements = output.numel() + sum(x.numel() for x in inputs if isinstance(x, torch.Tensor))
                traffic += elements * bytes_per_element

    hooks = [module.register_forward_hook(record) for module in meta.modules()]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta(torch.empty(_BATCH, 3, *input_size, device='meta'))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(f'{type(meta).__name__} does not run on {input_size[0]}x{input_size[1]} images in training '
                         f'mode ({reason}); plan it at another input size') from error
    finally:
        for hook in hooks:
            hook.remove()

    rows = []
    for site, latent_channels in selection.chosen:
        shape = shapes.get(site.module)
        if shape is None or len(shape) != 4:
            raise ValueError(f'module {site.names[0]!r} did not produce a 4-D feature map in the forward pass, so its '
                             f'SE cost cannot be planned')
        channels, height, width = int(shape[1]), int(shape[2]), int(shape[3])
        norm = folds.get(id(site.module))
        fused = norm is not None or settings.placement == 'block'  # SE applied in one pass with a BatchNorm
        feature_map = channels * height * width * bytes_per_element
        block = AddedBlock(name=site.names[0], in_channels=site.in_channels, out_channels=channels,
                           latent_channels=latent_channels, num_params=block_params(channels, latent_channels),
                           folded_into=None if norm is None else names[id(norm)])
        rows.append(BlockCost(
            block=block,
            feature_map=(height, width),
            flops=4 * channels * latent_channels,
            traffic_bytes=feature_map if fused else 3 * feature_map,
            saved_bytes=0 if fused else feature_map,
        ))

    # The same rules at each distinct site channel count as min_channels (patterns and existing blocks included):
    # select once with no channel bound; each threshold keeps the sites it qualifies. Convs inside the
    # network's SE or attention modules never get a block, so their channel counts are no choice.
    thresholds = sorted({site.channels for site in selection.sites if site.attention is None})
    unbounded = select_sites(meta, dataclasses.replace(settings, min_channels=1)).chosen
    candidates = {}
    for threshold in thresholds:
        bound = dataclasses.replace(settings, min_channels=threshold)
        chosen = [(site, latent) for site, latent in unbounded if bound.qualifies(site.channels)]
        candidates[threshold] = (len(chosen), sum(block_params(site.channels, latent) for site, latent in chosen))
    return Plan(
        rows=rows,
        input_size=(int(input_size[0]), int(input_size[1])),
        bytes_per_element=bytes_per_element,
        model_params=sum(p.numel() for p in meta.parameters()),
        model_flops=int(counter.get_total_flops()) // _BATCH,
        model_traffic_bytes=traffic // _BATCH,
        largest_channels=thresholds[-1] if thresholds else 0,
        candidates=candidates,
        settings=settings,
        skipped=list(selection.skipped),
    )


def _percent(part: int, whole: int) -> str:
    return f'{100 * part / whole:.2f}%' if whole else 'n/a'


def _table(header: list[str], body: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
        return lines + ['| ' + ' | '.join(row) + ' |' for row in body]
    widths = [max(len(cell) for cell in column) for column in zip(header, *body)]
    line = lambda cells: '  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), line(['-' * w for w in widths])] + [line(row) for row in body]


def _advice(plan: Plan) -> str:
    if plan.settings.placement == 'block':
        return ('Advice: the paper puts SE on every residual block (min_channels=1) with latent_channels=1/16. '
                'Blocks and parameters for each min_channels:')
    return (f'Method card advice: min_channels=512 for ImageNet-scale models; for smaller ones, the largest output '
            f'channel count, here {plan.largest_channels}. Blocks and parameters for each min_channels:')


def format_plan(plan: Plan, style: str = 'table') -> str:
    """The plan as an aligned text table, a Markdown table or JSON."""
    if style not in FORMATS:
        raise ValueError(f'format must be one of {FORMATS}, got {style!r}')
    if style == 'json':
        document = asdict(plan)
        document['candidates'] = {str(k): {'blocks': v[0], 'num_params': v[1]} for k, v in plan.candidates.items()}
        document['totals'] = {'blocks': len(plan.rows), 'num_params': plan.num_params, 'flops': plan.flops,
                              'traffic_bytes': plan.traffic_bytes, 'saved_bytes': plan.saved_bytes}
        document['skipped'] = [{'name': name, 'reason': reason} for name, reason in plan.skipped]
        return json.dumps(document, indent=2)
    markdown = style == 'markdown'
    header = ['module', 'in->out', 'HxW', 'latent', 'params', 'FLOPs', 'traffic (bytes)', 'kept (bytes)', 'folded into']
    body = [[row.block.name, f'{row.block.in_channels}->{row.block.out_channels}',
             f'{row.feature_map[0]}x{row.feature_map[1]}', str(row.block.latent_channels), f'{row.block.num_params:,}',
             f'{row.flops:,}', f'{row.traffic_bytes:,}', f'{row.saved_bytes:,}', row.block.folded_into or '-']
            for row in plan.rows]
    settings = ', '.join(f'{name}={getattr(plan.settings, name)!r}' for name in PLANNED)
    lines = [f'SE plan at {plan.input_size[0]}x{plan.input_size[1]} ({settings}), per image:', '']
    lines += _table(header, body, markdown)
    lines += [
        '',
        f'{len(plan.rows)} SE blocks add {plan.num_params:,} parameters '
        f'({_percent(plan.num_params, plan.model_params)} of {plan.model_params:,}, making '
        f'{plan.model_params + plan.num_params:,}), {plan.flops:,} FLOPs ({_percent(plan.flops, plan.model_flops)} of '
        f'{plan.model_flops:,}) and {plan.traffic_bytes:,} bytes of activation traffic '
        f'({_percent(plan.traffic_bytes, plan.model_traffic_bytes)} of {plan.model_traffic_bytes:,}); '
        f'{sum(row.block.folded_into is not None for row in plan.rows)} blocks are folded into the BatchNorm after '
        f'their conv, and the blocks keep {plan.saved_bytes:,} bytes of activations for backward.',
        '',
    ]
    if plan.skipped:
        lines += [f'{len(plan.skipped)} selected modules get no block:', '']
        lines += _table(['module', 'reason'], [list(entry) for entry in plan.skipped], markdown)
        lines += ['']
    lines += [
        _advice(plan),
        '',
    ]
    lines += _table(['min_channels', 'blocks', 'params'],
                    [[str(k), str(v[0]), f'{v[1]:,}'] for k, v in plan.candidates.items()], markdown)
    return '\n'.join(lines)

"""``composer-se gates``: the SENet paper's excitation figure for a recipe's model (a checkpoint's weights) on its data.

The figure has one panel per chosen block (the mean gate of each channel, one line per
class, as in the paper's "Role of Excitation" figures) and a bar chart of every block's
input dependence (:class:`~composer_se.gates.GateStatistics`); the command also prints
each block's statistics as a table.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from composer_se.gates import GateStatistics, gate_statistics
from composer_se.recipes.config import RecipeConfig, RecipeError, load_recipe
from composer_se.settings import SqueezeExciteSettings

__all__ = ['choose_blocks', 'draw', 'format_table', 'measure_recipe', 'recipe_se_model']


def recipe_se_model(recipe: str, config: RecipeConfig, checkpoint: Optional[str]) -> nn.Module:
    """``recipe``'s model (a ``ComposerClassifier``) with its SE blocks, holding ``checkpoint``'s weights, else the
    recipe's initial weights (seeded, the same on every call); a checkpoint of another model is a RecipeError."""
    from composer_se.composer_plumbing.checkpoint_format import model_state_of
    from composer_se.recipes.models import build_model
    from composer_se.recipes.safe_load import read_checkpoint
    from composer_se.surgery import apply_squeeze_excite

    se = config.algorithms.get('squeeze_excite')
    if se is None:
        raise RecipeError(f'{recipe}: the recipe adds no SE (algorithms.squeeze_excite), so there is no gate to show')
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    apply_squeeze_excite(model.module, settings=SqueezeExciteSettings(**se))
    if checkpoint is not None:
        state = model_state_of(read_checkpoint(checkpoint), f'checkpoint {checkpoint}')
        wrong = f'checkpoint {checkpoint} does not hold the weights of {recipe}\'s model with SE'
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as error:  # a tensor of another shape
            detail = next((line.strip() for line in str(error).splitlines() if 'size mismatch' in line), str(error))
            raise RecipeError(f'{wrong}: {detail}; was it trained with this recipe?') from None
        if missing or unexpected:
            raise RecipeError(f'{wrong}: {len(missing)} missing (first: {missing[:1]}), {len(unexpected)} unexpected '
                              f'(first: {unexpected[:1]}); was it trained with this recipe?')
    return model


def measure_recipe(recipe: str, overrides: Sequence[str], checkpoint: Optional[str], max_batches: int,
                   batch_size: int) -> tuple[dict[str, GateStatistics], list[str]]:
    """The gate statistics of ``recipe``'s SE model (with ``checkpoint``'s weights, else as initialised) on a
    shuffled sample of ``max_batches`` batches of its evaluation split, and the class names."""
    from composer_se.recipes.data.loaders import build_transform, image_dataset

    config = load_recipe(recipe, overrides)
    if config.data.source not in ('cifar10', 'imagefolder'):
        raise RecipeError(f'composer-se gates reads data.source cifar10 or imagefolder, got {config.data.source!r}')
    model = recipe_se_model(recipe, config, checkpoint)
    dataset = image_dataset(config.data, config.model.num_classes, False, config.seed,
                            build_transform(config.data.augmentation, config.data.image_size, False))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,  # the split is sorted by class
                        generator=torch.Generator().manual_seed(config.seed))
    classes = list(getattr(dataset, 'classes', None) or getattr(getattr(dataset, 'dataset', None), 'classes', []))
    return gate_statistics(model.module, loader, max_batches), classes


def choose_blocks(names: Sequence[str], patterns: Optional[Sequence[str]], count: int = 4) -> list[str]:
    """The blocks matching ``patterns`` (fnmatch), or ``count`` spread evenly from the first to the last."""
    if patterns:
        chosen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
        if not chosen:
            raise ValueError(f'--blocks {" ".join(patterns)} matches none of the blocks: {", ".join(names)}')
        return chosen
    if len(names) <= count:
        return list(names)
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


def format_table(statistics: dict[str, GateStatistics]) -> str:
    rows = ['| block | channels | input dependence (mean / max) | max deviation | near 0 | near 1 | mean gate |',
            '|---|---|---|---|---|---|---|']
    for name, s in statistics.items():
        rows.append(f'| {name} | {s.channels} | {s.input_dependence:.4f} / {s.max_input_dependence:.4f} | '
                    f'{s.max_deviation:.4f} | {s.near_zero:.1%} | {s.near_one:.1%} | {float(s.mean.mean()):.3f} |')
    return '\n'.join(rows)


def draw(statistics: dict[str, GateStatistics], blocks: Sequence[str], classes: Sequence[str], out: str) -> None:
    """Writes the figure to ``out`` (its suffix picks the format: .png, .pdf, .svg)."""
    try:
        import matplotlib
    except ImportError:
        raise RecipeError("the figure needs matplotlib: pip install 'composer-se[bench]'") from None
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(4 * max(len(blocks), 2), 7), layout='constrained')
    top, bottom = figure.subfigures(2, 1, height_ratios=[3, 2])
    axes = top.subplots(1, len(blocks), squeeze=False)[0]
    for ax, name in zip(axes, blocks):
        s = statistics[name]
        if s.class_mean is not None:
            for k, row in enumerate(s.class_mean):
                if not row.isnan().any():
                    ax.plot(row.numpy(), linewidth=0.8, label=classes[k] if k < len(classes) else str(k))
        ax.plot(s.mean.numpy(), color='black', linewidth=1.2, linestyle='--', label='all')
        ax.set_title(name, fontsize=9)
        ax.set_xlabel('channel')
        ax.set_ylim(0, s.scale)
    axes[0].set_ylabel('mean gate')
    axes[-1].legend(fontsize=6, loc='upper right')
    ax = bottom.subplots()
    names = list(statistics)
    ax.bar(range(len(names)), [statistics[n].input_dependence for n in names])
    ax.set_xticks(range(len(names)), [n.removesuffix('.se') for n in names], rotation=90, fontsize=6)
    ax.set_ylabel('input dependence (std of gate over images)')
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=150)
    plt.close(figure)

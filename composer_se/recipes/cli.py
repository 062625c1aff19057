"""The ``composer-se`` command: ``composer-se plan MODEL ...`` shows where SE goes and what it costs;
``composer-se gates RECIPE ...`` draws what each block's gate does on the recipe's data."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from fractions import Fraction
from typing import Optional

from composer_se.checkpoints import CheckpointError
from composer_se.plan import FORMATS, PLANNED, format_plan, plan_squeeze_excite
from composer_se.recipes.config import ModelConfig, RecipeError, load_recipe
from composer_se.settings import DEFAULTS, PLACEMENTS, SqueezeExciteSettings

__all__ = ['main']

DTYPE_BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


def _number(text: str) -> float:
    """``64``, ``0.0625`` or ``1/16``."""
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f'{text!r} is not a number (e.g. 64, 0.0625 or 1/16)') from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='composer-se', description='Squeeze-and-Excitation for Composer.')
    commands = parser.add_subparsers(dest='command', required=True)
    plan = commands.add_parser(
        'plan',
        help='show where SE blocks would go and what they would cost',
        description='Show one row per SE block that SqueezeExcite would add to MODEL (module, in->out channels, '
        'feature map size, latent channels, parameters, FLOPs and activation bytes per image), totals against the '
        'unmodified model, and how many blocks each min_channels would add. Options left out come from the '
        "recipe's squeeze_excite entry when MODEL is a recipe, else from SqueezeExcite's defaults.",
    )
    plan.add_argument('model', help='a torchvision classification model (resnet50, ...), resnet20/resnet56/resnet110, '
                      'a timm model as timm/<name> (timm/efficientnet_b0, ...; needs timm), or a recipe YAML file')
    plan.add_argument('--input-size', type=int, nargs='+', metavar='PIXELS',
                      help='image height (and width); default: the recipe\'s data.image_size, else 224')
    plan.add_argument('--num-classes', type=int, help='classifier outputs (default: the recipe\'s, else 1000 for '
                      'torchvision and timm models and 10 for CIFAR ResNets)')
    plan.add_argument('--latent-channels', type=_number,
                      help=f'width of each block\'s hidden layer, or a fraction of its channels such as 1/16 '
                      f'(default {DEFAULTS.latent_channels})')
    plan.add_argument('--min-channels', type=int, help=f'minimum channels of a module that gets SE '
                      f'(default {DEFAULTS.min_channels})')
    plan.add_argument('--include', nargs='+', metavar='PATTERN', help='module-name patterns to restrict SE to')
    plan.add_argument('--exclude', nargs='+', metavar='PATTERN', help='module-name patterns to leave out')
    plan.add_argument('--placement', choices=PLACEMENTS, help=f"'conv' or 'block' (the paper's); default "
                      f'{DEFAULTS.placement!r}')
    plan.add_argument('--no-fold', dest='fold_batchnorm', action='store_false', default=None,
                      help='plan with fold_batchnorm=False (every block inside its conv)')
    plan.add_argument('--dtype', choices=sorted(DTYPE_BYTES), default='float32', help='activation type for the '
                      'traffic bytes (default float32)')
    plan.add_argument('--format', choices=FORMATS, default='table', help='output format (default table)')
    gates = commands.add_parser(
        'gates',
        help="draw each SE block's gate on the recipe's data (the SENet paper's excitation figure)",
        description="Measure each SE block of RECIPE's model (CHECKPOINT's weights, else as initialised) on a "
        'shuffled sample of its evaluation split, print a table of every block (input dependence: the standard '
        'deviation of its gate over images, averaged over channels), and draw the mean gate per channel and class '
        'at chosen blocks, with a bar per block of input dependence.',
    )
    gates.add_argument('recipe', help='a recipe YAML file with algorithms.squeeze_excite')
    gates.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='recipe overrides, as for training (e.g. '
                       'data.source=imagefolder data.root=/data/cifar10)')
    gates.add_argument('--checkpoint', help='a Composer checkpoint of a run of RECIPE')
    gates.add_argument('--out', default='gates.png', help='the figure (.png, .pdf or .svg; default gates.png)')
    gates.add_argument('--blocks', nargs='+', metavar='PATTERN', help='blocks to draw (fnmatch patterns on names such '
                       'as layer3.8.conv2.se); default: four spread from the first to the last')
    gates.add_argument('--max-batches', type=int, default=8, help='batches to measure (default 8)')
    gates.add_argument('--batch-size', type=int, default=256, help='images per batch (default 256)')
    return parser


def _gates(args: argparse.Namespace) -> str:
    from composer_se.recipes.gates_figure import choose_blocks, draw, format_table, measure_recipe
    for flag in ('max_batches', 'batch_size'):
        if getattr(args, flag) < 1:
            raise ValueError(f'--{flag.replace("_", "-")} must be at least 1, got {getattr(args, flag)}')
    statistics, classes = measure_recipe(args.recipe, args.overrides, args.checkpoint, args.max_batches,
                                         args.batch_size)
    blocks = choose_blocks(list(statistics), args.blocks)
    draw(statistics, blocks, classes, args.out)
    samples = next(iter(statistics.values())).samples
    return f'{format_table(statistics)}\n\n{samples} images; figure ({", ".join(blocks)}): {args.out}'


def _plan(args: argparse.Namespace) -> str:
    from composer_se.recipes.models import CIFAR_NAMES, build_skeleton
    settings = DEFAULTS
    if args.model.endswith(('.yaml', '.yml')):
        recipe = load_recipe(args.model)
        model_config = recipe.model
        settings = SqueezeExciteSettings(**(recipe.algorithms.get('squeeze_excite') or {}))
        size = recipe.data.image_size
    else:
        model_config = ModelConfig(name=args.model, num_classes=10 if args.model in CIFAR_NAMES else 1000)
        size = 224
    if args.num_classes is not None:
        model_config.num_classes = args.num_classes
    flags = {key: getattr(args, key) for key in PLANNED if getattr(args, key) is not None}
    settings = dataclasses.replace(settings, **flags)
    if args.input_size:
        if len(args.input_size) > 2:
            raise ValueError(f'--input-size takes a height and an optional width, got {args.input_size}')
        height, width = args.input_size[0], args.input_size[-1]
    else:
        height = width = size
    plan = plan_squeeze_excite(build_skeleton(model_config), (height, width), bytes_per_element=DTYPE_BYTES[args.dtype],
                               settings=settings)
    return format_plan(plan, args.format)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(_gates(args) if args.command == 'gates' else _plan(args))
    except (RecipeError, CheckpointError, ValueError, TypeError) as error:
        print(f'composer-se {args.command}: error: {error}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

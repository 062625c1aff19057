"""Does folding SE into the BatchNorm change training? Rounding, then outcomes.

    python benchmarks/fold_parity.py
    python benchmarks/fold_parity.py optimizer.lr=0.2 --seeds 1 2 3 4 --lr 0.2 0.1

Recipe overrides (``key=value``) come before the options.

Rounding (always): a recipe (the README's demo by default) trains with folded SE, as
``fold_batchnorm=True`` does. At several steps along that run, the same weights are
loaded into the model with unfolded SE (``fold_batchnorm=False``; the state-dict names
are the same), and the loss and gradient of one fixed training batch are computed in
float32 by the folded model and by the unfolded one, and in float64 by the unfolded one.
Each float32 result is printed as its relative error against float64: if folding lost
accuracy, its column would be the larger.

Outcomes (``--seeds``): the recipe is trained to the end, folded and unfolded, for every
seed and learning rate, each run in its own process (``python -m composer_se.train``),
and the final eval accuracies are printed side by side.
"""

from __future__ import annotations

import argparse
import copy
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from composer.loggers import ConsoleLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from composer_se import SqueezeExcite, apply_squeeze_excite  # noqa: E402
from composer_se.composer_plumbing.models import network_of  # noqa: E402
from composer_se.recipes.config import load_recipe  # noqa: E402
from composer_se.recipes.models import build_model  # noqa: E402
from composer_se.recipes.run import build_trainer  # noqa: E402

DEMO = ROOT / 'yamls' / 'resnet56_synthetic_demo.yaml'


def loss_and_gradients(network: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, dict]:
    """Training-mode loss and gradients by parameter name, on a copy in ``x``'s dtype (``network`` stays as it is)."""
    network = copy.deepcopy(network).to(x.dtype).train()
    loss = F.cross_entropy(network(x), y)
    loss.backward()
    return loss.item(), {name: p.grad.double() for name, p in network.named_parameters()}


def relative_error(gradients: dict, reference: dict, names: list[str]) -> float:
    """Norm of the difference over ``names``, divided by the reference's norm over them."""
    difference = sum((gradients[name] - reference[name]).square().sum() for name in names)
    return (difference / sum(reference[name].square().sum() for name in names)).sqrt().item()


def rounding(recipe: str, overrides: list[str], steps: list[int]) -> None:
    config = load_recipe(recipe, [*overrides, 'loggers.progress_bar=false'])
    trainer = build_trainer(config)
    trainer.logger.destinations = [d for d in trainer.logger.destinations if not isinstance(d, ConsoleLogger)]
    se = [a for a in trainer.state.algorithms if isinstance(a, SqueezeExcite)]
    if len(se) != 1 or not se[0].fold_batchnorm:
        raise SystemExit(f'{recipe} must use SqueezeExcite with fold_batchnorm=true, got {se}')
    unfolded = build_model(config.model)
    hyperparameters = ('latent_channels', 'min_channels', 'include', 'exclude', 'init', 'placement')
    report = apply_squeeze_excite(network_of(unfolded), **{name: getattr(se[0], name) for name in hyperparameters},
                                  fold_batchnorm=False)
    x, y = next(iter(trainer.state.train_dataloader))
    print(f'{" ".join([recipe, *overrides])}: {report.num_blocks} SE blocks; one training batch of {len(x)}. Errors '
          f'of float32 relative to float64; for gradients, the norm of the difference over the norm, over the SE '
          f'blocks\' parameters and over all others.')
    print('| step | loss (float64) | loss error: folded | unfolded | SE gradient error: folded | unfolded | '
          'other gradient error: folded | unfolded |')
    print('|---|---|---|---|---|---|---|---|')
    trained = 0
    for step in steps:
        if step > trained:
            trainer.fit(duration=f'{step - trained}ba')
            trained = step
        folded = network_of(trainer.state.model)
        network_of(unfolded).load_state_dict(folded.state_dict())
        reference_loss, reference = loss_and_gradients(network_of(unfolded), x.double(), y)
        se_names = [name for name in reference if '.se.' in f'.{name}']
        other_names = [name for name in reference if name not in se_names]
        results = [loss_and_gradients(network, x, y) for network in (folded, network_of(unfolded))]
        row = [f'{step}', f'{reference_loss:.4f}']
        row += [f'{abs(loss - reference_loss) / reference_loss:.1e}' for loss, _ in results]
        row += [f'{relative_error(gradients, reference, se_names):.1e}' for _, gradients in results]
        row += [f'{relative_error(gradients, reference, other_names):.1e}' for _, gradients in results]
        print('| ' + ' | '.join(row) + ' |', flush=True)


def outcomes(recipe: str, overrides: list[str], seeds: list[int], rates: list[float]) -> None:
    print(f'\n{" ".join([recipe, *overrides])}: final eval accuracy')
    print('| lr | seed | folded | unfolded |')
    print('|---|---|---|---|')
    for lr in rates:
        for seed in seeds:
            row = [f'{lr:g}', f'{seed}']
            for fold in ('true', 'false'):
                command = [
                    sys.executable, '-m', 'composer_se.train', recipe, *overrides, f'seed={seed}', f'optimizer.lr={lr}',
                    f'algorithms.squeeze_excite.fold_batchnorm={fold}', 'loggers.progress_bar=false'
                ]
                run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
                found = re.search(r'final eval accuracy: ([0-9.]+%)', run.stdout)
                if run.returncode or not found:
                    raise SystemExit(f'{" ".join(command)} failed ({run.returncode}):\n{run.stderr[-2000:]}')
                row.append(found.group(1))
            print('| ' + ' | '.join(row) + ' |', flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--recipe', default=str(DEMO))
    parser.add_argument('--steps', type=int, nargs='+', default=[0, 3, 5, 7, 9, 12, 16, 24],
                        help='training steps at which to compare (default: through the demo\'s early loss spike)')
    parser.add_argument('--seeds', type=int, nargs='*', default=[], help='also train to the end with these seeds')
    parser.add_argument('--lr', type=float, nargs='+', default=[0.1], help='learning rates for --seeds')
    parser.add_argument('overrides', nargs='*', help='recipe overrides, key=value (rounding uses them too)')
    args = parser.parse_args()
    rounding(args.recipe, args.overrides, args.steps)
    if args.seeds:
        outcomes(args.recipe, args.overrides, args.seeds, args.lr)


if __name__ == '__main__':
    main()

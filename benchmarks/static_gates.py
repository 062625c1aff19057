"""Which SE blocks of a trained model have a nearly fixed gate, and what folding them costs and saves.

    python benchmarks/static_gates.py yamls/resnet56_cifar10_fast.yaml data.root=/data/cifar10 \\
        --checkpoint runs/ckpt/latest-rank0.pt --json out.json --figure gates.png

For a recipe's SE model with a checkpoint's weights (in eval mode, float32, on CPU):

1. each block's gate statistics (``composer_se.gate_statistics``) on a calibration
   sample of the *training* split (``--calibration-batches`` shuffled batches, the eval
   transform: no augmentation);
2. for each tolerance (``--tolerances``), a copy of the model with
   ``composer_se.fold_static_gates`` applied at that tolerance on the same sample (on
   ``--measure``: the worst case, ``max_deviation``, by default), and its
   top-1 accuracy on the whole evaluation split, against the unfolded model's;
3. eval time of each folded copy against the unfolded model (batch ``--time-batch``, one
   thread, interleaved rounds, minimum), as ``overhead.py`` times.

Without ``--checkpoint`` the model is as initialised: a dry run of the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from composer_se import fold_static_gates, gate_statistics  # noqa: E402
from composer_se.recipes.config import load_recipe  # noqa: E402
from composer_se.recipes.data.loaders import build_transform, image_dataset  # noqa: E402
from composer_se.recipes.gates_figure import choose_blocks, draw, format_table, recipe_se_model  # noqa: E402


def load(recipe: str, overrides: list[str], checkpoint: str | None) -> tuple[torch.nn.Module, object]:
    config = load_recipe(recipe, overrides)
    return recipe_se_model(recipe, config, checkpoint).module.eval(), config


def split(config, train: bool, limit: int | None = None) -> torch.utils.data.Dataset:
    """The training or evaluation split with the eval transform (no augmentation), its first ``limit`` images."""
    dataset = image_dataset(config.data, config.model.num_classes, train, config.seed,
                            build_transform(config.data.augmentation, config.data.image_size, False))
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return dataset


def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('recipe')
    parser.add_argument('overrides', nargs='*')
    parser.add_argument('--checkpoint')
    parser.add_argument('--tolerances', type=float, nargs='+', default=[0.01, 0.03, 0.1])
    parser.add_argument('--measure', default='max_deviation', help='what a tolerance bounds (fold_static_gates)')
    parser.add_argument('--calibration-batches', type=int, default=8)
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--eval-samples', type=int, help='evaluate on the first this many (default: the whole split)')
    parser.add_argument('--time-batch', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=21)
    parser.add_argument('--json')
    parser.add_argument('--figure')
    args = parser.parse_args()
    torch.manual_seed(0)
    model, config = load(args.recipe, args.overrides, args.checkpoint)
    train = split(config, True)
    calibration = [batch for _, batch in zip(range(args.calibration_batches), DataLoader(
        train, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(config.seed)))]
    evaluation = DataLoader(split(config, False, args.eval_samples), batch_size=args.batch_size)
    statistics = gate_statistics(model, calibration)
    print(format_table(statistics))
    if args.figure:
        draw(statistics, choose_blocks(list(statistics), None), list(getattr(train, 'classes', [])), args.figure)
    base_accuracy = accuracy(model, evaluation)
    folded = {}
    for tolerance in args.tolerances:
        copy_ = copy.deepcopy(model)
        report = fold_static_gates(copy_, calibration, tolerance, measure=args.measure)
        folded[tolerance] = (copy_, report, accuracy(copy_, evaluation))
    # Eval time: one thread, interleaved rounds, minimum.
    torch.set_num_threads(1)
    x = next(iter(evaluation))[0][:args.time_batch]
    models = {'SE': model, **{f'folded at {t:g}': m for t, (m, _, _) in folded.items()}}
    times = {name: float('inf') for name in models}
    with torch.no_grad():
        for step in range(3 + args.rounds):
            for name, m in models.items():
                start = time.perf_counter()
                m(x)
                if step >= 3:
                    times[name] = min(times[name], time.perf_counter() - start)
    rows = []
    for tolerance, (_, report, top1) in folded.items():
        rows.append({'tolerance': tolerance, 'blocks_folded': len(report.folded), 'blocks': len(statistics),
                     'params_removed': report.params_removed, 'flops_removed_per_image': report.flops_removed,
                     'top1': top1, 'top1_change_points': 100 * (top1 - base_accuracy),
                     'eval_time_ratio': times[f'folded at {tolerance:g}'] / times['SE']})
    print(f'\nunfolded top-1 {100 * base_accuracy:.2f}% on {len(evaluation.dataset)} images')
    print(f'folded where {args.measure} <= tolerance')
    print('| tolerance | blocks folded | parameters removed | top-1 | change | eval time |')
    print('|---|---|---|---|---|---|')
    for row in rows:
        print(f"| {row['tolerance']:g} | {row['blocks_folded']} of {row['blocks']} | {row['params_removed']} | "
              f"{100 * row['top1']:.2f}% | {row['top1_change_points']:+.2f} | x{row['eval_time_ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            'recipe': args.recipe, 'overrides': args.overrides, 'checkpoint': args.checkpoint, 'measure': args.measure,
            'date': str(date.today()), 'torch': torch.__version__,
            'machine': f'{platform.processor() or platform.machine()}, eval time on 1 thread',
            'calibration_images': sum(len(y) for _, y in calibration), 'eval_images': len(evaluation.dataset),
            'top1_unfolded': base_accuracy, 'time_batch': args.time_batch,
            'blocks': {name: {'input_dependence': s.input_dependence, 'max_input_dependence': s.max_input_dependence,
                              'max_deviation': s.max_deviation, 'near_zero': s.near_zero, 'near_one': s.near_one,
                              'mean_gate': float(s.mean.mean())} for name, s in statistics.items()},
            'folding': rows,
        }, indent=2) + '\n')


if __name__ == '__main__':
    main()

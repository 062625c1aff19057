"""Train from a YAML recipe: ``python -m composer_se.train RECIPE [key=value ...]``.

Also runs under Composer's launcher, on one or many processes and nodes::

    composer -n 8 -m composer_se.train yamls/resnet50_imagenet.yaml data.root=/data/imagenet

The recipe and the overrides become one :class:`~composer_se.config.RecipeConfig`;
:func:`build_trainer` turns it into a Composer ``Trainer``, and :func:`main` trains it
and prints, on every process, the SE blocks added, the epochs and batches trained, the
final evaluation accuracy and a fingerprint of the final weights (equal on all
processes of a data-parallel run).
A mistake in the recipe, an override or the data location stops the run before
training with one message, and exit status 2.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Optional

import torch
from composer import Trainer
from composer.utils import dist, reproducibility

from composer_se.builders import build_algorithms, build_loggers, build_optimizer, build_scheduler
from composer_se.config import RecipeConfig, RecipeError, load_recipe
from composer_se.data.loaders import build_dataloader
from composer_se.layers import SqueezeExcite2d
from composer_se.models import build_model

__all__ = ['build_trainer', 'main', 'weights_fingerprint']

USAGE = 'usage: python -m composer_se.train RECIPE.yaml [key=value ...]'


def _check_numbers(config: RecipeConfig) -> None:
    if config.global_batch_size < 1:
        raise RecipeError(f'global_batch_size must be at least 1, got {config.global_batch_size}')
    if config.eval_batch_size < 1:
        raise RecipeError(f'eval_batch_size must be at least 1, got {config.eval_batch_size}')
    if config.data.num_workers < 0:
        raise RecipeError(f'data.num_workers must be >= 0, got {config.data.num_workers}')
    if config.precision not in (None, 'fp32', 'amp_fp16', 'amp_bf16'):
        raise RecipeError(f'precision must be fp32, amp_fp16 or amp_bf16 (or null for the default), got '
                          f'{config.precision!r}')
    if config.device not in (None, 'cpu', 'gpu'):
        raise RecipeError(f'device must be cpu or gpu (or null for the default), got {config.device!r}')
    if config.checkpoint.autoresume and not (config.run_name and config.checkpoint.save_folder):
        raise RecipeError('checkpoint.autoresume needs run_name and checkpoint.save_folder, so that a relaunch finds '
                          'the run\'s checkpoints')


def build_trainer(config: RecipeConfig) -> Trainer:
    """A Composer ``Trainer`` for ``config``; raises :class:`RecipeError` for anything wrong in it."""
    _check_numbers(config)
    device = config.device or ('gpu' if torch.cuda.is_available() else 'cpu')
    precision = config.precision or ('amp_bf16' if device == 'gpu' else 'fp32')
    algorithms = build_algorithms(config.algorithms)
    if any(type(a).__name__ in ('RandAugment', 'AugMix') for a in algorithms) and config.data.source not in (
            'cifar10', 'imagefolder'):
        raise RecipeError(f'randaugment and augmix transform images in the dataset; they need data.source cifar10 or '
                          f'imagefolder, not {config.data.source}')
    reproducibility.seed_all(config.seed)
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.initialize_dist(device)
    model = build_model(config.model)
    train = build_dataloader(config.data, config.model.num_classes, True, config.global_batch_size, config.seed)
    evaluation = build_dataloader(config.data, config.model.num_classes, False, config.eval_batch_size, config.seed)
    try:
        optimizer = build_optimizer(config.optimizer, model)
        scheduler = build_scheduler(config.scheduler)
        return Trainer(
            model=model,
            train_dataloader=train,
            eval_dataloader=evaluation,
            eval_interval=config.eval_interval,
            max_duration=config.max_duration,
            optimizers=optimizer,
            schedulers=scheduler,
            algorithms=algorithms,
            loggers=build_loggers(config.loggers),
            progress_bar=config.loggers.progress_bar,
            log_to_console=not config.loggers.progress_bar,
            run_name=config.run_name,
            seed=config.seed,
            device=device,
            precision=precision,
            device_train_microbatch_size=config.device_train_microbatch_size,
            save_folder=config.checkpoint.save_folder,
            save_interval=config.checkpoint.save_interval,
            save_num_checkpoints_to_keep=config.checkpoint.save_num_checkpoints_to_keep,
            autoresume=config.checkpoint.autoresume,
            load_path=config.checkpoint.load_path,
            load_weights_only=config.checkpoint.load_weights_only,
        )
    except (ValueError, TypeError) as error:
        if isinstance(error, RecipeError):
            raise
        # Composer's own checks (durations such as '5 epochs', intervals, ...) speak for the recipe.
        raise RecipeError(f'Composer rejected the recipe: {str(error).splitlines()[0]}') from error


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short SHA-256 of every parameter, in order: equal weights give equal fingerprints.

    Buffers are left out: under DDP each process updates BatchNorm's running statistics
    from its own batch, so they differ between processes after the last step.
    """
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ('-h', '--help'):
        print(USAGE + '\n\n' + (__doc__ or '').strip())
        return 0 if args else 2
    rank = f'[rank {dist.get_global_rank()}] ' if dist.get_world_size() > 1 else ''
    try:
        config = load_recipe(args[0], args[1:])
        trainer = build_trainer(config)
    except RecipeError as error:
        print(f'{rank}composer_se.train: error: {error}', file=sys.stderr)
        return 2
    blocks = [m for m in trainer.state.model.modules() if isinstance(m, SqueezeExcite2d)]
    added = sum(p.numel() for block in blocks for p in block.parameters())
    print(f'{rank}SqueezeExcite: {len(blocks)} SE blocks ({added:,} parameters)', flush=True)
    trainer.fit()
    timestamp = trainer.state.timestamp
    print(f'{rank}trained {int(timestamp.epoch)} epochs, {int(timestamp.batch)} batches')
    metrics = trainer.state.eval_metrics.get('eval', {})
    if 'MulticlassAccuracy' in metrics:
        print(f'{rank}final eval accuracy: {float(metrics["MulticlassAccuracy"].compute()):.2%}')
    print(f'{rank}final weights fingerprint: {weights_fingerprint(trainer.state.model)}', flush=True)
    trainer.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())

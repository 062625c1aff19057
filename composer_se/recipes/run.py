"""Train from a YAML recipe: ``python -m composer_se.train RECIPE [key=value ...]``.

Also runs under Composer's launcher, on one or many processes and nodes::

    composer -n 8 -m composer_se.train yamls/resnet50_imagenet.yaml data.root=/data/imagenet

The recipe and the overrides become one :class:`~composer_se.recipes.config.RecipeConfig`;
:func:`build_trainer` turns it into a Composer ``Trainer``, and :func:`main` trains it
and prints, on every process, the SE blocks added, the epochs and batches trained, the
final evaluation accuracy and a fingerprint of the final weights (equal on all
processes of a data-parallel run).
A mistake in the recipe, an override, the data location or a checkpoint stops the run
before training with one message, and exit status 2; an image that cannot be read, or
a label outside the model's classes, stops it during training with one message naming
the file or sample, and exit status 1.

With ``checkpoint.autoresume``, relaunching a killed run with the same command
continues from its last complete checkpoint (see
:func:`~composer_se.recipes.resume.prepare_autoresume`), and relaunching a finished run
trains nothing and evaluates its final checkpoint. Checkpoints are read without running
code from them and checked against the model before Composer loads them
(:func:`~composer_se.recipes.resume.composer_loads_safely`).
"""

from __future__ import annotations

import hashlib
import sys
from typing import Optional

import torch
from composer import Trainer
from composer.utils import dist, format_name_with_dist, reproducibility

from composer_se.algorithm import SqueezeExcite
from composer_se.checkpoints import CheckpointError
from composer_se.layers import SqueezeExcite2d
from composer_se.recipes.builders import ALGORITHMS, build_algorithms, build_loggers, build_optimizer, build_scheduler
from composer_se.recipes.config import RecipeConfig, RecipeError, load_recipe
from composer_se.recipes.data.loaders import DataError, build_dataloader
from composer_se.recipes.data.on_device import EpochFromTimestamp, build_device_dataloader, training_device
from composer_se.recipes.models import build_model
from composer_se.recipes.resume import checkpoint_files, composer_loads_safely, prepare_autoresume

__all__ = ['build_trainer', 'main', 'weights_fingerprint']

USAGE = 'usage: python -m composer_se.train RECIPE.yaml [key=value ...]'


def _prepare_save_folder(config: RecipeConfig) -> Optional[str]:
    """Readies the save folder; returns the checkpoint autoresume will continue from, if any.

    With autoresume, process 0 runs :func:`prepare_autoresume` while the others wait.
    Without it, a folder that already holds checkpoints is refused (Composer would
    refuse it only once training starts, as a new run could overwrite them).
    """
    if not config.checkpoint.save_folder:
        return None
    folder = format_name_with_dist(config.checkpoint.save_folder, config.run_name)
    if not config.checkpoint.autoresume:
        found = [name for _, name in checkpoint_files(folder)]
        if found:
            shown = ', '.join(found[:3]) + (f' and {len(found) - 3} more' if len(found) > 3 else '')
            raise RecipeError(f'checkpoint.save_folder {folder} already holds checkpoints ({shown}): set '
                              f'checkpoint.autoresume=true (with the same run_name) to continue that run, or use '
                              f'another folder for a new run')
        return None
    outcome: list = [None]
    if dist.get_global_rank() == 0:
        try:
            outcome = [prepare_autoresume(folder) + (None,)]
        except CheckpointError as error:
            outcome = [(None, [], str(error))]
        except OSError as error:  # a folder that cannot be read or written: every process must hear of it
            outcome = [(None, [], f'cannot prepare checkpoint.save_folder {folder} for autoresume: {error}')]
    dist.broadcast_object_list(outcome, src=0)  # also keeps the others waiting until the folder is ready
    resumed, notes, error = outcome[0]
    if error is not None:
        raise CheckpointError(error)
    if dist.get_global_rank() == 0:
        for note in notes:
            print(f'composer_se.train: autoresume: {note}', file=sys.stderr, flush=True)
    return resumed


def _dataset_algorithms(algorithms: list) -> list[str]:
    """Recipe names of the algorithms that add a PIL transform to the training dataset.

    RandAugment and AugMix always do; ColOut does with ``batch=False``.
    """
    return [name for name in ('randaugment', 'augmix', 'colout') for algorithm in algorithms
            if type(algorithm) is ALGORITHMS[name] and not getattr(algorithm, 'batch', False)]


def build_trainer(config: RecipeConfig) -> Trainer:
    """A Composer ``Trainer`` for ``config``.

    Raises:
        RecipeError: for anything wrong in the recipe or what it points at.
        CheckpointError: for a checkpoint to load that is missing, damaged, unsafe or
            made for another model (see :mod:`composer_se.recipes.resume`).
    """
    device = config.device or ('gpu' if torch.cuda.is_available() else 'cpu')
    precision = config.precision or ('amp_bf16' if device == 'gpu' else 'fp32')
    algorithms = build_algorithms(config.algorithms)
    in_dataset = _dataset_algorithms(algorithms)
    if {'randaugment', 'augmix'} & set(in_dataset) and config.data.source not in ('cifar10', 'imagefolder'):
        raise RecipeError(f'randaugment and augmix transform images in the dataset; they need data.source cifar10 or '
                          f'imagefolder, not {config.data.source}')
    if config.data.on_device and in_dataset:
        raise RecipeError(f'{", ".join(in_dataset)} transform PIL images in a torch dataset, which data.on_device=true '
                          f'does not have; set data.on_device=false to use them')
    reproducibility.seed_all(config.seed)
    if dist.get_world_size() > 1 and not dist.is_initialized():
        dist.initialize_dist(device)
    resumed = _prepare_save_folder(config)
    if resumed is not None:
        source = f'the checkpoint that autoresume continues from, {resumed},'
    else:
        source = f'checkpoint.load_path {config.checkpoint.load_path}'
    model = build_model(config.model)
    if config.data.on_device:
        data, num_classes, on_device = config.data, config.model.num_classes, training_device(device)
        train = build_device_dataloader(data, num_classes, True, config.global_batch_size, config.seed, on_device)
        evaluation = build_device_dataloader(data, num_classes, False, config.eval_batch_size, config.seed, on_device)
        callbacks = [EpochFromTimestamp()]
    else:
        train = build_dataloader(config.data, config.model.num_classes, True, config.global_batch_size, config.seed)
        evaluation = build_dataloader(config.data, config.model.num_classes, False, config.eval_batch_size, config.seed)
        callbacks = []
    se = [a.settings.call() for a in algorithms if isinstance(a, SqueezeExcite)]
    try:
        optimizer = build_optimizer(config.optimizer, model)
        scheduler = build_scheduler(config.scheduler)
        with composer_loads_safely(model, source=source, current_call=se[0] if se else None):
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
                callbacks=callbacks,
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
                compile_config=None if config.compile is None else config.compile.trainer_config(),
            )
    except (ValueError, TypeError) as error:
        if isinstance(error, (RecipeError, CheckpointError)):
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


def _one_line(error: BaseException) -> str:
    """The message of a :class:`DataError`, also when a dataloader worker raised it (its traceback is then the text)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if 'DataError: ' in line:
            return line.split('DataError: ', 1)[1]
    return lines[-1] if lines else type(error).__name__


def _finished(trainer: Trainer) -> bool:
    """Whether the loaded checkpoint is already at ``max_duration`` (a relaunch of a finished run)."""
    max_duration = trainer.state.max_duration
    return max_duration is not None and trainer.state.timestamp.get(max_duration.unit) >= max_duration


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ('-h', '--help'):
        print(USAGE + '\n\n' + (__doc__ or '').strip())
        return 0 if args else 2
    rank = f'[rank {dist.get_global_rank()}] ' if dist.get_world_size() > 1 else ''
    try:
        config = load_recipe(args[0], args[1:])
        trainer = build_trainer(config)
    except (RecipeError, CheckpointError) as error:
        print(f'{rank}composer_se.train: error: {error}', file=sys.stderr)
        return 2
    except DataError as error:  # data.on_device reads every image before training
        print(f'{rank}composer_se.train: error: {_one_line(error)}', file=sys.stderr, flush=True)
        return 1
    blocks = [m for m in trainer.state.model.modules() if isinstance(m, SqueezeExcite2d)]
    added = sum(p.numel() for block in blocks for p in block.parameters())
    print(f'{rank}SqueezeExcite: {len(blocks)} SE blocks ({added:,} parameters)', flush=True)
    timestamp = trainer.state.timestamp
    if trainer.state.load_path is not None:
        print(f'{rank}loaded checkpoint {trainer.state.load_path}: continuing at epoch {int(timestamp.epoch)}, batch '
              f'{int(timestamp.batch)}', flush=True)
    try:
        if _finished(trainer):
            print(f'{rank}the run already reached max_duration={config.max_duration}; nothing to train, evaluating '
                  f'its final checkpoint', flush=True)
            trainer.eval()
        else:
            trainer.fit()
    except DataError as error:
        print(f'{rank}composer_se.train: error: {_one_line(error)}', file=sys.stderr, flush=True)
        trainer.close()
        return 1
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

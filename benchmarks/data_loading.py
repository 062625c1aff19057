"""What a CIFAR epoch's data costs: ``data.on_device: true`` against the worker-based loader, beside the model's step.

    python benchmarks/data_loading.py --archive cifar10-jpeg.tar.gz
    python benchmarks/data_loading.py --data /data/cifar10 --device cuda --samples 50000 --num-workers 8
    python benchmarks/data_loading.py --dry-run      # toy images, on CPU: the whole script at toy size

Both loaders come from ``yamls/resnet56_cifar10_fast.yaml`` (its batch, 512, and its
``cifar`` augmentation), built as ``composer_se.train`` builds them, on the first
``--samples`` training images of CIFAR-10 as a folder of images (``--data``; ``--archive``
unpacks a ``.tar.gz`` of it into a temporary folder). One round times one training epoch
of each, interleaved: every batch is made and, for the worker-based loader, copied to
``--device`` as the Trainer does (``--device cuda`` waits for the device at the end). The
workers persist between epochs, as in the recipes, and one epoch of each is run before the
rounds, so worker start-up and decoding are not timed; decoding for ``on_device`` is
timed once and reported on its own. With ``--model`` (the default) the same rounds also
time a ResNet-56 SE training step (forward, backward, SGD; bf16 autocast and
channels_last on CUDA, float32 on CPU) on one batch, so the table shows each loader's
epoch beside the model's epoch. The figures are the minimum over ``--rounds``. On CPU,
torch uses one thread in this process (the workers are processes of their own).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
from accuracy import _image_root, unpack, write_toy_images  # noqa: E402

from composer_se.recipes.config import load_recipe  # noqa: E402
from composer_se.recipes.data.loaders import build_dataloader  # noqa: E402
from composer_se.recipes.data.on_device import build_device_dataloader  # noqa: E402
from composer_se.recipes.models import build_model  # noqa: E402

RECIPE = ROOT / 'yamls' / 'resnet56_cifar10_fast.yaml'


def _synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def epoch_seconds(loader, device: torch.device) -> float:
    """One pass over ``loader``, each batch on ``device``: seconds."""
    start = time.perf_counter()
    for images, labels in loader:
        images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    _synchronize(device)
    return time.perf_counter() - start


def step_seconds(model, optimizer, images, labels, device: torch.device) -> float:
    """One training step of ``model`` on one batch: seconds."""
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda'):
        loss = model.loss(model((images, labels)), (images, labels))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - start


def measure(root: Path, args) -> dict:
    device = torch.device(args.device)
    overrides = [f'data.root={root}', f'data.max_train_samples={args.samples}', f'data.num_workers={args.num_workers}',
                 f'global_batch_size={args.batch}']
    config = load_recipe(str(RECIPE), overrides)
    data, classes, batch = config.data, config.model.num_classes, config.global_batch_size
    started = time.perf_counter()
    on_device = build_device_dataloader(data, classes, True, batch, config.seed, device).dataloader
    decode_s = time.perf_counter() - started
    workers = build_dataloader(data, classes, True, batch, config.seed).dataloader
    timings = {'on_device': [], 'workers': [], 'model': []}
    epoch_seconds(on_device, device), epoch_seconds(workers, device)  # start the workers; warm the caches
    if args.model:
        model = build_model(config.model).to(device)
        if device.type == 'cuda':
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images, labels = next(iter(on_device))
        step_seconds(model, optimizer, images, labels, device)
    for _ in range(args.rounds):
        timings['on_device'].append(epoch_seconds(on_device, device))
        timings['workers'].append(epoch_seconds(workers, device))
        if args.model:
            timings['model'].append(len(on_device) * step_seconds(model, optimizer, images, labels, device))
    images_per_epoch = len(on_device) * batch
    return {'images': images_per_epoch, 'batch': batch, 'decode_s': decode_s,
            **{name: min(values) for name, values in timings.items() if values}}


def report(result: dict, args) -> str:
    device = args.device if args.device == 'cpu' else torch.cuda.get_device_name(torch.device(args.device))
    lines = [
        f'# One CIFAR-10 training epoch: {result["images"]:,} images in batches of {result["batch"]}, on {device}', '',
        f'torch {torch.__version__}, {datetime.date.today()}, {args.num_workers} worker process(es), minimum of '
        f'{args.rounds} interleaved rounds; `on_device` decoded the images once in {result["decode_s"]:.2f} s.', '',
        '| what | seconds per epoch | images/s |', '|---|---|---|',
    ]
    names = {'on_device': 'data.on_device: true', 'workers': 'worker-based loader', 'model': 'ResNet-56 SE train steps'}
    for key, name in names.items():
        if key in result:
            lines.append(f'| {name} | {result[key]:.3f} | {result["images"] / result[key]:,.0f} |')
    lines += ['', f'on_device is {result["workers"] / result["on_device"]:.1f}x as fast as the worker-based loader.']
    if 'model' in result:
        lines.append(f'Per epoch, the worker-based loader costs {result["workers"] / result["model"]:.0%} of the '
                     f'model\'s training steps and on_device {result["on_device"] / result["model"]:.0%}.')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or '').split('\n')[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument('--data', type=Path, help='CIFAR-10 as train/<class>/*.jpg (and test/)')
    source.add_argument('--archive', type=Path, help='a .tar.gz of that folder')
    source.add_argument('--dry-run', action='store_true', help='toy images, 2 rounds, on CPU')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N (default: cpu)')
    parser.add_argument('--samples', type=int, default=10240, help='training images per epoch (default: 10240)')
    parser.add_argument('--batch', type=int, default=512, help='global batch size (default: 512, the recipe\'s)')
    parser.add_argument('--num-workers', type=int, default=2, help='worker processes (default: 2)')
    parser.add_argument('--rounds', type=int, default=5, help='interleaved rounds (default: 5)')
    parser.add_argument('--no-model', dest='model', action='store_false', help='time the loaders only')
    parser.add_argument('--out', type=Path, help='also write the table to this file')
    args = parser.parse_args(argv)
    if args.device == 'cpu':
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        if args.dry_run:
            args.samples, args.batch, args.rounds, args.device = 64, 16, 2, 'cpu'
            root = write_toy_images(Path(scratch) / 'toy', (8, 2))
        elif args.archive:
            root = unpack(args.archive, Path(scratch))
        elif args.data:
            root = _image_root(args.data)
        else:
            parser.error('give --data, --archive or --dry-run')
        table = report(measure(root, args), args)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())

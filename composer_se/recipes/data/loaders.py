"""Datasets and dataloaders for a recipe's ``data`` section.

Sources: ``cifar10`` (torchvision's CIFAR-10), ``imagefolder`` (a ``train/`` and a
``val/`` or ``test/`` folder of class folders: ImageNet's layout), ``streaming``
(mosaicml-streaming MDS shards with an image column ``x`` and an int column ``y``) and
``synthetic`` (:class:`~composer_se.recipes.data.SyntheticImages`).

Augmentation, chosen by ``data.augmentation``:

- ``cifar``: random crop with 4 pixels of padding and a horizontal flip for training;
  nothing for evaluation;
- ``imagenet``: random-resized crop and a horizontal flip for training; a resize to
  ``image_size / 0.875`` (256 for 224) and a center crop for evaluation.

Both end with ``ToTensor`` and a per-channel normalisation. The pipeline is a
``torchvision.transforms.Compose`` whose PIL stage ends at ``ToTensor``: that is where
Composer's RandAugment and AugMix insert their PIL transforms. With ``data.on_device``,
``cifar10`` and ``imagefolder`` images are instead decoded once onto the training device
and the ``cifar`` pipeline runs there on whole batches (:mod:`.on_device`).

Bad data stops the run with a message naming what to fix. Before training (a
:class:`~composer_se.recipes.config.RecipeError`): a missing folder or split, a split without
class folders or without images, more class folders than ``model.num_classes``, an
evaluation split whose classes differ from the training split's, and CIFAR-10 with
fewer than 10 classes. During training (a :class:`DataError`, raised in whichever
process or dataloader worker reads the sample): an image file that cannot be read or
decoded (named, with the reason: the policy is to stop, not to skip) and a streaming
sample whose label is outside ``0 .. model.num_classes - 1``. Files without an image
extension (``notes.txt``, ``.DS_Store``) are not samples: torchvision's
``ImageFolder`` leaves them out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch
from composer.core import DataSpec
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset, Subset
from PIL import Image
from torchvision import datasets, transforms
from torchvision.transforms import v2

from composer_se.recipes.config import AUGMENTATIONS, SOURCES, DataConfig, RecipeError
from composer_se.recipes.data.synthetic import SyntheticImages

__all__ = ['SOURCES', 'DataError', 'build_dataloader', 'build_dataset', 'build_transform', 'image_dataset',
           'per_process_batch', 'read_image']

NORMALIZATION = {
    'cifar': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DataError(RuntimeError):
    """A sample cannot be used (an unreadable image, a label out of range); the message names it and the fix."""


def read_image(path: str) -> Image.Image:
    """The RGB image in file ``path``; raises :class:`DataError` naming the file when it cannot be read or decoded."""
    try:
        with open(path, 'rb') as file:
            image = Image.open(file)
            return image.convert('RGB')  # decodes the whole file: a truncated one fails here
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise DataError(f'image file {path} cannot be read ({type(error).__name__}: {error}); delete or replace it, '
                        f'then relaunch (with checkpoint.autoresume the run continues from its last checkpoint)'
                        ) from None


def build_transform(augmentation: str, image_size: int, train: bool) -> transforms.Compose:
    """The PIL-to-tensor pipeline for ``augmentation`` (``'cifar'`` or ``'imagenet'``)."""
    if augmentation == 'cifar':
        steps = [v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()] if train else []
    elif augmentation == 'imagenet':
        if train:
            steps = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps = [v2.Resize(round(image_size / 0.875), antialias=True), v2.CenterCrop(image_size)]
    else:
        raise RecipeError(f'unknown data.augmentation {augmentation!r}; choose one of {", ".join(AUGMENTATIONS)}')
    mean, std = NORMALIZATION[augmentation]
    return transforms.Compose([*steps, transforms.ToTensor(), v2.Normalize(mean, std)])


try:
    from streaming import StreamingDataset
except ImportError:  # the streaming extra is not installed; _streaming() says how to get it
    StreamingDataset = None

if StreamingDataset is not None:

    class StreamingImages(StreamingDataset):
        """Image classification samples from MDS shards: column ``x`` (an image) and ``y`` (its class).

        A ``StreamingDataset``: iterating it gives each process (and each dataloader
        worker) its own share of the samples, shuffled per epoch when ``shuffle=True``.
        """

        def __init__(self, transform: Callable, num_classes: int, **kwargs):
            super().__init__(**kwargs)
            self.transform = transform
            self.num_classes = num_classes
            self.split_name = kwargs.get('split')

        def get_item(self, index: int):
            sample = super().get_item(index)
            label = int(sample['y'])
            if not 0 <= label < self.num_classes:
                raise DataError(f'sample {index} of the streaming split {self.split_name!r} has label {label}, outside '
                                f'0 .. {self.num_classes - 1} (model.num_classes={self.num_classes}): set '
                                f'model.num_classes to the number of classes of the data, or fix the shards')
            return self.transform(sample['x'].convert('RGB')), label


def _eval_split(config: DataConfig, root: Path) -> str:
    if config.eval_split:
        return config.eval_split
    for split in ('val', 'test'):
        if (root / split).is_dir():
            return split
    raise RecipeError(f'data.root {root} has neither a val/ nor a test/ folder; set data.eval_split to the evaluation '
                      f'split or point data.root at the dataset')


def _image_folder(config: DataConfig, train: bool, transform: Callable, num_classes: int) -> datasets.ImageFolder:
    if not config.root:
        raise RecipeError('data.root must be set for data.source=imagefolder (a folder with train/ and val/ or test/)')
    root = Path(config.root)
    if not root.is_dir():
        raise RecipeError(f'data.root {root} is not a folder; imagefolder expects {root}/train/<class>/<image> and '
                          f'{root}/val/<class>/<image> (or test/). Other sources: {", ".join(SOURCES)}.')
    split = config.train_split if train else _eval_split(config, root)
    folder = root / split
    if not folder.is_dir():
        raise RecipeError(f'split folder {folder} does not exist; data.root must hold {split}/<class>/<image>')
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transform, loader=read_image)
    except (FileNotFoundError, RuntimeError) as error:
        raise RecipeError(f'{folder} is not a folder of class folders of images: {error}') from None
    classes = dataset.classes
    if len(classes) > num_classes:
        extra = classes[num_classes:]
        shown = ', '.join(extra[:3]) + (f' and {len(extra) - 3} more' if len(extra) > 3 else '')
        raise RecipeError(f'{folder} has {len(classes)} class folders but model.num_classes is {num_classes}, so the '
                          f'labels of {shown} would be out of range: set model.num_classes={len(classes)}')
    if not train:
        train_classes = sorted(entry.name for entry in os.scandir(root / config.train_split) if entry.is_dir())
        if classes != train_classes:
            differ = sorted(set(classes) ^ set(train_classes))
            raise RecipeError(f'the class folders of {folder} and {root / config.train_split} differ (not in both: '
                              f'{", ".join(differ[:5])}), so a label would name different classes in the two: give '
                              f'both splits the same class folders')
    return dataset


def _cifar10(config: DataConfig, train: bool, transform: Callable, num_classes: int) -> datasets.CIFAR10:
    if num_classes < 10:
        raise RecipeError(f'CIFAR-10 has 10 classes but model.num_classes is {num_classes}: set model.num_classes=10')
    if not config.root:
        raise RecipeError('data.root must be set for data.source=cifar10 (the folder holding cifar-10-batches-py)')
    try:
        return datasets.CIFAR10(config.root, train=train, transform=transform, download=config.download)
    except RuntimeError as error:
        raise RecipeError(
            f'CIFAR-10 was not found in data.root {config.root} ({error}). Set data.download=true to fetch it, or use '
            f'data.source=imagefolder for a folder of images.',
        ) from None


def _streaming(config: DataConfig, train: bool, transform: Callable, batch_size: int, seed: int,
               num_classes: int) -> Dataset:
    if not (config.remote or config.local):
        raise RecipeError('data.source=streaming needs data.remote (where the MDS shards are) or data.local')
    split = config.train_split if train else (config.eval_split or 'val')
    if config.remote is None and not os.path.isdir(os.path.join(str(config.local), split)):
        raise RecipeError(f'data.local {config.local} has no {split}/ folder of MDS shards (index.json). Other '
                          f'sources: {", ".join(SOURCES)}.')
    if StreamingDataset is None:
        raise RecipeError("data.source=streaming needs mosaicml-streaming: pip install 'composer-se[streaming]'")
    if config.max_train_samples is not None or config.max_eval_samples is not None:
        raise RecipeError('data.max_train_samples and max_eval_samples do not apply to data.source=streaming; write '
                          'smaller shards instead')
    return StreamingImages(
        transform,
        num_classes,
        remote=config.remote,
        local=config.local,
        split=split,
        shuffle=train,
        shuffle_seed=seed,
        batch_size=batch_size,
    )


def _limit(dataset: Dataset, count: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of ``count`` samples; keeps torchvision datasets (and their transform) in place."""
    if count is None or count >= len(dataset):  # type: ignore[arg-type]
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()  # type: ignore
    if isinstance(dataset, datasets.ImageFolder):
        dataset.samples = [dataset.samples[i] for i in keep]
        dataset.imgs = dataset.samples
        dataset.targets = [label for _, label in dataset.samples]
        return dataset
    if isinstance(dataset, datasets.CIFAR10):
        dataset.data = dataset.data[keep]
        dataset.targets = [dataset.targets[i] for i in keep]
        return dataset
    return Subset(dataset, keep)


def image_dataset(config: DataConfig, num_classes: int, train: bool, seed: int,
                  transform: Optional[Callable]) -> datasets.CIFAR10 | datasets.ImageFolder:
    """The ``cifar10`` or ``imagefolder`` split of ``config``, with ``transform``, cut to ``data.max_*_samples``."""
    reader = _cifar10 if config.source == 'cifar10' else _image_folder
    dataset = reader(config, train, transform, num_classes)
    return _limit(dataset, config.max_train_samples if train else config.max_eval_samples, seed)  # type: ignore


def build_dataset(config: DataConfig, num_classes: int, train: bool, batch_size: int, seed: int) -> Dataset:
    """The training or evaluation dataset of ``config``."""
    if config.source == 'streaming':
        return _streaming(config, train, build_transform(config.augmentation, config.image_size, train), batch_size,
                          seed, num_classes)
    if config.source == 'synthetic':
        samples = config.synthetic_train_samples if train else config.synthetic_eval_samples
        offset = 0 if train else config.synthetic_train_samples
        dataset = SyntheticImages(samples, num_classes, (3, config.image_size, config.image_size), seed=seed,
                                  offset=offset)
        return _limit(dataset, config.max_train_samples if train else config.max_eval_samples, seed)
    return image_dataset(config, num_classes, train, seed, build_transform(config.augmentation, config.image_size,
                                                                           train))


def per_process_batch(global_batch_size: int) -> int:
    """Each process's share of a global batch; refuses one that the processes cannot share equally."""
    world_size = dist.get_world_size()
    if global_batch_size % world_size:
        raise RecipeError(f'the global batch size {global_batch_size} must be a positive multiple of the number of '
                          f'processes ({world_size})')
    return global_batch_size // world_size


def build_dataloader(config: DataConfig, num_classes: int, train: bool, global_batch_size: int, seed: int) -> DataSpec:
    """A dataloader over this process's share of the data, for a global batch of ``global_batch_size``."""
    batch_size = per_process_batch(global_batch_size)
    dataset = build_dataset(config, num_classes, train, batch_size, seed)
    sampler = None
    if not isinstance(dataset, torch.utils.data.IterableDataset):  # StreamingImages splits the data itself
        sampler = dist.get_sampler(dataset, shuffle=train, drop_last=train)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train,
        num_workers=config.num_workers,
        pin_memory=config.pin_memory,
        persistent_workers=config.num_workers > 0,
    )
    return DataSpec(loader)

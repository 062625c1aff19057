"""CIFAR-style data that lives on the training device: ``data.on_device: true``.

Small images spend more time in a dataloader (a Python call, a PIL crop and flip and a
normalisation per image, then a copy to the GPU) than in a ResNet-56 step on a GPU.
Here every image of a split (``cifar10`` or ``imagefolder``, after
``data.max_train_samples`` / ``max_eval_samples``) is decoded once, before training, into
one uint8 tensor ``(N, 3, H, W)`` on the device the Trainer trains on (``cuda:<local
rank>`` on GPU, else the CPU: :func:`training_device`), and each batch is made there
from a few tensor operations:

- training: the ``cifar`` augmentation of :mod:`~composer_se.recipes.data.loaders`, as
  one gather per batch: zero padding by 4, an ``image_size`` window at a random offset,
  mirrored for a random half of the images (:func:`crop_and_flip`);
- both: ``ToTensor``'s division by 255 and the ``cifar`` normalisation, the same
  operations and constants as the worker-based loader, so evaluation batches are equal
  to its batches bit for bit (float32, NCHW).

**Decoding.** ``imagefolder`` images are read with the worker-based loader's reader (PIL,
so the pixels are the same and an unreadable file is a
:class:`~composer_se.recipes.data.loaders.DataError` naming it), in ``data.num_workers``
processes; every image must have the size of the first. CIFAR-10's own files are already
pixels. Nothing is cached: each start decodes again (CIFAR-10's 60,000 JPEGs take about
85 µs each on one core), and nothing is written next to the data, so a changed folder is
read as it now is.

**Order and processes.** Epoch ``e`` of a run with seed ``s`` draws, from one NumPy
generator seeded with ``[s, e]``, a permutation of the ``N`` training samples and, for
each position of it, a crop offset and a flip. The permutation is cut into global
batches of ``global_batch_size`` (the incomplete last one is dropped, like the
worker-based loader's ``drop_last``); process ``r`` of ``W`` takes the ``r``-th of the
``W`` equal, disjoint slices of each global batch. Every process draws the same numbers,
so the batches depend on the seed and the epoch alone, and together the processes' batches
are exactly those of a run on one process. Evaluation takes every sample once, in order:
process ``r`` takes the ``r``-th of ``W`` nearly equal contiguous parts, cut into the same
number of batches on every process (Composer ends every process's evaluation as soon as
one process runs out of batches).

**Epochs and resumption.** The Trainer calls ``set_epoch`` only on a ``DistributedSampler``
of a torch ``DataLoader``; :class:`EpochFromTimestamp`, a callback that the recipes add
with these batches, sets the epoch from the Trainer's timestamp at ``FIT_START`` (after a
checkpoint is loaded) and at every ``EPOCH_START``. A run resumed in the middle of an
epoch therefore draws that epoch's order again, and Composer skips the batches already
trained by drawing and dropping them; the batches after them are those of the
uninterrupted run.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
from composer.core import Callback, DataSpec, State
from composer.loggers import Logger
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets
from torchvision.transforms.functional import pil_to_tensor

from composer_se.recipes.config import DataConfig, RecipeError
from composer_se.recipes.data.loaders import (NORMALIZATION, DataError, image_dataset, per_process_batch,
                                              read_image)

__all__ = ['DeviceBatches', 'EpochFromTimestamp', 'build_device_dataloader', 'crop_and_flip', 'decode',
           'training_device']

PADDING = 4  #: the cifar augmentation's zero padding on each side


def training_device(device: str) -> torch.device:
    """The torch device a Trainer with ``device='gpu'`` or ``'cpu'`` trains on (Composer: the local rank's GPU)."""
    if device == 'gpu':
        return torch.device('cuda', dist.get_local_rank())
    if device == 'cpu':
        return torch.device('cpu')
    raise RecipeError(f'device must be cpu or gpu, got {device!r}')


class _Pixels(Dataset):
    """Image ``i`` of ``samples`` (``(path, label)`` pairs) as a uint8 ``(3, H, W)`` tensor, for ``size == (W, H)``."""

    def __init__(self, samples: list[tuple[str, int]], size: tuple[int, int]):
        self.samples = samples
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.samples[index][0]
        image = read_image(path)
        if image.size != self.size:
            first = self.samples[0][0]
            raise DataError(f'data.on_device=true stacks the images of a split into one tensor, so they must have one '
                            f'size: {path} is {image.size[0]}x{image.size[1]}, {first} is '
                            f'{self.size[0]}x{self.size[1]}; resize the images, or set data.on_device=false')
        return pil_to_tensor(image)


def decode(dataset: datasets.CIFAR10 | datasets.ImageFolder, num_workers: int = 0) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """Every image of ``dataset`` as one uint8 ``(N, 3, H, W)`` tensor, and the labels as int64 ``(N,)``, on the CPU.

    ImageFolder images are read in ``num_workers`` processes (none: in this one).
    """
    if isinstance(dataset, datasets.CIFAR10):
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)
    samples = list(dataset.samples)
    size = read_image(samples[0][0]).size
    chunks = DataLoader(_Pixels(samples, size), batch_size=512, num_workers=num_workers)
    return torch.cat(list(chunks)), torch.as_tensor([label for _, label in samples], dtype=torch.int64)


def crop_and_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, size: int,
                  padding: int = PADDING) -> torch.Tensor:
    """``size`` x ``size`` windows of ``images`` padded with ``padding`` zeros, mirrored where ``flip`` is true.

    Image ``i`` of the result is ``pad(images[i])[:, top[i]:top[i] + size, left[i]:left[i] + size]``, reversed
    along its width where ``flip[i]``: torchvision's ``RandomCrop(size, padding)`` then ``RandomHorizontalFlip``
    with those draws. One gather for the whole batch, on the images' device.

    Args:
        images (torch.Tensor): ``(B, C, H, W)``.
        top (torch.Tensor): ``(B,)`` integers in ``0 .. H + 2 * padding - size``; ``left`` likewise for the width.
        flip (torch.Tensor): ``(B,)`` booleans.
        size (int): height and width of the windows.
        padding (int, optional): zeros added on each side. Default: ``4``.
    """
    count, channels, height, width = images.shape
    padded = images.new_zeros(count, channels, height + 2 * padding, width + 2 * padding)
    padded[:, :, padding:padding + height, padding:padding + width] = images
    steps = torch.arange(size, device=images.device)
    rows = top[:, None] + steps
    cols = left[:, None] + torch.where(flip[:, None], size - 1 - steps, steps)
    batch = torch.arange(count, device=images.device)[:, None, None, None]
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


class DeviceBatches:
    """Batches of images held on one device: shuffled, cropped and flipped for training, in order for evaluation.

    A dataloader for Composer's Trainer (iterable, with ``len``); see the module's
    docstring for the order, the split between processes and the epochs.

    Args:
        images (torch.Tensor): uint8 ``(N, C, H, W)``, on the device the batches are made on.
        labels (torch.Tensor): int64 ``(N,)``, on the same device.
        batch_size (int): images per batch on this process (the global batch divided by ``world_size``).
        train (bool): shuffle, crop and flip, and drop the incomplete last global batch (``True``), or take
            every image once, in order (``False``).
        seed (int, optional): with the epoch, seeds the order, the crops and the flips. Default: ``0``.
        crop_size (int, optional): training window size; ``None`` for the images' height. Default: ``None``.
        normalization (tuple, optional): per-channel ``(mean, std)`` of pixel values in ``[0, 1]``. Default: the
            ``cifar`` constants.
        rank (int, optional): this process; ``None`` for Composer's global rank. Default: ``None``.
        world_size (int, optional): processes sharing the data; ``None`` for Composer's. Default: ``None``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, train: bool, seed: int = 0,
                 crop_size: Optional[int] = None, normalization=NORMALIZATION['cifar'], rank: Optional[int] = None,
                 world_size: Optional[int] = None):
        self.images = images
        self.labels = labels
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank = dist.get_global_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size
        self.epoch = 0
        count, _, height, width = images.shape
        self.crop_size = height if crop_size is None else crop_size
        if self.crop_size > min(height, width) + 2 * PADDING:
            raise RecipeError(f'data.image_size {self.crop_size} is larger than the images ({height}x{width}) padded '
                              f'by {PADDING}; set data.image_size to at most {min(height, width) + 2 * PADDING}')
        mean, std = (torch.tensor(values, dtype=torch.float32, device=images.device)[None, :, None, None]
                     for values in normalization)
        self.mean, self.std = mean, std
        if train:
            if count < batch_size * self.world_size:
                raise RecipeError(f'data.on_device: {count} training images make no global batch of '
                                  f'{batch_size * self.world_size}; lower global_batch_size or use more images')
            return
        parts = torch.tensor_split(torch.arange(count, device=images.device), self.world_size)
        self.num_batches = math.ceil(len(parts[0]) / batch_size)
        if len(parts[-1]) < self.num_batches:
            raise RecipeError(f'data.on_device: {count} evaluation images cannot be cut into the same number of '
                              f'batches ({self.num_batches}) on each of {self.world_size} processes with '
                              f'eval_batch_size {batch_size * self.world_size}; raise eval_batch_size to at least '
                              f'{2 * self.world_size} or evaluate on more images')
        self.eval_batches = torch.tensor_split(parts[self.rank], self.num_batches)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order, crops and flips the next ``iter()`` draws (training only)."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return len(self.labels) // (self.batch_size * self.world_size)
        return self.num_batches

    def plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's training batches in ``epoch``: image indices, window tops, lefts and flips, ``(len, B)``."""
        rng = np.random.default_rng([self.seed, epoch])
        count, _, height, width = self.images.shape
        order = rng.permutation(count)
        top = rng.integers(0, height + 2 * PADDING - self.crop_size, count, endpoint=True)
        left = rng.integers(0, width + 2 * PADDING - self.crop_size, count, endpoint=True)
        flip = rng.integers(0, 2, count).astype(bool)
        used = len(self) * self.batch_size * self.world_size
        shares = (torch.from_numpy(np.ascontiguousarray(
            values[:used].reshape(len(self), self.world_size, self.batch_size)[:, self.rank]))
                  for values in (order, top, left, flip))
        return tuple(share.to(self.images.device) for share in shares)  # type: ignore[return-value]

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().div_(255).sub_(self.mean).div_(self.std)  # ToTensor, then Normalize

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            return ((self._normalize(self.images[batch]), self.labels[batch]) for batch in self.eval_batches)
        return self._training_batches(self.epoch)

    def _training_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, top, left, flip = self.plan(epoch)
        for step in range(len(indices)):
            batch = indices[step]
            windows = crop_and_flip(self.images[batch], top[step], left[step], flip[step], self.crop_size)
            yield self._normalize(windows), self.labels[batch]


class EpochFromTimestamp(Callback):
    """Sets the epoch of :class:`DeviceBatches` training data from the Trainer's timestamp.

    At ``FIT_START`` (after any checkpoint is loaded, so a resumed run continues in its
    epoch) and at every ``EPOCH_START``: Composer itself sets the epoch only of a
    ``DistributedSampler``.
    """

    def _set(self, state: State) -> None:
        if isinstance(state.train_dataloader, DeviceBatches):
            state.train_dataloader.set_epoch(int(state.timestamp.epoch))

    def fit_start(self, state: State, logger: Logger) -> None:
        self._set(state)

    def epoch_start(self, state: State, logger: Logger) -> None:
        self._set(state)


def build_device_dataloader(config: DataConfig, num_classes: int, train: bool, global_batch_size: int, seed: int,
                            device: torch.device) -> DataSpec:
    """:class:`DeviceBatches` of ``config``'s split, decoded onto ``device``, global batch ``global_batch_size``.

    The training batches need :class:`EpochFromTimestamp` among the Trainer's callbacks.
    """
    batch_size = per_process_batch(global_batch_size)
    images, labels = decode(image_dataset(config, num_classes, train, seed, transform=None), config.num_workers)
    batches = DeviceBatches(images.to(device), labels.to(device), batch_size, train, seed,
                            crop_size=config.image_size if train else None)
    return DataSpec(batches, num_samples=len(batches) * global_batch_size if train else len(labels))

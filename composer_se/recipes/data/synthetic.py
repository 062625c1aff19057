"""Synthetic, learnable image classification data that needs no download."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ['SyntheticImages']


class SyntheticImages(Dataset):
    """Images whose label can be learnt: each class has a fixed, smooth random template.

    Sample ``i`` is ``signal * template[label] + noise`` with ``label`` and the
    Gaussian noise drawn from a generator seeded with ``seed * 2**32 + offset + i``
    (distinct for indices below ``2**32``), so the dataset is
    the same on every run and every process, and costs no memory beyond the
    templates. With the default ``signal=0.25`` a small CNN needs a few epochs to
    separate the classes, far above chance but not instantly.

    Args:
        num_samples (int): length of the dataset.
        num_classes (int, optional): number of classes. Default: ``10``.
        shape (tuple[int, int, int], optional): ``(C, H, W)`` of each image.
            Default: ``(3, 32, 32)``.
        signal (float, optional): weight of the class template against unit noise.
            Default: ``0.25``.
        seed (int, optional): seeds the templates and the samples; give the train
            and evaluation splits the same seed and different ``offset``. Default: ``0``.
        offset (int, optional): index of the first sample, so that splits do not
            overlap. Default: ``0``.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 10,
        shape: tuple[int, int, int] = (3, 32, 32),
        signal: float = 0.25,
        seed: int = 0,
        offset: int = 0,
    ):
        if num_samples < 1 or num_classes < 2:
            raise ValueError(f'need num_samples >= 1 and num_classes >= 2, got {num_samples} and {num_classes}')
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.shape = tuple(shape)
        self.signal = signal
        self.seed = seed
        self.offset = offset
        # Smooth templates (4x4 noise, upsampled): like real images, the class signal lives
        # at low spatial frequency, where convolutions and pooling keep it.
        coarse = torch.randn(num_classes, self.shape[0], 4, 4, generator=torch.Generator().manual_seed(seed))
        self.templates = torch.nn.functional.interpolate(coarse, size=self.shape[1:], mode='bilinear',
                                                         align_corners=False)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} is out of range for {self.num_samples} samples')
        gen = torch.Generator().manual_seed(self.seed * 2**32 + self.offset + index)
        label = int(torch.randint(self.num_classes, (), generator=gen))
        image = self.signal * self.templates[label] + torch.randn(self.shape, generator=gen)
        return image, label

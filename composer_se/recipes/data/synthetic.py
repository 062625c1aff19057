"""Synthetic, learnable image classification data that needs no download."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ['SyntheticImages']


class SyntheticImages(Dataset):
    """Images whose label a CNN can learn: each class has its own texture, under strong noise.

    Each class owns a random ``period x period`` tile per channel (zero mean, unit
    variance). Sample ``i`` is that tile repeated over the image from a random offset,
    times ``signal``, plus unit Gaussian noise: the class is a local texture, wherever
    it sits, which convolutions and global pooling keep, and no single pixel tells it.
    ``label``, offset and noise come from a generator seeded from ``(seed, offset + i)``,
    so the dataset is the same on every run and every process, differs between seeds
    and between splits (``offset``), and costs no memory beyond the tiles.

    Args:
        num_samples (int): length of the dataset.
        num_classes (int, optional): number of classes. Default: ``10``.
        shape (tuple[int, int, int], optional): ``(C, H, W)`` of each image.
            Default: ``(3, 32, 32)``.
        signal (float, optional): weight of the class texture against unit noise.
            Default: ``1.0``.
        seed (int, optional): seeds the tiles and the samples; give the train and
            evaluation splits the same seed and different ``offset``. Default: ``0``.
        offset (int, optional): index of the first sample, so that splits do not
            overlap. Default: ``0``.
        period (int, optional): side of the texture tile, in pixels. Default: ``4``.
    """

    def __init__(
        self,
        num_samples: int,
        num_classes: int = 10,
        shape: tuple[int, int, int] = (3, 32, 32),
        signal: float = 1.0,
        seed: int = 0,
        offset: int = 0,
        period: int = 4,
    ):
        if num_samples < 1 or num_classes < 2:
            raise ValueError(f'need num_samples >= 1 and num_classes >= 2, got {num_samples} and {num_classes}')
        if period < 2:
            raise ValueError(f'period must be at least 2 pixels, got {period}')
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.shape = tuple(shape)
        self.signal = signal
        self.seed = seed
        self.offset = offset
        self.period = period
        tiles = torch.randn(num_classes, self.shape[0], period, period, generator=self._generator(0))
        tiles = tiles - tiles.mean((2, 3), keepdim=True)  # texture only: no class has its own mean colour
        self.tiles = tiles / tiles.std((2, 3), keepdim=True)

    def _generator(self, *key: int) -> torch.Generator:
        """A generator for ``key`` (``(0,)``: the tiles; ``(1, i)``: sample ``i``) under this dataset's seed.

        The words are mixed into one 32-bit seed by NumPy's ``SeedSequence``: a CPU
        generator keeps only 32 bits of its seed, so adding them up would repeat samples
        across seeds.
        """
        state = np.random.SeedSequence([self.seed, *key]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f'index {index} is out of range for {self.num_samples} samples')
        gen = self._generator(1, self.offset + index)
        label = int(torch.randint(self.num_classes, (), generator=gen))
        dy, dx = torch.randint(self.period, (2,), generator=gen).tolist()
        _, height, width = self.shape
        reps = (1, height // self.period + 2, width // self.period + 2)
        texture = self.tiles[label].repeat(reps)[:, dy:dy + height, dx:dx + width]
        image = self.signal * texture + torch.randn(self.shape, generator=gen)
        return image, label

"""SyntheticImages: deterministic, learnable data that needs no download."""

from __future__ import annotations

import pytest
import torch

from composer_se.recipes.data import SyntheticImages


def test_synthetic_images_are_deterministic_and_splits_differ():
    a, b = SyntheticImages(8, seed=3), SyntheticImages(8, seed=3)
    assert all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(8))
    other = SyntheticImages(8, seed=3, offset=8)
    assert not torch.equal(a[0][0], other[0][0])
    assert a[0][0].shape == (3, 32, 32) and 0 <= a[0][1] < 10
    with pytest.raises(IndexError):
        a[8]
    with pytest.raises(ValueError, match='num_samples >= 1 and num_classes >= 2, got 0 and 10'):
        SyntheticImages(0)

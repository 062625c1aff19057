"""The README's main job (composer_se.demo) and its synthetic data."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from composer_se import demo
from composer_se.data import SyntheticImages


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


def test_demo_trains_an_se_model_well_above_chance(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'composer_se.demo', '--epochs', '3', '--samples', '1024'],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'SqueezeExcite added 2 SE blocks: module.12, module.15' in result.stdout
    assert 'squeeze_excite/num_squeeze_excite_layers: 2' in result.stdout + result.stderr  # Composer's config print
    accuracy = float(re.search(r'final eval accuracy: ([0-9.]+)%', result.stdout).group(1))
    assert accuracy > 30.0


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        demo.main(['--epochs', '0'])
    assert 'need --epochs >= 1' in capsys.readouterr().err

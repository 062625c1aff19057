"""composer_se/recipes/safe_load.py: reading checkpoint files without running code from them."""

from __future__ import annotations

import datetime
import pickle
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from composer_se.checkpoints import CheckpointError
from composer_se.recipes.safe_load import read_checkpoint

OURS = ('SqueezeExcite', {'repr': 'composer_se.SqueezeExcite(latent_channels=4)'})

#: What unpickling the objects below would have called.
CALLS: list = []


def record_call(*args):
    CALLS.append(args)
    return args


class RunsCode:
    """Unpickled, it would call :func:`record_call`."""

    def __reduce__(self):
        return record_call, ('ran',)


@dataclass
class Point:
    x: int = 1


def composer_checkpoint(algorithms=None) -> dict:
    """A Composer checkpoint's shape: model state, algorithms, and the numpy, datetime and torch-version values."""
    state = {'model': {'0.weight': torch.arange(12.).reshape(3, 4)}, 'timestamp': datetime.timedelta(seconds=5)}
    if algorithms is not None:
        state['algorithms'] = algorithms
    rng = [{'numpy': np.random.RandomState(0).get_state(), 'dtype': np.dtype('float32')}]
    return {'state': state, 'rng': rng, 'metadata': {'torch_version': torch.__version__}}


def test_a_saved_checkpoint_reads_back_with_the_values_composer_stores(tmp_path):
    path = tmp_path / 'ep0-ba2-rank0.pt'
    torch.save(composer_checkpoint([OURS]), path)
    with pytest.raises(pickle.UnpicklingError):  # what SAFE_GLOBALS adds: plain weights_only loading refuses the numpy state
        torch.load(path, weights_only=True)
    checkpoint = read_checkpoint(path)
    torch.testing.assert_close(checkpoint['state']['model']['0.weight'], torch.arange(12.).reshape(3, 4))
    assert checkpoint['state']['timestamp'] == datetime.timedelta(seconds=5)
    assert checkpoint['rng'][0]['dtype'] == np.dtype('float32')
    np.testing.assert_array_equal(checkpoint['rng'][0]['numpy'][1], np.random.RandomState(0).get_state()[1])
    assert checkpoint['metadata']['torch_version'] == torch.__version__
    assert checkpoint['state']['algorithms'] == [OURS]


def test_a_file_cut_short_is_named_as_damaged(tmp_path):
    path = tmp_path / 'ep0-ba2-rank0.pt'
    torch.save({'weight': torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    damaged = rf'^checkpoint {re.escape(str(path))} is damaged or not a PyTorch checkpoint \('
    with pytest.raises(CheckpointError, match=damaged):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=r'^the file to resume from is damaged .*load an earlier checkpoint'):
        read_checkpoint(path, name='the file to resume from')


def test_changed_bytes_fail_the_zip_checksums(tmp_path):
    path = tmp_path / 'ep0-ba2-rank0.pt'
    weight = torch.arange(256, dtype=torch.int64)
    torch.save({'weight': weight}, path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weight.numpy().tobytes())
    assert at > 0
    data[at + 8] ^= 0xFF  # the second value: still a valid tensor to torch.load, which checks no checksum
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)['weight'], weight)
    with pytest.raises(CheckpointError, match=r'is damaged or not a PyTorch checkpoint \(checksum mismatch in '
                                              r'[\w-]+/data/0\)'):
        read_checkpoint(path)


def test_a_missing_file_or_one_that_is_not_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist or is not a file'):
        read_checkpoint(tmp_path / 'missing.pt')
    garbage = tmp_path / 'notes.pt'
    garbage.write_text('not a checkpoint at all\n')
    damaged = rf'^checkpoint {re.escape(str(garbage))} is damaged or not a PyTorch checkpoint \(UnpicklingError: '
    with pytest.raises(CheckpointError, match=damaged) as caught:
        read_checkpoint(garbage)
    assert 'Please file an issue' not in str(caught.value)  # torch's advice for its own bugs, not for this file


@pytest.mark.parametrize('payload, named', [(RunsCode(), 'record_call'), (Point(), 'Point')], ids=['reduce', 'object'])
def test_a_pickle_holding_another_class_is_refused_without_running_code(tmp_path, payload, named):
    path = tmp_path / 'untrusted.pt'
    torch.save({'state': {'model': {'w': torch.zeros(2)}, 'extra': payload}}, path)
    CALLS.clear()
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(path, name='the checkpoint')
    assert CALLS == []
    text = str(caught.value)
    assert text.startswith('the checkpoint holds a reference to ') and f'.{named};' in text
    assert 'loading it could run code from the file' in text and 'damaged' not in text

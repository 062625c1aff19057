"""composer_se/composer_plumbing/checkpoint_reader.py: replacing, for a while, how Composer reads checkpoint files."""

from __future__ import annotations

import pytest
from composer.utils import checkpoint as composer_checkpoint

from composer_se.composer_plumbing.checkpoint_reader import composer_reads_checkpoints_with

READER = '_torch_load_with_validation'


@pytest.fixture
def calls(monkeypatch) -> list:
    """What the reader and Composer's validation hook (a recording stand-in for ``_ensure_valid_checkpoint``) were
    called with, in order."""
    recorded = []

    def validate(path):
        recorded.append(('validate', path))
        if 'invalid' in str(path):
            raise ValueError(f'Checkpoint at {path} is invalid.')
        return path.replace('ba2', 'ba2-validated')  # as Composer's reader does, read the path the hook returns

    monkeypatch.setattr(composer_checkpoint, '_ensure_valid_checkpoint', validate, raising=False)
    return recorded


def reader_for(calls: list):
    def read(path, map_location):
        calls.append(('read', path, map_location))
        return {'read': path}
    return read


def test_within_it_composer_reads_with_the_function_given_after_its_own_validation(calls):
    original = getattr(composer_checkpoint, READER)
    with composer_reads_checkpoints_with(reader_for(calls)):
        load = getattr(composer_checkpoint, READER)
        assert load is not original
        assert load('/tmp/ep0-ba2-rank0.pt', 'cuda:0') == {'read': '/tmp/ep0-ba2-validated-rank0.pt'}
        assert load('/tmp/other.pt') == {'read': '/tmp/other.pt'}  # Composer's default map_location
        with pytest.raises(ValueError, match='is invalid'):
            load('/tmp/invalid.pt', 'cpu')
    assert calls == [('validate', '/tmp/ep0-ba2-rank0.pt'), ('read', '/tmp/ep0-ba2-validated-rank0.pt', 'cuda:0'),
                     ('validate', '/tmp/other.pt'), ('read', '/tmp/other.pt', 'cpu'),
                     ('validate', '/tmp/invalid.pt')]  # an invalid file is never read
    assert getattr(composer_checkpoint, READER) is original


def test_without_composers_validation_hook_the_function_is_called_alone(calls, monkeypatch):
    monkeypatch.delattr(composer_checkpoint, '_ensure_valid_checkpoint')
    with composer_reads_checkpoints_with(reader_for(calls)):
        assert getattr(composer_checkpoint, READER)('a.pt', 'cpu') == {'read': 'a.pt'}
    assert calls == [('read', 'a.pt', 'cpu')]


def test_the_original_reader_is_back_when_the_body_raises(calls):
    original = getattr(composer_checkpoint, READER)
    with pytest.raises(ZeroDivisionError):
        with composer_reads_checkpoints_with(reader_for(calls)):
            assert getattr(composer_checkpoint, READER) is not original
            1 / 0
    assert getattr(composer_checkpoint, READER) is original
    assert calls == []


def test_a_composer_without_the_private_reader_is_an_error_naming_it(calls, monkeypatch):
    monkeypatch.delattr(composer_checkpoint, READER)
    with pytest.raises(RuntimeError, match=r'composer\.utils\.checkpoint\._torch_load_with_validation is gone'):
        with composer_reads_checkpoints_with(reader_for(calls)):
            pytest.fail('the body ran')
    assert not hasattr(composer_checkpoint, READER)  # nothing was put in its place

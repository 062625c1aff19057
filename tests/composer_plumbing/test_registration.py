"""composer_se/composer_plumbing/registration.py: the repr prefix and the entry under composer.algorithms."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import composer.algorithms
import pytest

from composer_se import SqueezeExcite
from composer_se.composer_plumbing.registration import (NAMESPACE, REPR_PREFIX, call_in_repr, register,
                                                        registered_factory)


@pytest.fixture
def original_factory():
    """The factory registered now (our class registers itself on import), registered again afterwards."""
    original = registered_factory()
    assert original is not None
    yield original
    register(original)


def test_our_repr_starts_with_the_prefix_that_names_the_entry_under_composer_algorithms():
    assert NAMESPACE == 'composer_se' and REPR_PREFIX == 'composer_se.'
    assert repr(SqueezeExcite(latent_channels=4)).startswith(REPR_PREFIX + 'SqueezeExcite(latent_channels=4, ')


def test_call_in_repr_gives_our_call_and_nothing_for_composers_own_or_other_values():
    assert call_in_repr('composer_se.SqueezeExcite(latent_channels=4)') == 'SqueezeExcite(latent_channels=4)'
    assert call_in_repr(repr(SqueezeExcite(latent_channels=4))) == SqueezeExcite(latent_channels=4).settings.call()
    assert call_in_repr('SqueezeExcite(latent_channels=64)') is None  # Composer's own algorithm
    assert call_in_repr('composer_se.BlurPool()') is None
    assert call_in_repr('other.composer_se.SqueezeExcite()') is None
    for value in (None, 4, b'composer_se.SqueezeExcite()', ['composer_se.SqueezeExcite()']):
        assert call_in_repr(value) is None


def test_a_registered_factory_is_what_composer_algorithms_names(original_factory, monkeypatch):
    def factory(*args, **kwargs):
        return ('built', args, kwargs)

    register(factory)
    assert registered_factory() is factory
    assert getattr(composer.algorithms, NAMESPACE).SqueezeExcite is factory
    built = eval('algorithms.composer_se.SqueezeExcite(latent_channels=4)', {'algorithms': composer.algorithms})
    assert built == ('built', (), {'latent_channels': 4})
    register(SqueezeExcite)
    assert composer.algorithms.composer_se.SqueezeExcite is SqueezeExcite
    monkeypatch.delattr(composer.algorithms, NAMESPACE)
    assert registered_factory() is None  # before any register


@pytest.mark.parametrize('kwargs', [{'latent_channels': 4},
                                    {'latent_channels': 0.25, 'min_channels': 8, 'include': ['layer3'],
                                     'exclude': 'layer3.0', 'init': 'identity', 'placement': 'block',
                                     'fold_batchnorm': False}], ids=['latent', 'every_setting'])
def test_composers_evaluation_of_our_repr_rebuilds_our_algorithm_with_its_settings(original_factory, kwargs):
    register(SqueezeExcite)
    algorithm = SqueezeExcite(**kwargs)
    rebuilt = eval('algorithms.' + repr(algorithm), {'algorithms': composer.algorithms})
    assert type(rebuilt) is SqueezeExcite
    assert rebuilt is not algorithm and rebuilt.settings == algorithm.settings
    assert repr(rebuilt) == repr(algorithm)


@pytest.mark.parametrize('order', ['composer_se first', 'composer first'])
def test_composer_finds_our_algorithm_whichever_is_imported_first(order):
    """In a fresh interpreter: once our algorithm is imported, before or after Composer, Composer's checkpoint
    loader rebuilds our class from our checkpoints' repr."""
    first, second = ('from composer_se import SqueezeExcite', 'from composer import Trainer')
    lines = [first, second] if order == 'composer_se first' else [second, first]
    code = '; '.join(lines + ['import composer.algorithms as a',
                              'print(a.composer_se.SqueezeExcite(latent_channels=4).__class__.__module__)'])
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == 'composer_se.algorithm'

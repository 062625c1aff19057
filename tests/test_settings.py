"""composer_se/settings.py: one settings object for every entry point, with the defaults written once."""

from __future__ import annotations

import dataclasses

import pytest
import torchvision

from composer_se import SqueezeExcite, SqueezeExciteSettings, apply_squeeze_excite
from composer_se.plan import plan_squeeze_excite
from composer_se.settings import DEFAULTS
from tests.helpers import small_cnn


def test_defaults_and_normalisation():
    assert DEFAULTS == SqueezeExciteSettings(64, 128, (), (), 'default', 'conv', True)
    settings = SqueezeExciteSettings(latent_channels=64.0, min_channels=256.0, include='layer3', exclude=None)
    assert (settings.latent_channels, settings.min_channels, settings.include, settings.exclude) == (
        64, 256, ('layer3',), ())
    assert type(settings.latent_channels) is int and type(settings.min_channels) is int
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.min_channels = 1


def test_every_entry_point_takes_the_same_settings():
    settings = SqueezeExciteSettings(latent_channels=4, min_channels=16, fold_batchnorm=False)
    by_keywords = apply_squeeze_excite(small_cnn(), latent_channels=4, min_channels=16, fold_batchnorm=False)
    by_settings = apply_squeeze_excite(small_cnn(), settings=settings)
    assert by_settings == by_keywords and by_settings.num_blocks == 2
    algorithm = SqueezeExcite(settings=settings)
    assert algorithm.settings is settings and algorithm.min_channels == 16
    assert repr(algorithm) == repr(SqueezeExcite(latent_channels=4, min_channels=16, fold_batchnorm=False))
    plan = plan_squeeze_excite(torchvision.models.resnet18(), settings=dataclasses.replace(settings, min_channels=512))
    assert len(plan.rows) == 5 and plan.settings.fold_batchnorm is False


def test_settings_and_keywords_together_are_refused():
    with pytest.raises(TypeError, match='either as settings or one by one, not both .*min_channels'):
        SqueezeExcite(min_channels=8, settings=DEFAULTS)
    settings = SqueezeExciteSettings(8, placement='block', fold_batchnorm=False)
    # Also when the keywords carry the default values, which an identity check would take for "not given".
    with pytest.raises(TypeError, match='not both .*fold_batchnorm, latent_channels, placement'):
        apply_squeeze_excite(small_cnn(), latent_channels=64, placement='conv', fold_batchnorm=True, settings=settings)
    with pytest.raises(TypeError, match='not both .*fold_batchnorm'):
        SqueezeExcite(fold_batchnorm=True, settings=settings)
    with pytest.raises(TypeError, match='not both .*positional arguments'):
        SqueezeExcite(64, settings=settings)
    with pytest.raises(TypeError, match='settings must be a SqueezeExciteSettings, got dict'):
        apply_squeeze_excite(small_cnn(), settings={'min_channels': 8})


def test_the_call_recorded_in_checkpoints_is_unchanged():
    assert DEFAULTS.call() == ("SqueezeExcite(latent_channels=64, min_channels=128, include=(), exclude=(), "
                               "init='default', placement='conv', fold_batchnorm=True)")

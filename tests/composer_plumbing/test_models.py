"""composer_se/composer_plumbing/models.py: the network inside a Composer model, the conv Composer's SE follows."""

from __future__ import annotations

import sys

import torch
from composer.models import ComposerClassifier, ComposerModel
from torch import nn

from composer_se.composer_plumbing.models import has_composers_squeeze_excite, network_of
from tests.helpers import small_cnn


class Wrapper(ComposerModel):
    """A ComposerModel that is not a ComposerClassifier, though it keeps its network in ``module`` too."""

    def __init__(self):
        super().__init__()
        self.module = nn.Linear(2, 2)

    def forward(self, batch):
        return self.module(batch[0])

    def loss(self, outputs, batch):
        return torch.nn.functional.mse_loss(outputs, batch[1])


def test_a_composer_classifier_gives_the_network_it_wraps():
    network = small_cnn()
    assert network_of(ComposerClassifier(network, num_classes=4)) is network


def test_a_plain_module_or_another_composer_model_is_its_own_network():
    plain = small_cnn()
    assert network_of(plain) is plain
    wrapper = Wrapper()
    assert network_of(wrapper) is wrapper


def test_finding_the_network_never_imports_composer(monkeypatch):
    monkeypatch.delitem(sys.modules, 'composer.models')
    plain = nn.Linear(2, 2)
    assert network_of(plain) is plain
    assert 'composer.models' not in sys.modules


def test_a_conv_that_composers_se_follows_is_recognised():
    from composer.algorithms.squeeze_excite import apply_squeeze_excite as composer_apply_squeeze_excite
    model = small_cnn()
    composer_apply_squeeze_excite(model, latent_channels=4, min_channels=1)
    marked = {name for name, module in model.named_modules() if has_composers_squeeze_excite(module)}
    wrapped = {name + '.conv' for name, module in model.named_modules() if type(module).__name__ == 'SqueezeExciteConv2d'}
    assert marked == wrapped and marked
    assert not has_composers_squeeze_excite(nn.Conv2d(3, 8, 3))

"""composer_se/composer_plumbing/models.py: the network inside a Composer model."""

from __future__ import annotations

import sys

import torch
from composer.models import ComposerClassifier, ComposerModel
from torch import nn

from composer_se.composer_plumbing.models import network_of
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

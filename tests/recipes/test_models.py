"""composer_se/recipes/models/: the models a recipe names (CIFAR ResNets, torchvision, timm), weights, zero init."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from composer_se.recipes.config import ModelConfig, RecipeError, load_recipe
from composer_se.recipes.models import cifar_resnet
from composer_se.recipes.run import build_trainer, main
from tests.recipes.helpers import DEMO, SHRINK, se_blocks


def test_cifar_resnet_sizes():
    assert sum(p.numel() for p in cifar_resnet(56).parameters()) == 855_770  # "about 0.85M" in He et al.
    assert sum(p.numel() for p in cifar_resnet(20).parameters()) == 272_474
    assert cifar_resnet(110)(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match='depth must be one of'):
        cifar_resnet(50)


def test_local_weights_load_and_a_mismatch_is_named(tmp_path, capsys):
    from composer_se.recipes.models import build_module
    source = cifar_resnet(20)
    torch.save(source.state_dict(), tmp_path / 'weights.pt')
    loaded = build_module(ModelConfig(name='resnet20', weights=str(tmp_path / 'weights.pt')))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))
    torch.save({f'module.{k}': v for k, v in source.state_dict().items()}, tmp_path / 'prefixed.pt')
    assert main([DEMO, *SHRINK, 'model.name=resnet20', f'model.weights={tmp_path}/prefixed.pt']) == 2
    assert 'does not fit model CIFARResNet: 128 missing key(s): conv1.weight, bn1.weight, bn1.bias and 125 more' in (
        capsys.readouterr().err)


def test_a_timm_model_by_name_gets_se_and_a_bad_name_is_one_error(capsys):
    timm = pytest.importorskip('timm')
    trainer = build_trainer(load_recipe(DEMO, [*SHRINK, 'model.name=timm/resnet18', 'model.num_classes=10',
                                               'algorithms.squeeze_excite.min_channels=512']))
    network = trainer.state.model.module
    assert isinstance(network, timm.models.ResNet) and network.num_classes == 10
    assert se_blocks(trainer) == ['module.layer4.0.conv1', 'module.layer4.0.conv2', 'module.layer4.0.downsample.0',
                                  'module.layer4.1.conv1', 'module.layer4.1.conv2']
    assert main([DEMO, *SHRINK, 'model.name=timm/resnet5O']) == 2
    assert ("unknown model.name 'timm/resnet5O': timm has no model 'resnet5O'; did you mean timm/resnet50"
            in capsys.readouterr().err)


def test_a_timm_model_without_timm_says_how_to_install_it(monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, 'timm', None)  # import timm now raises ImportError
    assert main([DEMO, *SHRINK, 'model.name=timm/resnet18']) == 2
    assert ('model.name timm/resnet18 needs timm, which is not installed; install it with pip install '
            '"composer-se[timm]"' in capsys.readouterr().err)


@pytest.mark.parametrize('seed', [1, 2, 3])
def test_the_demo_model_starts_with_small_outputs(seed):
    """The demo's other guard: its residual blocks start as the identity (model.zero_init_residual), so the 56-layer
    net starts with small outputs; with the default start they are large enough that the loss spikes as the
    learning rate warms up, and the BatchNorm running statistics of those few steps then spoil evaluation."""
    from composer_se.recipes.data import SyntheticImages
    from composer_se.recipes.models import build_module
    config = load_recipe(DEMO, [f'seed={seed}'])
    assert config.model.zero_init_residual
    images = torch.stack([SyntheticImages(64, seed=seed)[i][0] for i in range(64)])
    outputs = {}
    for zero_init in (True, False):
        torch.manual_seed(seed)
        model = build_module(dataclasses.replace(config.model, zero_init_residual=zero_init))
        with torch.no_grad():
            outputs[zero_init] = model(images).std().item()
    assert outputs[True] < 0.3 < 0.6 < outputs[False]


def test_zero_init_residual_reaches_each_model_source_or_is_one_error():
    """CIFAR, torchvision and timm ResNets start their residual branches at zero; a model without that option says so."""
    from composer_se.recipes.models import build_module
    has_timm = importlib.util.find_spec('timm') is not None
    for name in ['resnet20', 'resnet18'] + (['timm/resnet18'] if has_timm else []):
        model = build_module(ModelConfig(name=name, zero_init_residual=True))
        assert not model.layer1[0].bn2.weight.any(), name
    for name in ['mobilenet_v2'] + (['timm/efficientnet_b0'] if has_timm else []):
        with pytest.raises(RecipeError, match=f'model.zero_init_residual applies to .*not to {name}'):
            build_module(ModelConfig(name=name, zero_init_residual=True))

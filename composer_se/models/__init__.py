"""Models by name, wrapped for Composer: CIFAR ResNets and torchvision classifiers."""

from __future__ import annotations

import difflib
import os

import torch
import torchvision
from composer.models import ComposerClassifier
from torch import nn

from composer_se.config import ModelConfig, RecipeError
from composer_se.models.cifar_resnet import DEPTHS, BasicBlock, CIFARResNet, cifar_resnet

__all__ = ['BasicBlock', 'CIFARResNet', 'build_model', 'cifar_resnet', 'model_names']

CIFAR_NAMES = {f'resnet{depth}': depth for depth in DEPTHS}


def model_names() -> list[str]:
    """Every name ``model.name`` accepts: the CIFAR ResNets and torchvision's classification models."""
    return sorted(CIFAR_NAMES) + sorted(torchvision.models.list_models(module=torchvision.models))


def build_module(config: ModelConfig) -> nn.Module:
    """The bare ``nn.Module`` named by ``config``, with its weights loaded when ``config.weights`` is set."""
    if config.num_classes < 2:
        raise RecipeError(f'model.num_classes must be at least 2, got {config.num_classes}')
    if config.name in CIFAR_NAMES:
        module = cifar_resnet(CIFAR_NAMES[config.name], num_classes=config.num_classes)
    elif config.name in torchvision.models.list_models(module=torchvision.models):
        module = torchvision.models.get_model(config.name, weights=None, num_classes=config.num_classes)
    else:
        close = difflib.get_close_matches(config.name, model_names(), n=3)
        raise RecipeError(
            f'unknown model.name {config.name!r}' + (f'; did you mean {", ".join(close)}?' if close else '') +
            f' Choose resnet20, resnet56, resnet110 (CIFAR) or a torchvision classification model such as '
            f'resnet50.',
        )
    if config.weights:
        _load_weights(module, config.weights)
    return module


def _load_weights(module: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise RecipeError(f'model.weights file {path} does not exist (weights are only read from local files)')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:
        raise RecipeError(f'model.weights file {path} could not be read as a state dict: {error}') from None
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise RecipeError(f'model.weights file {path} does not fit the model: {str(error).splitlines()[1].strip()}'
                          ) from None


def build_model(config: ModelConfig) -> ComposerClassifier:
    """The model named by ``config`` as a ``ComposerClassifier`` (cross-entropy loss, top-1 accuracy)."""
    return ComposerClassifier(build_module(config), num_classes=config.num_classes)

"""Models by name, wrapped for Composer: CIFAR ResNets, torchvision classifiers and, with timm, timm's models."""

from __future__ import annotations

import dataclasses
import difflib
import os

import torch
import torchvision
from composer.models import ComposerClassifier
from torch import nn

from composer_se.checkpoints import CheckpointError
from composer_se.composer_plumbing.checkpoint_format import CLASSIFIER_PREFIX, is_composer_checkpoint, model_state_of
from composer_se.recipes.config import ModelConfig, RecipeError
from composer_se.recipes.models.cifar_resnet import DEPTHS, BasicBlock, CIFARResNet, cifar_resnet
from composer_se.recipes.safe_load import read_checkpoint

__all__ = ['TIMM_PREFIX', 'BasicBlock', 'CIFARResNet', 'build_model', 'build_skeleton', 'cifar_resnet', 'model_names']

CIFAR_NAMES = {f'resnet{depth}': depth for depth in DEPTHS}
#: ``model.name: timm/<name>`` builds ``timm.create_model(<name>)`` (timm is the optional extra ``composer-se[timm]``)
TIMM_PREFIX = 'timm/'


def model_names() -> list[str]:
    """The names ``model.name`` accepts without timm: the CIFAR ResNets and torchvision's classification models."""
    return sorted(CIFAR_NAMES) + sorted(torchvision.models.list_models(module=torchvision.models))


def build_module(config: ModelConfig) -> nn.Module:
    """The bare ``nn.Module`` named by ``config``, with its weights loaded when ``config.weights`` is set."""
    zero_init = {'zero_init_residual': True} if config.zero_init_residual else {}
    if config.name.startswith(TIMM_PREFIX):
        module = _timm_model(config.name.removeprefix(TIMM_PREFIX), config.num_classes,
                             zero_init_last=config.zero_init_residual)
    elif config.name in CIFAR_NAMES:
        module = cifar_resnet(CIFAR_NAMES[config.name], num_classes=config.num_classes, **zero_init)
    elif config.name in torchvision.models.list_models(module=torchvision.models):
        try:
            module = torchvision.models.get_model(config.name, weights=None, num_classes=config.num_classes,
                                                  **zero_init)
        except TypeError:
            if not zero_init:
                raise
            raise RecipeError(f'model.zero_init_residual applies to CIFAR and torchvision ResNets (ResNet, ResNeXt, '
                              f'Wide ResNet), not to {config.name}') from None
    else:
        close = difflib.get_close_matches(config.name, model_names(), n=3)
        raise RecipeError(
            f'unknown model.name {config.name!r}' + (f'; did you mean {", ".join(close)}?' if close else '') +
            ' Choose resnet20, resnet32, resnet44, resnet56, resnet110 (CIFAR), a torchvision classification model '
            f'such as resnet50, or a timm model as {TIMM_PREFIX}<name> (e.g. {TIMM_PREFIX}resnet50).',
        )
    if config.weights:
        _load_weights(module, config.weights)
    return module


def build_skeleton(config: ModelConfig) -> nn.Module:
    """The model named by ``config`` for its shapes only (``config.weights`` is not read), as the planner needs it.

    Built on the ``meta`` device, so no weight is allocated or initialised; a
    constructor that reads tensor values (torchvision's RegNets compute their widths
    with tensors) runs on the CPU instead.
    """
    config = dataclasses.replace(config, weights=None)
    try:
        with torch.device('meta'):
            return build_module(config)
    except NotImplementedError:  # "Cannot copy out of meta tensor": the constructor needs real tensors
        return build_module(config)


def _timm_model(name: str, num_classes: int, zero_init_last: bool = False) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=...)``: built from its definition, nothing downloaded.

    ``zero_init_last`` asks for timm's ``zero_init_last=True`` (its ResNets and RegNets
    already default to it); left False, the model keeps timm's own default.
    """
    try:
        import timm
    except ImportError:
        raise RecipeError(
            f'model.name {TIMM_PREFIX}{name} needs timm, which is not installed; install it with '
            f'pip install "composer-se[timm]" (or pip install timm)',
        ) from None
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f'; did you mean {", ".join(TIMM_PREFIX + c for c in close)}?' if close else ''
        raise RecipeError(f'unknown model.name {TIMM_PREFIX + name!r}: timm has no model {name!r}{hint} '
                          f'(timm.list_models() lists the names it knows)')
    if not zero_init_last:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, zero_init_last=True)
    except TypeError:
        raise RecipeError(f'model.zero_init_residual applies to residual networks whose constructor takes '
                          f'zero_init_last in timm (ResNet, RegNet, ...), not to {TIMM_PREFIX}{name}') from None


def _load_weights(module: nn.Module, path: str) -> None:
    """Loads a state dict, or the model of a Composer checkpoint, from local file ``path`` into ``module``.

    The file is read with ``weights_only=True`` (:func:`~composer_se.recipes.safe_load.read_checkpoint`).
    A Composer checkpoint's model is a ``ComposerClassifier``, whose keys start with
    ``module.``; that prefix is removed. This is how a model trained without SE starts
    an SE run: its weights are loaded here, before SE is added.
    """
    if not os.path.isfile(path):
        raise RecipeError(f'model.weights file {path} does not exist (weights are only read from local files)')
    try:
        state = read_checkpoint(path, name=f'model.weights file {path}')
    except CheckpointError as error:
        raise RecipeError(str(error)) from None
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    elif is_composer_checkpoint(state):
        state = {key.removeprefix(CLASSIFIER_PREFIX): value for key, value in model_state_of(state, path).items()}
    if not isinstance(state, dict):
        raise RecipeError(f'model.weights file {path} holds a {type(state).__name__}, not a state dict')
    expected = module.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [key for key in expected if key in state and tuple(state[key].shape) != tuple(expected[key].shape)]
    for problem, keys in (('missing', missing), ('unexpected', unexpected), ('wrong-shape', wrong_shape)):
        if keys:
            shown = ', '.join(keys[:3]) + (f' and {len(keys) - 3} more' if len(keys) > 3 else '')
            hint = ''
            if problem == 'unexpected' and any('se' in key.split('.')[:-1] for key in keys):
                hint = ('; its SE weights show that it was saved with SqueezeExcite: to continue that run, pass it as '
                        'checkpoint.load_path (with the same algorithms.squeeze_excite) instead')
            raise RecipeError(f'model.weights file {path} does not fit model {module.__class__.__name__}: '
                              f'{len(keys)} {problem} key(s): {shown}{hint}')
    module.load_state_dict(state)


def build_model(config: ModelConfig) -> ComposerClassifier:
    """The model named by ``config`` as a ``ComposerClassifier`` (cross-entropy loss, top-1 accuracy)."""
    return ComposerClassifier(build_module(config), num_classes=config.num_classes)

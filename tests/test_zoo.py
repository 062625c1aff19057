"""SE is drop-in on one model of every torchvision classification CNN family, and on timm CNNs.

For each model: the folded model computes what SE inside the convs computes (float64:
training outputs, gradients, running statistics, eval outputs), it scripts, an optimizer
with two param groups trains the new blocks, every original state-dict key keeps its
name and shape, and no block lands inside an SE module the network already has.

The smallest variant of each family, on small images; where that is still large in
float64, a smaller model built from the family's own parts: Wide ResNet with one block
per stage, and VGG and AlexNet with one Linear layer for their 4096-wide classifiers,
which hold most of their weights and which SE never touches.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from composer_se import SqueezeExciteConv2d, apply_squeeze_excite
from composer_se.placement import registered_attention_modules
from tests.helpers import no_decay_groups

tv = torchvision.models


@pytest.fixture(autouse=True, scope='module')
def _one_thread():
    """One intra-op thread: these small float64 models run no slower on it, and on a busy
    machine with few cores, OpenMP threads waiting for each other can take 30 times longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Case:
    family: str
    build: Callable[[], nn.Module]
    size: int  #: input height and width
    min_channels: int
    blocks: int  #: SE blocks added
    folded: int  #: of which folded into the next BatchNorm
    inside_attention: int = 0  #: convs skipped because an SE module of the network holds them


def _tv(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: tv.get_model(name, num_classes=10, **kwargs)


def _small_classifier(name: str) -> Callable[[], nn.Module]:
    """torchvision's model with its classifier replaced by one Linear layer.

    Built on the meta device, so the large layers are never allocated, then given
    PyTorch's default initialisation.
    """

    def build() -> nn.Module:
        with torch.device('meta'):
            model = tv.get_model(name, num_classes=10)
            first = next(m for m in model.classifier.modules() if isinstance(m, nn.Linear))
            model.classifier = nn.Linear(first.in_features, 10)
        model.to_empty(device='cpu')
        for module in model.modules():
            if hasattr(module, 'reset_parameters'):
                module.reset_parameters()
        return model

    return build


ZOO = [
    Case('ResNet', _tv('resnet18'), 32, 256, 10, 10),
    Case('ResNeXt', _tv('resnext50_32x4d'), 32, 1024, 17, 17),
    Case('Wide ResNet', lambda: tv.ResNet(tv.resnet.Bottleneck, [1, 1, 1, 1], width_per_group=128, num_classes=10),
         32, 2048, 2, 2),
    Case('MobileNetV2', _tv('mobilenet_v2'), 32, 320, 22, 22),
    Case('MobileNetV3', _tv('mobilenet_v3_small'), 32, 288, 7, 7, 3),
    Case('EfficientNet', _tv('efficientnet_b0'), 32, 672, 15, 15, 7),
    Case('EfficientNet V2', _tv('efficientnet_v2_s'), 32, 1200, 29, 29, 14),
    Case('RegNetX', _tv('regnet_x_400mf'), 32, 400, 37, 37),
    Case('RegNetY', _tv('regnet_y_400mf'), 32, 440, 19, 19, 6),
    Case('DenseNet', _tv('densenet121'), 32, 128, 61, 58),
    Case('ShuffleNetV2', _tv('shufflenet_v2_x0_5'), 32, 96, 15, 15),
    Case('MNASNet', _tv('mnasnet0_5'), 32, 480, 9, 9),
    Case('SqueezeNet', _tv('squeezenet1_1'), 32, 256, 4, 0),
    Case('GoogLeNet', _tv('googlenet', aux_logits=False, init_weights=False), 32, 384, 2, 2),
    Case('Inception v3', _tv('inception_v3', aux_logits=False, init_weights=False), 80, 320, 18, 18),
    Case('VGG with BN', _small_classifier('vgg11_bn'), 32, 512, 4, 4),
    Case('VGG', _small_classifier('vgg11'), 32, 512, 4, 0),
    Case('ConvNeXt', _tv('convnext_tiny'), 32, 768, 4, 0),
    Case('AlexNet', _small_classifier('alexnet'), 64, 256, 3, 0),
]


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal up to float64 rounding, magnified by BatchNorms over few values (1x1 maps at the end of a network).

    Relative to the tensor's largest value; the absolute floor is for gradients that are
    zero but for rounding (of a BatchNorm's bias when another BatchNorm follows).
    """
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-7 * scale + 1e-10, msg=lambda m: f'{what}: {m}')


def assert_drop_in(model: nn.Module, size: int, min_channels: int):
    """The checks of this file on ``model``; returns the report of the folded surgery."""
    torch.manual_seed(0)
    model = model.double()
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    plain = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(no_decay_groups(m), lr=0.01, momentum=0.9) for m in (model, plain)]
    torch.manual_seed(1)
    report = apply_squeeze_excite(model, 4, min_channels, optimizers=optimizers[0])
    torch.manual_seed(1)
    unfolded = apply_squeeze_excite(plain, 4, min_channels, optimizers=optimizers[1], fold_batchnorm=False)
    assert report.names == unfolded.names and report.fold_unavailable is None and unfolded.num_folded == 0

    # Names kept: every original key, same shape; the only new keys are the blocks'.
    state = model.state_dict()
    assert all(key in state and state[key].shape == shape for key, shape in shapes.items())
    new = {f'{name}.se.{key}' for name in report.names for key in ('gate_scale', 'fc1.weight', 'fc1.bias',
                                                                   'fc2.weight', 'fc2.bias')}
    assert set(state) - set(shapes) == new

    # No block inside an SE or attention module of the network.
    for holder in model.modules():
        if isinstance(holder, registered_attention_modules()):
            assert not any(isinstance(m, SqueezeExciteConv2d) for m in holder.modules())

    # One training step, two param groups: same outputs, gradients, weights and running statistics.
    se_before = {id(p): p.detach().clone() for name in report.names for p in model.get_submodule(name).se.parameters()}
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    outputs = []
    for net, optimizer in zip((model, plain), optimizers):
        torch.manual_seed(2)  # the same dropout masks in both
        out = net(x)
        F.cross_entropy(out, torch.arange(4)).backward()
        optimizer.step()
        outputs.append(out.detach())
    close(outputs[0], outputs[1], 'training outputs')
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        if q.grad is not None:
            close(p.grad, q.grad, f'gradient of {name}')
    after, plain_after = model.state_dict(), plain.state_dict()
    for key in after:
        close(after[key], plain_after[key], f'{key} after the step')
    decay = {id(p) for p in optimizers[0].param_groups[0]['params']}
    for name in report.names:
        for key, p in model.get_submodule(name).se.named_parameters():
            assert id(p) in decay and not torch.equal(p, se_before[id(p)]), f'{name}.se.{key}'

    # Eval mode (running statistics, so one image will do), eager and scripted.
    model.eval(), plain.eval()
    x = x[:1]
    with torch.no_grad():
        expected = model(x)
        close(expected, plain(x), 'eval outputs')
        with torch.jit.optimized_execution(False):  # no profiling runs: the interpreter's result, at once
            scripted = torch.jit.script(model)(x)
    if isinstance(scripted, tuple):  # GoogLeNet and Inception v3 script to their output tuples
        scripted = scripted[0]
    close(scripted, expected, 'TorchScript eval outputs')
    return report


@pytest.mark.filterwarnings('ignore:Scripted (GoogleNet|Inception3) always returns')
@pytest.mark.parametrize('case', ZOO, ids=lambda case: case.family)
def test_torchvision_family(case: Case):
    report = assert_drop_in(case.build(), case.size, case.min_channels)
    assert (report.num_blocks, report.num_folded) == (case.blocks, case.folded)
    reasons = [reason for _, reason in report.skipped]
    assert reasons == ['inside an SE or attention module (SqueezeExcitation)'] * case.inside_attention


TIMM_ZOO = [
    # name, create_model arguments, input size, min_channels, blocks, folded, skipped inside timm's SE modules
    ('resnet50', dict(channels=(16, 32, 64, 128)), 32, 512, 4, 4, {}),  # a quarter of the width
    ('efficientnet_b0', {}, 32, 672, 15, 15, {'SqueezeExcite': 7}),
    ('regnety_016', {}, 32, 512, 7, 7, {'SEModule': 2}),
]


@pytest.mark.parametrize('name, kwargs, size, min_channels, blocks, folded, inside', TIMM_ZOO,
                         ids=[case[0] for case in TIMM_ZOO])
def test_timm_model(name, kwargs, size, min_channels, blocks, folded, inside):
    timm = pytest.importorskip('timm')
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    report = assert_drop_in(model, size, min_channels)
    assert (report.num_blocks, report.num_folded) == (blocks, folded)
    reasons = Counter(reason for _, reason in report.skipped)
    assert reasons == {f'inside an SE or attention module ({kind})': count for kind, count in inside.items()}

"""The zoo: one model of every torchvision classification CNN family and three timm CNNs, and their SE variants.

The smallest variant of each family, on small images; where that is still large in
float64, a smaller model built from the family's own parts: Wide ResNet with one block
per stage, and VGG and AlexNet with one Linear layer for their 4096-wide classifiers,
which hold most of their weights and which SE never touches.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torchvision
from torch import nn

from composer_se import apply_squeeze_excite

tv = torchvision.models


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread, for the test modules that import it: these small float64 models run no slower on it,
    and on a busy machine with few cores, OpenMP threads waiting for each other can take 30 times longer."""
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


def first_output(out):
    """A model's output, or the first of the outputs it returns (a timm or torchvision model in training may return
    several)."""
    return out[0] if isinstance(out, tuple) else out


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal up to float64 rounding, magnified by BatchNorms over few values (1x1 maps at the end of a network).

    Relative to the tensor's largest value; the absolute floor is for gradients that are
    zero but for rounding (of a BatchNorm's bias when another BatchNorm follows).
    """
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-7 * scale + 1e-10, msg=lambda m: f'{what}: {m}')


TIMM_ZOO = [
    # name, create_model arguments, input size, min_channels, blocks, folded, skipped inside timm's SE modules
    ('resnet50', dict(channels=(16, 32, 64, 128)), 32, 512, 4, 4, {}),  # a quarter of the width
    ('efficientnet_b0', {}, 32, 672, 15, 15, {'SqueezeExcite': 7}),
    ('regnety_016', {}, 32, 512, 7, 7, {'SEModule': 2}),
]


def _timm(name: str, kwargs: dict) -> nn.Module:
    timm = pytest.importorskip('timm')
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


#: The SE variants of a model: folded into the next BatchNorm (the default), unfolded, and the paper's placement.
VARIANTS = {'folded': {}, 'unfolded': dict(fold_batchnorm=False), 'block': dict(placement='block')}
#: The families whose residual blocks the paper's placement knows.
RESIDUAL = {'ResNet', 'ResNeXt', 'Wide ResNet', 'resnet50'}


@dataclass(frozen=True)
class SeModel:
    """One family of either zoo with one SE variant, for tests that ask the same of every SE model."""

    family: str
    build: Callable[[], nn.Module]
    size: int
    min_channels: int
    is_timm: bool
    variant: str
    folds: int  #: blocks of placement 'conv' that go before a BatchNorm they can be folded into

    def __str__(self) -> str:
        return f'{self.family}-{self.variant}'

    def models(self) -> tuple[nn.Module, nn.Module, dict[str, Optional[str]]]:
        """The plain model and its SE model (float64, no in-place activations, SE latent width 4), and the blocks'
        names, each with the BatchNorm it is folded into or ``None``."""
        torch.manual_seed(0)
        plain = self.build().double()
        for module in plain.modules():  # an in-place ReLU rewrites a tensor a hook or tap returned, eager or traced
            if getattr(module, 'inplace', False) is True:
                module.inplace = False
        model = copy.deepcopy(plain)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # latent widths above the channels of a few blocks
            report = apply_squeeze_excite(model, 4, self.min_channels, **VARIANTS[self.variant])
        assert report.names, 'no SE block added'
        return plain, model, {added.name: added.folded_into for added in report.added}


SE_MODELS = [
    SeModel(family, build, size, min_channels, is_timm, variant, folds)
    for family, build, size, min_channels, is_timm, folds in (
        *((case.family, case.build, case.size, case.min_channels, False, case.folded) for case in ZOO),
        *((name, lambda name=name, kwargs=kwargs: _timm(name, kwargs), size, min_channels, True, folded)
          for name, kwargs, size, min_channels, _, folded, _ in TIMM_ZOO),
    )
    for variant in VARIANTS if variant != 'block' or family in RESIDUAL
]


def trained_looking(model: nn.Module, seed: int = 3) -> nn.Module:
    """Gives every BatchNorm running statistics and affine parameters far from their initial 0 and 1, so that the
    fusion has a scale and a shift to move (negative scales included)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.3)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.randn(c, generator=generator))
                module.bias.data.copy_(torch.randn(c, generator=generator))
    return model


def folded_resnet18() -> nn.Module:
    """torchvision's ResNet-18 in float64, trained-looking, with SE (latent width 4) folded on its 10 convs of at least
    256 outputs; in eval mode."""
    torch.manual_seed(0)
    model = trained_looking(torchvision.models.resnet18(num_classes=10).double())
    apply_squeeze_excite(model, 4, 256)
    return model.eval()

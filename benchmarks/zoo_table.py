"""Where SE goes in one model of each torchvision CNN family, and in timm CNNs: the README's table.

    python benchmarks/zoo_table.py

For each model, the planner (``composer_se.plan``, which applies the surgery's own
selection to a copy with ``meta`` weights where the model's constructor allows it, so
no weight is allocated) at recipe-style
settings: ``latent_channels=64`` and the method card's ``min_channels``, 512 for
ImageNet-scale models, or the widest conv's output channels where no conv has 512 (the
planner's advice for smaller models). It prints a Markdown table: the SE blocks added,
how many are folded into the BatchNorm after their conv, and the selected convs that
get no block, with the reason. timm's rows need timm installed.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from composer_se.plan import plan_squeeze_excite  # noqa: E402
from composer_se.recipes.config import ModelConfig  # noqa: E402
from composer_se.recipes.models import build_skeleton  # noqa: E402

LATENT_CHANNELS = 64
MIN_CHANNELS = 512  #: the method card's advice for ImageNet-scale models

#: (family, model.name as recipes take it): the smallest variant of each family
TORCHVISION = [
    ('ResNet', 'resnet18'),
    ('ResNeXt', 'resnext50_32x4d'),
    ('Wide ResNet', 'wide_resnet50_2'),
    ('MobileNetV2', 'mobilenet_v2'),
    ('MobileNetV3', 'mobilenet_v3_small'),
    ('EfficientNet', 'efficientnet_b0'),
    ('EfficientNet V2', 'efficientnet_v2_s'),
    ('RegNetX', 'regnet_x_400mf'),
    ('RegNetY', 'regnet_y_400mf'),
    ('DenseNet', 'densenet121'),
    ('ShuffleNetV2', 'shufflenet_v2_x0_5'),
    ('MNASNet', 'mnasnet0_5'),
    ('SqueezeNet', 'squeezenet1_1'),
    ('GoogLeNet', 'googlenet'),
    ('Inception v3', 'inception_v3'),
    ('VGG with BN', 'vgg11_bn'),
    ('VGG', 'vgg11'),
    ('ConvNeXt', 'convnext_tiny'),
    ('AlexNet', 'alexnet'),
]
TIMM = [('ResNet (timm)', 'timm/resnet50'), ('EfficientNet (timm)', 'timm/efficientnet_b0'),
        ('RegNetY (timm)', 'timm/regnety_016')]
INPUT_SIZE = {'inception_v3': 299}  #: its auxiliary classifier, which runs in training, needs 299x299


def row(family: str, name: str) -> str:
    """One table row for ``name`` at the settings above."""
    with warnings.catch_warnings():  # torchvision's notice about Inception's and GoogLeNet's initialisation
        warnings.simplefilter('ignore', FutureWarning)
        model = build_skeleton(ModelConfig(name=name, num_classes=1000))
    size = INPUT_SIZE.get(name, 224)
    plan = plan_squeeze_excite(model, (size, size), LATENT_CHANNELS, MIN_CHANNELS)
    min_channels = MIN_CHANNELS
    if plan.largest_channels < MIN_CHANNELS:
        min_channels = plan.largest_channels
        plan = plan_squeeze_excite(model, (size, size), LATENT_CHANNELS, min_channels)
    folded = sum(r.block.folded_into is not None for r in plan.rows)
    reasons = Counter(reason for _, reason in plan.skipped)
    skipped = '; '.join(f'{count} {reason}' for reason, count in sorted(reasons.items())) or '-'
    return f'| {family} | `{name}` | {min_channels} | {len(plan.rows)} | {folded} | {skipped} |'


def table(with_timm: bool = True) -> str:
    """The Markdown table; timm's rows when ``with_timm``."""
    lines = ['| family | model | min_channels | SE blocks | folded | skipped |', '|---|---|---|---|---|---|']
    lines += [row(family, name) for family, name in TORCHVISION + (TIMM if with_timm else [])]
    return '\n'.join(lines)


if __name__ == '__main__':
    try:
        import timm  # noqa: F401
        with_timm = True
    except ImportError:
        print('timm is not installed: its rows are left out', file=sys.stderr)
        with_timm = False
    print(table(with_timm))

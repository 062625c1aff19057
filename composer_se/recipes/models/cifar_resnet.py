"""ResNets for 32x32 images (He, Zhang, Ren, Sun, "Deep Residual Learning", CVPR 2016, section 4.2).

A 3x3 stem of 16 channels, then three stages of ``n`` BasicBlocks at 16, 32 and 64
channels (the second and third halve the resolution), global average pooling and a
linear classifier: ``6n + 2`` layers. Where a block changes shape, its shortcut is a
1x1 convolution and BatchNorm (the paper's option B; its CIFAR models use zero-padded
identity shortcuts, option A, which have no parameters). ResNet-56 has 855,770
parameters with 10 classes.
"""

from __future__ import annotations

import torch
from torch import nn

from composer_se.placement import register_residual_block

__all__ = ['BasicBlock', 'CIFARResNet', 'cifar_resnet']

#: depth -> blocks per stage
DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


register_residual_block(BasicBlock, 'bn2')  # SE with placement='block' goes after bn2, before the addition


class CIFARResNet(nn.Module):
    """The CIFAR ResNet of depth ``6 * blocks_per_stage + 2``.

    Args:
        blocks_per_stage (int): ``n``, BasicBlocks in each of the three stages.
        num_classes (int, optional): outputs of the classifier. Default: ``10``.
        zero_init_residual (bool, optional): start the last BatchNorm of every residual
            branch with a zero scale, so that each block starts as the identity (Goyal et
            al., "Accurate, Large Minibatch SGD", 2017; torchvision's option of the same
            name): the network starts shallow, with small outputs, and tolerates a large
            learning rate from the first steps. Default: ``False`` (the paper's start).
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_channels = 16
        for index, channels in enumerate((16, 32, 64)):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, channels, stride))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10, zero_init_residual: bool = False) -> CIFARResNet:
    """The CIFAR ResNet of ``depth`` layers (one of 20, 32, 44, 56, 110); see :class:`CIFARResNet`."""
    if depth not in DEPTHS:
        raise ValueError(f'CIFAR ResNet depth must be one of {sorted(DEPTHS)}, got {depth!r}')
    return CIFARResNet(DEPTHS[depth], num_classes=num_classes, zero_init_residual=zero_init_residual)

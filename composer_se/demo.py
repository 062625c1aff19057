"""A short SE training run on synthetic data: ``python -m composer_se.demo``.

Trains a small three-stage CNN (16/32/64 channels) with
``SqueezeExcite(latent_channels=16, min_channels=64)`` through Composer's ``Trainer``
on CPU, prints Composer's progress, the SE blocks added and the final evaluation
accuracy. Needs no data download and no GPU.
"""

from __future__ import annotations

import argparse

import torch
from composer import Trainer
from composer.models import ComposerClassifier
from composer.optim import DecoupledSGDW
from torch import nn
from torch.utils.data import DataLoader

from composer_se import SqueezeExcite, SqueezeExciteConv2d
from composer_se.data import SyntheticImages


def small_convnet(num_classes: int = 10) -> nn.Sequential:
    """Three conv-BN-ReLU stages of 16, 32 and 64 channels, each halving the resolution."""
    layers: list[nn.Module] = []
    in_channels = 3
    for out_channels in (16, 32, 64):
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=5, help='training epochs (default: 5)')
    parser.add_argument('--samples', type=int, default=4096, help='training images (default: 4096)')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default: 0)')
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.samples < 64:
        parser.error(f'need --epochs >= 1 and --samples >= 64, got {args.epochs} and {args.samples}')

    torch.manual_seed(args.seed)
    train = SyntheticImages(args.samples, seed=args.seed)
    test = SyntheticImages(1024, seed=args.seed, offset=args.samples)
    model = ComposerClassifier(small_convnet(), num_classes=10)
    trainer = Trainer(
        model=model,
        optimizers=DecoupledSGDW(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4),
        train_dataloader=DataLoader(train, batch_size=128, shuffle=True),
        eval_dataloader=DataLoader(test, batch_size=256),
        max_duration=f'{args.epochs}ep',
        algorithms=[SqueezeExcite(latent_channels=16, min_channels=64)],
        device='cpu',
        seed=args.seed,
    )
    blocks = [name for name, m in trainer.state.model.named_modules() if isinstance(m, SqueezeExciteConv2d)]
    print(f'SqueezeExcite added {len(blocks)} SE blocks: {", ".join(blocks)}')
    trainer.fit()
    accuracy = float(trainer.state.eval_metrics['eval']['MulticlassAccuracy'].compute())
    print(f'final eval accuracy: {accuracy:.1%} (chance: 10.0%)')
    return accuracy


if __name__ == '__main__':
    main()

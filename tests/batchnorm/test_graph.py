"""composer_se/batchnorm/graph.py: which convs feed a BatchNorm and nothing else, read from the fx trace, and why not."""

from __future__ import annotations

import torch
from torch import nn

from composer_se import apply_squeeze_excite
from composer_se.layers import SqueezeExciteConv2d


def test_fold_needs_the_batchnorm_to_be_the_only_consumer():
    class Residual(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 8, 1)
            self.bn2 = nn.BatchNorm2d(8)
            self.conv3 = nn.Conv2d(8, 8, 1)
            self.bn3 = nn.BatchNorm2d(8, affine=False)

        def forward(self, x):
            u = self.conv(x)
            y = self.bn(u) + u  # the conv output goes to the BN and to the addition
            return self.bn3(self.conv3(torch.relu_(self.conv2(y)))) + self.bn2(y)

    model = Residual()
    report = apply_squeeze_excite(model, latent_channels=2, min_channels=8)
    assert report.num_blocks == 3 and report.num_folded == 0  # two shared outputs, one in-place ReLU, no affine
    assert report.fold_unavailable is None
    assert type(model.bn) is nn.BatchNorm2d
    model(torch.randn(2, 8, 6, 6)).sum().backward()


def test_untraceable_model_is_not_folded_and_says_why():

    class DataDependent(nn.Module):

        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

        def forward(self, x):
            if x.sum() > 0:  # symbolic tracing cannot follow this
                x = -x
            return self.bn(self.conv(x))

    model = DataDependent()
    report = apply_squeeze_excite(model, latent_channels=2, min_channels=8)
    assert report.num_blocks == 1 and report.num_folded == 0
    assert 'TraceError' in report.fold_unavailable or 'Proxy' in report.fold_unavailable
    assert type(model.bn) is nn.BatchNorm2d and isinstance(model.conv, SqueezeExciteConv2d)

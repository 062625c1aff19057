"""Folding a conv's SE block into the BatchNorm it feeds (composer_se.batchnorm.fold, .graph): where it happens,
where it cannot, and that names, parameter groups and the block's home do not change."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from composer_se import apply_squeeze_excite
from composer_se.batchnorm import FoldedSqueezeExciteBatchNorm2d
from composer_se.layers import SqueezeExcite2d, SqueezeExciteConv2d


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


def test_folding_keeps_names_groups_and_the_block_under_the_conv():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    names_before = list(model.state_dict())
    num_params = len(list(model.parameters()))
    decay = [p for n, p in model.named_parameters() if 'bn' not in n and 'downsample.1' not in n]
    no_decay = [p for n, p in model.named_parameters() if 'bn' in n or 'downsample.1' in n]
    opt = torch.optim.SGD([{'params': decay, 'weight_decay': 1e-4}, {'params': no_decay, 'weight_decay': 0}], lr=0.1)
    report = apply_squeeze_excite(model, latent_channels=16, min_channels=512, optimizers=opt)
    assert report.num_blocks == report.num_folded == 5
    assert report.added[0].name == 'layer4.0.conv1' and report.added[0].folded_into == 'layer4.0.bn1'
    assert report.added[2].name == 'layer4.0.downsample.0' and report.added[2].folded_into == 'layer4.0.downsample.1'
    names_after = list(model.state_dict())
    assert [n for n in names_after if '.se.' not in n] == names_before
    assert sum('.se.' in n for n in names_after) == 5 * 5  # fc1/fc2 weight and bias, gate_scale
    assert isinstance(model.layer4[0].bn1, FoldedSqueezeExciteBatchNorm2d)
    assert model.layer4[0].bn1._folded_se is model.layer4[0].conv1.se
    assert not any(isinstance(m, SqueezeExcite2d) for m in model.layer4[0].bn1.modules())
    se_params = {id(p) for p in model.layer4[0].conv1.se.parameters()}
    assert se_params <= {id(p) for p in opt.param_groups[0]['params']}
    assert len(list(model.parameters())) == num_params + 4 * 5  # each block's once, though two modules use it

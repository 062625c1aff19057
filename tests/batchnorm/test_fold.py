"""composer_se/batchnorm/fold.py: a conv's SE block folded into the BatchNorm it feeds, and back; names, parameter
groups and the block's home do not change (where folding can happen is tests/batchnorm/test_graph.py)."""

from __future__ import annotations

import torch
import torchvision

from composer_se import apply_squeeze_excite
from composer_se.batchnorm import FoldedSqueezeExciteBatchNorm2d
from composer_se.layers import SqueezeExcite2d


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

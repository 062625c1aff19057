"""SE folded into the following BatchNorm: same numbers as SE then BatchNorm, less memory kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from composer.algorithms.squeeze_excite import apply_squeeze_excite as composer_apply_squeeze_excite
from torch import nn

from composer_se import apply_squeeze_excite
from composer_se.fused.function import _BatchNormSqueezeExcite, _SqueezeExciteBatchNorm
from composer_se.folding import FoldedSqueezeExciteBatchNorm2d
from composer_se.layers import SqueezeExcite2d, SqueezeExciteConv2d
from tests.helpers import saved_activation_bytes, assert_steps_match


def stack(channels: int = 8, depth: int = 3) -> nn.Sequential:
    """conv -> BN -> ReLU(inplace) blocks: every conv feeds a BatchNorm and nothing else."""
    layers, inputs = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(inputs, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(True)]
        inputs = channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4))


def folded_and_plain(model: nn.Module, **kwargs) -> tuple[nn.Module, nn.Module]:
    """Two copies with the same SE weights: one folded, one with SE inside the convs."""
    plain = copy.deepcopy(model)
    torch.manual_seed(1)
    folded_report = apply_squeeze_excite(model, fold_batchnorm=True, **kwargs)
    torch.manual_seed(1)
    plain_report = apply_squeeze_excite(plain, fold_batchnorm=False, **kwargs)
    assert folded_report.num_folded == folded_report.num_blocks > 0
    assert plain_report.num_folded == 0
    return model, plain


def randomise_norms(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize('function', [_SqueezeExciteBatchNorm, _BatchNormSqueezeExcite], ids=['se-bn', 'bn-se'])
def test_gradcheck_float64_including_near_zero_gates(function):
    """Both fused functions: SE then BatchNorm (folded) and BatchNorm then SE (a residual block's end)."""
    torch.manual_seed(0)
    n, c, latent = 3, 5, 2
    u = (torch.randn(n, c, 4, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    w1 = torch.randn(latent, c, dtype=torch.float64, requires_grad=True)
    b1 = torch.randn(latent, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(c, latent, dtype=torch.float64, requires_grad=True)
    b2 = torch.tensor([0.0, 1.0, -2.0, -12.0, -20.0], dtype=torch.float64, requires_grad=True)  # gates to ~2e-9
    gamma = torch.rand(c, dtype=torch.float64).add(0.5).requires_grad_()
    beta = torch.randn(c, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64)

    def fused(*inputs):
        return function.apply(*inputs[:5], scale, *inputs[5:], None, None, 0.1, 1e-5)

    assert torch.autograd.gradcheck(fused, (u, w1, b1, w2, b2, gamma, beta))


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('init', ['default', 'identity'])
def test_folded_matches_se_then_batchnorm_in_training_and_eval(channels_last, init):
    torch.manual_seed(0)
    model = stack()
    randomise_norms(model)
    folded, plain = folded_and_plain(model, latent_channels=3, min_channels=8, init=init)
    if init == 'default':
        with torch.no_grad():  # a spread of gates, some near zero
            for m in (folded, plain):
                m[3].se.fc2.bias.copy_(torch.tensor([-30.0, -8, -1, 0, 1, 2, 3, 4]))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    folded, plain = folded.to(memory_format=memory_format), plain.to(memory_format=memory_format)
    inputs = [torch.randn(4, 3, 9, 7).to(memory_format=memory_format) for _ in range(3)]
    assert_steps_match(folded, plain, inputs, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5)
    x = inputs[-1]
    torch.testing.assert_close(folded.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)
    assert folded[:2](x).is_contiguous(memory_format=memory_format)  # conv + folded BN, training
    plain[:2](x)  # the same running-statistics update
    folded.eval(), plain.eval()
    assert folded[:2](x).is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-5, atol=1e-5)


def test_momentum_none_and_bf16_autocast():
    torch.manual_seed(0)
    model = stack()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    folded, plain = folded_and_plain(model, latent_channels=3, min_channels=8)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.state_dict(), plain.state_dict())
    reference = copy.deepcopy(plain)
    weights = torch.randn(4, 8, 8, 8)  # a loss that depends on the gates (a sum of squares after BN would not)
    (reference[:2](x) * weights).sum().backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out_f, out_p = folded[:2](x), plain[:2](x)
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_p.float(), rtol=0.05, atol=0.05)
    (out_f.float() * weights).sum().backward()
    (out_p.float() * weights).sum().backward()
    for name in ('se.fc1.weight', 'se.fc2.bias', 'weight'):
        expected = reference[0].get_parameter(name).grad.flatten()
        similarity = [torch.nn.functional.cosine_similarity(m[0].get_parameter(name).grad.flatten(), expected, dim=0)
                      for m in (folded, plain)]
        # The folded gate runs in float32, so it is at least as close to the float32 gradient.
        assert similarity[0] > 0.999 and similarity[0] >= similarity[1] - 1e-4, name


def added_saved_bytes(model: nn.Module, base: nn.Module, x: torch.Tensor) -> int:
    """Extra bytes of the storages autograd keeps for backward, parameters (alive anyway) left out."""
    return saved_activation_bytes(model, x) - saved_activation_bytes(base, x)


def test_folded_se_keeps_no_activation_for_backward_where_composer_keeps_one_per_block():
    torch.manual_seed(0)
    base = stack(channels=16, depth=3)
    x = torch.randn(4, 3, 16, 16)
    activation = x.shape[0] * 16 * 16 * 16 * 4  # one conv output, float32
    ours = copy.deepcopy(base)
    assert apply_squeeze_excite(ours, latent_channels=4, min_channels=16).num_folded == 3
    theirs = copy.deepcopy(base)
    composer_apply_squeeze_excite(theirs, latent_channels=4, min_channels=3)
    assert sum(type(m).__name__ == 'SqueezeExciteConv2d' for m in theirs.modules()) == 3
    bound = 3 * 8 * x.shape[0] * 16 * 4  # a few (N, C) statistics a block: 6 KiB here, 3 MiB for ResNet-50
    assert 0 < added_saved_bytes(ours, base, x) <= bound
    assert added_saved_bytes(theirs, base, x) >= 3 * activation > 10 * bound


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


def test_compile_stays_correct_with_folded_blocks():
    torch.manual_seed(0)
    folded, plain = folded_and_plain(stack(depth=2), latent_channels=3, min_channels=8)
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(folded)
    out_c, out_p = compiled(x), plain(x)
    torch.testing.assert_close(out_c, out_p, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(out_c)
    (out_c * weights).sum().backward()
    (out_p * weights).sum().backward()
    for p, q in zip(folded.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)

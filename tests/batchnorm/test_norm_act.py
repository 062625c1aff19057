"""composer_se/batchnorm/norm_act.py: timm's BatchNormAct2d with a conv's block folded in, its drop and activation kept."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from composer_se import apply_squeeze_excite
from composer_se.batchnorm import can_fold
from tests.helpers import assert_steps_match

timm = pytest.importorskip('timm')
from timm.layers import BatchNormAct2d  # noqa: E402


def conv_norm_act(**norm_kwargs) -> nn.Sequential:
    """Two conv -> BatchNormAct2d pairs, with non-trivial norm parameters and running statistics."""
    layers, inputs = [], 3
    for _ in range(2):
        layers += [nn.Conv2d(inputs, 8, 3, padding=1, bias=False), BatchNormAct2d(8, **norm_kwargs)]
        inputs = 8
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, BatchNormAct2d):
                norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
                norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2)
    return model


NORM_ACTS = {
    'relu-inplace': dict(),  # timm's default: nn.ReLU(inplace=True)
    'silu': dict(act_layer=nn.SiLU),
    'no-act': dict(apply_act=False),
    'dropout': dict(act_layer='gelu', drop_layer=partial(nn.Dropout2d, 0.3)),
    'momentum-none': dict(momentum=None, act_layer='hard_swish'),
}


@pytest.mark.parametrize('kwargs', NORM_ACTS.values(), ids=NORM_ACTS.keys())
def test_batch_norm_act_folds_and_matches_se_then_batch_norm_act_in_float64(kwargs):
    torch.manual_seed(0)
    model = conv_norm_act(**kwargs).double()
    plain = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    torch.manual_seed(1)
    report = apply_squeeze_excite(model, latent_channels=3, min_channels=8)
    torch.manual_seed(1)
    apply_squeeze_excite(plain, latent_channels=3, min_channels=8, fold_batchnorm=False)
    assert report.num_folded == report.num_blocks == 2 and report.added[0].folded_into == '1'
    norm = model[1]
    assert type(norm).__name__ == 'FoldedSqueezeExciteBatchNormAct2d' and isinstance(norm, BatchNormAct2d)
    assert (type(norm.act), type(norm.drop)) == (type(plain[1].act), type(plain[1].drop))
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in plain.named_parameters()]
    assert set(names) <= {name for name, _ in model.named_parameters()}
    assert model.state_dict().keys() == plain.state_dict().keys()

    inputs = [torch.randn(4, 3, 6, 5, dtype=torch.float64) * (step + 1) for step in range(3)]
    assert_steps_match(model, plain, inputs, rtol=1e-10, atol=1e-12, grad_rtol=1e-9, grad_atol=1e-12)
    torch.testing.assert_close(model.state_dict(), plain.state_dict(), rtol=1e-10, atol=1e-12)  # running statistics
    model.eval(), plain.eval()
    x = torch.randn(3, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('how', ['script', 'trace'])
def test_folded_batch_norm_act_scripts_and_traces(how):
    torch.manual_seed(0)
    model = conv_norm_act(act_layer=nn.SiLU)
    assert apply_squeeze_excite(model, latent_channels=3, min_channels=8).num_folded == 2
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    exported = torch.jit.script(model) if how == 'script' else torch.jit.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))
        other = torch.randn(3, 3, 5, 5)
        torch.testing.assert_close(exported(other), model(other))


def test_only_exact_batch_norm_act_is_folded_into():

    class FrozenStatsBatchNormAct2d(BatchNormAct2d):  # a subclass may normalise differently
        pass

    assert can_fold(BatchNormAct2d(8), 8) and not can_fold(FrozenStatsBatchNormAct2d(8), 8)
    assert not can_fold(BatchNormAct2d(8, affine=False), 8) and not can_fold(BatchNormAct2d(8), 16)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenStatsBatchNormAct2d(8))
    report = apply_squeeze_excite(model, latent_channels=2, min_channels=8)
    assert report.num_blocks == 1 and report.num_folded == 0 and type(model[1]) is FrozenStatsBatchNormAct2d

"""timm support: its SE and attention modules are left alone, BatchNormAct2d folds, its ResNet blocks are known."""

from __future__ import annotations

import copy
import importlib
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from composer.algorithms.warnings import NoEffectWarning
from torch import nn

from composer_se import SqueezeExciteConv2d, apply_squeeze_excite
from composer_se.batchnorm import can_fold
from composer_se.placement import TIMM_ATTENTION_MODULES, registered_attention_modules, registered_blocks
from tests.helpers import assert_steps_match

timm = pytest.importorskip('timm')
from timm.layers import BatchNormAct2d  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --- SE and attention modules ---------------------------------------------------------------------------------


def test_every_listed_timm_attention_module_exists_and_is_registered():
    registered = registered_attention_modules()
    for module_name, names in TIMM_ATTENTION_MODULES.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert getattr(module, name) in registered, f'{module_name}.{name}'


@pytest.mark.parametrize('name, kwargs, attention, inside', [
    ('seresnet18', {}, 'SEModule', 16),
    ('legacy_seresnet18', {}, 'SEModule', 16),  # timm.models.senet's own SEModule
    ('mobilenetv3_small_100', {}, 'SqueezeExcite', 18),
    ('hgnet_tiny', {}, 'EseModule', 5),
    ('gcresnet33ts', {}, 'GlobalContext', 30),
    ('resnest14d', {}, 'SplitAttn', 12),
    ('skresnet18', {}, 'SelectiveKernelAttn', 16),
    ('resnet18', dict(block_args=dict(attn_layer='cbam')), 'CbamModule', 24),
    ('resnet18', dict(block_args=dict(attn_layer='nl')), 'NonLocalAttn', 32),
    ('resnet18', dict(block_args=dict(attn_layer='coord')), 'CoordAttn', 24),
    ('botnet26t_256', {}, 'BottleneckAttn', 3),
    ('halonet26t', {}, 'HaloAttn', 6),
    ('lambda_resnet26t', {}, 'LambdaLayer', 3),
    ('mobilenetv4_hybrid_medium', {}, 'MultiQueryAttention2d', 40),
], ids=lambda value: value if isinstance(value, str) else '')
def test_no_block_inside_timms_se_and_attention_modules(name, kwargs, attention, inside):
    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False, **kwargs)
    report = apply_squeeze_excite(model, latent_channels=8, min_channels=1)
    assert report.num_blocks > 0
    assert [reason for _, reason in report.skipped] == [f'inside an SE or attention module ({attention})'] * inside
    holders = [m for m in model.modules() if isinstance(m, registered_attention_modules())]
    assert holders and not any(isinstance(m, SqueezeExciteConv2d) for holder in holders for m in holder.modules())


def test_timm_is_never_imported_by_the_package_and_registered_once_it_is():
    code = '''
import sys, warnings, torchvision
from composer_se import apply_squeeze_excite
from composer_se.plan import plan_squeeze_excite
from composer_se.recipes.models import build_module
apply_squeeze_excite(torchvision.models.mobilenet_v3_small(), 8, 512)
plan_squeeze_excite(torchvision.models.resnet18(), (32, 32), 8, 512)
assert 'timm' not in sys.modules, 'imported timm'
import timm
report = apply_squeeze_excite(timm.create_model('seresnet18'), 8, 512)
print(sorted({reason for _, reason in report.skipped}))
'''
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['inside an SE or attention module (SEModule)']"


# --- BatchNormAct2d folds, its activation kept -----------------------------------------------------------------


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


# --- placement='block' ------------------------------------------------------------------------------------------


def test_block_placement_knows_timms_resnet_blocks():
    assert {timm.models.resnet.BasicBlock: 'bn2', timm.models.resnet.Bottleneck: 'bn3'}.items() <= \
        registered_blocks().items()
    basic = apply_squeeze_excite(timm.create_model('resnet18'), 1 / 16, 1, placement='block')
    assert basic.num_blocks == 8 and all(name.endswith('.bn2') for name in basic.names)
    model = timm.create_model('resnet50', channels=(16, 32, 64, 128))
    bottleneck = apply_squeeze_excite(model, 1 / 16, 1, placement='block')
    assert bottleneck.num_blocks == 16 and all(name.endswith('.bn3') for name in bottleneck.names)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_block_placement_leaves_blocks_that_already_have_se_alone():
    with pytest.warns(NoEffectWarning, match=r'all 8 modules .* skipped: in a residual block that already has an SE '
                      r'or attention module \(SEModule\): 8'):
        report = apply_squeeze_excite(timm.create_model('seresnet18'), 1 / 16, 1, placement='block')
    assert report.num_blocks == 0 and report.skipped[0] == (
        'layer1.0.bn2', 'in a residual block that already has an SE or attention module (SEModule)')


def test_composer_se_plan_takes_a_timm_model(capsys):
    from composer_se.recipes.cli import main
    assert main(['plan', 'timm/efficientnet_b0', '--min-channels', '512', '--format', 'json']) == 0
    document = json.loads(capsys.readouterr().out)
    assert document['totals']['blocks'] == 15 and all(row['folded_into'] for row in document['rows'])
    assert {entry['reason'] for entry in document['skipped']} == {'inside an SE or attention module (SqueezeExcite)'}
    assert main(['plan', 'timm/efficientnet_b9']) == 2
    assert "unknown model.name 'timm/efficientnet_b9': timm has no model" in capsys.readouterr().err

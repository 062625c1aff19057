"""Across the package, timm's models: its SE and attention modules are left alone, its ResNet blocks known (its
BatchNormAct2d folding is tests/batchnorm/test_norm_act.py)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from composer_se import NoEffectWarning, SqueezeExciteConv2d, apply_squeeze_excite
from composer_se.placement import TIMM_ATTENTION_MODULES, registered_attention_modules, registered_blocks

timm = pytest.importorskip('timm')

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
    assert document['totals']['blocks'] == 15 and all(row['block']['folded_into'] for row in document['rows'])
    assert {entry['reason'] for entry in document['skipped']} == {'inside an SE or attention module (SqueezeExcite)'}
    assert main(['plan', 'timm/efficientnet_b9']) == 2
    assert "unknown model.name 'timm/efficientnet_b9': timm has no model" in capsys.readouterr().err

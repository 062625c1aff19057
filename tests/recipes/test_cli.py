"""composer_se/recipes/cli.py: the composer-se command (plan and its flags; gates is in test_gates_figure.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from composer_se.recipes.cli import main
from tests.recipes.helpers import ROOT


def test_cli_plans_a_named_model_and_a_recipe(capsys):
    assert main(['plan', 'resnet56', '--input-size', '32', '--min-channels', '64', '--latent-channels', '1/4']) == 0
    out = capsys.readouterr().out
    assert 'SE plan at 32x32' in out and '19 SE blocks add' in out and 'layer3.8.conv2' in out
    assert main(['plan', str(ROOT / 'yamls' / 'resnet50_imagenet.yaml'), '--format', 'json']) == 0
    document = json.loads(capsys.readouterr().out)
    assert document['input_size'] == [224, 224] and document['totals']['blocks'] == 22
    assert main(['plan', str(ROOT / 'yamls' / 'se_resnet50_imagenet.yaml')]) == 0
    assert '16 SE blocks add 2,530,992 parameters' in capsys.readouterr().out


def test_cli_errors_are_one_line(capsys):
    assert main(['plan', 'resnet5O']) == 2
    assert "unknown model.name 'resnet5O'" in capsys.readouterr().err
    assert main(['plan', 'resnet20', '--latent-channels', '1.5']) == 2
    assert 'latent_channels >= 1 must be a whole number' in capsys.readouterr().err
    assert main(['plan', 'vgg11', '--placement', 'block']) == 2
    assert 'placement="block" found no residual block' in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name('composer-se')
    result = subprocess.run([str(script), 'plan', 'resnet20', '--input-size', '32', '--min-channels', '64',
                             '--format', 'markdown'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '7 SE blocks add' in result.stdout


def test_cli_flags_override_the_recipe(capsys):
    assert main(['plan', str(ROOT / 'yamls' / 'se_resnet50_imagenet.yaml'), '--placement', 'conv', '--min-channels',
                 '2048', '--input-size', '160', '--format', 'json']) == 0
    document = json.loads(capsys.readouterr().out)
    assert document['settings']['placement'] == 'conv' and document['input_size'] == [160, 160]
    assert [row['block']['name'] for row in document['rows']] == ['layer4.0.conv3', 'layer4.0.downsample.0', 'layer4.1.conv3',
                                                         'layer4.2.conv3']
    assert document['rows'][0]['feature_map'] == [5, 5]


def test_the_command_lists_the_selected_modules_that_get_no_block(capsys):
    assert main(['plan', 'mobilenet_v3_small', '--min-channels', '512']) == 0
    out = capsys.readouterr().out
    assert '2 selected modules get no block:' in out
    assert 'features.10.block.2.fc2  inside an SE or attention module (SqueezeExcitation)' in out


def test_regnets_build_for_the_command(capsys):
    # RegNets' constructors compute their widths from tensors, so the command builds them with real (CPU) weights.
    assert main(['plan', 'regnet_y_400mf', '--min-channels', '440', '--format', 'json']) == 0
    document = json.loads(capsys.readouterr().out)
    assert document['totals']['blocks'] == 19 and len(document['skipped']) == 6

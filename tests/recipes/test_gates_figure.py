"""composer_se/recipes/gates_figure.py: ``composer-se gates``, its table and figure, with a checkpoint, and errors."""

from __future__ import annotations

import pytest
import torch

from composer_se.recipes.cli import main
from composer_se.recipes.config import load_recipe
from composer_se.recipes.gates_figure import choose_blocks
from composer_se.recipes.models import build_model
from composer_se.settings import SqueezeExciteSettings
from composer_se.surgery import apply_squeeze_excite
from tests.recipes.helpers import ROOT, write_image_tree

pytest.importorskip('matplotlib')

RECIPE = str(ROOT / 'yamls' / 'resnet56_cifar10_fast.yaml')


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    return write_image_tree(tmp_path_factory.mktemp('images'), per_class=6, size=32)


def command(images, *extra: str) -> list[str]:
    return ['gates', RECIPE, f'data.root={images}', 'model.name=resnet20', 'model.num_classes=2', '--max-batches', '2',
            '--batch-size', '4', *extra]


def rows(text: str) -> dict[str, str]:
    return {line.split(' | ')[0].removeprefix('| '): line for line in text.splitlines()
            if line.startswith('| layer')}


def test_the_command_prints_every_block_and_draws_the_figure_with_the_checkpoints_weights(images, tmp_path, capsys):
    out = tmp_path / 'figures' / 'gates.png'
    assert main(command(images, '--out', str(out))) == 0
    initial = capsys.readouterr().out
    assert out.stat().st_size > 10_000
    blocks = rows(initial)
    assert len(blocks) == 7 and 'layer3.2.conv2.se' in blocks  # ResNet-20's convs with 64 outputs
    assert '8 images; figure (layer3.0.conv1.se, ' in initial
    assert main(command(images, '--out', str(out))) == 0
    assert capsys.readouterr().out == initial  # the recipe's seed: the same initial weights on every call
    # A checkpoint of the recipe's model with one block changed: its weights, not the initial ones, are measured.
    config = load_recipe(RECIPE, ['model.name=resnet20', 'model.num_classes=2'])
    torch.manual_seed(config.seed)
    model = build_model(config.model)
    apply_squeeze_excite(model.module, settings=SqueezeExciteSettings(**config.algorithms['squeeze_excite']))
    torch.manual_seed(5)
    with torch.no_grad():
        model.module.layer3[2].conv2.se.fc2.bias.uniform_(-3, 3)
    torch.save({'state': {'model': model.state_dict()}}, tmp_path / 'ckpt.pt')
    assert main(command(images, '--checkpoint', str(tmp_path / 'ckpt.pt'), '--out', str(out), '--blocks',
                        'layer3.2.*')) == 0
    trained = capsys.readouterr().out
    assert rows(trained)['layer3.2.conv2.se'] != blocks['layer3.2.conv2.se']
    assert all(rows(trained)[name] == blocks[name] for name in rows(trained) if name != 'layer3.2.conv2.se')
    assert 'figure (layer3.2.conv1.se, layer3.2.conv2.se)' in trained


def test_errors_are_one_line_naming_the_fault(images, tmp_path, capsys):
    torch.save({'state': {'model': build_model(load_recipe(RECIPE, ['model.name=resnet20']).model).state_dict()}},
               tmp_path / 'plain.pt')
    cases = [
        (command(images, '--checkpoint', str(tmp_path / 'plain.pt')), "does not hold the weights of"),
        (command(images, '--blocks', 'layer9*'), '--blocks layer9* matches none of the blocks: layer3.0.conv1.se'),
        (command(images, '--max-batches', '0'), '--max-batches must be at least 1, got 0'),
        (['gates', str(ROOT / 'yamls' / 'resnet56_cifar10_fast_baseline.yaml'), f'data.root={images}'],
         'the recipe adds no SE'),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('composer-se gates: error: ') and message in err and len(err.splitlines()) == 1, err


def test_blocks_are_spread_from_the_first_to_the_last():
    names = [f'b{i}' for i in range(10)]
    assert choose_blocks(names, None) == ['b0', 'b3', 'b6', 'b9']
    assert choose_blocks(names[:3], None) == ['b0', 'b1', 'b2']
    assert choose_blocks(names, ['b1', 'b?']) == names

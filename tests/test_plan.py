"""composer_se/plan.py: the planner, its rows pinned by hand and its agreement with real surgery."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from composer_se import apply_squeeze_excite
from composer_se.plan import format_plan, plan_squeeze_excite
from composer_se.recipes.models import cifar_resnet


def rows_by_name(plan) -> dict:
    return {row.block.name: row for row in plan.rows}


def test_resnet50_rows_match_hand_computation():
    plan = plan_squeeze_excite(torchvision.models.resnet50(), (224, 224), latent_channels=64, min_channels=512)
    unfolded = rows_by_name(plan_squeeze_excite(torchvision.models.resnet50(), (224, 224), latent_channels=64,
                                                min_channels=512, fold_batchnorm=False))
    rows = rows_by_name(plan)
    # layer2.0.conv3: 1x1, 128 -> 512 channels at 28x28. Params 2*512*64 + 64 + 512; FLOPs 2 matmuls of
    # 512x64 at 2 FLOPs per multiply-add. Unfolded, the block reads 512*28*28 floats twice, writes them once
    # and keeps them for backward; folded into bn3, it reads them once and keeps nothing of that size.
    row = rows['layer2.0.conv3']
    assert (row.block.in_channels, row.block.out_channels, row.feature_map, row.block.latent_channels) == (128, 512, (28, 28), 64)
    assert (row.block.num_params, row.flops, row.traffic_bytes, row.saved_bytes) == (66_112, 131_072, 1_605_632, 0)
    assert row.block.folded_into == 'layer2.0.bn3'
    row = unfolded['layer2.0.conv3']
    assert (row.traffic_bytes, row.saved_bytes, row.block.folded_into) == (4_816_896, 1_605_632, None)
    # layer4.0.conv2: the strided 3x3 of the first bottleneck of stage 4: 512 -> 512 at 7x7.
    row = rows['layer4.0.conv2']
    assert (row.block.in_channels, row.block.out_channels, row.feature_map) == (512, 512, (7, 7))
    assert (row.block.num_params, row.flops, unfolded['layer4.0.conv2'].traffic_bytes) == (66_112, 131_072, 301_056)
    # layer4.2.conv3: 512 -> 2048 at 7x7.
    row = rows['layer4.2.conv3']
    assert (row.block.num_params, row.flops, row.traffic_bytes) == (2 * 2048 * 64 + 64 + 2048, 4 * 2048 * 64, 2048 * 49 * 4)
    assert (plan.model_params, len(plan.rows), plan.num_params, plan.saved_bytes) == (25_557_032, 22, 2_709_376, 0)
    assert all(row.block.folded_into for row in plan.rows)


def test_paper_placement_plan_says_28_1_million():
    plan = plan_squeeze_excite(torchvision.models.resnet50(), (224, 224), 1 / 16, 1, placement='block')
    row = rows_by_name(plan)['layer1.0.bn3']
    # The block end is applied in one pass with its BatchNorm: one read of the 256 x 56 x 56 map extra, nothing kept.
    assert (row.block.out_channels, row.feature_map[0], row.block.latent_channels, row.block.num_params,
            row.traffic_bytes, row.saved_bytes) == (256, 56, 16, 8_464, 3_211_264, 0)
    assert len(plan.rows) == 16 and plan.model_params + plan.num_params == 28_088_024
    assert 'making 28,088,024' in format_plan(plan)


@pytest.mark.parametrize('build, kwargs', [
    (torchvision.models.resnet50, dict(latent_channels=64, min_channels=512)),
    (torchvision.models.resnet50, dict(latent_channels=1 / 16, min_channels=1, placement='block')),
    (torchvision.models.resnet18, dict(latent_channels=0.25, min_channels=64, include=['layer3'], exclude='*downsample*')),
    (lambda: cifar_resnet(56), dict(latent_channels=64, min_channels=64)),
], ids=['r50-conv', 'r50-block', 'r18-patterns', 'r56'])
def test_plan_agrees_with_surgery(build, kwargs):
    model = build()
    size = 64
    plan = plan_squeeze_excite(model, (size, size), **kwargs)
    with torch.device('meta'):
        meta = build()
    x = torch.empty(1, 3, size, size, device='meta')
    with FlopCounterMode(display=False) as base_counter:
        meta(x)
    report = apply_squeeze_excite(meta, **kwargs)
    with FlopCounterMode(display=False) as se_counter:
        meta(x)
    assert [row.block for row in plan.rows] == list(report.added)  # one record, the same blocks
    assert plan.num_params == report.num_params == sum(p.numel() for p in meta.parameters()) - plan.model_params
    assert plan.flops == se_counter.get_total_flops() - base_counter.get_total_flops()
    assert plan.model_flops == base_counter.get_total_flops()
    assert sum(p.numel() for p in model.parameters()) == plan.model_params  # the model itself is untouched


def test_method_card_advice_lists_each_threshold():
    plan = plan_squeeze_excite(cifar_resnet(56), (32, 32), latent_channels=64, min_channels=64)
    assert plan.largest_channels == 64
    assert plan.candidates[64][0] == 19 and plan.candidates[32][0] == 19 + 18 + 1
    assert plan.candidates[16][0] == 1 + 18 + 19 + 19


def test_formats():
    plan = plan_squeeze_excite(cifar_resnet(20), (32, 32), latent_channels=8, min_channels=64)
    markdown = format_plan(plan, 'markdown')
    assert '| layer3.0.conv1 | 32->64 | 8x8 | 8 |' in markdown
    document = json.loads(format_plan(plan, 'json'))
    assert document['totals']['blocks'] == 7 and document['rows'][0]['block']['name'] == 'layer3.0.conv1'
    assert document['candidates']['64'] == {'blocks': 7, 'num_params': plan.num_params}
    with pytest.raises(ValueError, match='format must be one of'):
        format_plan(plan, 'html')


def test_advice_table_applies_the_same_patterns_and_the_model_is_left_alone():
    model = torchvision.models.resnet18()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_squeeze_excite(model, (64, 64), 16, 64, include=['layer3'], exclude='*downsample*')
    assert len(plan.rows) == 4 and plan.candidates[64] == (len(plan.rows), plan.num_params)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == 'cpu'


def test_a_composer_classifier_is_planned_like_the_algorithm_sees_it():
    from composer.models import ComposerClassifier
    plan = plan_squeeze_excite(ComposerClassifier(cifar_resnet(20), num_classes=10), (32, 32), 8, 64,
                               include='layer3')
    assert plan.rows[0].block.name == 'layer3.0.conv1' and len(plan.rows) == 7


def test_block_rows_show_the_blocks_input_channels_and_the_papers_advice():
    plan = plan_squeeze_excite(torchvision.models.resnet50(), (224, 224), 1 / 16, 1, placement='block')
    rows = rows_by_name(plan)
    assert (rows['layer1.0.bn3'].block.in_channels, rows['layer2.0.bn3'].block.in_channels) == (64, 256)
    assert 'the paper puts SE on every residual block' in format_plan(plan)


def test_the_plan_lists_what_surgery_skips_and_says_why():
    model = torchvision.models.efficientnet_b0()
    plan = plan_squeeze_excite(model, (64, 64), 8, 512)
    report = apply_squeeze_excite(model, 8, 512)
    assert plan.skipped == list(report.skipped) and len(plan.skipped) == 7
    assert plan.skipped[0] == ('features.5.1.block.2.fc2', 'inside an SE or attention module (SqueezeExcitation)')
    assert [row.block.name for row in plan.rows] == report.names
    assert '| features.5.1.block.2.fc2 | inside an SE or attention module (SqueezeExcitation) |' in format_plan(
        plan, 'markdown')
    assert json.loads(format_plan(plan, 'json'))['skipped'][0] == {
        'name': 'features.5.1.block.2.fc2', 'reason': 'inside an SE or attention module (SqueezeExcitation)'}


def test_training_only_branches_are_planned():
    # Inception v3's auxiliary classifier runs only in training, where SE trains.
    model = torchvision.models.inception_v3(init_weights=False)
    plan = plan_squeeze_excite(model, (299, 299), 64, 512)
    assert [row.block.name for row in plan.rows] == ['AuxLogits.conv1.conv'] == apply_squeeze_excite(model, 64, 512).names
    assert plan.rows[0].feature_map == (1, 1)
    with pytest.raises(ValueError, match=r'Inception3 does not run on 64x64 images in training mode \(.*\); plan it '
                       r'at another input size'):
        plan_squeeze_excite(model, (64, 64), 64, 512)

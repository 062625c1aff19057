"""composer_se/surgery.py: apply_squeeze_excite, which convs, names, optimizers, idempotency, atomicity, report."""

from __future__ import annotations

import copy
import math
import warnings

import composer.functional as cf
import pytest
import torch
import torchvision
from torch import nn

from composer_se import (NoEffectWarning, SqueezeExcite, SqueezeExciteConv2d, apply_squeeze_excite,
                         plan_squeeze_excite)
from composer_se.settings import resolve_latent_channels
from tests.helpers import no_decay_groups, small_cnn


def se_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, SqueezeExciteConv2d)]


def snapshot(model: nn.Module) -> tuple:
    return ([(name, type(m)) for name, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    types, state = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)


# --- which convs -----------------------------------------------------------------------------------------------


def test_selects_by_output_channels_not_min_of_in_and_out():
    # small_cnn's convs: '0' is 3->16, '3.0' is 16->32, '4' is 32->8.
    model = small_cnn()
    report = apply_squeeze_excite(model, latent_channels=4, min_channels=16)
    assert report.names == ['0', '3.0'] == se_names(model)
    # Composer's rule, min(in, out) >= 16, would skip '0' (3 inputs): the difference the README states.
    composer_model = small_cnn()
    cf.apply_squeeze_excite(composer_model, latent_channels=4, min_channels=16)
    assert [n for n, m in composer_model.named_modules() if type(m).__name__ == 'SqueezeExciteConv2d'] == ['3.0']


def test_min_channels_threshold_is_inclusive():
    assert apply_squeeze_excite(small_cnn(), latent_channels=2, min_channels=32).names == ['3.0']
    with pytest.warns(NoEffectWarning, match='largest out_channels in the model is 32'):
        assert apply_squeeze_excite(small_cnn(), latent_channels=2, min_channels=33).num_blocks == 0


@pytest.mark.parametrize(
    'latent, out_channels, width',
    [(64, 16, 64), (64.0, 16, 64), (0.25, 16, 4), (0.25, 32, 8), (1 / 16, 2048, 128), (0.01, 16, 1), (0.15625, 16, 2),
     (0.21875, 16, 4), (1, 16, 1)],
)
def test_latent_channels_width_or_rounded_fraction(latent, out_channels, width):
    # 0.15625 * 16 = 2.5 rounds half to even (2); 0.21875 * 16 = 3.5 rounds to 4.
    assert resolve_latent_channels(latent, out_channels) == width
    conv = nn.Sequential(nn.Conv2d(4, out_channels, 1))
    report = apply_squeeze_excite(conv, latent_channels=latent, min_channels=1)
    assert report.added[0].latent_channels == width == conv[0].se.fc1.out_features


BAD_LATENT = ['64', 'a', True, False, None, [64], math.nan, math.inf, -math.inf, 0, 0.0, -1, -0.5, 1.5, 64.5]
BAD_MIN = ['128', True, None, math.nan, math.inf, 0, 0.0, -3, 0.5, 1.5, 127.9]


@pytest.mark.parametrize('bad', BAD_LATENT, ids=repr)
def test_bad_latent_channels_is_a_value_error_naming_it(bad):
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r'latent_channels .*' + __import__('re').escape(repr(bad))):
        apply_squeeze_excite(model, latent_channels=bad, min_channels=1)
    with pytest.raises(ValueError, match='latent_channels'):
        SqueezeExcite(latent_channels=bad)
    assert_unchanged(model, before)


@pytest.mark.parametrize('bad', BAD_MIN, ids=repr)
def test_bad_min_channels_is_a_value_error_naming_it(bad):
    model = small_cnn()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r'min_channels must be a whole number >= 1 .*' + __import__('re').escape(repr(bad))):
        apply_squeeze_excite(model, latent_channels=4, min_channels=bad)
    with pytest.raises(ValueError, match='min_channels'):
        SqueezeExcite(min_channels=bad)
    assert_unchanged(model, before)


@pytest.mark.parametrize('kwargs, message', [
    (dict(init='sigmoid'), "init must be one of \\('default', 'identity'\\), got 'sigmoid'"),
    (dict(init=None), 'init must be one of'),
    (dict(include=5), 'include must be None, a non-empty string or a list'),
    (dict(include=['']), 'include must be'),
    (dict(exclude=[3]), 'exclude must be'),
])
def test_bad_options_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        apply_squeeze_excite(small_cnn(), **kwargs)
    with pytest.raises(ValueError, match=message):
        SqueezeExcite(**kwargs)


def test_a_model_that_is_not_a_module_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="apply_squeeze_excite takes the model as a torch.nn.Module, got str: 'resnet'"):
        apply_squeeze_excite('resnet', 16, 256)


def test_an_optimizer_of_another_model_is_an_error_and_changes_nothing():
    model, other = torchvision.models.resnet18(), torchvision.models.resnet18()
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"the optimizer given holds none of the model's parameters \(62 parameters in "
                                         r"1 param group, none of them the model's\), so the SE blocks would train in "
                                         r"another model's optimizer"):
        apply_squeeze_excite(model, 16, 256, optimizers=optimizer)
    assert_unchanged(model, before)
    assert len(optimizer.param_groups[0]['params']) == 62


@pytest.mark.parametrize('third', ['optimizer', 'include'])
def test_only_the_first_two_se_arguments_go_by_position(third):
    """``apply_squeeze_excite(model, latent_channels, min_channels, ...)`` as in Composer; the other settings and the
    optimizers are keyword-only, so a third positional argument (an optimizer, or a pattern meant for ``include``)
    binds to nothing silently: it is a TypeError before anything changes."""
    model = torchvision.models.resnet18()
    value = torch.optim.SGD(model.parameters(), lr=0.1) if third == 'optimizer' else 'layer3'
    before = snapshot(model)
    with pytest.raises(TypeError, match=r'takes from 1 to 3 positional arguments but 4 were given'):
        apply_squeeze_excite(model, 16, 256, value)
    assert_unchanged(model, before)
    with pytest.raises(TypeError, match=r'takes from 1 to 4 positional arguments but 5 were given'):
        plan_squeeze_excite(model, (32, 32), 16, 256, value)


def test_a_latent_width_above_a_blocks_channels_warns_once_with_how_many():
    model = torchvision.models.resnet18()
    with pytest.warns(UserWarning, match=r'latent_channels=300 is more than the channels of 15 of the 20 blocks \('
                                         r'for example conv1: latent_channels=300 for 64 channels\)') as caught:
        apply_squeeze_excite(model, 300, 1)
    assert len([w for w in caught if 'latent_channels=300' in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        apply_squeeze_excite(torchvision.models.resnet18(), 1 / 16, 1)  # a fraction never does


# --- selection by name ----------------------------------------------------------------------------------------


def test_include_restricts_to_named_subtrees():
    model = torchvision.models.resnet18()
    report = apply_squeeze_excite(model, latent_channels=8, min_channels=1, include=['layer3', 'layer4'])
    assert report.num_blocks == 10 and all(n.startswith(('layer3.', 'layer4.')) for n in report.names)
    model = torchvision.models.resnet18()
    assert apply_squeeze_excite(model, latent_channels=8, min_channels=1, include='layer3.*').names == [
        'layer3.0.conv1', 'layer3.0.conv2', 'layer3.0.downsample.0', 'layer3.1.conv1', 'layer3.1.conv2']


def test_exclude_and_include_combine():
    model = torchvision.models.resnet18()
    report = apply_squeeze_excite(model, latent_channels=8, min_channels=1, include='layer4', exclude='*.downsample*')
    assert report.names == ['layer4.0.conv1', 'layer4.0.conv2', 'layer4.1.conv1', 'layer4.1.conv2']


def test_pattern_matching_nothing_is_an_error_and_changes_nothing():
    model = torchvision.models.resnet18()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"include pattern 'layer5' matches no module name.*'layer4'"):
        apply_squeeze_excite(model, min_channels=1, include=['layer4', 'layer5'])
    with pytest.raises(ValueError, match=r"exclude pattern 'Layer4\*' matches no module"):
        apply_squeeze_excite(model, min_channels=1, exclude='Layer4*')
    assert_unchanged(model, before)


# --- surgery on any tree --------------------------------------------------------------------------------------


class Trees(nn.Module):

    def __init__(self):
        super().__init__()
        shared = nn.Conv2d(8, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU()), nn.Sequential(shared)])
        self.heads = nn.ModuleDict({'a': nn.Sequential(nn.Sequential(nn.Conv2d(8, 8, 1))), 'b': shared})

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.heads['a'](x) + self.heads['b'](x)


def test_nested_containers_and_a_shared_conv_wrapped_once():
    model = Trees()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    report = apply_squeeze_excite(model, latent_channels=2, min_channels=8, optimizers=opt)
    assert report.names == ['stem', 'blocks.0.0', 'blocks.1.0', 'heads.a.0.0']
    assert model.blocks[1][0] is model.heads['b'] and isinstance(model.heads['b'], SqueezeExciteConv2d)
    params = opt.param_groups[0]['params']
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 8, 6, 6)


def test_a_second_application_adds_nothing():
    model = torchvision.models.resnet18()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = apply_squeeze_excite(model, latent_channels=16, min_channels=256, optimizers=opt)
    keys = list(model.state_dict())
    n_opt = len(opt.param_groups[0]['params'])
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # Composer's convention: applying again is a silent no-op
        second = apply_squeeze_excite(model, latent_channels=16, min_channels=256, optimizers=opt)
    assert first.num_blocks == 10 and second.num_blocks == 0 and len(second.skipped) == 10
    assert set(second.skipped) == {(name, 'already has an SE block') for name in first.names}
    assert list(model.state_dict()) == keys and len(opt.param_groups[0]['params']) == n_opt
    # A wider selection afterwards adds only the new convs.
    third = apply_squeeze_excite(model, latent_channels=16, min_channels=128, optimizers=opt)
    assert third.num_blocks == 5 and len(third.skipped) == 10


def test_convs_that_composer_already_wrapped_are_left_alone():
    model = torchvision.models.resnet18()
    cf.apply_squeeze_excite(model, latent_channels=16, min_channels=512)
    report = apply_squeeze_excite(model, latent_channels=16, min_channels=512)
    # 256 -> 512 convs: Composer's min(in, out) rule skipped them, ours (out >= 512) takes them.
    assert report.names == ['layer4.0.conv1', 'layer4.0.downsample.0']
    assert ('layer4.0.conv2.conv', 'already has an SE block') in report.skipped


class StdConv(nn.Conv2d):

    def forward(self, x):
        return super().forward(x) * 2


def test_conv_subclasses_are_skipped_with_a_warning():
    model = nn.Sequential(StdConv(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.warns(UserWarning, match=r'0 \(StdConv\)'):
        report = apply_squeeze_excite(model, latent_channels=2, min_channels=8)
    assert report.names == ['1'] and report.skipped[0][0] == '0' and type(model[0]) is StdConv
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the first application said so; applying again is silent
        assert apply_squeeze_excite(model, latent_channels=2, min_channels=8).num_blocks == 0


def test_nothing_but_subclasses_selected_is_a_no_effect_warning_that_says_why():
    with pytest.warns(UserWarning, match=r'0 \(StdConv\)'), \
            pytest.warns(NoEffectWarning, match=r'all 1 modules that passed the channel and name rules were skipped: '
                         r'is a StdConv, not exactly a Conv2d or BatchNorm2d: 1'):
        apply_squeeze_excite(nn.Sequential(StdConv(3, 8, 3), nn.Conv2d(8, 4, 1)), latent_channels=2, min_channels=8)


@pytest.mark.parametrize('name, inside', [('efficientnet_b0', 14), ('mobilenet_v3_small', 8), ('regnet_y_400mf', 12)])
def test_no_block_inside_the_networks_own_se_modules(name, inside):
    # At the default min_channels=128, these SE modules' fc2 convs (C/4 -> C) qualify by channels.
    model = torchvision.models.get_model(name)
    report = apply_squeeze_excite(model, latent_channels=8)
    skipped = [n for n, reason in report.skipped if reason == 'inside an SE or attention module (SqueezeExcitation)']
    assert len(skipped) == len(report.skipped) == inside and report.num_blocks > 0
    for holder in model.modules():
        if isinstance(holder, torchvision.ops.misc.SqueezeExcitation):
            assert type(holder.fc1) is type(holder.fc2) is nn.Conv2d
    assert not set(skipped) & set(report.names)


def test_a_model_whose_selected_convs_all_sit_in_se_modules_warns_that_nothing_was_added():
    se = torchvision.ops.misc.SqueezeExcitation(64, 16)
    with pytest.warns(NoEffectWarning, match=r'skipped: inside an SE or attention module \(SqueezeExcitation\): 1'):
        report = apply_squeeze_excite(nn.Sequential(nn.Conv2d(3, 64, 3), se), latent_channels=4, min_channels=64,
                                      exclude='0')
    assert report.skipped == (('1.fc2', 'inside an SE or attention module (SqueezeExcitation)'),)


def test_a_user_attention_module_registers_in_one_line():
    from composer_se import placement, register_attention_module

    class SpatialGate(nn.Module):

        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 1)

        def forward(self, x):
            return x * self.conv(x).sigmoid()

    model = nn.Sequential(nn.Conv2d(3, 8, 3), SpatialGate(8))
    assert apply_squeeze_excite(copy.deepcopy(model), 2, 8).names == ['0', '1.conv']
    register_attention_module(SpatialGate)
    try:
        report = apply_squeeze_excite(model, 2, 8)
        assert report.names == ['0'] and report.skipped == (('1.conv', 'inside an SE or attention module '
                                                                        '(SpatialGate)'),)
        with pytest.raises(TypeError, match="module_type must be a torch.nn.Module subclass, got 'SpatialGate'"):
            register_attention_module('SpatialGate')
    finally:
        del placement._ATTENTION[SpatialGate]


def test_no_conv_is_a_no_effect_warning():
    with pytest.warns(NoEffectWarning, match='has no torch.nn.Conv2d'):
        assert apply_squeeze_excite(nn.Linear(3, 3)).num_blocks == 0


def test_report_counts_what_was_added():
    model = torchvision.models.resnet18()
    before = sum(p.numel() for p in model.parameters())
    report = apply_squeeze_excite(model, latent_channels=64, min_channels=512)
    assert report.num_blocks == 5 == len(se_names(model))
    assert report.num_params == sum(p.numel() for p in model.parameters()) - before == 5 * (2 * 512 * 64 + 64 + 512)
    block = report.added[2]
    assert (block.name, block.in_channels, block.out_channels, block.latent_channels) == ('layer4.0.downsample.0', 256,
                                                                                           512, 64)


def test_blocks_follow_the_conv_device_dtype_and_mode():
    model = small_cnn().double().eval()
    apply_squeeze_excite(model, latent_channels=2, min_channels=16)
    assert model[0].se.fc1.weight.dtype == torch.float64 and not model[0].se.training
    assert model(torch.randn(1, 3, 4, 4, dtype=torch.float64)).dtype == torch.float64


def test_refuses_a_ddp_wrapped_model(tmp_path):
    torch.distributed.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(small_cnn())
        before = snapshot(model)
        with pytest.raises(TypeError, match='wrapped by DistributedDataParallel. Apply SE before wrapping'):
            apply_squeeze_excite(model, min_channels=1)
        assert_unchanged(model, before)
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
        with pytest.warns(UserWarning):  # FSDP1 on CPU warns about its device
            wrapped = FullyShardedDataParallel(small_cnn(), device_id=torch.device('cpu'))
        with pytest.raises(TypeError, match='wrapped by FullyShardedDataParallel'):
            apply_squeeze_excite(wrapped, min_channels=1)
        sharded = small_cnn()
        fully_shard(sharded)
        with pytest.raises(TypeError, match=r'wrapped by FSDP \(fully_shard\)'):
            apply_squeeze_excite(sharded, min_channels=1)
    finally:
        torch.distributed.destroy_process_group()


def test_refuses_a_compiled_model():
    with pytest.raises(TypeError, match='wrapped by torch.compile'):
        apply_squeeze_excite(torch.compile(small_cnn()), min_channels=1)


# --- weights still load ---------------------------------------------------------------------------------------


def test_plain_state_dict_loads_and_only_se_keys_are_missing():
    plain = torchvision.models.resnet50()
    saved = plain.state_dict()
    model = torchvision.models.resnet50()
    apply_squeeze_excite(model, latent_channels=64, min_channels=512)
    result = model.load_state_dict(saved, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all('.se.' in key for key in result.missing_keys)
    assert set(model.state_dict()) - set(result.missing_keys) == set(saved)
    assert 'layer4.0.conv2.weight' in model.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


def test_identity_init_keeps_a_pretrained_networks_outputs():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        apply_squeeze_excite(model, latent_channels=16, min_channels=64, init='identity')
        after = model(x)
    assert len(se_names(model)) == 20
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_default_init_changes_outputs():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        apply_squeeze_excite(model, latent_channels=16, min_channels=64)
        assert not torch.allclose(model(x), before)


# --- optimizers -----------------------------------------------------------------------------------------------


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    x = torch.randn(4, 3, 8, 8)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()


def test_se_params_join_the_group_of_their_conv_weight_with_several_groups():
    model = small_cnn()
    opt = torch.optim.SGD(no_decay_groups(model), lr=0.1, momentum=0.9)
    train_step(model, opt)
    report = apply_squeeze_excite(model, latent_channels=4, min_channels=16, optimizers=opt)
    decay_ids = {id(p) for p in opt.param_groups[0]['params']}
    se_params = [p for name in report.names for p in model.get_submodule(name).se.parameters()]
    assert len(se_params) == 8 and all(id(p) in decay_ids for p in se_params)
    all_ids = [id(p) for g in opt.param_groups for p in g['params']]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    before = [p.clone() for p in se_params]
    train_step(model, opt)
    assert all(not torch.equal(b, p) for b, p in zip(before, se_params))


def test_composer_raises_where_we_do_not():
    model = small_cnn()
    opt = torch.optim.SGD(no_decay_groups(model), lr=0.1)
    with pytest.raises(RuntimeError, match='No parameters were removed'):
        cf.apply_squeeze_excite(copy.deepcopy(model), latent_channels=4, min_channels=16,
                                optimizers=torch.optim.SGD(no_decay_groups(model), lr=0.1))
    assert apply_squeeze_excite(model, latent_channels=4, min_channels=16, optimizers=opt).num_blocks == 2


def test_adam_with_state_keeps_training_after_surgery():
    model = small_cnn()
    opt = torch.optim.AdamW(no_decay_groups(model), lr=1e-2)
    train_step(model, opt)
    apply_squeeze_excite(model, latent_channels=4, min_channels=16, optimizers=opt)
    train_step(model, opt)
    assert all(p in opt.state for p in model[0].se.parameters())


def test_several_optimizers_each_get_their_convs_blocks():
    model = small_cnn()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    rest = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith('0.')], lr=0.1)
    apply_squeeze_excite(model, latent_channels=4, min_channels=16, optimizers=[first, rest])
    assert {id(p) for p in first.param_groups[0]['params']} == {id(p) for p in model[0].parameters()}
    assert {id(p) for p in model[3][0].se.parameters()} <= {id(p) for p in rest.param_groups[0]['params']}


def test_frozen_conv_with_one_group_uses_that_group():
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    apply_squeeze_excite(model, latent_channels=4, min_channels=16, optimizers=opt)
    ids = {id(p) for p in opt.param_groups[0]['params']}
    assert all(id(p) in ids for p in model[0].se.parameters())


def test_frozen_conv_with_several_groups_is_an_error_and_changes_nothing():
    model = small_cnn()
    opt = torch.optim.SGD([{'params': [model[3][0].weight]}, {'params': [model[4].weight]}], lr=0.1)
    before, groups_before = snapshot(model), [list(g['params']) for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"the weight '0.weight' that decides the param group of the SE block at '0' is in none of the "
                       r"2 optimizer param groups.*exclude=\['0'\]"):
        apply_squeeze_excite(model, latent_channels=4, min_channels=16, optimizers=opt)
    assert_unchanged(model, before)
    assert [list(g['params']) for g in opt.param_groups] == groups_before


def test_groups_built_from_named_parameters_get_the_new_names():
    model = small_cnn()
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    apply_squeeze_excite(model, latent_channels=4, min_channels=16, optimizers=opt)
    group = opt.param_groups[0]
    assert len(group['params']) == len(group['param_names'])
    by_name = dict(model.named_parameters())
    assert all(by_name[n] is p for n, p in zip(group['param_names'], group['params']))
    train_step(model, opt)
    twin = small_cnn()
    twin_opt = torch.optim.AdamW(twin.named_parameters(), lr=1e-2)
    apply_squeeze_excite(twin, latent_channels=4, min_channels=16, optimizers=twin_opt)
    twin_opt.load_state_dict(opt.state_dict())

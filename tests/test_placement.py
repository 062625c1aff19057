"""composer_se/placement.py: where SE may go; placement='block', SE at the end of residual branches, as in the
paper's SE-ResNet."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from composer import Trainer
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader

from composer_se import (SqueezeExcite, SqueezeExcite2d, SqueezeExciteBatchNorm2d, apply_squeeze_excite, placement,
                         register_residual_block)
from composer_se.placement import registered_blocks
from composer_se.recipes.data import SyntheticImages
from composer_se.recipes.models import cifar_resnet
from tests.helpers import no_decay_groups, small_cnn


def test_se_resnet50_matches_the_paper():
    model = torchvision.models.resnet50()
    report = apply_squeeze_excite(model, latent_channels=1 / 16, min_channels=1, placement='block')
    assert report.num_blocks == 16  # every bottleneck
    assert all(name.endswith('.bn3') for name in report.names)
    assert sorted({b.latent_channels for b in report.added}) == [16, 32, 64, 128]  # C / 16 for each stage
    total = sum(p.numel() for p in model.parameters())
    assert total == 28_088_024 and round(total / 1e6, 1) == 28.1  # the paper: 28.09M (ResNet-50: 25.6M)


def test_basic_blocks_of_torchvision_and_the_cifar_resnet():
    assert len(apply_squeeze_excite(torchvision.models.resnet18(), 16, 1, placement='block').names) == 8
    cifar = apply_squeeze_excite(cifar_resnet(56), 1 / 16, 1, placement='block')
    assert cifar.num_blocks == 27 and cifar.names[0] == 'layer1.0.bn2' and cifar.added[0].latent_channels == 1


def test_block_output_is_the_branch_scaled_before_the_addition():
    block = torchvision.models.resnet.Bottleneck(64, 16).eval()
    plain = copy.deepcopy(block)
    apply_squeeze_excite(block, latent_channels=4, min_channels=1, placement='block')
    x = torch.randn(2, 64, 6, 6)
    with torch.no_grad():
        branch = plain.bn3(plain.conv3(plain.relu(plain.bn2(plain.conv2(plain.relu(plain.bn1(plain.conv1(x))))))))
        expected = torch.relu(block.bn3.se(branch) + x)
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize('kwargs', [{}, {'momentum': None}, {'track_running_stats': False}, {'affine': False}])
def test_batchnorm_with_se_normalises_exactly_like_batchnorm(kwargs):
    plain = nn.BatchNorm2d(8, **kwargs)
    converted = SqueezeExciteBatchNorm2d.convert_(copy.deepcopy(plain), SqueezeExcite2d(8, 2, init='identity'))
    for step in range(3):
        x = torch.randn(4, 8, 5, 5) * (step + 1) + step
        torch.testing.assert_close(converted(x), plain(x))
    assert plain.state_dict().keys() <= converted.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value)
    plain.eval(), converted.eval()
    x = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(converted(x), plain(x))


def test_batchnorm_with_se_is_scriptable_and_constructible():
    norm = SqueezeExciteBatchNorm2d(16, latent_channels=4)
    assert [n for n, _ in norm.named_parameters()] == ['weight', 'bias', 'se.fc1.weight', 'se.fc1.bias',
                                                       'se.fc2.weight', 'se.fc2.bias']
    x = torch.randn(2, 16, 4, 4)
    torch.testing.assert_close(torch.jit.script(norm.eval())(x), norm(x))
    with pytest.raises(TypeError, match='exactly a torch.nn.BatchNorm2d, got SyncBatchNorm'):
        SqueezeExciteBatchNorm2d.convert_(nn.SyncBatchNorm(8), SqueezeExcite2d(8, 2))


def test_identity_init_names_idempotency_with_blocks():
    model = torchvision.models.resnet50().eval()
    saved = model.state_dict()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        apply_squeeze_excite(model, 1 / 16, 1, init='identity', placement='block')
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    missing, unexpected = model.load_state_dict(saved, strict=False)
    assert unexpected == [] and missing and all('.bn3.se.' in key for key in missing)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # applying again with the same arguments is a silent no-op
        again = apply_squeeze_excite(model, 1 / 16, 1, init='identity', placement='block')
    assert again.num_blocks == 0 and len(again.skipped) == 16
    with pytest.warns(UserWarning, match=r"SE was applied again with other arguments, SqueezeExcite\(.*init='default'"
                                         r".*16 of the modules they select already have SE of other arguments.*"
                                         r"layer1.0.bn3 has a block of placement='block', latent_channels=16, "
                                         r"init='identity'.*It added no block"):
        other = apply_squeeze_excite(model, 1 / 16, 1, placement='block')
    assert other.num_blocks == 0


def test_the_paper_placement_on_a_conv_se_model_says_what_is_there():
    model = torchvision.models.resnet50()
    apply_squeeze_excite(model, 16, 1)
    with pytest.warns(UserWarning) as caught:
        report = apply_squeeze_excite(model, 1 / 16, 1, placement='block')
    assert report.num_blocks == 0 and len(report.skipped) == 16
    (message,) = [str(w.message) for w in caught]  # one warning, and not of a subclass whose forward would be dropped
    assert ("16 of the modules they select already have SE of other arguments and were left as they are: layer1.0.bn3 "
            "has a block of placement='conv', latent_channels=16, init='default' (its conv's, folded into it)") in message


def test_se_parameters_join_the_group_of_the_branchs_last_conv_not_the_norms():
    model = torchvision.models.resnet18()
    opt = torch.optim.SGD(no_decay_groups(model), lr=0.1)
    apply_squeeze_excite(model, 16, 1, optimizers=opt, placement='block')
    decay, no_decay = ({id(p) for p in group['params']} for group in opt.param_groups)
    se = [p for name, p in model.named_parameters() if '.se.' in name]
    assert len(se) == 8 * 4 and all(id(p) in decay for p in se) and not any(id(p) in no_decay for p in se)


def test_both_placements_in_one_model():
    model = torchvision.models.resnet18()
    apply_squeeze_excite(model, 16, 512, placement='block')
    conv = apply_squeeze_excite(model, 16, 512, placement='conv')
    assert conv.names == ['layer4.0.conv1', 'layer4.0.conv2', 'layer4.0.downsample.0', 'layer4.1.conv1',
                          'layer4.1.conv2']
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_unknown_architectures_get_a_clear_error():
    model = small_cnn()
    with pytest.raises(ValueError, match=r'placement="block" found no residual block of a known type in Sequential.*'
                       r'torchvision.models.resnet.Bottleneck.*register_residual_block.*placement="conv"'):
        apply_squeeze_excite(model, 4, 1, placement='block')
    with pytest.raises(ValueError, match="placement must be one of \\('conv', 'block'\\), got 'branch'"):
        apply_squeeze_excite(model, 4, 1, placement='branch')
    with pytest.raises(ValueError, match='placement must be one of'):
        SqueezeExcite(placement='residual')


class TwoConvBlock(nn.Module):

    def __init__(self, channels: int):
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
                                    nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))

    def forward(self, x):
        return torch.relu(x + self.branch(x))


def test_a_user_block_registers_in_one_line():
    register_residual_block(TwoConvBlock, 'branch.4')
    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 1), TwoConvBlock(8), TwoConvBlock(8))
        report = apply_squeeze_excite(model, 2, 1, placement='block')
        assert report.names == ['1.branch.4', '2.branch.4']
        assert model(torch.randn(1, 3, 4, 4)).shape == (1, 8, 4, 4)
        with pytest.raises(TypeError, match='block_type must be a torch.nn.Module subclass'):
            register_residual_block(int, 'x')
    finally:
        del placement._BRANCH_ENDS[TwoConvBlock]
    assert TwoConvBlock not in registered_blocks()


@pytest.mark.parametrize('branch_end, message', [
    ('branch.9', r"residual block '0' \(TwoConvBlock\) has no submodule 'branch.9'"),
    ('branch.2', r"residual block '0' \(TwoConvBlock\) ends its branch with 'branch.2', a ReLU; SE can follow only"),
])
def test_a_registration_naming_a_wrong_module_is_an_error(branch_end, message):
    register_residual_block(TwoConvBlock, branch_end)
    try:
        with pytest.raises(ValueError, match=message):
            apply_squeeze_excite(nn.Sequential(TwoConvBlock(4)), 2, 1, placement='block')
    finally:
        del placement._BRANCH_ENDS[TwoConvBlock]


def test_block_placement_trains_and_resumes_in_a_trainer(tmp_path):

    def trainer(**kwargs) -> Trainer:
        model = ComposerClassifier(cifar_resnet(20), num_classes=10)
        return Trainer(model=model, optimizers=torch.optim.SGD(no_decay_groups(model), lr=0.05, momentum=0.9),
                       train_dataloader=DataLoader(SyntheticImages(64), batch_size=16),
                       algorithms=[SqueezeExcite(latent_channels=1 / 16, min_channels=1, placement='block')],
                       device='cpu', seed=3, progress_bar=False, log_to_console=False, save_folder=str(tmp_path),
                       save_interval='1ep', **kwargs)

    straight = trainer(max_duration='2ep')
    straight.fit()
    resumed = trainer(max_duration='2ep', load_path=str(tmp_path / 'ep1-ba4-rank0.pt'), save_overwrite=True)
    resumed.fit()
    final, again = straight.state.model.state_dict(), resumed.state.model.state_dict()
    assert sum('.se.fc1.weight' in key for key in final) == 9
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)


def test_blurpool_after_block_placement_is_fine():
    from composer.algorithms import BlurPool
    model = ComposerClassifier(cifar_resnet(20), num_classes=10)
    trainer = Trainer(model=model, train_dataloader=DataLoader(SyntheticImages(16), batch_size=8), max_duration='1ba',
                      algorithms=[SqueezeExcite(1 / 16, 1, placement='block'), BlurPool()], device='cpu',
                      progress_bar=False, log_to_console=False)
    assert sum(isinstance(m, SqueezeExciteBatchNorm2d) for m in trainer.state.model.modules()) == 9


def test_ghost_batchnorm_wraps_the_blocks_of_either_placement_and_computes_the_same():
    """Composer's GhostBatchNorm wraps each BatchNorm2d (ours included) and calls it once per ghost batch, so it
    drops no SE block in either order: the SE model with ghost batches equals SE in plain operations with them."""
    from composer.algorithms import GhostBatchNorm
    from composer.algorithms.ghost_batchnorm import apply_ghost_batchnorm
    torch.manual_seed(0)
    x = torch.randn(16, 3, 32, 32)
    for kwargs in ({'latent_channels': 8, 'min_channels': 16}, {'latent_channels': 1 / 16, 'placement': 'block'}):
        ours = cifar_resnet(20)
        report = apply_squeeze_excite(ours, min_channels=kwargs.pop('min_channels', 1), **kwargs)
        plain = copy.deepcopy(ours)
        for module in plain.modules():  # SE in plain operations: in the conv, or after F.batch_norm
            if isinstance(module, SqueezeExciteBatchNorm2d):
                module.forward = lambda input, module=module: module.se(module._normalise(input))
            elif hasattr(module, '_folded_se'):
                module.forward = lambda input, module=module: module._normalise(module._folded_se(input))
        for model in (ours, plain):
            apply_ghost_batchnorm(model, ghost_batch_size=4)
        assert sum(isinstance(m, SqueezeExcite2d) for m in ours.modules()) == report.num_blocks
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
    # ... and in a Trainer: after SE in either placement; before SE with conv placement (block placement then
    # finds GhostBatchNorm's wrappers where its residual branches end, and says so).
    for where, ghost_first in (('conv', False), ('block', False), ('conv', True)):
        ghost, se = GhostBatchNorm(ghost_batch_size=4), SqueezeExcite(1 / 16, 16, placement=where)
        trainer = Trainer(model=ComposerClassifier(cifar_resnet(20), num_classes=10),
                          train_dataloader=DataLoader(SyntheticImages(16), batch_size=8), max_duration='1ba',
                          algorithms=[ghost, se] if ghost_first else [se, ghost], device='cpu', progress_bar=False,
                          log_to_console=False)
        trainer.fit()
        assert sum(isinstance(m, SqueezeExcite2d) for m in trainer.state.model.modules()) > 0

"""composer_se/inference/fuse.py: fuse_for_inference, each conv takes the BatchNorm after it, SE kept, the eval
output unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from composer_se import apply_squeeze_excite, fuse_for_inference
from composer_se.batchnorm import FoldedSqueezeExciteBatchNorm2d, broken_folds
from composer_se.inference import ChannelBias, fuse
from composer_se.layers import SqueezeExcite2d
from tests.zoo import SE_MODELS, SeModel, close, first_output, folded_resnet18, one_thread, trained_looking  # noqa: F401 - one_thread


@pytest.mark.parametrize('case', SE_MODELS, ids=str)
def test_fusion_keeps_the_eval_output_and_every_block(case: SeModel):
    _, model, blocks = case.models()
    model = trained_looking(model).eval()
    x = torch.randn(2, 3, case.size, case.size, dtype=torch.float64)
    with torch.no_grad():
        expected = first_output(model(x))
    report = fuse_for_inference(model)
    with torch.no_grad():
        close(first_output(model(x)), expected, 'fused eval output')
    assert report.untraced is None and report.unfused == ()
    between = {fused.conv for fused in report.fused if fused.se == 'between'}
    after = {fused.norm for fused in report.fused if fused.se == 'after'}
    if case.variant == 'folded':  # every folded block, and none left folded
        assert between == {name for name, norm in blocks.items() if norm is not None}
        assert not any(isinstance(m, FoldedSqueezeExciteBatchNorm2d) for m in model.modules())
    elif case.variant == 'block':  # every block end
        assert after == set(blocks)
    else:
        assert between <= set(blocks) and len(between) == case.folds  # where a block could have been folded
    assert broken_folds(model) == []
    assert sum(isinstance(m, SqueezeExcite2d) for m in model.modules()) == len(blocks)  # every block kept


def test_a_zero_batch_norm_scale_leaves_that_pair_and_says_why():
    model = folded_resnet18()
    model.layer4[0].bn1.weight.data[[3, 7]] = 0.0
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    report = fuse_for_inference(model)
    assert report.unfused == (('layer4.0.bn1', "the BatchNorm's scale is zero in 2 of 512 channels, so it cannot "
                                               'move through the SE block between it and the conv'),)
    assert isinstance(model.layer4[0].bn1, FoldedSqueezeExciteBatchNorm2d) and model.layer4[0].conv1.folded_into_norm
    assert report.num_fused == 19 and broken_folds(model) == []
    with torch.no_grad():
        close(model(x), expected, 'eval output')


def test_what_remains_of_each_batch_norm():
    model = folded_resnet18()
    fuse_for_inference(model)
    block = model.layer4[0]
    assert isinstance(block.bn1, ChannelBias) and type(block.conv1).__name__ == 'SqueezeExciteConv2d'
    assert isinstance(model.layer1[0].bn1, nn.Identity) and model.layer1[0].conv1.bias is not None
    torch.manual_seed(0)
    paper = trained_looking(torchvision.models.resnet50(num_classes=10).double())
    apply_squeeze_excite(paper, 1 / 16, 1, placement='block')
    se = paper.layer1[0].bn3.se
    fuse_for_inference(paper.eval())
    assert paper.layer1[0].bn3 is se


def test_a_fused_model_scripts_traces_and_loads_its_state_dict():
    model = folded_resnet18()
    fuse_for_inference(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        close(torch.jit.script(model)(x), expected, 'TorchScript')
        close(torch.jit.trace(model, x)(x), expected, 'torch.jit.trace')
        close(torch.fx.symbolic_trace(model)(x), expected, 'torch.fx')
        again = copy.deepcopy(model)
        again.load_state_dict(model.state_dict())
        close(again(x), expected, 'state dict reloaded')


def test_a_fused_model_exports_to_onnx(tmp_path):
    pytest.importorskip('onnx')
    onnxruntime = pytest.importorskip('onnxruntime')
    model = folded_resnet18().float()
    fuse_for_inference(model)
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / 'fused.onnx')
    torch.onnx.export(model, (x,), path, input_names=['x'], output_names=['y'], dynamo=False)
    (y,) = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'x': x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x), rtol=1e-4, atol=1e-4)


def test_timm_batch_norm_act_keeps_its_activation():
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    model = trained_looking(timm.create_model('efficientnet_b0', num_classes=10).double())
    apply_squeeze_excite(model, 4, 672)
    model.eval()
    act = model.blocks[5][1].bn1.act
    fuse_for_inference(model)
    remains = model.blocks[5][1].bn1
    assert isinstance(remains, nn.Sequential) and isinstance(remains[0], ChannelBias) and remains[2] is act


def test_without_the_graph_only_folded_pairs_fuse_and_the_report_says_why(monkeypatch):
    model = folded_resnet18()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    monkeypatch.setattr(fuse, 'batch_norm_consumers', lambda model: ({}, 'TraceError: control flow'))
    report = fuse_for_inference(model)
    assert report.untraced == 'TraceError: control flow'
    assert {fused.conv for fused in report.fused} == {'layer3.0.conv1', 'layer3.0.conv2', 'layer3.0.downsample.0',
                                                      'layer3.1.conv1', 'layer3.1.conv2', 'layer4.0.conv1',
                                                      'layer4.0.conv2', 'layer4.0.downsample.0', 'layer4.1.conv1',
                                                      'layer4.1.conv2'}
    with torch.no_grad():
        close(model(x), expected, 'eval output')


def test_bad_input_is_refused_and_changes_nothing():
    model = folded_resnet18()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="fuse_for_inference takes a torch.nn.Module, got str: 'resnet'"):
        fuse_for_inference('resnet')
    model.layer2.train()
    with pytest.raises(ValueError, match=r'in eval mode, and \d+ modules are in training mode \(first: layer2\); '
                                         r'call model.eval\(\) first'):
        fuse_for_inference(model)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())

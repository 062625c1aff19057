"""composer_se/inference/static_gates.py: fold_static_gates, blocks whose gate is fixed on the data become a
scale in the conv or BatchNorm."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from composer_se import apply_squeeze_excite, fold_static_gates, fuse_for_inference, gate_statistics
from composer_se.batchnorm import FoldedSqueezeExciteBatchNorm2d, SqueezeExciteBatchNorm2d
from composer_se.inference import ChannelScale
from composer_se.layers import SqueezeExcite2d, SqueezeExciteConv2d
from tests.zoo import SE_MODELS, SeModel, close, first_output, folded_resnet18, one_thread, trained_looking  # noqa: F401 - one_thread


def batches(size: int, count: int = 2, batch: int = 3, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=generator, dtype=torch.float64) for _ in range(count)]


#: Within float64 rounding: a gate made constant can still differ in its last bit between the rows of a batch, as the
#: matrix product rounds them.
ROUNDING = 1e-12


def make_constant(block: SqueezeExcite2d) -> None:
    """The block's gate no longer depends on its input: the first layer's weights are zero (its bias is not)."""
    with torch.no_grad():
        block.fc1.weight.zero_()


@pytest.mark.parametrize('case', SE_MODELS, ids=str)
def test_constant_gates_fold_exactly_and_leave_the_plain_models_layers(case: SeModel):
    plain, model, blocks = case.models()
    model = trained_looking(model).eval()
    for module in model.modules():
        if isinstance(module, SqueezeExcite2d):
            make_constant(module)
    se_params = sum(p.numel() for m in model.modules() if isinstance(m, SqueezeExcite2d) for p in m.parameters())
    data = batches(case.size)
    x = torch.randn(2, 3, case.size, case.size, dtype=torch.float64)  # not among the data measured: a fixed gate
    with torch.no_grad():
        expected = first_output(model(x))
    report = fold_static_gates(model, data, tolerance=ROUNDING)
    assert [gate.block.removesuffix('.se') for gate in report.folded] == list(blocks) and report.kept == ()
    assert {gate.into for gate in report.folded} == {'batchnorm' if case.variant == 'block' else 'conv'}
    assert report.params_removed == se_params
    assert not any(isinstance(m, (SqueezeExcite2d, SqueezeExciteConv2d, SqueezeExciteNorm)) for m in model.modules())
    with torch.no_grad():
        close(first_output(model(x)), expected, 'eval output after folding')
    # What is left is the plain model's layers: its state dict loads into the model without SE, which computes the same.
    plain = trained_looking(plain).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        close(first_output(plain(x)), expected, 'the plain model with the folded weights')


SqueezeExciteNorm = (FoldedSqueezeExciteBatchNorm2d, SqueezeExciteBatchNorm2d)


def test_only_blocks_within_the_tolerance_fold_and_the_rest_say_why():
    model = folded_resnet18()
    make_constant(model.layer3[1].conv2.se)
    make_constant(model.layer4[0].conv1.se)
    data = batches(32)
    state = copy.deepcopy(model.state_dict())
    report = fold_static_gates(model, data, tolerance=ROUNDING)
    assert [gate.block for gate in report.folded] == ['layer3.1.conv2.se', 'layer4.0.conv1.se']
    assert len(report.kept) == 8 and report.kept[0][0] == 'layer3.0.conv1.se'
    assert report.kept[0][1].startswith('its max_deviation is ')
    assert type(model.layer3[1].conv2) is nn.Conv2d and type(model.layer3[1].bn2) is nn.BatchNorm2d
    assert isinstance(model.layer3[0].bn1, FoldedSqueezeExciteBatchNorm2d)  # kept, still folded
    # A block's statistics are those gate_statistics gives; C x H x W twice (squeeze, scale) plus the MLP's 2 x 2CL.
    gate = report.folded[1]
    assert report.statistics[gate.block].max_deviation == gate.max_deviation <= ROUNDING
    assert gate.flops_removed == 2 * 512 * 1 * 1 + 2 * 2 * 512 * 4 and gate.params_removed == 2 * 512 * 4 + 4 + 512
    # Nothing within that tolerance otherwise: the same model, unfolded, is left exactly as it was.
    model = folded_resnet18()
    state = copy.deepcopy(model.state_dict())
    report = fold_static_gates(model, data, tolerance=ROUNDING)
    assert report.folded == () and len(report.kept) == 10
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_a_gate_folded_within_a_tolerance_moves_each_output_by_at_most_that_times_the_input():
    torch.manual_seed(0)
    conv = SqueezeExciteConv2d(3, 8, 3, latent_channels=4).double().eval()
    model = nn.Sequential(conv)
    data = batches(8, count=3)
    with torch.no_grad():
        before = [model(x) for x in data]
        plain = [conv._conv_forward(x, conv.weight, conv.bias) for x in data]
    tolerance = gate_statistics(model, data)['0.se'].max_deviation
    assert tolerance > 0
    report = fold_static_gates(model, data, tolerance=tolerance)
    assert [gate.into for gate in report.folded] == ['conv'] and type(model[0]) is nn.Conv2d
    with torch.no_grad():
        for x, y, u in zip(data, before, plain):
            assert bool(((model(x) - y).abs() <= tolerance * u.abs() + 1e-12).all())


def test_blocks_left_by_the_fusion_fold_too():
    model = folded_resnet18()
    for module in model.modules():
        if isinstance(module, SqueezeExcite2d):
            make_constant(module)
    torch.manual_seed(0)
    paper = trained_looking(torchvision.models.resnet50(num_classes=10).double())
    apply_squeeze_excite(paper, 1 / 16, 1, placement='block')
    for module in paper.modules():
        if isinstance(module, SqueezeExcite2d):
            make_constant(module)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for net, into in ((model, {'conv'}), (paper.eval(), {'scale'})):
        fuse_for_inference(net)
        blocks = [m for m in net.modules() if isinstance(m, SqueezeExcite2d)]
        before = sum(p.numel() for p in net.parameters())
        with torch.no_grad():
            expected = net(x)
        report = fold_static_gates(net, batches(32), tolerance=ROUNDING)
        assert {gate.into for gate in report.folded} == into and report.kept == ()
        assert report.params_removed == before - sum(p.numel() for p in net.parameters())  # a ChannelScale's counted
        assert report.params_removed < sum(p.numel() for m in blocks for p in m.parameters()) or into == {'conv'}
        assert not any(isinstance(m, SqueezeExcite2d) for m in net.modules())
        with torch.no_grad():
            close(net(x), expected, f'fused, then folded into {into}')
    assert isinstance(paper.layer1[0].bn3, ChannelScale)


def test_a_folded_model_scripts_traces_exports_and_loads_its_state_dict(tmp_path):
    model = folded_resnet18()
    for name in ('layer3.0.conv1', 'layer4.1.conv2'):
        make_constant(model.get_submodule(name).se)
    fold_static_gates(model, batches(32), tolerance=ROUNDING)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        close(torch.jit.script(model)(x), expected, 'TorchScript')
        close(torch.jit.trace(model, x)(x), expected, 'torch.jit.trace')
    again = copy.deepcopy(model)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        close(again(x), expected, 'state dict reloaded')
    pytest.importorskip('onnx')
    onnxruntime = pytest.importorskip('onnxruntime')
    model = model.float()
    path = str(tmp_path / 'folded.onnx')
    torch.onnx.export(model, (x.float(),), path, input_names=['x'], output_names=['y'], dynamo=False)
    (y,) = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider']).run(None, {'x': x.float().numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), model(x.float()), rtol=1e-4, atol=1e-4)


def test_a_block_after_a_batch_norm_without_affine_is_kept_and_named():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(8, affine=False)
    SqueezeExciteBatchNorm2d.convert_(norm, SqueezeExcite2d(8, 4))
    model = nn.Sequential(nn.Conv2d(3, 8, 1), norm).double().eval()
    make_constant(norm.se)
    report = fold_static_gates(model, batches(4), tolerance=ROUNDING)
    assert report.folded == () and report.kept == (
        ('1.se', 'the BatchNorm it follows has no affine weight and bias to take its gate'),)
    assert isinstance(model[1], SqueezeExciteBatchNorm2d)


def test_bad_tolerance_is_refused_and_changes_nothing():
    model = folded_resnet18()
    make_constant(model.layer4[0].conv1.se)
    for bad in (-0.1, float('nan'), float('inf'), '0.1', True, None):
        with pytest.raises(ValueError, match=f'tolerance must be a finite number >= 0 .*, got {bad!r}'):
            fold_static_gates(model, batches(32), tolerance=bad)
    assert isinstance(model.layer4[0].conv1, SqueezeExciteConv2d)
    with pytest.raises(ValueError, match=r"measure must be one of \('max_deviation', 'max_input_dependence', "
                       r"'input_dependence'\), got 'std'"):
        fold_static_gates(model, batches(32), tolerance=0.1, measure='std')
    assert isinstance(model.layer4[0].conv1, SqueezeExciteConv2d)
    with pytest.raises(TypeError, match='got str'):
        fold_static_gates('resnet', batches(32), tolerance=0.1)


def test_a_typical_variation_folds_a_gate_that_swings_on_one_input_and_the_worst_case_does_not():
    torch.manual_seed(0)
    model = nn.Sequential(SqueezeExciteConv2d(3, 8, 1, latent_channels=4)).double().eval()
    data = batches(8, count=1, batch=64)
    data[0][0] += 50.0  # one image far from the others: its gate swings
    stats = gate_statistics(model, data)['0.se']
    assert stats.max_deviation > 10 * stats.input_dependence
    tolerance = 2 * stats.max_input_dependence
    assert fold_static_gates(copy.deepcopy(model), data, tolerance).folded == ()
    for measure in ('max_input_dependence', 'input_dependence'):
        report = fold_static_gates(copy.deepcopy(model), data, tolerance, measure=measure)
        assert report.measure == measure and [gate.block for gate in report.folded] == ['0.se']

"""Across the package: an SE model under torch.compile, TorchScript and ONNX gives the eager outputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

from composer_se import apply_squeeze_excite


@pytest.fixture(scope='module', params=['conv', 'block'])
def se_resnet(request):
    """ResNet-18 with SE after its convs of 128+ channels, or at the end of every residual branch."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    report = apply_squeeze_excite(model, latent_channels=16, min_channels=128 if request.param == 'conv' else 1,
                                  placement=request.param)
    assert report.num_blocks == (15 if request.param == 'conv' else 8)
    for module in model.modules():  # non-trivial running statistics, so eval-mode BN matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture(scope='module')
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def eager(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('how', ['script', 'trace'])
def test_torchscript(se_resnet, images, how, tmp_path):
    module = torch.jit.script(se_resnet) if how == 'script' else torch.jit.trace(se_resnet, images)
    module.save(str(tmp_path / 'model.pt'))
    loaded = torch.jit.load(str(tmp_path / 'model.pt'))
    torch.testing.assert_close(eager(loaded, images), eager(se_resnet, images))
    other = torch.randn(3, 3, 48, 48)
    torch.testing.assert_close(eager(loaded, other), eager(se_resnet, other))


def test_onnx_export_runs_in_onnxruntime(se_resnet, images, tmp_path):
    pytest.importorskip('onnx')
    onnxruntime = pytest.importorskip('onnxruntime')
    path = str(tmp_path / 'model.onnx')
    torch.onnx.export(se_resnet, (images,), path, input_names=['x'], output_names=['y'],
                      dynamic_axes={'x': {0: 'n', 2: 'h', 3: 'w'}}, dynamo=False)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    other = torch.randn(3, 3, 48, 48)
    for x in (images, other):
        (y,) = session.run(None, {'x': x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), eager(se_resnet, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('fold_batchnorm', [True, False])
def test_torchscript_scripts_unfolded_blocks_and_scripts_again(fold_batchnorm):
    """A block left in its conv (no BatchNorm after it, or fold_batchnorm=False) scripts, and so does a second model."""
    for _ in range(2):  # a failed script used to poison the class for every later scripting in the process
        model = torchvision.models.vgg11_bn() if fold_batchnorm else torchvision.models.vgg11()
        report = apply_squeeze_excite(model, latent_channels=8, min_channels=256, fold_batchnorm=fold_batchnorm)
        assert report.num_blocks == 6 and report.num_folded == (6 if fold_batchnorm else 0)
        model.eval()
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(torch.jit.script(model)(x), eager(model, x))


def se_model(kind: str) -> torch.nn.Module:
    """A small residual network with SE of one kind: conv placement folded or not, or block placement."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(inplace=True),
        torchvision.models.resnet.BasicBlock(8, 8), torchvision.models.resnet.BasicBlock(8, 8),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    )
    kwargs = {'conv-folded': {}, 'conv-unfolded': {'fold_batchnorm': False}, 'block': {'placement': 'block'}}[kind]
    report = apply_squeeze_excite(model, latent_channels=3, min_channels=8, **kwargs)
    assert report.num_blocks == (2 if kind == 'block' else 5)
    assert report.num_folded == (5 if kind == 'conv-folded' else 0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2)
    return model


def onnx_run(model, x, training, path):
    onnxruntime = pytest.importorskip('onnxruntime')
    mode = torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL
    torch.onnx.export(model, (x,), path, input_names=['x'], output_names=['y'], training=mode, dynamo=False,
                      do_constant_folding=not training)
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {'x': x.numpy()})[0])


@pytest.mark.parametrize('how', ['script', 'trace', 'onnx', 'compile'])
@pytest.mark.parametrize('mode', ['train', 'eval'])
@pytest.mark.parametrize('kind', ['conv-folded', 'conv-unfolded', 'block'])
def test_every_kind_of_se_model_exports_and_matches_eager(kind, mode, how, tmp_path):
    """Outputs (and for compile, gradients and running statistics) of the exported model match eager, in both modes."""
    model = se_model(kind).train(mode == 'train')
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 12, 10)
    expected = reference(x)
    if how == 'script':
        got = torch.jit.script(model)(x)
    elif how == 'trace':
        traced = torch.jit.trace(model, x.clone(), check_trace=False)
        model.load_state_dict(se_model(kind).state_dict())  # tracing ran the model once: restore its statistics
        got = traced(x)
    elif how == 'onnx':
        got = onnx_run(model, x, mode == 'train', str(tmp_path / 'model.onnx'))
    else:
        compiled = torch.compile(model)
        got = compiled(x)
        if mode == 'train':
            got.square().sum().backward()
            expected.square().sum().backward()
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if how in ('script', 'trace', 'compile'):  # the model's own running statistics moved as in eager
        torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=1e-5, atol=1e-6)

"""composer_se/layers/: the SE block and the conv+SE module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from composer_se.layers import SqueezeExcite2d, SqueezeExciteConv2d

ROOT = Path(__file__).resolve().parents[1]


def reference_se(block: SqueezeExcite2d, u: torch.Tensor) -> torch.Tensor:
    """The paper's formula written out with explicit sums and matrix products, in float64."""
    u = u.double()
    n, c, h, w = u.shape
    z = u.sum(dim=(2, 3)) / (h * w)
    hidden = torch.clamp(z @ block.fc1.weight.double().T + block.fc1.bias.double(), min=0)
    s = 1 / (1 + torch.exp(-(hidden @ block.fc2.weight.double().T + block.fc2.bias.double())))
    return u * (block.gate_scale * s).reshape(n, c, 1, 1)


def test_the_layers_need_neither_composer_nor_torchvision(tmp_path):
    """In a fresh interpreter: importing the SE modules, or unpickling an SE model, imports only torch."""
    model = torch.nn.Sequential(SqueezeExciteConv2d(3, 8, 3, latent_channels=2), torch.nn.BatchNorm2d(8))
    apply_fold = 'from composer_se.batchnorm import fold_into_batch_norm_; '
    check = ('import sys; heavy = sorted({m.split(".")[0] for m in sys.modules} & {"composer", "torchvision", "timm", "triton"}); '
             'print(heavy)')
    for code in (
        'import composer_se.layers, composer_se.batchnorm; ' + check,
        f'import torch; {apply_fold}m = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False); '
        'fold_into_batch_norm_(m[0], m[1]); m(torch.randn(2, 3, 8, 8)); ' + check,
    ):
        torch.save(model, tmp_path / 'model.pt')
        result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == '[]', result.stdout


@pytest.mark.parametrize('shape', [(1, 8, 1, 1), (1, 8, 5, 3), (4, 8, 16, 16), (2, 8, 33, 17)])
def test_block_matches_formula_any_batch_and_spatial_size(shape):
    block = SqueezeExcite2d(8, 3)
    u = torch.randn(shape)
    y = block(u)
    assert y.shape == u.shape and y.dtype == u.dtype
    torch.testing.assert_close(y.double(), reference_se(block, u), rtol=1e-5, atol=1e-6)


def test_block_shapes_and_parameters():
    block = SqueezeExcite2d(64, 16)
    assert block.fc1.weight.shape == (16, 64) and block.fc2.weight.shape == (64, 16)
    assert sum(p.numel() for p in block.parameters()) == 2 * 64 * 16 + 16 + 64
    assert list(block.state_dict()) == ['gate_scale', 'fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
    with pytest.raises(ValueError, match="init must be one of .*'sideways'"):
        SqueezeExcite2d(8, 2, init='sideways')


def test_gate_is_a_per_channel_scale_in_0_1():
    block = SqueezeExcite2d(8, 4)
    u = torch.rand(3, 8, 6, 6) + 0.1  # positive, so y / u is the gate
    gate = block(u) / u
    torch.testing.assert_close(gate, gate[:, :, :1, :1].expand_as(gate))
    assert bool(((gate > 0) & (gate < 1)).all())


def test_channels_last_input_gives_channels_last_output_with_same_values():
    block = SqueezeExcite2d(16, 4)
    u = torch.randn(2, 16, 7, 7)
    u_cl = u.to(memory_format=torch.channels_last)
    y_cl = block(u_cl)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, block(u))


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last], ids=['nchw', 'nhwc'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_under_cpu_autocast_output_keeps_the_conv_dtype_and_is_close(dtype, memory_format):
    conv = SqueezeExciteConv2d(8, 16, 3, padding=1, latent_channels=4).to(memory_format=memory_format)
    x = torch.randn(2, 8, 10, 10).to(memory_format=memory_format)
    expected = conv(x)
    with torch.autocast('cpu', dtype=dtype):
        y = conv(x)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=memory_format)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), expected, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


@pytest.mark.parametrize(
    'conv_kwargs',
    [
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, bias=False),
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, bias=True),
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, groups=4),
        dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, groups=16),  # depthwise
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=2, dilation=2),
        dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, padding_mode='reflect'),
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, padding_mode='circular'),
        dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, padding_mode='replicate'),
    ],
    ids=['plain', 'bias', 'grouped', 'depthwise', 'dilated', 'strided', 'reflect', 'circular', 'replicate'],
)
def test_convert_keeps_the_conv_and_applies_se_after_it(conv_kwargs):
    conv = nn.Conv2d(**conv_kwargs)
    x = torch.randn(2, conv.in_channels, 9, 9)
    conv_out = conv(x)
    params_before = dict(conv.named_parameters())
    block = SqueezeExcite2d(conv.out_channels, 4)

    same = SqueezeExciteConv2d.convert_(conv, block)

    assert same is conv and isinstance(conv, SqueezeExciteConv2d) and isinstance(conv, nn.Conv2d)
    for name, param in params_before.items():
        assert getattr(conv, name) is param
    torch.testing.assert_close(conv(x).double(), reference_se(block, conv_out), rtol=1e-5, atol=1e-6)


def test_constructed_like_a_conv2d():
    conv = SqueezeExciteConv2d(3, 32, kernel_size=3, stride=2, padding=1, bias=False, latent_channels=8)
    assert [name for name, _ in conv.named_parameters()] == ['weight', 'se.fc1.weight', 'se.fc1.bias', 'se.fc2.weight',
                                                           'se.fc2.bias']
    assert conv(torch.randn(1, 3, 8, 8)).shape == (1, 32, 4, 4)


def test_convert_refuses_subclasses_and_wrong_widths():
    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(TypeError, match='exactly a torch.nn.Conv2d, got .*MyConv'):
        SqueezeExciteConv2d.convert_(MyConv(3, 8, 3), SqueezeExcite2d(8, 2))
    conv = nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match='4 channels but the module has 8 output channels'):
        SqueezeExciteConv2d.convert_(conv, SqueezeExcite2d(4, 2))
    assert type(conv) is nn.Conv2d and not hasattr(conv, 'se')


def test_identity_init_returns_the_input_exactly_and_still_learns():
    block = SqueezeExcite2d(8, 4, init='identity')
    u = torch.randn(3, 8, 5, 5, requires_grad=True)
    y = block(u)
    assert torch.equal(y, u)
    (y * torch.randn_like(y)).sum().backward()
    assert block.fc2.bias.grad.abs().sum() > 0
    torch.optim.SGD(block.parameters(), lr=0.1).step()
    assert not torch.allclose(block(u), u)


def test_the_gate_travels_with_the_state_dict():
    trained = SqueezeExcite2d(8, 4, init='identity')
    nn.init.normal_(trained.fc2.weight)
    fresh = SqueezeExcite2d(8, 4)
    fresh.load_state_dict(trained.state_dict())
    u = torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(fresh(u), trained(u))


def test_default_init_is_not_identity():
    block = SqueezeExcite2d(8, 4)
    u = torch.randn(3, 8, 5, 5)
    assert not torch.allclose(block(u), u)

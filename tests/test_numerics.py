"""Across the package: SE under fp16 and bf16 autocast on CPU, finite outputs and gradients for huge and all-zero
inputs.

Inputs are scaled to 1e4 (fp16's largest value is 65504) or are all zeros (a mean of
zero, a BatchNorm variance of zero). Losses are means, as training losses are, so
that an overflow could only come from inside the model. Only public behaviour is
tested: the layers' outputs and every parameter's gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composer_se import SqueezeExcite2d, SqueezeExciteBatchNorm2d, SqueezeExciteConv2d, apply_squeeze_excite

DTYPES = [pytest.param(torch.bfloat16, id='bf16'), pytest.param(torch.float16, id='fp16')]
INPUTS = [pytest.param(1e4, id='large'), pytest.param(0.0, id='zeros')]


def images(scale: float, channels: int = 3) -> torch.Tensor:
    x = torch.randn(4, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    return (x * scale).requires_grad_()


def assert_finite(output: torch.Tensor, module: nn.Module, x: torch.Tensor) -> None:
    assert torch.isfinite(output).all(), 'output'
    assert x.grad is not None and torch.isfinite(x.grad).all(), 'input gradient'
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, f'{name} has no gradient'
        assert torch.isfinite(parameter.grad).all(), f'{name} has a non-finite gradient'


def conv_bn_relu() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('scale', INPUTS)
@pytest.mark.parametrize('init', ['default', 'identity'])
def test_an_se_model_trains_a_step_under_autocast(dtype, scale, init):
    model = conv_bn_relu()
    assert apply_squeeze_excite(model, latent_channels=4, min_channels=16, init=init).num_blocks == 2
    x, labels = images(scale), torch.tensor([0, 1, 2, 3])
    with torch.autocast('cpu', dtype=dtype):
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert_finite(logits, model, x)
    model.eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('scale', INPUTS)
@pytest.mark.parametrize('layer', ['SqueezeExcite2d', 'SqueezeExciteConv2d', 'SqueezeExciteBatchNorm2d'])
def test_each_se_layer_under_autocast(layer, dtype, scale):
    channels = 3 if layer == 'SqueezeExciteConv2d' else 16
    module = {
        'SqueezeExcite2d': lambda: SqueezeExcite2d(16, 4),
        'SqueezeExciteConv2d': lambda: SqueezeExciteConv2d(3, 16, 3, padding=1, latent_channels=4),
        'SqueezeExciteBatchNorm2d': lambda: SqueezeExciteBatchNorm2d(16, latent_channels=4),
    }[layer]()
    x = images(scale, channels)
    with torch.autocast('cpu', dtype=dtype):
        output = module(x)
    output.float().mean().backward()
    assert_finite(output, module, x)

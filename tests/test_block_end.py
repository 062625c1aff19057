"""SE at the end of a residual branch (placement='block'): BatchNorm and SE in one pass, nothing extra kept.

Its gradcheck is in test_fused.py, beside the folded function's."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from composer_se import SqueezeExcite2d, SqueezeExciteBatchNorm2d, apply_squeeze_excite
from tests.helpers import saved_activation_bytes


def plain_forward(module: SqueezeExciteBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """``se(batch_norm(x))`` in plain operations, as TorchScript runs the module."""
    return module.se(module._normalise(x))


@pytest.mark.parametrize('kwargs', [{}, {'momentum': None}, {'track_running_stats': False}, {'affine': False}])
@pytest.mark.parametrize('channels_last', [False, True])
def test_fused_matches_batchnorm_then_se_in_training_and_eval(kwargs, channels_last):
    torch.manual_seed(0)
    fused = SqueezeExciteBatchNorm2d(8, latent_channels=3, **kwargs)
    if fused.affine:
        with torch.no_grad():
            fused.weight.uniform_(0.5, 1.5)
            fused.bias.uniform_(-0.5, 0.5)
    with torch.no_grad():
        fused.se.fc2.bias.copy_(torch.tensor([-30.0, -8, -1, 0, 1, 2, 3, 4]))  # a spread of gates, some near zero
    plain = copy.deepcopy(fused)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for _ in range(3):
        x = (torch.randn(4, 8, 9, 7) * 3 + 2).to(memory_format=memory_format)
        x_f, x_p = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_f, out_p = fused(x_f), plain_forward(plain, x_p)
        assert out_f.is_contiguous(memory_format=memory_format)
        torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
        weights = torch.randn_like(out_f)
        (out_f * weights).sum().backward()
        (out_p * weights).sum().backward()
        torch.testing.assert_close(x_f.grad, x_p.grad, rtol=1e-4, atol=1e-5)
        for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(fused.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)
    fused.eval(), plain.eval()
    torch.testing.assert_close(fused(x), plain_forward(plain, x), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_keeps_the_dtype_and_the_gradients():
    torch.manual_seed(0)
    fused = SqueezeExciteBatchNorm2d(8, latent_channels=3)
    plain = copy.deepcopy(fused)
    x = torch.randn(4, 8, 8, 8)
    weights = torch.randn(4, 8, 8, 8)
    (plain_forward(plain, x) * weights).sum().backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = fused(x.bfloat16())
    assert out.dtype == torch.bfloat16
    (out.float() * weights).sum().backward()
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        similarity = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert similarity > 0.999, name


def test_a_residual_block_end_keeps_no_extra_activation_for_backward():
    """Plain ResNet-50 block ends keep the conv output (for BN) and the ReLU output; SE adds only (N, C) tensors."""
    torch.manual_seed(0)
    base = torchvision.models.resnet50()
    base.fc = nn.Identity()
    ours = copy.deepcopy(base)
    assert apply_squeeze_excite(ours, latent_channels=1 / 16, min_channels=1, placement='block').num_blocks == 16
    x = torch.randn(2, 3, 64, 64)
    added = saved_activation_bytes(ours, x) - saved_activation_bytes(base, x)
    per_block = 8 * 2 * 2048 * 8  # a few (N, C) float32 tensors per block, C at most 2048
    assert 0 < added <= 16 * per_block
    assert added < 0.02 * saved_activation_bytes(base, x)


def test_scripted_and_eager_agree():
    torch.manual_seed(0)
    module = SqueezeExciteBatchNorm2d(8, latent_channels=3)
    scripted = torch.jit.script(copy.deepcopy(module))
    x = torch.randn(4, 8, 5, 5)
    torch.testing.assert_close(scripted(x), module(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scripted.running_var, module.running_var)
    module.eval(), scripted.eval()
    torch.testing.assert_close(scripted(x), module(x), rtol=1e-5, atol=1e-6)
    assert isinstance(module.se, SqueezeExcite2d)

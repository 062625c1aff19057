"""composer_se/batchnorm/modules.py: the BatchNorms that apply an SE block in their own pass, the same numbers as
the block and BatchNorm written plainly, in training and eval, and nothing of the activation's size kept for backward.

Folded (SE then BatchNorm, after a conv) and at a residual branch's end (BatchNorm then SE, placement='block'). On
CPU they run the torch passes; tests/batchnorm/test_triton_passes.py runs the same checks on the Triton kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from composer.algorithms.squeeze_excite import apply_squeeze_excite as composer_apply_squeeze_excite
from torch import nn

from composer_se import SqueezeExcite2d, SqueezeExciteBatchNorm2d, apply_squeeze_excite
from tests.helpers import assert_steps_match, folded_and_plain, randomise_norms, saved_activation_bytes, stack


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


# --- folded after a conv ----------------------------------------------------------------------------------------


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('init', ['default', 'identity'])
def test_folded_matches_se_then_batchnorm_in_training_and_eval(channels_last, init):
    torch.manual_seed(0)
    model = stack()
    randomise_norms(model)
    folded, plain = folded_and_plain(model, latent_channels=3, min_channels=8, init=init)
    if init == 'default':
        with torch.no_grad():  # a spread of gates, some near zero
            for m in (folded, plain):
                m[3].se.fc2.bias.copy_(torch.tensor([-30.0, -8, -1, 0, 1, 2, 3, 4]))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    folded, plain = folded.to(memory_format=memory_format), plain.to(memory_format=memory_format)
    inputs = [torch.randn(4, 3, 9, 7).to(memory_format=memory_format) for _ in range(3)]
    assert_steps_match(folded, plain, inputs, rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=1e-5)
    x = inputs[-1]
    torch.testing.assert_close(folded.state_dict(), plain.state_dict(), rtol=1e-5, atol=1e-6)
    assert folded[:2](x).is_contiguous(memory_format=memory_format)  # conv + folded BN, training
    plain[:2](x)  # the same running-statistics update
    folded.eval(), plain.eval()
    assert folded[:2](x).is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(folded(x), plain(x), rtol=1e-5, atol=1e-5)


def test_momentum_none_and_bf16_autocast():
    torch.manual_seed(0)
    model = stack()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    folded, plain = folded_and_plain(model, latent_channels=3, min_channels=8)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        torch.testing.assert_close(folded(x), plain(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.state_dict(), plain.state_dict())
    reference = copy.deepcopy(plain)
    weights = torch.randn(4, 8, 8, 8)  # a loss that depends on the gates (a sum of squares after BN would not)
    (reference[:2](x) * weights).sum().backward()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out_f, out_p = folded[:2](x), plain[:2](x)
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_p.float(), rtol=0.05, atol=0.05)
    (out_f.float() * weights).sum().backward()
    (out_p.float() * weights).sum().backward()
    for name in ('se.fc1.weight', 'se.fc2.bias', 'weight'):
        expected = reference[0].get_parameter(name).grad.flatten()
        similarity = [torch.nn.functional.cosine_similarity(m[0].get_parameter(name).grad.flatten(), expected, dim=0)
                      for m in (folded, plain)]
        # The folded gate runs in float32, so it is at least as close to the float32 gradient.
        assert similarity[0] > 0.999 and similarity[0] >= similarity[1] - 1e-4, name


def added_saved_bytes(model: nn.Module, base: nn.Module, x: torch.Tensor) -> int:
    """Extra bytes of the storages autograd keeps for backward, parameters (alive anyway) left out."""
    return saved_activation_bytes(model, x) - saved_activation_bytes(base, x)


def test_folded_se_keeps_no_activation_for_backward_where_composer_keeps_one_per_block():
    torch.manual_seed(0)
    base = stack(channels=16, depth=3)
    x = torch.randn(4, 3, 16, 16)
    activation = x.shape[0] * 16 * 16 * 16 * 4  # one conv output, float32
    ours = copy.deepcopy(base)
    assert apply_squeeze_excite(ours, latent_channels=4, min_channels=16).num_folded == 3
    theirs = copy.deepcopy(base)
    composer_apply_squeeze_excite(theirs, latent_channels=4, min_channels=3)
    assert sum(type(m).__name__ == 'SqueezeExciteConv2d' for m in theirs.modules()) == 3
    bound = 3 * 8 * x.shape[0] * 16 * 4  # a few (N, C) statistics a block: 6 KiB here, 3 MiB for ResNet-50
    assert 0 < added_saved_bytes(ours, base, x) <= bound
    assert added_saved_bytes(theirs, base, x) >= 3 * activation > 10 * bound


def test_compile_stays_correct_with_folded_blocks():
    torch.manual_seed(0)
    folded, plain = folded_and_plain(stack(depth=2), latent_channels=3, min_channels=8)
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(folded)
    out_c, out_p = compiled(x), plain(x)
    torch.testing.assert_close(out_c, out_p, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(out_c)
    (out_c * weights).sum().backward()
    (out_p * weights).sum().backward()
    for p, q in zip(folded.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)

"""composer_se/batchnorm/torch_passes.py: its steps against their formulas, written out in float64."""

from __future__ import annotations

import pytest
import torch

from composer_se.batchnorm import torch_passes as passes

N, C, H, W, L = 3, 4, 5, 5, 2


def f64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.double() for t in tensors]


def test_statistics_accumulate_in_float32_for_half_precision_and_in_the_input_dtype_otherwise():
    assert passes.accumulation_dtype(torch.bfloat16) == torch.float32
    assert passes.accumulation_dtype(torch.float16) == torch.float32
    assert passes.accumulation_dtype(torch.float32) == torch.float32
    assert passes.accumulation_dtype(torch.float64) == torch.float64


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_channel_stats_are_the_mean_and_population_variance_over_h_w_even_far_from_zero(channels_last):
    u = 1e4 + torch.randn(N, C, H, W)  # float32: E[u^2] - E[u]^2 would lose every digit of the variance here
    if channels_last:
        u = u.contiguous(memory_format=torch.channels_last)
    mean, var = passes.channel_stats(u)
    expected = u.double().flatten(2)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (N, C)
    torch.testing.assert_close(mean.double(), expected.mean(2), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), expected.var(2, unbiased=False), rtol=1e-3, atol=0)
    half_mean, half_var = passes.channel_stats(u.to(torch.bfloat16))
    rounded = u.to(torch.bfloat16).double().flatten(2)
    assert half_var.dtype == torch.float32
    torch.testing.assert_close(half_var.double(), rounded.var(2, unbiased=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(half_mean.double(), rounded.mean(2), rtol=1e-6, atol=0)


@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
def test_affine_is_x_times_scale_plus_shift_per_sample_and_channel_or_per_channel(channels_last):
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = torch.randn(N, C, dtype=torch.float64), torch.randn(N, C, dtype=torch.float64)
    out = passes.affine(x, scale, shift)
    torch.testing.assert_close(out, x * scale[:, :, None, None] + shift[:, :, None, None], rtol=1e-12, atol=1e-12)
    per_channel = passes.affine(x.float(), scale[0], shift[0])  # (C,) statistics, float64 given for float32 input
    assert per_channel.dtype == torch.float32
    torch.testing.assert_close(per_channel.double(), x * scale[0, :, None, None] + shift[0, :, None, None],
                               rtol=1e-6, atol=1e-6)


def test_affine_of_two_is_g_p_plus_centred_u_q_plus_r():
    g, u = torch.randn(N, C, H, W, dtype=torch.float64), torch.randn(N, C, H, W, dtype=torch.float64)
    p, center, r = torch.randn(N, C, dtype=torch.float64), u.mean((2, 3)), torch.randn(N, C, dtype=torch.float64)
    for q in (torch.randn(N, C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)):
        expected = g * p[:, :, None, None] + (u - center[:, :, None, None]) * q.expand(N, C)[:, :, None, None]
        expected += r[:, :, None, None]
        out = passes.affine_of_two(g, u, p, q, center, r)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_affine_of_two_in_bfloat16_keeps_the_digits_of_u_far_from_its_mean():
    u = (100 + 2 * torch.randn(N, C, H, W)).to(torch.bfloat16)  # a large mean next to the spread
    g = torch.randn(N, C, H, W).to(torch.bfloat16)
    center, _ = passes.channel_stats(u)
    p, q = 0.1 * torch.randn(N, C), 1 + torch.rand(N, C)
    r = torch.zeros(N, C)
    out = passes.affine_of_two(g, u, p, q, center, r)
    assert out.dtype == torch.bfloat16
    g64, u64, p64, q64, c64 = f64(g, u, p, q, center)
    expected = g64 * p64[:, :, None, None] + (u64 - c64[:, :, None, None]) * q64[:, :, None, None]
    tolerance = 2 ** -7 * expected.abs().max().item()  # one bfloat16 rounding of the output, with room
    assert (out.double() - expected).abs().max().item() <= tolerance
    # The uncentred form in bfloat16 (u q + (r - q center)) misses by far more: what the centring is for.
    b = torch.bfloat16
    uncentred = (g * p.to(b)[:, :, None, None] + u * q.to(b)[:, :, None, None]
                 + (r - q * center).to(b)[:, :, None, None])
    assert (uncentred.double() - expected).abs().max().item() > 4 * tolerance


def test_grad_sums_are_the_sums_of_g_and_of_g_times_centred_u_on_either_path():
    g, u = torch.randn(N, C, H, W, dtype=torch.float64), torch.randn(N, C, H, W, dtype=torch.float64) + 3
    mean = u.mean((2, 3))
    expected_g, expected_gu = g.sum((2, 3)), (g * (u - mean[:, :, None, None])).sum((2, 3))
    for g_in, u_in in ((g, u), (g.contiguous(memory_format=torch.channels_last), u)):  # a dot product, or not
        g_sum, gu_sum = passes.grad_sums(g_in, u_in, mean)
        torch.testing.assert_close(g_sum, expected_g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gu_sum, expected_gu, rtol=1e-10, atol=1e-10)
    half_g, half_u = g.to(torch.bfloat16), u.to(torch.bfloat16)
    half_mean = half_u.double().mean((2, 3))
    g_sum, gu_sum = passes.grad_sums(half_g, half_u, half_mean.float())
    assert g_sum.dtype == gu_sum.dtype == torch.float32  # the mean's dtype
    g64, u64 = f64(half_g, half_u)
    torch.testing.assert_close(g_sum.double(), g64.sum((2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gu_sum.double(), (g64 * (u64 - half_mean[:, :, None, None])).sum((2, 3)), rtol=1e-4,
                               atol=1e-4)


def test_the_gate_hidden_units_are_relu_of_the_first_layer_and_their_gradient_is_masked():
    z, w1, b1 = torch.randn(N, C, dtype=torch.float64), torch.randn(L, C, dtype=torch.float64), torch.randn(L).double()
    hidden = passes.gate_hidden(z, w1, b1)
    torch.testing.assert_close(hidden, (z @ w1.T + b1).clamp_min(0), rtol=1e-12, atol=1e-12)
    weight, bias, running_mean, running_var = torch.randn(C), torch.randn(C), torch.randn(C), torch.rand(C) + 0.5
    normed = passes.gate_hidden(z, w1, b1, (weight, bias, running_mean, running_var, 1e-5))
    bn = (z - running_mean.double()) / (running_var.double() + 1e-5).sqrt() * weight.double() + bias.double()
    torch.testing.assert_close(normed, (bn @ w1.T + b1).clamp_min(0), rtol=1e-6, atol=1e-6)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the gate stays in its parameters' dtype
        assert passes.gate_hidden(z.float(), w1.float(), b1.float()).dtype == torch.float32
    w2, grad_z2 = torch.randn(C, L, dtype=torch.float64), torch.randn(N, C, dtype=torch.float64)
    grad_z1 = passes.gate_hidden_backward(grad_z2, hidden, w2)
    torch.testing.assert_close(grad_z1, (grad_z2 @ w2) * (hidden > 0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('se_first', [True, False], ids=['se_then_bn', 'bn_then_se'])
def test_gate_affine_is_the_gate_and_the_running_statistics_batchnorm_in_either_order(se_first):
    u, hidden = torch.randn(N, C, H, W, dtype=torch.float64), torch.rand(N, L, dtype=torch.float64)
    w2, b2, gate_scale = torch.randn(C, L, dtype=torch.float64), torch.randn(C, dtype=torch.float64), torch.tensor(2.)
    weight, bias = torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    running_mean, running_var = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    out = passes.gate_affine(u, hidden, w2, b2, gate_scale, weight, bias, running_mean, running_var, 1e-5, se_first)
    s = (2 * torch.sigmoid(hidden @ w2.T + b2))[:, :, None, None]

    def bn(x):
        return ((x - running_mean[:, None, None]) / (running_var[:, None, None] + 1e-5).sqrt() * weight[:, None, None]
                + bias[:, None, None])

    torch.testing.assert_close(out, bn(u * s) if se_first else bn(u) * s, rtol=1e-10, atol=1e-10)

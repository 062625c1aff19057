"""The steps of the fused SE + BatchNorm functions in plain torch operations (the CPU kernels).

:mod:`composer_se.fused.passes` composes the fused functions from these steps; on
CUDA the same steps run as the Triton kernels of :mod:`composer_se.fused.triton_ops`,
which take the same arguments and return the same values (the tests hold one against
the other and both against float64). Four steps touch the full ``(N, C, H, W)``
activation, once each:

- :func:`channel_stats`: the per-(n, c) mean and variance of ``u`` over H, W;
- :func:`affine`: ``x * A + B`` with per-(n, c) ``A`` and ``B``;
- :func:`grad_sums`: ``sum_hw g`` and ``sum_hw g * (u - m)`` per (n, c);
- :func:`affine2`: ``g * P + (u - M) * Q + R`` per (n, c).

The rest works on ``(N, C)`` statistics, in float32 (float64 for float64 inputs):
:func:`se_bn_forward` and :func:`se_bn_backward` for SE followed by BatchNorm (a block
folded into the next BatchNorm), :func:`bn_stats`, :func:`bn_se_scale`,
:func:`bn_se_gate_grad` and :func:`bn_se_backward` for BatchNorm followed by SE (a block
at the end of a residual branch). Their docstrings give the formulas; the derivations
are in :mod:`composer_se.fused.passes`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    'affine',
    'affine2',
    'bn_se_backward',
    'bn_se_gate_grad',
    'bn_se_scale',
    'bn_stats',
    'channel_stats',
    'grad_sums',
    'se_bn_backward',
    'se_bn_forward',
]

Tensor = torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (as BatchNorm keeps its statistics), else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def _flat(t: Tensor) -> tuple[Tensor, int]:
    """``t`` (N, C, H, W) as a 3-d tensor with H and W in one dimension, and that dimension.

    A view for NCHW-contiguous and channels_last tensors (whose (N, H*W, C) view keeps
    the reductions below on contiguous memory); a copy otherwise.
    """
    n, c, h, w = t.shape
    if t.is_contiguous():
        return t.view(n, c, h * w), 2
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(n, h * w, c), 1
    return t.reshape(n, c, h * w), 2


def channel_stats(u: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and variance of ``u`` over H, W, in the accumulation dtype.

    Two passes, a sum and then the norm of the centred values: ``torch.var_mean`` over H, W
    is an order of magnitude slower on CPU, and the one-pass ``E[u^2] - E[u]^2`` loses the
    variance's leading digits where the mean is large next to the spread, which the
    gate's gradient amplifies.
    """
    acc = accumulation_dtype(u.dtype)
    flat, dim = _flat(u)
    area = flat.shape[dim]
    mean = flat.sum(dim, dtype=acc) / area
    centred = flat.to(acc) - mean.unsqueeze(dim)
    var = torch.linalg.vector_norm(centred, dim=dim).square_() / area
    return mean, var


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` with per-(n, c) ``scale`` (N, C) and ``shift`` (N, C) or (C,), in ``x``'s dtype.

    For NCHW-contiguous ``x`` on CPU, one pass: eval-mode ``F.batch_norm`` on the
    (1, N*C, H, W) view with zero mean, whose kernel is a single fused multiply-add
    (measured faster than a broadcast multiply-add there); otherwise a multiply and an
    in-place add. The statistics it is given are ``var = 0.5`` and ``eps = 0.5``: their sum
    is exactly 1 in every floating-point type, so the normalisation is exactly the
    identity, and ``eps`` stays positive (torch 2.11 refuses ``eps=0``).
    """
    n, c, h, w = x.shape
    scale, shift = scale.to(x.dtype), shift.to(x.dtype).expand(n, c)
    if x.device.type == 'cpu' and x.is_contiguous():
        zeros, halves = x.new_zeros(n * c), x.new_full((n * c,), 0.5)
        out = F.batch_norm(x.view(1, n * c, h, w), zeros, halves, scale.reshape(-1), shift.reshape(-1), False, 0.0, 0.5)
        return out.view(n, c, h, w)
    return (x * scale[:, :, None, None]).add_(shift[:, :, None, None])


def grad_sums(g: Tensor, u: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``sum_hw g`` and ``sum_hw g * (u - mean)`` per (n, c), in ``mean``'s dtype.

    The second is computed as ``sum_hw g * u - mean * sum_hw g`` (one fused dot product
    per (n, c) on CPU).
    """
    acc = mean.dtype
    g_sum = g.sum((2, 3), dtype=acc)
    if g.dtype == u.dtype == acc and g.stride() == u.stride():
        (fg, dim), (fu, _) = _flat(g), _flat(u)
        gu_sum = torch.linalg.vecdot(fg, fu, dim=dim)
    else:
        gu_sum = (g.to(acc) * u.to(acc)).sum((2, 3))
    return g_sum, gu_sum - mean * g_sum


def affine2(g: Tensor, u: Tensor, p: Tensor, q: Tensor, center: Tensor, r: Tensor, r2: Optional[Tensor] = None,
            r2_scale: float = 0.0) -> Tensor:
    """``g * p + (u - center) * q + r (+ r2 * r2_scale)`` per (n, c), in ``u``'s dtype.

    ``p``, ``center``, ``r`` and ``r2`` are (N, C); ``q`` is (N, C) or (C,). For float32 and
    float64, two passes: :func:`affine` of ``g``, then an in-place multiply-add of ``u``
    (``u q + (r - q center)``). Half-precision inputs are centred in float32 first, since
    that form would lose the leading digits of ``(u - center) q`` to rounding in their
    dtype where the mean is large next to the spread.
    """
    n, c = u.shape[:2]
    q = q.expand(n, c)
    shift = r if r2 is None else r + r2 * r2_scale
    if accumulation_dtype(u.dtype) != u.dtype:
        acc = accumulation_dtype(u.dtype)
        out = (g.to(acc) * p[:, :, None, None] + (u.to(acc) - center[:, :, None, None]) * q[:, :, None, None])
        return out.add_(shift[:, :, None, None]).to(u.dtype)
    return affine(g, p, shift - q * center).to(u.dtype).addcmul_(u, q[:, :, None, None].to(u.dtype))


def _lerp_running(running_mean: Optional[Tensor], running_var: Optional[Tensor], mu: Tensor, var: Tensor,
                  momentum: float, count: int) -> None:
    """BatchNorm's running-statistics update, with the unbiased variance."""
    if running_mean is not None:
        running_mean.lerp_(mu.to(running_mean.dtype), momentum)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def se_bn_forward(mean: Tensor, var: Tensor, z2: Tensor, gate_scale: Tensor, weight: Tensor, bias: Tensor,
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                  count: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SE then BatchNorm, forward statistics: ``(sig, A, B, mu, rstd)``.

    ``sig = sigmoid(z2)`` and ``s = gate_scale * sig`` is the gate; the batch statistics of
    ``y = u * s`` are ``mu = mean_n(s m)`` and ``var = mean_n(s^2 v) + mean_n((s m - mu)^2)``;
    ``rstd = 1 / sqrt(var + eps)``; the output is ``u * A + B`` with ``A = s * gamma * rstd``
    (N, C) and ``B = beta - mu * gamma * rstd`` (C). Updates the running statistics.
    """
    acc = mean.dtype
    sig = torch.sigmoid(z2.to(acc))
    s = sig * gate_scale.to(acc)
    shifted = s * mean
    mu = shifted.mean(0)
    var_c = (s * s * var).mean(0) + (shifted - mu).square_().mean(0)
    rstd = torch.rsqrt(var_c + eps)
    _lerp_running(running_mean, running_var, mu, var_c, momentum, count)
    k = weight.to(acc) * rstd
    return sig, s * k, bias.to(acc) - mu * k, mu, rstd


def se_bn_backward(g_sum: Tensor, gu_c: Tensor, mean: Tensor, var: Tensor, sig: Tensor, gate_scale: Tensor, mu: Tensor,
                   rstd: Tensor, weight: Tensor,
                   count: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SE then BatchNorm, backward: ``(grad_weight, grad_bias, grad_z2, sum_n grad_z2, P, Q, R)``.

    With ``gu = gu_c + m * g_sum`` (``sum_hw g * u``) and ``k = gamma * rstd``:
    ``grad_bias = sum_n g_sum``, ``grad_weight = rstd (sum_n s gu - mu grad_bias)``;
    ``a = k grad_bias / count``, ``b = k rstd grad_weight / count``; the gate's gradient
    ``grad_s = k gu - area (a m + b (s v + m (s m - mu)))`` and its logits'
    ``grad_z2 = grad_s * gate_scale * sig (1 - sig)``; and ``grad_u = g P + (u - m) Q + R``
    (plus the squeezed gradient over ``area``) with ``P = k s``, ``Q = -b s^2`` and
    ``R = s (b (mu - s m) - a)``.
    """
    acc = mean.dtype
    area = count // mean.shape[0]
    gate_scale = gate_scale.to(acc)
    s = sig * gate_scale
    gu = gu_c + mean * g_sum
    k = weight.to(acc) * rstd
    grad_bias = g_sum.sum(0)
    grad_weight = rstd * ((s * gu).sum(0) - mu * grad_bias)
    a = k * grad_bias / count
    b = k * rstd * grad_weight / count
    grad_s = k * gu - area * (a * mean + b * (s * var + mean * (s * mean - mu)))
    grad_z2 = grad_s * gate_scale * sig * (1 - sig)
    p = k * s
    q = -b * s * s
    r = s * (b * (mu - s * mean) - a)
    return grad_weight, grad_bias, grad_z2, grad_z2.sum(0), p, q, r


def bn_stats(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
             running_var: Optional[Tensor], momentum: float, eps: float, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm then SE, forward statistics: ``(mu, rstd, z)``.

    ``mu = mean_n(m)``, ``var = mean_n(v) + mean_n((m - mu)^2)``, ``rstd = 1 / sqrt(var + eps)``,
    and ``z = gamma * rstd * (m - mu) + beta`` (N, C), the mean over H, W of the normalised
    map: what SE squeezes. Updates the running statistics.
    """
    acc = mean.dtype
    mu = mean.mean(0)
    var_c = var.mean(0) + (mean - mu).square_().mean(0)
    rstd = torch.rsqrt(var_c + eps)
    _lerp_running(running_mean, running_var, mu, var_c, momentum, count)
    return mu, rstd, weight.to(acc) * rstd * (mean - mu) + bias.to(acc)


def bn_se_scale(z2: Tensor, gate_scale: Tensor, mu: Tensor, rstd: Tensor, weight: Tensor,
                bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm then SE, the output map: ``(sig, A, B)`` with ``y = u * A + B``.

    ``s = gate_scale * sigmoid(z2)``, ``k = gamma * rstd``, ``A = s k`` and
    ``B = s (beta - mu k)``, both (N, C).
    """
    acc = rstd.dtype
    sig = torch.sigmoid(z2.to(acc))
    s = sig * gate_scale.to(acc)
    k = weight.to(acc) * rstd
    return sig, s * k, s * (bias.to(acc) - mu * k)


def bn_se_gate_grad(g_sum: Tensor, gu_c: Tensor, mean: Tensor, sig: Tensor, gate_scale: Tensor, mu: Tensor,
                    rstd: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """BatchNorm then SE, the gradient of the gate's logits ``grad_z2`` (N, C) and its sum over the batch.

    ``grad_s = sum_hw g * bn(u) = k (gu_c + (m - mu) g_sum) + beta g_sum`` and
    ``grad_z2 = grad_s * gate_scale * sig (1 - sig)``.
    """
    acc = mean.dtype
    k = weight.to(acc) * rstd
    grad_s = k * (gu_c + (mean - mu) * g_sum) + bias.to(acc) * g_sum
    grad_z2 = grad_s * gate_scale.to(acc) * sig * (1 - sig)
    return grad_z2, grad_z2.sum(0)


def bn_se_backward(g_sum: Tensor, gu_c: Tensor, mean: Tensor, sig: Tensor, gate_scale: Tensor, grad_z: Tensor,
                   mu: Tensor, rstd: Tensor, weight: Tensor,
                   count: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """BatchNorm then SE, backward through the BatchNorm: ``(grad_weight, grad_bias, P, Q, R)``.

    The gradient reaching the normalised map is ``gb = s g + grad_z / area`` (``grad_z``:
    the gradient of the squeezed ``z``). ``grad_bias = sum gb = sum_n (s g_sum + grad_z)``,
    ``grad_weight = sum gb * xhat = rstd sum_n (s (gu_c + (m - mu) g_sum) + grad_z (m - mu))``,
    and ``grad_u = g P + (u - m) Q + R`` with ``P = k s``,
    ``Q = -k rstd grad_weight / count`` (C) and
    ``R = k (grad_z / area - grad_bias / count) + Q (m - mu)``.
    """
    acc = mean.dtype
    area = count // mean.shape[0]
    s = sig * gate_scale.to(acc)
    d = mean - mu
    grad_bias = (s * g_sum + grad_z).sum(0)
    grad_weight = rstd * (s * (gu_c + d * g_sum) + grad_z * d).sum(0)
    k = weight.to(acc) * rstd
    q = -k * rstd * grad_weight / count
    r = k * (grad_z / area - grad_bias / count) + q * d
    return grad_weight, grad_bias, k * s, q, r

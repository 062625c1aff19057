"""SE and a training-mode BatchNorm in one pass over the activation, in either order: the arithmetic, in torch.

**SE then BatchNorm** (a block folded into the BatchNorm after its conv). For a conv
output ``u`` (N, C, H, W)::

    s = excite(mean_hw(u))                    # (N, C) gate
    y = u * s                                 # SE
    out = gamma * (y - mu) / sqrt(var + eps) + beta,  mu, var: batch statistics of y

The batch statistics of ``y`` follow from the per-(n, c) mean ``m`` and variance ``v``
of ``u``, read in one pass: ``mu_c = mean_n(s m)`` and
``var_c = mean_n(s^2 v) + mean_n((s m - mu_c)^2)`` (a sum of non-negative terms, so no
cancellation). SE and normalisation then become one affine map per (n, c),
``out = u * A + B``.

**BatchNorm then SE** (a block at the end of a residual branch, the paper's place).
``b = gamma (u - mu) rstd + beta`` with the batch statistics of ``u``, which follow from
the same per-(n, c) ``m`` and ``v``; SE squeezes ``mean_hw(b) = gamma rstd (m - mu) + beta``,
so ``out = s * b`` is again one affine map per (n, c) of ``u``. Nothing of ``b`` is kept:
the backward pass recomputes what it needs of it from ``u`` (as In-Place ABN does).

**Backward.** Written out by hand from two reductions of the incoming gradient per
(n, c), ``sum_hw g`` and ``sum_hw g (u - m)``, read in one pass over ``g`` and ``u``,
then one elementwise pass ``grad_u = g P + (u - m) Q + R``. Autograd keeps ``u``, which
a BatchNorm keeps anyway, and (N, C) statistics: SE adds no full-size tensor to what is
saved for backward, and there is no division by the gate (near-zero gates are exact).
The gate's small MLP is differentiated by hand too, from its (N, L) hidden units and
(N, C) inputs; the squeezed input's gradient joins ``R``.

**Eval.** With running statistics the BatchNorm is ``u k + shift`` per channel, so the
output is one affine pass after one read for the squeeze: SE then BatchNorm squeezes
``u`` itself, BatchNorm then SE squeezes ``k mean_hw(u) + shift``.

This module computes all of it in torch operations: the passes :func:`forward`,
:func:`backward` and :func:`infer`, composed of steps whose docstrings give the
formulas. It runs on CPU (and any device without Triton) and is the reference the
Triton kernels of :mod:`~composer_se.batchnorm.triton_passes` follow; they take the same
arguments and return the same results (the tests hold one against the other and both
against float64), but for what :func:`forward` saves for :func:`backward`, which each
keeps in its own form. Five steps touch the full ``(N, C, H, W)`` activation, once each:

- :func:`channel_stats` (:func:`channel_mean` in eval): the per-(n, c) mean and
  variance of ``u`` over H, W;
- :func:`affine`: ``x * A + B`` with per-(n, c) ``A`` and ``B``; :func:`gate_affine`
  (eval) computes its ``A`` and ``B`` from the gate's hidden units and the running
  statistics first;
- :func:`grad_sums`: ``sum_hw g`` and ``sum_hw g * (u - m)`` per (n, c);
- :func:`affine_of_two`: ``g * P + (u - M) * Q + R`` per (n, c).

The rest works on ``(N, C)`` statistics and the gate's ``(N, L)`` hidden units, in
float32 (float64 for float64 inputs), the gate's two layers as ``F.linear`` in the
parameters' dtype.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (as BatchNorm keeps its statistics), else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def _autocast_off(device_type: str):
    """A context that turns autocast off for ``device_type``, where it is on."""
    if device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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


def _norm_scale(weight: Optional[Tensor], bias: Optional[Tensor], rstd: Tensor,
                mu: Tensor) -> tuple[Tensor, Tensor]:
    """``k = gamma rstd`` and ``shift = beta - mu k`` (``gamma = 1``, ``beta = 0`` without affine parameters)."""
    if weight is None:
        return rstd, -mu * rstd
    k = weight.to(rstd.dtype) * rstd
    return k, bias.to(rstd.dtype) - mu * k


def _update_running(running_mean: Optional[Tensor], running_var: Optional[Tensor], new_mean: Optional[Tensor],
                    new_var: Optional[Tensor], mu: Tensor, var: Tensor, momentum: float, count: int) -> None:
    """BatchNorm's running-statistics step from ``running_*`` into ``new_*`` (the same tensors in eager mode), with
    the unbiased variance."""
    if running_mean is None:
        return
    unbiased = var * (count / (count - 1))
    for old, new, value in ((running_mean, new_mean, mu), (running_var, new_var, unbiased)):
        if new is old:
            old.lerp_(value.to(old.dtype), momentum)
        else:
            new.copy_(torch.lerp(old, value.to(old.dtype), momentum))


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


def channel_mean(u: Tensor) -> Tensor:
    """Per-(n, c) mean of ``u`` over H, W, in the accumulation dtype."""
    return u.mean((2, 3), dtype=accumulation_dtype(u.dtype))


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` with ``scale`` and ``shift`` each (N, C) or (C,), in ``x``'s dtype.

    For NCHW-contiguous ``x`` on CPU, one pass: eval-mode ``F.batch_norm`` on the
    (1, N*C, H, W) view with zero mean, whose kernel is a single fused multiply-add
    (measured faster than a broadcast multiply-add there); otherwise a multiply and an
    in-place add. The statistics it is given are ``var = 0.5`` and ``eps = 0.5``: their sum
    is exactly 1 in every floating-point type, so the normalisation is exactly the
    identity, and ``eps`` stays positive (torch 2.11 refuses ``eps=0``).
    """
    n, c, h, w = x.shape
    scale, shift = scale.to(x.dtype).expand(n, c), shift.to(x.dtype).expand(n, c)
    if x.device.type == 'cpu' and x.is_contiguous():
        zeros, halves = x.new_zeros(n * c), x.new_full((n * c,), 0.5)
        out = F.batch_norm(x.view(1, n * c, h, w), zeros, halves, scale.reshape(-1), shift.reshape(-1), False, 0.0, 0.5)
        return out.view(n, c, h, w)
    return (x * scale[:, :, None, None]).add_(shift[:, :, None, None])


def gate_affine(u: Tensor, hidden: Tensor, w2: Tensor, b2: Tensor, gate_scale: Tensor, weight: Optional[Tensor],
                bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
                se_first: bool) -> Tensor:
    """Eval: the gate ``s = gate_scale * sigmoid(hidden W2.T + b2)`` and BatchNorm with its running statistics,
    ``bn(u) = u k + shift``, as one affine map: ``u s k + shift`` (SE then BatchNorm) or ``u s k + s shift``
    (BatchNorm then SE)."""
    acc = accumulation_dtype(u.dtype)
    with _autocast_off(u.device.type):
        s = torch.sigmoid(F.linear(hidden.to(w2.dtype), w2, b2).to(acc)) * gate_scale.to(acc)
    k, shift = _norm_scale(weight, bias, torch.rsqrt(running_var.to(acc) + eps), running_mean.to(acc))
    return affine(u, s * k, shift if se_first else s * shift)


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


def affine_of_two(g: Tensor, u: Tensor, p: Tensor, q: Tensor, center: Tensor, r: Tensor) -> Tensor:
    """``g * p + (u - center) * q + r`` per (n, c), in ``u``'s dtype.

    ``p``, ``center`` and ``r`` are (N, C); ``q`` is (N, C) or (C,). For float32 and float64,
    two passes: :func:`affine` of ``g``, then an in-place multiply-add of ``u``
    (``u q + (r - q center)``). Half-precision inputs are centred in float32 first, since
    that form would lose the leading digits of ``(u - center) q`` to rounding in their
    dtype where the mean is large next to the spread.
    """
    n, c = u.shape[:2]
    q = q.expand(n, c)
    acc = accumulation_dtype(u.dtype)
    if acc != u.dtype:
        out = (g.to(acc) * p[:, :, None, None] + (u.to(acc) - center[:, :, None, None]) * q[:, :, None, None])
        return out.add_(r[:, :, None, None]).to(u.dtype)
    return affine(g, p, r - q * center).to(u.dtype).addcmul_(u, q[:, :, None, None].to(u.dtype))


def gate_hidden(z: Tensor, w1: Tensor, b1: Tensor, norm: Optional[tuple] = None) -> Tensor:
    """The gate's hidden units ``relu(z W1.T + b1)`` (N, L) for squeezed features ``z`` (N, C), in the parameters'
    dtype even under autocast.

    With ``norm = (weight, bias, running_mean, running_var, eps)`` (eval, BatchNorm then
    SE), ``z`` is the mean of the input and is first normalised as the BatchNorm does it.
    """
    if norm is not None:
        weight, bias, running_mean, running_var, eps = norm
        k, shift = _norm_scale(weight, bias, torch.rsqrt(running_var.to(z.dtype) + eps), running_mean.to(z.dtype))
        z = z * k + shift
    with _autocast_off(z.device.type):
        return F.linear(z.to(w1.dtype), w1, b1).relu_()


def gate_hidden_backward(grad_z2: Tensor, hidden: Tensor, w2: Tensor) -> Tensor:
    """The gradient of the hidden layer's pre-activation: ``grad_z1 = (grad_z2 W2) * (hidden > 0)`` (N, L)."""
    return torch.ops.aten.threshold_backward(grad_z2.to(w2.dtype) @ w2, hidden, 0)


def se_bn_forward(mean: Tensor, var: Tensor, hidden: Tensor, w2: Tensor, b2: Tensor, gate_scale: Tensor,
                  weight: Tensor, bias: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                  new_mean: Optional[Tensor], new_var: Optional[Tensor], momentum: float, eps: float,
                  count: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SE then BatchNorm, forward statistics: ``(sig, A, B, mu, rstd)``.

    ``sig = sigmoid(hidden W2.T + b2)`` and ``s = gate_scale * sig`` is the gate; the batch
    statistics of ``y = u * s`` are ``mu = mean_n(s m)`` and
    ``var = mean_n(s^2 v) + mean_n((s m - mu)^2)``; ``rstd = 1 / sqrt(var + eps)``; the output
    is ``u * A + B`` with ``A = s * gamma * rstd`` (N, C) and ``B = beta - mu * gamma * rstd`` (C).
    Steps the running statistics (into ``new_*``).
    """
    acc = mean.dtype
    with _autocast_off(mean.device.type):
        sig = torch.sigmoid(F.linear(hidden, w2, b2).to(acc))
    s = sig * gate_scale.to(acc)
    shifted = s * mean
    mu = shifted.mean(0)
    var_c = (s * s * var).mean(0) + (shifted - mu).square_().mean(0)
    rstd = torch.rsqrt(var_c + eps)
    _update_running(running_mean, running_var, new_mean, new_var, mu, var_c, momentum, count)
    k, shift = _norm_scale(weight, bias, rstd, mu)
    return sig, s * k, shift, mu, rstd


def se_bn_backward(g_sum: Tensor, gu_c: Tensor, mean: Tensor, var: Tensor, sig: Tensor, hidden: Tensor,
                   gate_scale: Tensor, mu: Tensor, rstd: Tensor, weight: Tensor, w2: Tensor, b2: Tensor,
                   count: int) -> tuple:
    """SE then BatchNorm, backward: ``(grad_weight, grad_bias, grad_z2, grad_w2, grad_b2, P, Q, R)``.

    With ``gu = gu_c + m * g_sum`` (``sum_hw g * u``) and ``k = gamma * rstd``:
    ``grad_bias = sum_n g_sum``, ``grad_weight = rstd (sum_n s gu - mu grad_bias)``;
    ``a = k grad_bias / count``, ``b = k rstd grad_weight / count``; the gate's gradient
    ``grad_s = k gu - area (a m + b (s v + m (s m - mu)))`` and its logits'
    ``grad_z2 = grad_s * gate_scale * sig (1 - sig)``, whence ``grad_w2 = grad_z2.T hidden``
    and ``grad_b2 = sum_n grad_z2``; and ``grad_u = g P + (u - m) Q + R`` with ``P = k s``,
    ``Q = -b s^2`` and ``R = s (b (mu - s m) - a)``, to which :func:`gate_input_backward`
    adds the squeeze's share.
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
    gz = grad_z2.to(w2.dtype)
    p = k * s
    q = -b * s * s
    r = s * (b * (mu - s * mean) - a)
    return (grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), grad_z2, gz.t() @ hidden.to(w2.dtype),
            gz.sum(0).to(b2.dtype), p, q, r)


def gate_input_backward(grad_z1: Tensor, z: Tensor, w1: Tensor, b1: Tensor, r: Tensor,
                        r_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gate's first layer, backward: ``(grad_w1, grad_b1, R')`` with ``grad_w1 = grad_z1.T z``,
    ``grad_b1 = sum_n grad_z1`` and ``R' = R + (grad_z1 W1) r_scale`` (the squeezed input's gradient, spread over
    the ``1 / r_scale`` values each (n, c) averages)."""
    grad_z1 = grad_z1.to(w1.dtype)
    r = r + (grad_z1 @ w1).to(r.dtype) * r_scale
    return grad_z1.t() @ z.to(w1.dtype), grad_z1.sum(0).to(b1.dtype), r


def bn_stats(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             running_mean: Optional[Tensor], running_var: Optional[Tensor], new_mean: Optional[Tensor],
             new_var: Optional[Tensor], momentum: float, eps: float, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm then SE, forward statistics: ``(mu, rstd, z)``.

    ``mu = mean_n(m)``, ``var = mean_n(v) + mean_n((m - mu)^2)``, ``rstd = 1 / sqrt(var + eps)``,
    and ``z = gamma * rstd * (m - mu) + beta`` (N, C), the mean over H, W of the normalised
    map: what SE squeezes. Steps the running statistics (into ``new_*``).
    """
    mu = mean.mean(0)
    var_c = var.mean(0) + (mean - mu).square_().mean(0)
    rstd = torch.rsqrt(var_c + eps)
    _update_running(running_mean, running_var, new_mean, new_var, mu, var_c, momentum, count)
    k, shift = _norm_scale(weight, bias, rstd, mu)
    return mu, rstd, k * mean + shift


def bn_se_scale(hidden: Tensor, w2: Tensor, b2: Tensor, gate_scale: Tensor, mu: Tensor, rstd: Tensor,
                weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm then SE, the output map: ``(sig, A, B)`` with ``y = u * A + B``.

    ``sig = sigmoid(hidden W2.T + b2)``, ``s = gate_scale * sig``, ``k = gamma * rstd``,
    ``A = s k`` and ``B = s (beta - mu k)``, both (N, C).
    """
    acc = rstd.dtype
    with _autocast_off(hidden.device.type):
        sig = torch.sigmoid(F.linear(hidden, w2, b2).to(acc))
    s = sig * gate_scale.to(acc)
    k, shift = _norm_scale(weight, bias, rstd, mu)
    return sig, s * k, s * shift


def bn_se_gate_grad(g_sum: Tensor, gu_c: Tensor, mean: Tensor, sig: Tensor, hidden: Tensor, gate_scale: Tensor,
                    mu: Tensor, rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], w2: Tensor,
                    b2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm then SE, the gate's second layer backward: ``(grad_z2, grad_w2, grad_b2)``.

    ``grad_s = sum_hw g * bn(u) = k (gu_c + m g_sum) + shift g_sum``,
    ``grad_z2 = grad_s * gate_scale * sig (1 - sig)``, ``grad_w2 = grad_z2.T hidden`` and
    ``grad_b2 = sum_n grad_z2``.
    """
    k, shift = _norm_scale(weight, bias, rstd, mu)
    grad_s = k * (gu_c + mean * g_sum) + shift * g_sum
    grad_z2 = grad_s * gate_scale.to(mean.dtype) * sig * (1 - sig)
    gz = grad_z2.to(w2.dtype)
    return grad_z2, gz.t() @ hidden.to(w2.dtype), gz.sum(0).to(b2.dtype)


def bn_se_backward(g_sum: Tensor, gu_c: Tensor, mean: Tensor, sig: Tensor, gate_scale: Tensor, grad_z1: Tensor,
                   z: Tensor, w1: Tensor, b1: Tensor, mu: Tensor, rstd: Tensor, weight: Optional[Tensor],
                   count: int) -> tuple:
    """BatchNorm then SE, backward through the gate's first layer and the BatchNorm:
    ``(grad_w1, grad_b1, grad_weight, grad_bias, P, Q, R)`` (no ``grad_weight``, ``grad_bias`` without affine).

    The gradient reaching the squeezed ``z`` is ``grad_z = grad_z1 W1``, and the one reaching
    the normalised map ``gb = s g + grad_z / area``. ``grad_bias = sum gb = sum_n (s g_sum + grad_z)``,
    ``grad_weight = sum gb * xhat = rstd sum_n (s (gu_c + (m - mu) g_sum) + grad_z (m - mu))``,
    and ``grad_u = g P + (u - m) Q + R`` with ``P = k s``,
    ``Q = -k rstd grad_weight / count`` (C) and
    ``R = k (grad_z / area - grad_bias / count) + Q (m - mu)``.
    """
    acc = mean.dtype
    area = count // mean.shape[0]
    grad_w1, grad_b1, grad_z = gate_input_backward(grad_z1, z, w1, b1, torch.zeros_like(mean), 1.0)
    s = sig * gate_scale.to(acc)
    d = mean - mu
    grad_bias = (s * g_sum + grad_z).sum(0)
    grad_weight = rstd * (s * (gu_c + d * g_sum) + grad_z * d).sum(0)
    k = rstd if weight is None else weight.to(acc) * rstd
    q = -k * rstd * grad_weight / count
    r = k * (grad_z / area - grad_bias / count) + q * d
    if weight is None:
        grad_weight = grad_bias = None
    else:
        grad_weight, grad_bias = grad_weight.to(weight.dtype), grad_bias.to(weight.dtype)
    return grad_w1, grad_b1, grad_weight, grad_bias, k * s, q, r


# --- the passes ---------------------------------------------------------------------------------------------------


def count_per_channel(u: Tensor) -> int:
    """Values per channel in a batch, ``N * H * W``; BatchNorm's error where there is only one."""
    n, _, h, w = u.shape
    if n * h * w < 2:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {list(u.shape)}')
    return n * h * w


def forward(se_first: bool, u: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gate_scale: Tensor,
            weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
            running_var: Optional[Tensor], new_mean: Optional[Tensor], new_var: Optional[Tensor], momentum: float,
            eps: float) -> tuple[Tensor, tuple]:
    """Training (batch statistics), forward: the output, and what :func:`backward` needs, ``(mean, var, sig, mu,
    rstd, hidden)`` (SE then BatchNorm) or ``(mean, squeezed, sig, mu, rstd, hidden)``.

    The running statistics step from ``running_*`` into ``new_*`` (the same tensors, in
    place, in eager mode). SE then BatchNorm needs affine parameters.
    """
    count = count_per_channel(u)
    mean, var = channel_stats(u)
    if se_first:
        hidden = gate_hidden(mean, w1, b1)
        sig, scale, shift, mu, rstd = se_bn_forward(mean, var, hidden, w2, b2, gate_scale, weight, bias, running_mean,
                                                    running_var, new_mean, new_var, momentum, eps, count)
        return affine(u, scale, shift), (mean, var, sig, mu, rstd, hidden)
    mu, rstd, squeezed = bn_stats(mean, var, weight, bias, running_mean, running_var, new_mean, new_var, momentum,
                                  eps, count)
    hidden = gate_hidden(squeezed, w1, b1)
    sig, scale, shift = bn_se_scale(hidden, w2, b2, gate_scale, mu, rstd, weight, bias)
    return affine(u, scale, shift), (mean, squeezed, sig, mu, rstd, hidden)


def backward(se_first: bool, grad_out: Tensor, u: Tensor, saved: tuple, w1: Tensor, b1: Tensor, w2: Tensor,
             b2: Tensor, gate_scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple:
    """Training, backward: the gradients of ``(u, w1, b1, w2, b2, weight, bias)`` (``None`` for absent affine
    parameters)."""
    count = count_per_channel(u)
    mean, var_or_squeezed, sig, mu, rstd, hidden = saved
    g_sum, gu_c = grad_sums(grad_out, u, mean)
    if se_first:
        grad_weight, grad_bias, grad_z2, grad_w2, grad_b2, p, q, r = se_bn_backward(
            g_sum, gu_c, mean, var_or_squeezed, sig, hidden, gate_scale, mu, rstd, weight, w2, b2, count)
        grad_z1 = gate_hidden_backward(grad_z2, hidden, w2)
        grad_w1, grad_b1, r = gate_input_backward(grad_z1, mean, w1, b1, r, 1.0 / (count // u.shape[0]))
    else:
        grad_z2, grad_w2, grad_b2 = bn_se_gate_grad(g_sum, gu_c, mean, sig, hidden, gate_scale, mu, rstd, weight,
                                                    bias, w2, b2)
        grad_z1 = gate_hidden_backward(grad_z2, hidden, w2)
        grad_w1, grad_b1, grad_weight, grad_bias, p, q, r = bn_se_backward(
            g_sum, gu_c, mean, sig, gate_scale, grad_z1, var_or_squeezed, w1, b1, mu, rstd, weight, count)
    grad_u = affine_of_two(grad_out, u, p, q, mean, r)
    return grad_u, grad_w1, grad_b1, grad_w2, grad_b2, grad_weight, grad_bias


def infer(se_first: bool, u: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gate_scale: Tensor,
          weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor,
          eps: float) -> Tensor:
    """Eval (running statistics): the output, from one read of ``u`` for its squeeze and one affine pass."""
    mean = channel_mean(u)
    hidden = gate_hidden(mean, w1, b1, None if se_first else (weight, bias, running_mean, running_var, eps))
    return gate_affine(u, hidden, w2, b2, gate_scale, weight, bias, running_mean, running_var, eps, se_first)

"""SE followed by BatchNorm, computed as one per-(n, c) affine pass (imports only torch).

For a conv output ``u`` (N, C, H, W), SE then a training-mode BatchNorm compute::

    s = excite(mean_hw(u))                    # (N, C) gate
    y = u * s                                 # SE
    out = gamma * (y - mu) / sqrt(var + eps) + beta,  mu, var: batch statistics of y

The batch statistics of ``y`` follow from the per-(n, c) mean ``m`` and variance ``v``
of ``u``, read in one pass: ``mu_c = mean_n(s m)`` and
``var_c = mean_n(s^2 v) + mean_n((s m - mu_c)^2)`` (a sum of non-negative terms, so no
cancellation). SE and normalisation then become one affine map per (n, c),
``out = u * A + B``. The backward pass is written out by hand from two reductions of
the incoming gradient (``sum_hw g`` and ``sum_hw g * u``) and one elementwise pass; it
needs only ``u``, which a BatchNorm saves anyway, so SE adds no full-size tensor to what
autograd keeps for backward, and no division by the gate (near-zero gates are exact).
The gate's small MLP is differentiated by hand too, from its (N, L) and (N, C)
activations.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ['affine', 'squeeze_excite_batch_norm']


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (as BatchNorm keeps its statistics), else the input's own."""
    return torch.promote_types(dtype, torch.float32)


def _autocast_off(device_type: str):
    """A context that turns autocast off for ``device_type``, where it is on."""
    if device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, int]:
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


def _channel_stats(u: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) variance and mean of ``u`` over H, W, in ``acc``.

    On CUDA, ``torch.var_mean``. On CPU, where that reduction is an order of magnitude
    slower than a sum, the variance comes from the sum and the sum of squares, and is
    recomputed with ``torch.var_mean`` for the rare batches whose means are so large next
    to their spread that the subtraction would lose precision.
    """
    if u.device.type != 'cpu':
        return torch.var_mean(u.to(acc), (2, 3), correction=0)
    flat, dim = _flat(u)
    area = flat.shape[dim]
    mean = flat.sum(dim, dtype=acc) / area
    mean_sq = torch.linalg.vector_norm(flat, dim=dim, dtype=acc).square_() / area
    var = (mean_sq - mean * mean).clamp_(min=0)
    if bool((mean_sq * (1e3 * torch.finfo(acc).eps) > var).any()):
        var = torch.var_mean(flat.to(acc), dim, correction=0)[0]
    return var, mean


def affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
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


def _sum_of_products(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``sum over H, W of a * b`` per (n, c), in ``acc``."""
    if a.dtype == b.dtype == acc and a.stride() == b.stride():
        (fa, dim), (fb, _) = _flat(a), _flat(b)
        return torch.linalg.vecdot(fa, fb, dim=dim)
    return (a.to(acc) * b.to(acc)).sum((2, 3))


class _SqueezeExciteBatchNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean, running_var, momentum, eps):
        n, c, h, w = u.shape
        count = n * h * w
        if count < 2:
            raise ValueError(f'Expected more than 1 value per channel when training, got input size {list(u.shape)}')
        acc = _accumulation_dtype(u.dtype)
        var_nc, mean_nc = _channel_stats(u, acc)
        # The gate, in the parameters' dtype even under autocast, with its activations kept
        # for the hand-written backward: (N, L) and (N, C).
        with _autocast_off(u.device.type):
            hidden = torch.relu(F.linear(mean_nc.to(w1.dtype), w1, b1))
            sig = torch.sigmoid(F.linear(hidden, w2, b2))
        s = (sig * gate_scale).to(acc)
        shifted = s * mean_nc  # per-(n, c) mean of y = u * s
        mu = shifted.mean(0)
        var = (s * s * var_nc).mean(0) + (shifted - mu).square_().mean(0)
        rstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.lerp_(mu.to(running_mean.dtype), momentum)
            running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)
        k = weight.to(acc) * rstd  # gamma / sigma, (C,)
        # detach: affine may return a view, and a custom Function's output must not be one
        # (an in-place op after it, such as ReLU(inplace=True), would be refused).
        out = affine(u, s * k, bias.to(acc) - mu * k).detach()
        ctx.save_for_backward(u, mean_nc, var_nc, s, mu, rstd, hidden, sig)
        # The parameters by reference: they live on anyway (saving them would only make
        # saved-tensor accounting count them).
        ctx.params = (w1, w2, gate_scale, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        u, mean_nc, var_nc, s, mu, rstd, hidden, sig = ctx.saved_tensors
        w1, w2, gate_scale, weight = ctx.params
        n, c, h, w = u.shape
        area, count = h * w, n * h * w
        g_sum = grad_out.sum((2, 3), dtype=mean_nc.dtype)  # sum_hw g, (N, C)
        gu_sum = _sum_of_products(grad_out, u, mean_nc.dtype)  # sum_hw g * u, (N, C)
        k = weight.to(rstd.dtype) * rstd
        grad_bias = g_sum.sum(0)  # sum g
        grad_weight = rstd * ((s * gu_sum).sum(0) - mu * grad_bias)  # sum g * y_hat
        a = k * grad_bias / count  # dL/dy = k g - a - b (y - mu)
        b = k * rstd * grad_weight / count
        # dL/ds = sum_hw dL/dy * u, with sum_hw u = area m and sum_hw (y - mu) u = area (s v + m (s m - mu)).
        grad_s = k * gu_sum - area * (a * mean_nc + b * (s * var_nc + mean_nc * (s * mean_nc - mu)))
        # Back through the gate: sigmoid, W2, ReLU, W1 (no division by the gate anywhere).
        grad_z2 = grad_s.to(sig.dtype) * gate_scale * sig * (1 - sig)
        grad_z1 = (grad_z2 @ w2) * (hidden > 0)
        squeezed = mean_nc.to(w1.dtype)
        grad_squeezed = (grad_z1 @ w1).to(mean_nc.dtype)
        needs = ctx.needs_input_grad
        grad_w1 = grad_z1.t() @ squeezed if needs[1] else None
        grad_b1 = grad_z1.sum(0) if needs[2] else None
        grad_w2 = grad_z2.t() @ hidden if needs[3] else None
        grad_b2 = grad_z2.sum(0) if needs[4] else None
        # dL/du = s dL/dy + dL/dm / area = coef_g g + coef_u u + const, all per (n, c).
        coef_u = (-b * s * s)[:, :, None, None].to(u.dtype)
        grad_u = affine(grad_out, k * s, s * (b * mu - a) + grad_squeezed / area).addcmul_(u, coef_u)
        return (grad_u, grad_w1, grad_b1, grad_w2, grad_b2, None, grad_weight.to(weight.dtype),
                grad_bias.to(weight.dtype), None, None, None, None)


def squeeze_excite_batch_norm(
    u: torch.Tensor,
    se: torch.nn.Module,
    norm: torch.nn.BatchNorm2d,
) -> torch.Tensor:
    """``norm(se(u))`` in one pass over ``u``, for a training-mode ``norm`` with affine parameters.

    ``se`` is a :class:`~composer_se.layers.SqueezeExcite2d`; ``norm`` is an affine
    ``BatchNorm2d`` in training mode. Its running statistics and
    ``num_batches_tracked`` are updated as ``BatchNorm2d`` would (``momentum=None``
    included); the result equals ``norm(se(u))`` up to rounding, and so do the gradients.
    """
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    running = norm.track_running_stats and norm.running_mean is not None
    return _SqueezeExciteBatchNorm.apply(
        u,
        se.fc1.weight,
        se.fc1.bias,
        se.fc2.weight,
        se.fc2.bias,
        se.gate_scale,
        norm.weight,
        norm.bias,
        norm.running_mean if running else None,
        norm.running_var if running else None,
        momentum,
        norm.eps,
    )

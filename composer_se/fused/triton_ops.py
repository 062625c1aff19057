"""The steps of the fused SE + BatchNorm functions as Triton kernels (the CUDA kernels).

Same functions, arguments and results as :mod:`composer_se.fused.torch_ops`, whose
docstrings give the formulas. Each kernel that touches the ``(N, C, H, W)`` activation
reads it once and writes at most once, accumulates in float32 (float64 for float64
inputs) without a full-size float32 copy, and works on NCHW and channels_last tensors
in place: both are an ``(N, C, HW)`` view with one stride per axis, and the tile's
contiguous axis (HW for NCHW, C for channels_last) is the one the loads run along.
Nothing here synchronises with the host.

- :func:`channel_stats`: per-(n, c) mean and variance; each program reduces a tile of
  channels of one image, shifted by each channel's first value, and merges its blocks
  with Chan's update (no ``E[x^2] - E[x]^2`` cancellation, even for a mean far larger
  than the spread);
- :func:`affine`, :func:`affine2`: one elementwise pass each;
- :func:`grad_sums`: ``sum g`` and ``sum g (u - m)`` in one pass over ``g`` and ``u``;
- the ``(N, C)`` steps (``se_bn_*``, ``bn_*``): one launch each; a program owns a block
  of channels and loops over the batch, so the per-channel sums need no atomics.

Triton runs these on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``,
which is how the tests check them on a machine without a GPU.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from composer_se.fused.torch_ops import accumulation_dtype

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

#: Elements in one tile of the activation (per program and loop step), and the most
#: channels a channels_last tile spans.
TILE = 8192
MAX_TILE_CHANNELS = 128
#: Elements in one tile of the (N, C) kernels, and the most batch rows it spans: a program
#: owns a few channels and walks the batch in as few steps as possible, since those
#: kernels are latency-bound.
STAT_TILE = 4096
MAX_STAT_ROWS = 256


#: The accumulation dtype of each input dtype, in torch and in Triton: float32 for half
#: precision and float32, float64 for float64
#: (:func:`~composer_se.fused.torch_ops.accumulation_dtype`).
_ACC = {dtype: (acc, {torch.float32: tl.float32, torch.float64: tl.float64}[acc])
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        for acc in (accumulation_dtype(dtype),)}


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """The accumulation dtype of ``dtype``, in torch and in Triton."""
    try:
        return _ACC[dtype]
    except KeyError:
        raise TypeError(f'SE kernels take float16, bfloat16, float32 or float64 tensors, got {dtype}') from None


def _layout(t: Tensor) -> tuple[Tensor, int, int, int, int, int]:
    """``t`` (N, C, H, W), its strides along N, C and the merged H*W axis, and its tile ``(BLOCK_HW, BLOCK_C)``.

    NCHW-contiguous and channels_last tensors are used as they are; any other layout is
    copied to NCHW first.
    """
    _, c, h, w = t.shape
    if t.is_contiguous():
        channels_last = False
    elif t.is_contiguous(memory_format=torch.channels_last):
        channels_last = True
    else:
        t, channels_last = t.contiguous(), False
    stride_n, stride_c, stride_h, stride_w = t.stride()
    # H and W merge into one axis: stride_h == w * stride_w in both layouts.
    return (t, stride_n, stride_c, stride_w if w > 1 else stride_h, *_tile(channels_last, c, h * w))


@functools.lru_cache(maxsize=None)
def _tile(channels_last: bool, channels: int, area: int) -> tuple[int, int]:
    """``(BLOCK_HW, BLOCK_C)``: :data:`TILE` elements, long along the contiguous axis (C for channels_last, H*W for
    NCHW), the one the tile's loads run along."""
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), MAX_TILE_CHANNELS)
        return max(1, min(triton.next_power_of_2(area), TILE // block_c)), block_c
    block_hw = min(triton.next_power_of_2(area), 1024)
    return block_hw, max(1, min(triton.next_power_of_2(channels), TILE // block_hw))


@triton.jit
def _channel_stats_kernel(x_ptr, mean_ptr, var_ptr, C, HW, sx_n, sx_c, sx_hw, BLOCK_HW: tl.constexpr,
                          BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    base = x_ptr + n.to(tl.int64) * sx_n
    # Statistics of x - first: the first value of each channel is near its mean in all but
    # freak cases, so the sums below stay of the size of the spread, not of the mean.
    first = tl.load(base + cs * sx_c, mask=c_in, other=0.0).to(ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, HW, BLOCK_HW):
        hws = start + tl.arange(0, BLOCK_HW)
        inside = (hws < HW)[:, None] & c_in[None, :]
        x = tl.load(base + hws[:, None] * sx_hw + cs[None, :] * sx_c, mask=inside, other=0.0).to(ACC)
        x = tl.where(inside, x - first[None, :], 0.0)
        seen = tl.zeros([BLOCK_C], ACC) + start  # values merged so far, and in this block
        here = tl.minimum(seen + BLOCK_HW, HW) - seen
        block_mean = tl.sum(x, axis=0) / here
        centred = tl.where(inside, x - block_mean[None, :], 0.0)
        delta = block_mean - mean  # Chan's update: merge this block's mean and sum of squares
        total = seen + here
        mean += delta * (here / total)
        m2 += tl.sum(centred * centred, axis=0) + delta * delta * (seen * here / total)
    out = n * C + cs
    tl.store(mean_ptr + out, mean + first, mask=c_in)
    tl.store(var_ptr + out, m2 / HW, mask=c_in)


def channel_stats(u: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and variance of ``u`` over H, W (see :func:`~composer_se.fused.torch_ops.channel_stats`)."""
    n, c, h, w = u.shape
    x, sn, sc, shw, block_hw, block_c = _layout(u)
    acc, acc_tl = _acc(u.dtype)
    mean = torch.empty(n, c, device=u.device, dtype=acc)
    var = torch.empty(n, c, device=u.device, dtype=acc)
    _channel_stats_kernel[(n, triton.cdiv(c, block_c))](x, mean, var, c, h * w, sn, sc, shw, BLOCK_HW=block_hw,
                                                        BLOCK_C=block_c, ACC=acc_tl)
    return mean, var


@triton.jit
def _affine_kernel(x_ptr, y_ptr, a_ptr, b_ptr, C, HW, sx_n, sx_c, sx_hw, sa_n, sa_c, sb_n, sb_c,
                   BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # y is laid out as x is.
    n = tl.program_id(0)
    hws = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    inside = (hws < HW)[:, None] & c_in[None, :]
    a = tl.load(a_ptr + n * sa_n + cs * sa_c, mask=c_in, other=0.0).to(ACC)
    b = tl.load(b_ptr + n * sb_n + cs * sb_c, mask=c_in, other=0.0).to(ACC)
    n64 = n.to(tl.int64)
    at = n64 * sx_n + hws[:, None] * sx_hw + cs[None, :] * sx_c
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(ACC)
    tl.store(y_ptr + at, (x * a[None, :] + b[None, :]).to(y_ptr.dtype.element_ty), mask=inside)


def _per_channel(t: Tensor) -> tuple[Tensor, int, int]:
    """A (N, C) or (C,) tensor and its strides along N (0 for (C,)) and C."""
    if t.dim() == 1:
        return t, 0, t.stride(0)
    return t, t.stride(0), t.stride(1)


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` per (n, c), in ``x``'s dtype and memory format."""
    n, c, h, w = x.shape
    x, sn, sc, shw, block_hw, block_c = _layout(x)
    y = torch.empty_like(x)  # a dense tensor's strides: x's
    a, an, ac = _per_channel(scale)
    b, bn, bc = _per_channel(shift)
    grid = (n, triton.cdiv(h * w, block_hw), triton.cdiv(c, block_c))
    _affine_kernel[grid](x, y, a, b, c, h * w, sn, sc, shw, an, ac, bn, bc, BLOCK_HW=block_hw, BLOCK_C=block_c,
                         ACC=_acc(x.dtype)[1])
    return y


@triton.jit
def _grad_sums_kernel(g_ptr, u_ptr, m_ptr, gsum_ptr, gusum_ptr, C, HW, sg_n, sg_c, sg_hw, su_n, su_c, su_hw,
                      BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    n = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    n64 = n.to(tl.int64)
    m = tl.load(m_ptr + n * C + cs, mask=c_in, other=0.0).to(ACC)
    g_sum = tl.zeros([BLOCK_C], ACC)
    gu_sum = tl.zeros([BLOCK_C], ACC)
    for start in range(0, HW, BLOCK_HW):
        hws = start + tl.arange(0, BLOCK_HW)
        inside = (hws < HW)[:, None] & c_in[None, :]
        g = tl.load(g_ptr + n64 * sg_n + hws[:, None] * sg_hw + cs[None, :] * sg_c, mask=inside, other=0.0).to(ACC)
        u = tl.load(u_ptr + n64 * su_n + hws[:, None] * su_hw + cs[None, :] * su_c, mask=inside, other=0.0).to(ACC)
        g_sum += tl.sum(g, axis=0)
        gu_sum += tl.sum(g * (u - m[None, :]), axis=0)
    tl.store(gsum_ptr + n * C + cs, g_sum, mask=c_in)
    tl.store(gusum_ptr + n * C + cs, gu_sum, mask=c_in)


def grad_sums(g: Tensor, u: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    """``sum_hw g`` and ``sum_hw g * (u - mean)`` per (n, c), in ``mean``'s dtype, in one pass."""
    n, c, h, w = u.shape
    g, gn, gc, ghw, _, _ = _layout(g)
    u, un, uc, uhw, block_hw, block_c = _layout(u)
    mean = mean.contiguous()
    g_sum = torch.empty_like(mean)
    gu_sum = torch.empty_like(mean)
    _grad_sums_kernel[(n, triton.cdiv(c, block_c))](g, u, mean, g_sum, gu_sum, c, h * w, gn, gc, ghw, un, uc, uhw,
                                                    BLOCK_HW=block_hw, BLOCK_C=block_c,
                                                    ACC=_acc(mean.dtype)[1])
    return g_sum, gu_sum


@triton.jit
def _affine2_kernel(g_ptr, u_ptr, out_ptr, p_ptr, q_ptr, m_ptr, r_ptr, r2_ptr, r2_scale, C, HW, sg_n, sg_c, sg_hw,
                    su_n, su_c, su_hw, sq_n, HAS_R2: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                    ACC: tl.constexpr):
    # out is laid out as u is.
    n = tl.program_id(0)
    hws = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    inside = (hws < HW)[:, None] & c_in[None, :]
    row = n * C + cs
    p = tl.load(p_ptr + row, mask=c_in, other=0.0).to(ACC)
    q = tl.load(q_ptr + n * sq_n + cs, mask=c_in, other=0.0).to(ACC)
    m = tl.load(m_ptr + row, mask=c_in, other=0.0).to(ACC)
    r = tl.load(r_ptr + row, mask=c_in, other=0.0).to(ACC)
    if HAS_R2:
        r += tl.load(r2_ptr + row, mask=c_in, other=0.0).to(ACC) * r2_scale
    n64 = n.to(tl.int64)
    g = tl.load(g_ptr + n64 * sg_n + hws[:, None] * sg_hw + cs[None, :] * sg_c, mask=inside, other=0.0).to(ACC)
    at = n64 * su_n + hws[:, None] * su_hw + cs[None, :] * su_c
    u = tl.load(u_ptr + at, mask=inside, other=0.0).to(ACC)
    out = g * p[None, :] + (u - m[None, :]) * q[None, :] + r[None, :]
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=inside)


def affine2(g: Tensor, u: Tensor, p: Tensor, q: Tensor, center: Tensor, r: Tensor, r2: Optional[Tensor] = None,
            r2_scale: float = 0.0) -> Tensor:
    """``g * p + (u - center) * q + r (+ r2 * r2_scale)`` per (n, c), in ``u``'s dtype and layout, in one pass."""
    n, c, h, w = u.shape
    g, gn, gc, ghw, _, _ = _layout(g)
    u, un, uc, uhw, block_hw, block_c = _layout(u)
    out = torch.empty_like(u)  # a dense tensor's strides: u's
    p, q, center, r = p.contiguous(), q.contiguous(), center.contiguous(), r.contiguous()
    grid = (n, triton.cdiv(h * w, block_hw), triton.cdiv(c, block_c))
    _affine2_kernel[grid](g, u, out, p, q, center, r, r if r2 is None else r2.contiguous(), float(r2_scale), c, h * w,
                          gn, gc, ghw, un, uc, uhw, 0 if q.dim() == 1 else c, HAS_R2=r2 is not None,
                          BLOCK_HW=block_hw, BLOCK_C=block_c, ACC=_acc(p.dtype)[1])
    return out


# --- the (N, C) steps: a program owns a few channels and loops over the batch -------------------------------------


@triton.jit
def _rows(start, cs, c_in, N, C, BLOCK_N: tl.constexpr):
    """Rows ``start .. start + BLOCK_N`` of an (N, C) tensor at channels ``cs``: the mask, and the offsets."""
    ns = start + tl.arange(0, BLOCK_N)
    return (ns < N)[:, None] & c_in[None, :], ns[:, None] * C + cs[None, :]


@triton.jit
def _load(ptr, offsets, mask, ACC: tl.constexpr):
    """``ptr[offsets]`` in the accumulation dtype, zero where ``mask`` is false."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)


@triton.jit
def _update_running(rm_ptr, rv_ptr, cs, c_in, mu, var, momentum, unbias, ACC: tl.constexpr):
    """BatchNorm's running statistics at channels ``cs``, in place: a step of ``momentum`` towards ``mu`` and the
    unbiased ``var``."""
    rm = _load(rm_ptr, cs, c_in, ACC)
    rv = _load(rv_ptr, cs, c_in, ACC)
    tl.store(rm_ptr + cs, (rm + momentum * (mu - rm)).to(rm_ptr.dtype.element_ty), mask=c_in)
    tl.store(rv_ptr + cs, (rv + momentum * (var * unbias - rv)).to(rv_ptr.dtype.element_ty), mask=c_in)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _se_bn_forward_kernel(m_ptr, v_ptr, z_ptr, gs_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, sig_ptr, a_ptr, shift_ptr, mu_ptr,
                          rstd_ptr, N, C, momentum, eps, unbias, HAS_RUNNING: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    gate_scale = tl.load(gs_ptr).to(ACC)
    sum_sm = tl.zeros([BLOCK_C], ACC)
    sum_ssv = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        sig = _sigmoid(_load(z_ptr, at, inside, ACC))
        tl.store(sig_ptr + at, sig, mask=inside)
        s = sig * gate_scale
        m = _load(m_ptr, at, inside, ACC)
        v = _load(v_ptr, at, inside, ACC)
        sum_sm += tl.sum(tl.where(inside, s * m, 0.0), axis=0)
        sum_ssv += tl.sum(tl.where(inside, s * s * v, 0.0), axis=0)
    mu = sum_sm / N
    sum_d2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        s = _sigmoid(_load(z_ptr, at, inside, ACC)) * gate_scale
        d = s * _load(m_ptr, at, inside, ACC) - mu[None, :]
        sum_d2 += tl.sum(tl.where(inside, d * d, 0.0), axis=0)
    var = (sum_ssv + sum_d2) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    k = _load(w_ptr, cs, c_in, ACC) * rstd
    tl.store(mu_ptr + cs, mu, mask=c_in)
    tl.store(rstd_ptr + cs, rstd, mask=c_in)
    tl.store(shift_ptr + cs, _load(b_ptr, cs, c_in, ACC) - mu * k, mask=c_in)
    if HAS_RUNNING:
        _update_running(rm_ptr, rv_ptr, cs, c_in, mu, var, momentum, unbias, ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        s = _sigmoid(_load(z_ptr, at, inside, ACC)) * gate_scale
        tl.store(a_ptr + at, s * k[None, :], mask=inside)


@functools.lru_cache(maxsize=None)
def _stat_launch(n: int, c: int) -> tuple[tuple[int], dict]:
    """The grid and block sizes of an (N, C) kernel: BLOCK_N rows by BLOCK_C channels a step."""
    block_n = min(triton.next_power_of_2(n), MAX_STAT_ROWS)
    block_c = max(1, min(triton.next_power_of_2(c), STAT_TILE // block_n))
    return (triton.cdiv(c, block_c),), {'BLOCK_N': block_n, 'BLOCK_C': block_c}


def _running(running_mean: Optional[Tensor], running_var: Optional[Tensor], mean: Tensor) -> tuple[Tensor, Tensor]:
    """The running statistics to update in place, or placeholders when there are none."""
    if running_mean is None:
        return mean, mean
    return running_mean, running_var


def se_bn_forward(mean: Tensor, var: Tensor, z2: Tensor, gate_scale: Tensor, weight: Tensor, bias: Tensor,
                  running_mean: Optional[Tensor], running_var: Optional[Tensor], momentum: float, eps: float,
                  count: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`composer_se.fused.torch_ops.se_bn_forward`."""
    n, c = mean.shape
    _, acc_tl = _acc(mean.dtype)
    z2 = z2.contiguous()
    sig, scale = torch.empty_like(mean), torch.empty_like(mean)
    shift, mu, rstd = (mean.new_empty(c) for _ in range(3))
    rm, rv = _running(running_mean, running_var, mean)
    grid, blocks = _stat_launch(n, c)
    _se_bn_forward_kernel[grid](mean, var, z2, gate_scale, weight, bias, rm, rv, sig, scale, shift, mu, rstd,
                                n, c, float(momentum), float(eps), count / (count - 1),
                                HAS_RUNNING=running_mean is not None, **blocks, ACC=acc_tl)
    return sig, scale, shift, mu, rstd


@triton.jit
def _se_bn_backward_kernel(gsum_ptr, guc_ptr, m_ptr, v_ptr, sig_ptr, gs_ptr, mu_ptr, rstd_ptr, w_ptr, gw_ptr, gb_ptr,
                           gz_ptr, gzsum_ptr, p_ptr, q_ptr, r_ptr, N, C, count, area, BLOCK_N: tl.constexpr,
                           BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    gate_scale = tl.load(gs_ptr).to(ACC)
    mu = _load(mu_ptr, cs, c_in, ACC)
    rstd = _load(rstd_ptr, cs, c_in, ACC)
    k = _load(w_ptr, cs, c_in, ACC) * rstd
    grad_bias = tl.zeros([BLOCK_C], ACC)
    sum_sgu = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        g_sum = _load(gsum_ptr, at, inside, ACC)
        gu = _load(guc_ptr, at, inside, ACC) + _load(m_ptr, at, inside, ACC) * g_sum
        s = _load(sig_ptr, at, inside, ACC) * gate_scale
        grad_bias += tl.sum(g_sum, axis=0)
        sum_sgu += tl.sum(s * gu, axis=0)
    grad_weight = rstd * (sum_sgu - mu * grad_bias)
    tl.store(gw_ptr + cs, grad_weight, mask=c_in)
    tl.store(gb_ptr + cs, grad_bias, mask=c_in)
    a = k * grad_bias / count
    b = k * rstd * grad_weight / count
    grad_z_sum = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        g_sum = _load(gsum_ptr, at, inside, ACC)
        m = _load(m_ptr, at, inside, ACC)
        v = _load(v_ptr, at, inside, ACC)
        gu = _load(guc_ptr, at, inside, ACC) + m * g_sum
        sig = _load(sig_ptr, at, inside, ACC)
        s = sig * gate_scale
        grad_s = k[None, :] * gu - area * (a[None, :] * m + b[None, :] * (s * v + m * (s * m - mu[None, :])))
        grad_z = grad_s * gate_scale * sig * (1.0 - sig)  # 0 outside: sig loads as 0
        grad_z_sum += tl.sum(grad_z, axis=0)
        tl.store(gz_ptr + at, grad_z, mask=inside)
        tl.store(p_ptr + at, k[None, :] * s, mask=inside)
        tl.store(q_ptr + at, -b[None, :] * s * s, mask=inside)
        tl.store(r_ptr + at, s * (b[None, :] * (mu[None, :] - s * m) - a[None, :]), mask=inside)
    tl.store(gzsum_ptr + cs, grad_z_sum, mask=c_in)


def se_bn_backward(g_sum: Tensor, gu_c: Tensor, mean: Tensor, var: Tensor, sig: Tensor, gate_scale: Tensor, mu: Tensor,
                   rstd: Tensor, weight: Tensor,
                   count: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`composer_se.fused.torch_ops.se_bn_backward`."""
    n, c = mean.shape
    grad_weight, grad_bias, grad_z2_sum = mean.new_empty(c), mean.new_empty(c), mean.new_empty(c)
    grad_z2, p, q, r = (torch.empty_like(mean) for _ in range(4))
    grid, blocks = _stat_launch(n, c)
    _se_bn_backward_kernel[grid](g_sum, gu_c, mean, var, sig, gate_scale, mu, rstd, weight, grad_weight,
                                 grad_bias, grad_z2, grad_z2_sum, p, q, r, n, c, float(count), float(count // n),
                                 **blocks, ACC=_acc(mean.dtype)[1])
    return grad_weight, grad_bias, grad_z2, grad_z2_sum, p, q, r


@triton.jit
def _bn_stats_kernel(m_ptr, v_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, mu_ptr, rstd_ptr, z_ptr, N, C, momentum, eps, unbias,
                     HAS_RUNNING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    sum_m = tl.zeros([BLOCK_C], ACC)
    sum_v = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        sum_m += tl.sum(_load(m_ptr, at, inside, ACC), axis=0)
        sum_v += tl.sum(_load(v_ptr, at, inside, ACC), axis=0)
    mu = sum_m / N
    sum_d2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        d = _load(m_ptr, at, inside, ACC) - mu[None, :]
        sum_d2 += tl.sum(tl.where(inside, d * d, 0.0), axis=0)
    var = (sum_v + sum_d2) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mu_ptr + cs, mu, mask=c_in)
    tl.store(rstd_ptr + cs, rstd, mask=c_in)
    if HAS_RUNNING:
        _update_running(rm_ptr, rv_ptr, cs, c_in, mu, var, momentum, unbias, ACC)
    k = _load(w_ptr, cs, c_in, ACC) * rstd
    beta = _load(b_ptr, cs, c_in, ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        m = _load(m_ptr, at, inside, ACC)
        tl.store(z_ptr + at, k[None, :] * (m - mu[None, :]) + beta[None, :], mask=inside)


def bn_stats(mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, running_mean: Optional[Tensor],
             running_var: Optional[Tensor], momentum: float, eps: float, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """See :func:`composer_se.fused.torch_ops.bn_stats`."""
    n, c = mean.shape
    mu, rstd = mean.new_empty(c), mean.new_empty(c)
    z = torch.empty_like(mean)
    rm, rv = _running(running_mean, running_var, mean)
    grid, blocks = _stat_launch(n, c)
    _bn_stats_kernel[grid](mean, var, weight, bias, rm, rv, mu, rstd, z, n, c, float(momentum), float(eps),
                           count / (count - 1), HAS_RUNNING=running_mean is not None, **blocks,
                           ACC=_acc(mean.dtype)[1])
    return mu, rstd, z


@triton.jit
def _bn_se_scale_kernel(z_ptr, gs_ptr, mu_ptr, rstd_ptr, w_ptr, b_ptr, sig_ptr, a_ptr, shift_ptr, N, C,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    gate_scale = tl.load(gs_ptr).to(ACC)
    k = _load(w_ptr, cs, c_in, ACC) * _load(rstd_ptr, cs, c_in, ACC)
    shift = _load(b_ptr, cs, c_in, ACC) - _load(mu_ptr, cs, c_in, ACC) * k
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        sig = _sigmoid(_load(z_ptr, at, inside, ACC))
        s = sig * gate_scale
        tl.store(sig_ptr + at, sig, mask=inside)
        tl.store(a_ptr + at, s * k[None, :], mask=inside)
        tl.store(shift_ptr + at, s * shift[None, :], mask=inside)


def bn_se_scale(z2: Tensor, gate_scale: Tensor, mu: Tensor, rstd: Tensor, weight: Tensor,
                bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """See :func:`composer_se.fused.torch_ops.bn_se_scale`."""
    n, c = z2.shape
    acc, acc_tl = _acc(rstd.dtype)
    z2 = z2.contiguous()
    sig, scale, shift = (torch.empty(n, c, device=z2.device, dtype=acc) for _ in range(3))
    grid, blocks = _stat_launch(n, c)
    _bn_se_scale_kernel[grid](z2, gate_scale, mu, rstd, weight, bias, sig, scale, shift, n, c,
                              **blocks, ACC=acc_tl)
    return sig, scale, shift


@triton.jit
def _bn_se_gate_grad_kernel(gsum_ptr, guc_ptr, m_ptr, sig_ptr, gs_ptr, mu_ptr, rstd_ptr, w_ptr, b_ptr, gz_ptr,
                            gzsum_ptr, N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    gate_scale = tl.load(gs_ptr).to(ACC)
    mu = _load(mu_ptr, cs, c_in, ACC)
    k = _load(w_ptr, cs, c_in, ACC) * _load(rstd_ptr, cs, c_in, ACC)
    beta = _load(b_ptr, cs, c_in, ACC)
    grad_z_sum = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        g_sum = _load(gsum_ptr, at, inside, ACC)
        m = _load(m_ptr, at, inside, ACC)
        grad_s = k[None, :] * (_load(guc_ptr, at, inside, ACC) +
                               (m - mu[None, :]) * g_sum) + beta[None, :] * g_sum
        sig = _load(sig_ptr, at, inside, ACC)
        grad_z = grad_s * gate_scale * sig * (1.0 - sig)  # 0 outside: sig loads as 0
        grad_z_sum += tl.sum(grad_z, axis=0)
        tl.store(gz_ptr + at, grad_z, mask=inside)
    tl.store(gzsum_ptr + cs, grad_z_sum, mask=c_in)


def bn_se_gate_grad(g_sum: Tensor, gu_c: Tensor, mean: Tensor, sig: Tensor, gate_scale: Tensor, mu: Tensor,
                    rstd: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """See :func:`composer_se.fused.torch_ops.bn_se_gate_grad`."""
    n, c = mean.shape
    grad_z2, grad_z2_sum = torch.empty_like(mean), mean.new_empty(c)
    grid, blocks = _stat_launch(n, c)
    _bn_se_gate_grad_kernel[grid](g_sum, gu_c, mean, sig, gate_scale, mu, rstd, weight, bias, grad_z2, grad_z2_sum,
                                  n, c, **blocks, ACC=_acc(mean.dtype)[1])
    return grad_z2, grad_z2_sum


@triton.jit
def _bn_se_backward_kernel(gsum_ptr, guc_ptr, m_ptr, sig_ptr, gs_ptr, gz_ptr, mu_ptr, rstd_ptr, w_ptr, gw_ptr, gb_ptr,
                           p_ptr, q_ptr, r_ptr, N, C, count, area, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                           ACC: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    gate_scale = tl.load(gs_ptr).to(ACC)
    mu = _load(mu_ptr, cs, c_in, ACC)
    rstd = _load(rstd_ptr, cs, c_in, ACC)
    k = _load(w_ptr, cs, c_in, ACC) * rstd
    grad_bias = tl.zeros([BLOCK_C], ACC)
    sum_x = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        g_sum = _load(gsum_ptr, at, inside, ACC)
        d = _load(m_ptr, at, inside, ACC) - mu[None, :]
        s = _load(sig_ptr, at, inside, ACC) * gate_scale
        gz = _load(gz_ptr, at, inside, ACC)
        grad_bias += tl.sum(s * g_sum + gz, axis=0)
        sum_x += tl.sum(tl.where(inside, s * (_load(guc_ptr, at, inside, ACC) + d * g_sum) +
                                 gz * d, 0.0), axis=0)
    grad_weight = rstd * sum_x
    tl.store(gw_ptr + cs, grad_weight, mask=c_in)
    tl.store(gb_ptr + cs, grad_bias, mask=c_in)
    q = -k * rstd * grad_weight / count
    tl.store(q_ptr + cs, q, mask=c_in)
    for start in range(0, N, BLOCK_N):
        inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        d = _load(m_ptr, at, inside, ACC) - mu[None, :]
        s = _load(sig_ptr, at, inside, ACC) * gate_scale
        gz = _load(gz_ptr, at, inside, ACC)
        tl.store(p_ptr + at, k[None, :] * s, mask=inside)
        tl.store(r_ptr + at, k[None, :] * (gz / area - grad_bias[None, :] / count) + q[None, :] * d, mask=inside)


def bn_se_backward(g_sum: Tensor, gu_c: Tensor, mean: Tensor, sig: Tensor, gate_scale: Tensor, grad_z: Tensor,
                   mu: Tensor, rstd: Tensor, weight: Tensor,
                   count: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See :func:`composer_se.fused.torch_ops.bn_se_backward`."""
    n, c = mean.shape
    grad_weight, grad_bias, q = mean.new_empty(c), mean.new_empty(c), mean.new_empty(c)
    p, r = torch.empty_like(mean), torch.empty_like(mean)
    grid, blocks = _stat_launch(n, c)
    _bn_se_backward_kernel[grid](g_sum, gu_c, mean, sig, gate_scale, grad_z.contiguous(), mu, rstd, weight,
                                 grad_weight, grad_bias, p, q, r, n, c, float(count), float(count // n),
                                 **blocks, ACC=_acc(mean.dtype)[1])
    return grad_weight, grad_bias, p, q, r

"""SE + BatchNorm as Triton kernels (CUDA): the passes of :mod:`~composer_se.batchnorm.torch_passes`, the gate inside.

:func:`forward`, :func:`backward` and :func:`infer` are those of the torch passes, whose
docstrings give the formulas, each taking first the launcher it issues each step through,
as one kernel launch (:mod:`~composer_se.batchnorm.launch`: a launch plan cached per
shape in eager mode, ``torch.library.wrap_triton`` when traced). It does no other torch
computation: a forward pass allocates its output and one workspace, which holds every
statistic the kernels pass on and what backward needs (:func:`forward_layout`); a
backward pass its gradients and one workspace of its own. A training step of one call
is 4 + 5 launches; eval, 3.

Kernels that touch the ``(N, C, H, W)`` activation read it once and write at most once,
accumulate in float32 (float64 for float64 inputs) without a full-size float32 copy,
and work on NCHW and channels_last tensors in place: both are an ``(N, C, HW)`` view with
one stride per axis, and the tile's contiguous axis (HW for NCHW, C for channels_last)
is the one the loads run along:

- ``channel_stats``: per-(n, c) mean and variance (or the mean alone); each program
  reduces a tile of channels of one image, shifted by each channel's first value, and
  merges its blocks with Chan's update (no ``E[x^2] - E[x]^2`` cancellation);
- ``gate_affine``: the output, ``u s k + shift`` (SE first) or ``s (u k + shift)``; where
  the gate is not yet known (BatchNorm then SE, eval) each program computes the gate's
  second layer for its own image and channels first;
- ``grad_sums``: ``sum g`` and ``sum g (u - m)`` in one pass over ``g`` and ``u``;
- ``affine_of_two``: ``grad_u = g P + (u - m) Q + R``.

The ``(N, C)`` kernels hold the gate's MLP as ``tl.dot`` products (exact float32, no
TF32; for float64, which ``tl.dot`` does not take, the products summed):
``gate_hidden`` and ``gate_hidden_backward`` own blocks of rows and loop over channels,
the others own blocks of channels and loop over the batch, so per-channel sums need no
atomics. A kernel that reads back what it wrote in an earlier loop waits at a barrier
first. Nothing here synchronises with the host.

Triton runs these on CUDA tensors; on CPU tensors under ``TRITON_INTERPRET=1`` or with
a driver that takes CPU tensors (``benchmarks/stand_in_driver.py``), which is how the
tests check them on a machine without a GPU.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from composer_se.batchnorm.torch_passes import accumulation_dtype, count_per_channel

__all__ = ['KERNELS', 'backward', 'forward', 'forward_layout', 'infer']

Tensor = torch.Tensor

#: Elements in one tile of the activation (per program and loop step), and the most
#: channels a channels_last tile spans.
TILE = 8192
MAX_TILE_CHANNELS = 128
#: Tiles of the (N, C) kernels: the most batch rows, channels and hidden units a loop step
#: spans (``tl.dot`` takes blocks of at least 16 on each side); those that own channels, and
#: the two that own rows and hidden units (smaller, so that a batch of 256 and 64 hidden
#: units still make 32 programs).
STAT_ROWS, STAT_CHANNELS, STAT_HIDDEN = 64, 32, 64
HIDDEN_ROWS, HIDDEN_CHANNELS, HIDDEN_UNITS = 16, 64, 32
#: The (N, C) statistics kernel without a product: elements in one tile, and its rows.
STAT_TILE, MAX_STAT_ROWS = 4096, 256

#: The accumulation dtype of each input dtype, in torch and in Triton.
_ACC = {dtype: (acc, {torch.float32: tl.float32, torch.float64: tl.float64}[acc])
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        for acc in (accumulation_dtype(dtype),)}


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    try:
        return _ACC[dtype]
    except KeyError:
        raise TypeError(f'SE kernels take float16, bfloat16, float32 or float64 tensors, got {dtype}') from None


def _static(n) -> int:
    """``n`` where it is a Python int; a symbolic size (a dynamic shape under ``torch.compile``) counts as large."""
    return n if isinstance(n, int) else 1 << 20


@functools.lru_cache(maxsize=None)
def _tile(channels_last: bool, channels: int, area: int) -> tuple[int, int]:
    """``(BLOCK_HW, BLOCK_C)`` of an activation tile: :data:`TILE` elements, long along the contiguous axis."""
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), MAX_TILE_CHANNELS)
        return max(1, min(triton.next_power_of_2(area), TILE // block_c)), block_c
    block_hw = min(triton.next_power_of_2(area), 1024)
    return block_hw, max(1, min(triton.next_power_of_2(channels), TILE // block_hw))


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(triton.next_power_of_2(n), high))


def _dense_activation(t: Tensor) -> Tensor:
    """``t`` as the kernels read it: NCHW-contiguous and channels_last tensors as they are, any other layout copied to
    NCHW."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


class _Geometry(NamedTuple):
    """What the launches of one pass derive from its activation's shape, strides and dtype and the gate's width."""

    n: int
    c: int
    hw: int
    strides: tuple[int, int, int]  # along N, C and the merged H*W axis
    acc: torch.dtype
    acc_tl: tl.dtype
    block_hw: int
    block_c: int  # the activation tiles'
    block_n: int
    block_cs: int
    block_l: int  # the (N, C) kernels with products that own channels
    row_n: int
    row_c: int
    row_l: int  # ... and the two that own rows and hidden units
    stat_n: int
    stat_c: int  # the statistics kernel without one
    gate_l: int  # gate_affine's hidden units a step
    count: int
    rows_grid: tuple[int, int, int]  # a program per image and tile of channels
    tiles_grid: tuple[int, int, int]  # ... and tile of H*W
    channel_grid: tuple[int, int, int]  # a program per block of channels
    stat_grid: tuple[int, int, int]
    hidden_grid: tuple[int, int, int]  # a program per block of rows and of hidden units


def _geometry(shape: torch.Size, stride: tuple, dtype: torch.dtype, latent: int) -> _Geometry:
    """The :class:`_Geometry` of an activation: cached for sizes that are ints, worked out each time for symbolic ones
    (a dynamic shape under ``torch.compile``, which cannot be hashed)."""
    try:
        return _cached_geometry(shape, stride, dtype, latent)
    except TypeError:
        return _geometry_of(shape, stride, dtype, latent)


def _geometry_of(shape: torch.Size, stride: tuple, dtype: torch.dtype, latent: int) -> _Geometry:
    n, c, h, w = shape
    stride_n, stride_c, stride_h, stride_w = stride
    channels_last = _static(stride_c) == 1 and _static(c) > 1  # no test on a symbolic size: it could not be traced
    block_hw, block_c = _tile(channels_last, _static(c), _static(h * w))
    acc, acc_tl = _acc(dtype)
    if acc is torch.float64:  # its product is an elementwise one of all three blocks
        block_n = block_cs = block_l = gate_l = row_n = row_c = row_l = 16
    else:
        block_n, block_cs = _pow2(_static(n), 16, STAT_ROWS), _pow2(_static(c), 16, STAT_CHANNELS)
        block_l, gate_l = _pow2(latent, 16, STAT_HIDDEN), _pow2(latent, 16, 64)
        row_n, row_c = _pow2(_static(n), 16, HIDDEN_ROWS), _pow2(_static(c), 16, HIDDEN_CHANNELS)
        row_l = _pow2(latent, 16, HIDDEN_UNITS)
    stat_n = min(triton.next_power_of_2(_static(n)), MAX_STAT_ROWS)
    stat_c = max(1, min(triton.next_power_of_2(_static(c)), STAT_TILE // stat_n))
    # H and W merge into one axis: stride_h == w * stride_w in both layouts.
    strides = (stride_n, stride_c, stride_w if _static(w) > 1 else stride_h)
    return _Geometry(n, c, h * w, strides, acc, acc_tl, block_hw, block_c, block_n, block_cs, block_l, row_n, row_c,
                     row_l, stat_n, stat_c, gate_l, n * h * w, (n, triton.cdiv(c, block_c), 1),
                     (n, triton.cdiv(h * w, block_hw), triton.cdiv(c, block_c)), (triton.cdiv(c, block_cs), 1, 1),
                     (triton.cdiv(c, stat_c), 1, 1), (triton.cdiv(n, row_n), triton.cdiv(latent, row_l), 1))


_cached_geometry = functools.lru_cache(maxsize=1024)(_geometry_of)


def _strides(t: Tensor) -> tuple[int, int, int]:
    """``t``'s strides along N, C and the merged H*W axis."""
    stride_n, stride_c, stride_h, stride_w = t.stride()
    return stride_n, stride_c, stride_w if _static(t.shape[3]) > 1 else stride_h


def forward_layout(n: int, c: int, latent: int, se_first: bool) -> dict[str, tuple[int, tuple]]:
    """Where each statistic lies in a forward workspace: name -> (offset, shape), and its size under ``'size'``.

    (N, C) slots first: ``mean``, ``var``, ``sig`` and, BatchNorm then SE, the squeezed
    ``z`` (SE then BatchNorm squeezes ``mean``); then per channel ``k`` (``gamma rstd``),
    ``shift``, ``mu``, ``rstd``; then the gate's ``hidden`` units (N, L). The kernels
    compute the same offsets (``_forward_slots``).
    """
    nc = n * c
    base = (3 if se_first else 4) * nc
    layout = {'mean': (0, (n, c)), 'var': (nc, (n, c)), 'sig': (2 * nc, (n, c)),
              'z': ((0 if se_first else 3 * nc), (n, c)), 'k': (base, (c,)), 'shift': (base + c, (c,)),
              'mu': (base + 2 * c, (c,)), 'rstd': (base + 3 * c, (c,)), 'hidden': (base + 4 * c, (n, latent))}
    layout['size'] = (base + 4 * c + n * latent, ())
    return layout


# --- the workspaces' slots, as the kernels compute them ------------------------------------------------------------


@triton.jit
def _forward_slots(N, C, SE_FIRST: tl.constexpr):
    """Offsets of ``(mean, var, sig, z, k, shift, mu, rstd, hidden)`` in a forward workspace (see
    :func:`forward_layout`)."""
    nc = N * C
    if SE_FIRST:
        base = 3 * nc
        z = 0
    else:
        base = 4 * nc
        z = 3 * nc
    return 0, nc, 2 * nc, z, base, base + C, base + 2 * C, base + 3 * C, base + 4 * C


@triton.jit
def _backward_slots(N, C):
    """Offsets of ``(g_sum, gu_c, grad_z2, p, q, r, grad_z1)`` in a backward workspace: six (N, C), then (N, L)."""
    nc = N * C
    return 0, nc, 2 * nc, 3 * nc, 4 * nc, 5 * nc, 6 * nc


# --- small helpers ------------------------------------------------------------------------------------------------


@triton.jit
def _load(ptr, offsets, mask, ACC: tl.constexpr):
    """``ptr[offsets]`` in the accumulation dtype, zero where ``mask`` is false."""
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(ACC)


@triton.jit
def _rows(start, cs, c_in, N, C, BLOCK_N: tl.constexpr):
    """Rows ``start .. start + BLOCK_N`` of an (N, C) tensor at channels ``cs``: the rows, the mask and the offsets."""
    ns = start + tl.arange(0, BLOCK_N)
    return ns, (ns < N)[:, None] & c_in[None, :], ns[:, None] * C + cs[None, :]


@triton.jit
def _matmul(a, b, ACC: tl.constexpr):
    """``a @ b`` in ``ACC``: ``tl.dot`` in exact float32 (no TF32); for float64, which ``tl.dot`` does not take, the
    products summed."""
    if ACC == tl.float64:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision='ieee')


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _norm_scale(w_ptr, b_ptr, cs, c_in, rstd, mu, HAS_AFFINE: tl.constexpr, ACC: tl.constexpr):
    """``k = gamma rstd`` and ``shift = beta - mu k`` at channels ``cs`` (``gamma = 1`` and ``beta = 0`` without
    affine parameters)."""
    if HAS_AFFINE:
        k = _load(w_ptr, cs, c_in, ACC) * rstd
        return k, _load(b_ptr, cs, c_in, ACC) - mu * k
    else:
        return rstd, -mu * rstd


@triton.jit
def _running_scale(w_ptr, b_ptr, rm_ptr, rv_ptr, eps, cs, c_in, HAS_AFFINE: tl.constexpr, ACC: tl.constexpr):
    """``k`` and ``shift`` of the normalisation with the running statistics, at channels ``cs``."""
    rstd = 1.0 / tl.sqrt(_load(rv_ptr, cs, c_in, ACC) + eps)
    return _norm_scale(w_ptr, b_ptr, cs, c_in, rstd, _load(rm_ptr, cs, c_in, ACC), HAS_AFFINE, ACC)


@triton.jit
def _finish_stats(ws_ptr, K, SHIFT, MU, RSTD, w_ptr, b_ptr, rm_ptr, rv_ptr, rmo_ptr, rvo_ptr, cs, c_in, mu, var,
                  momentum, eps, count, HAS_RUNNING: tl.constexpr, HAS_AFFINE: tl.constexpr, ACC: tl.constexpr):
    """Store ``mu``, ``rstd``, ``k`` and ``shift`` at channels ``cs``; step the running statistics from ``rm``, ``rv``
    into ``rmo``, ``rvo`` (the same tensors in eager mode) towards ``mu`` and the unbiased ``var`` (over ``count``
    values). Returns ``k`` and ``shift``."""
    rstd = 1.0 / tl.sqrt(var + eps)
    k, shift = _norm_scale(w_ptr, b_ptr, cs, c_in, rstd, mu, HAS_AFFINE, ACC)
    tl.store(ws_ptr + MU + cs, mu, mask=c_in)
    tl.store(ws_ptr + RSTD + cs, rstd, mask=c_in)
    tl.store(ws_ptr + K + cs, k, mask=c_in)
    tl.store(ws_ptr + SHIFT + cs, shift, mask=c_in)
    if HAS_RUNNING:
        rm = _load(rm_ptr, cs, c_in, ACC)
        rv = _load(rv_ptr, cs, c_in, ACC)
        tl.store(rmo_ptr + cs, (rm + momentum * (mu - rm)).to(rmo_ptr.dtype.element_ty), mask=c_in)
        unbiased = var * (count / (count - 1.0))
        tl.store(rvo_ptr + cs, (rv + momentum * (unbiased - rv)).to(rvo_ptr.dtype.element_ty), mask=c_in)
    return k, shift


@triton.jit
def _saved_stats(ws_ptr, MU, RSTD, K, cs, c_in, ACC: tl.constexpr):
    """The batch mean ``mu``, ``rstd`` and ``k = gamma rstd`` the forward pass kept, at channels ``cs``."""
    return _load(ws_ptr + MU, cs, c_in, ACC), _load(ws_ptr + RSTD, cs, c_in, ACC), _load(ws_ptr + K, cs, c_in, ACC)


@triton.jit
def _gate_logits(h_ptr, w2_ptr, b2, ns, cs, N, C, L, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    """The gate's logits ``hidden[ns] @ W2[cs].T + b2`` (BLOCK_N, BLOCK_C); ``W2`` is (C, L)."""
    z = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for start in range(0, L, BLOCK_L):
        ls = start + tl.arange(0, BLOCK_L)
        h = _load(h_ptr, ns[:, None] * L + ls[None, :], (ns < N)[:, None] & (ls < L)[None, :], ACC)
        w = _load(w2_ptr, cs[None, :] * L + ls[:, None], (cs < C)[None, :] & (ls < L)[:, None], ACC)
        z += _matmul(h, w, ACC)
    return z + b2[None, :]


@triton.jit
def _squeezed_grad(gz1_ptr, w1_ptr, ns, cs, N, C, L, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    """The gradient reaching the squeezed input, ``grad_z1[ns] @ W1[:, cs]`` (BLOCK_N, BLOCK_C); ``W1`` is (L, C)."""
    g = tl.zeros([BLOCK_N, BLOCK_C], ACC)
    for start in range(0, L, BLOCK_L):
        ls = start + tl.arange(0, BLOCK_L)
        gz1 = _load(gz1_ptr, ns[:, None] * L + ls[None, :], (ns < N)[:, None] & (ls < L)[None, :], ACC)
        w = _load(w1_ptr, ls[:, None] * C + cs[None, :], (ls < L)[:, None] & (cs < C)[None, :], ACC)
        g += _matmul(gz1, w, ACC)
    return g


@triton.jit
def _first_layer_grad(gz1_ptr, z_ptr, gw1_ptr, gb1_ptr, cs, N, C, L, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    """The gradients of the gate's first layer at channels ``cs``: ``grad_W1[:, cs] = grad_z1.T @ z[:, cs]``; and
    ``grad_b1 = sum_n grad_z1`` from the first program."""
    c_in = cs < C
    for l_start in range(0, L, BLOCK_L):
        ls = l_start + tl.arange(0, BLOCK_L)
        l_in = ls < L
        grad = tl.zeros([BLOCK_L, BLOCK_C], ACC)
        grad_b = tl.zeros([BLOCK_L], ACC)
        for start in range(0, N, BLOCK_N):
            ns = start + tl.arange(0, BLOCK_N)
            n_in = ns < N
            gz1 = _load(gz1_ptr, ns[:, None] * L + ls[None, :], n_in[:, None] & l_in[None, :], ACC)
            z = _load(z_ptr, ns[:, None] * C + cs[None, :], n_in[:, None] & c_in[None, :], ACC)
            grad += _matmul(tl.trans(gz1), z, ACC)
            grad_b += tl.sum(gz1, axis=0)
        tl.store(gw1_ptr + ls[:, None] * C + cs[None, :], grad.to(gw1_ptr.dtype.element_ty),
                 mask=l_in[:, None] & c_in[None, :])
        if tl.program_id(0) == 0:
            tl.store(gb1_ptr + ls, grad_b.to(gb1_ptr.dtype.element_ty), mask=l_in)


@triton.jit
def _second_layer_grad(gz_ptr, h_ptr, gw2_ptr, cs, N, C, L, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    """The gradient of the gate's second layer at channels ``cs``: ``grad_W2[cs] = grad_z2[:, cs].T @ hidden``."""
    c_in = cs < C
    for l_start in range(0, L, BLOCK_L):
        ls = l_start + tl.arange(0, BLOCK_L)
        l_in = ls < L
        grad = tl.zeros([BLOCK_C, BLOCK_L], ACC)
        for start in range(0, N, BLOCK_N):
            ns = start + tl.arange(0, BLOCK_N)
            n_in = ns < N
            gz = _load(gz_ptr, ns[:, None] * C + cs[None, :], n_in[:, None] & c_in[None, :], ACC)
            h = _load(h_ptr, ns[:, None] * L + ls[None, :], n_in[:, None] & l_in[None, :], ACC)
            grad += _matmul(tl.trans(gz), h, ACC)
        tl.store(gw2_ptr + cs[:, None] * L + ls[None, :], grad.to(gw2_ptr.dtype.element_ty),
                 mask=c_in[:, None] & l_in[None, :])


# --- kernels over the activation ------------------------------------------------------------------------------------


@triton.jit
def _channel_stats_kernel(x_ptr, ws_ptr, N, C, HW, sx_n, sx_c, sx_hw, WITH_VAR: tl.constexpr, BLOCK_HW: tl.constexpr,
                          BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # The mean of each (n, c) at workspace offset 0, its variance after it (N * C on).
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
        if WITH_VAR:
            seen = tl.zeros([BLOCK_C], ACC) + start  # values merged so far, and in this block
            here = tl.minimum(seen + BLOCK_HW, HW) - seen
            block_mean = tl.sum(x, axis=0) / here
            centred = tl.where(inside, x - block_mean[None, :], 0.0)
            delta = block_mean - mean  # Chan's update: merge this block's mean and sum of squares
            total = seen + here
            mean += delta * (here / total)
            m2 += tl.sum(centred * centred, axis=0) + delta * delta * (seen * here / total)
        else:
            mean += tl.sum(x, axis=0)
    out = n * C + cs
    if WITH_VAR:
        tl.store(ws_ptr + out, mean + first, mask=c_in)
        tl.store(ws_ptr + N * C + out, m2 / HW, mask=c_in)
    else:
        tl.store(ws_ptr + out, mean / HW + first, mask=c_in)


@triton.jit
def _gate_affine_kernel(x_ptr, y_ptr, ws_ptr, w2_ptr, b2_ptr, gs_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, eps, N, C, HW, L,
                        sx_n, sx_c, sx_hw, SE_FIRST: tl.constexpr, GATE_FROM_HIDDEN: tl.constexpr,
                        EVAL: tl.constexpr, HAS_AFFINE: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # y = u s k + shift (SE first) or s (u k + shift); y is laid out as x is. Training reads k and shift from the
    # forward workspace; eval (whose workspace is the mean, then the hidden units) computes them from the running
    # statistics. The gate s comes from the workspace (SE then BatchNorm, training) or from the hidden units, for
    # this image and these channels (and training keeps it, once per (n, c)).
    n = tl.program_id(0)
    hws = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    MEAN, VAR, SIG, Z, K, SHIFT, MU, RSTD, HIDDEN = _forward_slots(N, C, SE_FIRST)
    if EVAL:
        HIDDEN = N * C
    if GATE_FROM_HIDDEN:
        logits = _load(b2_ptr, cs, c_in, ACC)
        for start in range(0, L, BLOCK_L):
            ls = start + tl.arange(0, BLOCK_L)
            h = _load(ws_ptr + HIDDEN, n * L + ls, ls < L, ACC)
            w = _load(w2_ptr, cs[None, :] * L + ls[:, None], c_in[None, :] & (ls < L)[:, None], ACC)
            logits += tl.sum(h[:, None] * w, axis=0)
        sig = _sigmoid(logits)
        if not EVAL:
            tl.store(ws_ptr + SIG + n * C + cs, sig, mask=c_in & (tl.program_id(1) == 0))
    else:
        sig = _load(ws_ptr + SIG, n * C + cs, c_in, ACC)
    s = sig * tl.load(gs_ptr).to(ACC)
    if EVAL:
        k, shift = _running_scale(w_ptr, b_ptr, rm_ptr, rv_ptr, eps, cs, c_in, HAS_AFFINE, ACC)
    else:
        k = _load(ws_ptr + K, cs, c_in, ACC)
        shift = _load(ws_ptr + SHIFT, cs, c_in, ACC)
    a = s * k
    if SE_FIRST:
        b = shift
    else:
        b = s * shift
    inside = (hws < HW)[:, None] & c_in[None, :]
    at = n.to(tl.int64) * sx_n + hws[:, None] * sx_hw + cs[None, :] * sx_c
    x = tl.load(x_ptr + at, mask=inside, other=0.0).to(ACC)
    tl.store(y_ptr + at, (x * a[None, :] + b[None, :]).to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _grad_sums_kernel(g_ptr, u_ptr, ws_ptr, ws2_ptr, N, C, HW, sg_n, sg_c, sg_hw, su_n, su_c, su_hw,
                      BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # sum_hw g and sum_hw g (u - mean) per (n, c), into the backward workspace.
    n = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    n64 = n.to(tl.int64)
    m = _load(ws_ptr, n * C + cs, c_in, ACC)
    g_sum = tl.zeros([BLOCK_C], ACC)
    gu_sum = tl.zeros([BLOCK_C], ACC)
    for start in range(0, HW, BLOCK_HW):
        hws = start + tl.arange(0, BLOCK_HW)
        inside = (hws < HW)[:, None] & c_in[None, :]
        g = tl.load(g_ptr + n64 * sg_n + hws[:, None] * sg_hw + cs[None, :] * sg_c, mask=inside, other=0.0).to(ACC)
        u = tl.load(u_ptr + n64 * su_n + hws[:, None] * su_hw + cs[None, :] * su_c, mask=inside, other=0.0).to(ACC)
        g_sum += tl.sum(g, axis=0)
        gu_sum += tl.sum(g * (u - m[None, :]), axis=0)
    G_SUM, GU_C, GZ2, P, Q, R, GZ1 = _backward_slots(N, C)
    tl.store(ws2_ptr + G_SUM + n * C + cs, g_sum, mask=c_in)
    tl.store(ws2_ptr + GU_C + n * C + cs, gu_sum, mask=c_in)


@triton.jit
def _affine_of_two_kernel(g_ptr, u_ptr, out_ptr, ws_ptr, ws2_ptr, N, C, HW, sg_n, sg_c, sg_hw, su_n, su_c, su_hw,
                          Q_PER_CHANNEL: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
                          ACC: tl.constexpr):
    # grad_u = g P + (u - mean) Q + R; out is laid out as u is; Q is (N, C), or (C,) with Q_PER_CHANNEL.
    n = tl.program_id(0)
    hws = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    cs = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    inside = (hws < HW)[:, None] & c_in[None, :]
    G_SUM, GU_C, GZ2, P, Q, R, GZ1 = _backward_slots(N, C)
    row = n * C + cs
    p = _load(ws2_ptr + P, row, c_in, ACC)
    if Q_PER_CHANNEL:
        q = _load(ws2_ptr + Q, cs, c_in, ACC)
    else:
        q = _load(ws2_ptr + Q, row, c_in, ACC)
    m = _load(ws_ptr, row, c_in, ACC)
    r = _load(ws2_ptr + R, row, c_in, ACC)
    n64 = n.to(tl.int64)
    g = tl.load(g_ptr + n64 * sg_n + hws[:, None] * sg_hw + cs[None, :] * sg_c, mask=inside, other=0.0).to(ACC)
    at = n64 * su_n + hws[:, None] * su_hw + cs[None, :] * su_c
    u = tl.load(u_ptr + at, mask=inside, other=0.0).to(ACC)
    out = g * p[None, :] + (u - m[None, :]) * q[None, :] + r[None, :]
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=inside)


# --- the gate's hidden layer: a program owns rows and hidden units, and loops over channels --------------------------


@triton.jit
def _gate_hidden_kernel(ws_ptr, w1_ptr, b1_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, eps, N, C, L, SE_FIRST: tl.constexpr,
                        EVAL: tl.constexpr, HAS_AFFINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # hidden = relu(z W1.T + b1) for the squeezed z. Eval: z is the mean (the workspace's start), normalised first
    # with the running statistics where BatchNorm comes first, and hidden follows it.
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    n_in, l_in = ns < N, ls < L
    MEAN, VAR, SIG, Z, K, SHIFT, MU, RSTD, HIDDEN = _forward_slots(N, C, SE_FIRST)
    if EVAL:
        Z = 0
        HIDDEN = N * C
    acc = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    for start in range(0, C, BLOCK_C):
        cs = start + tl.arange(0, BLOCK_C)
        c_in = cs < C
        inside = n_in[:, None] & c_in[None, :]
        z = _load(ws_ptr + Z, ns[:, None] * C + cs[None, :], inside, ACC)
        if EVAL and not SE_FIRST:
            k, shift = _running_scale(w_ptr, b_ptr, rm_ptr, rv_ptr, eps, cs, c_in, HAS_AFFINE, ACC)
            z = tl.where(inside, z * k[None, :] + shift[None, :], 0.0)
        w = _load(w1_ptr, ls[None, :] * C + cs[:, None], c_in[:, None] & l_in[None, :], ACC)
        acc += _matmul(z, w, ACC)
    h = tl.maximum(acc + _load(b1_ptr, ls, l_in, ACC)[None, :], 0.0)
    tl.store(ws_ptr + HIDDEN + ns[:, None] * L + ls[None, :], h, mask=n_in[:, None] & l_in[None, :])


@triton.jit
def _gate_hidden_backward_kernel(ws_ptr, ws2_ptr, w2_ptr, N, C, L, SE_FIRST: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # grad_z1 = (grad_z2 W2) where hidden > 0.
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    n_in, l_in = ns < N, ls < L
    MEAN, VAR, SIG, Z, K, SHIFT, MU, RSTD, HIDDEN = _forward_slots(N, C, SE_FIRST)
    G_SUM, GU_C, GZ2, P, Q, R, GZ1 = _backward_slots(N, C)
    acc = tl.zeros([BLOCK_N, BLOCK_L], ACC)
    for start in range(0, C, BLOCK_C):
        cs = start + tl.arange(0, BLOCK_C)
        c_in = cs < C
        gz = _load(ws2_ptr + GZ2, ns[:, None] * C + cs[None, :], n_in[:, None] & c_in[None, :], ACC)
        w = _load(w2_ptr, cs[:, None] * L + ls[None, :], c_in[:, None] & l_in[None, :], ACC)
        acc += _matmul(gz, w, ACC)
    inside = n_in[:, None] & l_in[None, :]
    at = ns[:, None] * L + ls[None, :]
    h = _load(ws_ptr + HIDDEN, at, inside, ACC)
    tl.store(ws2_ptr + GZ1 + at, tl.where(h > 0, acc, 0.0), mask=inside)


# --- the (N, C) kernels: a program owns a few channels and loops over the batch --------------------------------------


@triton.jit
def _se_bn_forward_kernel(ws_ptr, w2_ptr, b2_ptr, gs_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, rmo_ptr, rvo_ptr, N, C, L,
                          momentum, eps, count, HAS_RUNNING: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # SE then BatchNorm: the gate, and the batch statistics of u s.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    MEAN, VAR, SIG, Z, K, SHIFT, MU, RSTD, HIDDEN = _forward_slots(N, C, True)
    gate_scale = tl.load(gs_ptr).to(ACC)
    b2 = _load(b2_ptr, cs, c_in, ACC)
    sum_sm = tl.zeros([BLOCK_C], ACC)
    sum_ssv = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        sig = _sigmoid(_gate_logits(ws_ptr + HIDDEN, w2_ptr, b2, ns, cs, N, C, L, BLOCK_N, BLOCK_C, BLOCK_L, ACC))
        tl.store(ws_ptr + SIG + at, sig, mask=inside)
        s = sig * gate_scale
        m = _load(ws_ptr + MEAN, at, inside, ACC)
        sum_sm += tl.sum(tl.where(inside, s * m, 0.0), axis=0)
        sum_ssv += tl.sum(tl.where(inside, s * s * _load(ws_ptr + VAR, at, inside, ACC), 0.0), axis=0)
    mu = sum_sm / N
    tl.debug_barrier()  # the gates stored above are read back below
    sum_d2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        d = _load(ws_ptr + SIG, at, inside, ACC) * gate_scale * _load(ws_ptr + MEAN, at, inside, ACC) - mu[None, :]
        sum_d2 += tl.sum(tl.where(inside, d * d, 0.0), axis=0)
    _finish_stats(ws_ptr, K, SHIFT, MU, RSTD, w_ptr, b_ptr, rm_ptr, rv_ptr, rmo_ptr, rvo_ptr, cs, c_in, mu,
                  (sum_ssv + sum_d2) / N, momentum, eps, count, HAS_RUNNING, True, ACC)


@triton.jit
def _bn_stats_kernel(ws_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, rmo_ptr, rvo_ptr, N, C, momentum, eps, count,
                     HAS_RUNNING: tl.constexpr, HAS_AFFINE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    # BatchNorm then SE: the batch statistics of u, and z = k m + shift, what SE squeezes.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    MEAN, VAR, SIG, Z, K, SHIFT, MU, RSTD, HIDDEN = _forward_slots(N, C, False)
    sum_m = tl.zeros([BLOCK_C], ACC)
    sum_v = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        sum_m += tl.sum(_load(ws_ptr + MEAN, at, inside, ACC), axis=0)
        sum_v += tl.sum(_load(ws_ptr + VAR, at, inside, ACC), axis=0)
    mu = sum_m / N
    sum_d2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        d = _load(ws_ptr + MEAN, at, inside, ACC) - mu[None, :]
        sum_d2 += tl.sum(tl.where(inside, d * d, 0.0), axis=0)
    k, shift = _finish_stats(ws_ptr, K, SHIFT, MU, RSTD, w_ptr, b_ptr, rm_ptr, rv_ptr, rmo_ptr, rvo_ptr, cs, c_in, mu,
                             (sum_v + sum_d2) / N, momentum, eps, count, HAS_RUNNING, HAS_AFFINE, ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        tl.store(ws_ptr + Z + at, k[None, :] * _load(ws_ptr + MEAN, at, inside, ACC) + shift[None, :], mask=inside)


@triton.jit
def _se_bn_backward_kernel(ws_ptr, ws2_ptr, gs_ptr, gw_ptr, gb_ptr, gw2_ptr, gb2_ptr, N, C, L, count, area,
                           BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # SE then BatchNorm: the BatchNorm's gradients, the gate logits' and its second layer's, and P, Q, R.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    MEAN, VAR, SIG, Z, K, SHIFT, MU, RSTD, HIDDEN = _forward_slots(N, C, True)
    G_SUM, GU_C, GZ2, P, Q, R, GZ1 = _backward_slots(N, C)
    gate_scale = tl.load(gs_ptr).to(ACC)
    mu, rstd, k = _saved_stats(ws_ptr, MU, RSTD, K, cs, c_in, ACC)
    grad_bias = tl.zeros([BLOCK_C], ACC)
    sum_sgu = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        g_sum = _load(ws2_ptr + G_SUM, at, inside, ACC)
        gu = _load(ws2_ptr + GU_C, at, inside, ACC) + _load(ws_ptr + MEAN, at, inside, ACC) * g_sum
        grad_bias += tl.sum(g_sum, axis=0)
        sum_sgu += tl.sum(_load(ws_ptr + SIG, at, inside, ACC) * gate_scale * gu, axis=0)
    grad_weight = rstd * (sum_sgu - mu * grad_bias)
    tl.store(gw_ptr + cs, grad_weight.to(gw_ptr.dtype.element_ty), mask=c_in)
    tl.store(gb_ptr + cs, grad_bias.to(gb_ptr.dtype.element_ty), mask=c_in)
    a = k * grad_bias / count
    b = k * rstd * grad_weight / count
    grad_b2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        g_sum = _load(ws2_ptr + G_SUM, at, inside, ACC)
        m = _load(ws_ptr + MEAN, at, inside, ACC)
        gu = _load(ws2_ptr + GU_C, at, inside, ACC) + m * g_sum
        sig = _load(ws_ptr + SIG, at, inside, ACC)
        s = sig * gate_scale
        grad_s = k[None, :] * gu - area * (a[None, :] * m + b[None, :] * (s * _load(ws_ptr + VAR, at, inside, ACC) +
                                                                          m * (s * m - mu[None, :])))
        grad_z = grad_s * gate_scale * sig * (1.0 - sig)  # 0 outside: sig loads as 0
        grad_b2 += tl.sum(grad_z, axis=0)
        tl.store(ws2_ptr + GZ2 + at, grad_z, mask=inside)
        tl.store(ws2_ptr + P + at, k[None, :] * s, mask=inside)
        tl.store(ws2_ptr + Q + at, -b[None, :] * s * s, mask=inside)
        tl.store(ws2_ptr + R + at, s * (b[None, :] * (mu[None, :] - s * m) - a[None, :]), mask=inside)
    tl.store(gb2_ptr + cs, grad_b2.to(gb2_ptr.dtype.element_ty), mask=c_in)
    tl.debug_barrier()  # the logits' gradients stored above are read back below
    _second_layer_grad(ws2_ptr + GZ2, ws_ptr + HIDDEN, gw2_ptr, cs, N, C, L, BLOCK_N, BLOCK_C, BLOCK_L, ACC)


@triton.jit
def _gate_input_backward_kernel(ws_ptr, ws2_ptr, w1_ptr, gw1_ptr, gb1_ptr, area, N, C, L, BLOCK_N: tl.constexpr,
                                BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # SE then BatchNorm: the first layer's gradients, and R += (grad_z1 W1) / area, the squeeze's share of grad_u.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    G_SUM, GU_C, GZ2, P, Q, R, GZ1 = _backward_slots(N, C)
    _first_layer_grad(ws2_ptr + GZ1, ws_ptr, gw1_ptr, gb1_ptr, cs, N, C, L, BLOCK_N, BLOCK_C, BLOCK_L, ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        grad = _squeezed_grad(ws2_ptr + GZ1, w1_ptr, ns, cs, N, C, L, BLOCK_N, BLOCK_C, BLOCK_L, ACC)
        tl.store(ws2_ptr + R + at, _load(ws2_ptr + R, at, inside, ACC) + grad / area, mask=inside)


@triton.jit
def _bn_se_gate_grad_kernel(ws_ptr, ws2_ptr, gs_ptr, gw2_ptr, gb2_ptr, N, C, L, BLOCK_N: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # BatchNorm then SE: the gate logits' gradients and its second layer's.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    MEAN, VAR, SIG, Z, K, SHIFT, MU, RSTD, HIDDEN = _forward_slots(N, C, False)
    G_SUM, GU_C, GZ2, P, Q, R, GZ1 = _backward_slots(N, C)
    gate_scale = tl.load(gs_ptr).to(ACC)
    k = _load(ws_ptr + K, cs, c_in, ACC)
    shift = _load(ws_ptr + SHIFT, cs, c_in, ACC)
    grad_b2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        g_sum = _load(ws2_ptr + G_SUM, at, inside, ACC)
        m = _load(ws_ptr + MEAN, at, inside, ACC)
        # sum_hw g bn(u) = k (gu_c + m g_sum) + shift g_sum
        grad_s = k[None, :] * (_load(ws2_ptr + GU_C, at, inside, ACC) + m * g_sum) + shift[None, :] * g_sum
        sig = _load(ws_ptr + SIG, at, inside, ACC)
        grad_z = grad_s * gate_scale * sig * (1.0 - sig)  # 0 outside: sig loads as 0
        grad_b2 += tl.sum(grad_z, axis=0)
        tl.store(ws2_ptr + GZ2 + at, grad_z, mask=inside)
    tl.store(gb2_ptr + cs, grad_b2.to(gb2_ptr.dtype.element_ty), mask=c_in)
    tl.debug_barrier()  # the logits' gradients stored above are read back below
    _second_layer_grad(ws2_ptr + GZ2, ws_ptr + HIDDEN, gw2_ptr, cs, N, C, L, BLOCK_N, BLOCK_C, BLOCK_L, ACC)


@triton.jit
def _bn_se_backward_kernel(ws_ptr, ws2_ptr, gs_ptr, w1_ptr, gw1_ptr, gb1_ptr, gw_ptr, gb_ptr, N, C, L, count, area,
                           HAS_AFFINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_L: tl.constexpr, ACC: tl.constexpr):
    # BatchNorm then SE: the first layer's gradients, then back through the BatchNorm, the squeeze's share included.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = cs < C
    MEAN, VAR, SIG, Z, K, SHIFT, MU, RSTD, HIDDEN = _forward_slots(N, C, False)
    G_SUM, GU_C, GZ2, P, Q, R, GZ1 = _backward_slots(N, C)
    _first_layer_grad(ws2_ptr + GZ1, ws_ptr + Z, gw1_ptr, gb1_ptr, cs, N, C, L, BLOCK_N, BLOCK_C, BLOCK_L, ACC)
    gate_scale = tl.load(gs_ptr).to(ACC)
    mu, rstd, k = _saved_stats(ws_ptr, MU, RSTD, K, cs, c_in, ACC)
    grad_bias = tl.zeros([BLOCK_C], ACC)
    sum_x = tl.zeros([BLOCK_C], ACC)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        g_sum = _load(ws2_ptr + G_SUM, at, inside, ACC)
        d = _load(ws_ptr + MEAN, at, inside, ACC) - mu[None, :]
        s = _load(ws_ptr + SIG, at, inside, ACC) * gate_scale
        gz = _squeezed_grad(ws2_ptr + GZ1, w1_ptr, ns, cs, N, C, L, BLOCK_N, BLOCK_C, BLOCK_L, ACC)
        grad_bias += tl.sum(s * g_sum + gz, axis=0)
        sum_x += tl.sum(tl.where(inside, s * (_load(ws2_ptr + GU_C, at, inside, ACC) + d * g_sum) + gz * d, 0.0),
                        axis=0)
    grad_weight = rstd * sum_x
    if HAS_AFFINE:
        tl.store(gw_ptr + cs, grad_weight.to(gw_ptr.dtype.element_ty), mask=c_in)
        tl.store(gb_ptr + cs, grad_bias.to(gb_ptr.dtype.element_ty), mask=c_in)
    q = -k * rstd * grad_weight / count
    tl.store(ws2_ptr + Q + cs, q, mask=c_in)
    for start in range(0, N, BLOCK_N):
        ns, inside, at = _rows(start, cs, c_in, N, C, BLOCK_N)
        d = _load(ws_ptr + MEAN, at, inside, ACC) - mu[None, :]
        s = _load(ws_ptr + SIG, at, inside, ACC) * gate_scale
        gz = _squeezed_grad(ws2_ptr + GZ1, w1_ptr, ns, cs, N, C, L, BLOCK_N, BLOCK_C, BLOCK_L, ACC)
        tl.store(ws2_ptr + P + at, k[None, :] * s, mask=inside)
        tl.store(ws2_ptr + R + at, k[None, :] * (gz / area - grad_bias[None, :] / count) + q[None, :] * d,
                 mask=inside)


#: Every kernel, by name.
KERNELS = {name[1:-len('_kernel')]: kernel for name, kernel in dict(globals()).items() if name.endswith('_kernel')}


def _dense(t: Tensor) -> Tensor:
    """A gate weight as the kernels read it: contiguous (an ``nn.Linear`` weight already is)."""
    return t if t.is_contiguous() else t.contiguous()


# --- the passes -----------------------------------------------------------------------------------------------------
#
# Those of torch_passes, each taking first the launcher its kernels go through, ``launch(kernel, grid, *arguments)``
# (``arguments``: all of the kernel's parameters, compile-time ones included). What forward saves for backward is its
# workspace, ``(workspace,)`` (forward_layout).


def forward(launch: Callable[..., None], se_first: bool, u: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
            gate_scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
            running_var: Optional[Tensor], new_mean: Optional[Tensor], new_var: Optional[Tensor], momentum: float,
            eps: float) -> tuple[Tensor, tuple]:
    """:func:`composer_se.batchnorm.torch_passes.forward`; it saves ``(workspace,)``."""
    x = _dense_activation(u)
    latent = w1.shape[0]
    geo = _geometry(x.shape, x.stride(), x.dtype, latent)
    if _static(geo.count) < 2:
        count_per_channel(u)  # BatchNorm's error
    n, c = geo.n, geo.c
    ws = torch.empty((3 if se_first else 4) * n * c + 4 * c + n * latent, device=x.device, dtype=geo.acc)
    y = torch.empty_like(x)  # a dense tensor's strides: x's
    has_affine, has_running = weight is not None, running_mean is not None
    weight_, bias_ = (weight, bias) if has_affine else (ws, ws)
    running = (running_mean, running_var, new_mean, new_var) if has_running else (ws, ws, ws, ws)
    w1, w2 = _dense(w1), _dense(w2)
    momentum, eps = float(momentum), float(eps)
    acc_tl = geo.acc_tl
    launch(_channel_stats_kernel, geo.rows_grid, x, ws, n, c, geo.hw, *geo.strides, True, geo.block_hw,
           geo.block_c, acc_tl)
    if se_first:
        launch(_gate_hidden_kernel, geo.hidden_grid, ws, w1, b1, ws, ws, ws, ws, 0.0, n, c, latent, True, False,
               False, geo.row_n, geo.row_c, geo.row_l, acc_tl)
        launch(_se_bn_forward_kernel, geo.channel_grid, ws, w2, b2, gate_scale, weight_, bias_, *running, n, c,
               latent, momentum, eps, geo.count, has_running, geo.block_n, geo.block_cs, geo.block_l, acc_tl)
    else:
        launch(_bn_stats_kernel, geo.stat_grid, ws, weight_, bias_, *running, n, c, momentum, eps, geo.count,
               has_running, has_affine, geo.stat_n, geo.stat_c, acc_tl)
        launch(_gate_hidden_kernel, geo.hidden_grid, ws, w1, b1, ws, ws, ws, ws, 0.0, n, c, latent, False, False,
               False, geo.row_n, geo.row_c, geo.row_l, acc_tl)
    launch(_gate_affine_kernel, geo.tiles_grid, x, y, ws, w2, b2, gate_scale, ws, ws, ws, ws, 0.0, n, c, geo.hw,
           latent, *geo.strides, se_first, not se_first, False, has_affine, geo.block_hw, geo.block_c, geo.gate_l,
           acc_tl)
    return y, (ws,)


def backward(launch: Callable[..., None], se_first: bool, grad_out: Tensor, u: Tensor, saved: tuple, w1: Tensor,
             b1: Tensor, w2: Tensor, b2: Tensor, gate_scale: Tensor, weight: Optional[Tensor],
             bias: Optional[Tensor]) -> tuple:
    """:func:`composer_se.batchnorm.torch_passes.backward`."""
    (ws,) = saved
    x, g = _dense_activation(u), _dense_activation(grad_out)
    latent = w1.shape[0]
    geo = _geometry(x.shape, x.stride(), x.dtype, latent)
    n, c = geo.n, geo.c
    ws2 = torch.empty(6 * n * c + n * latent, device=x.device, dtype=geo.acc)
    grad_u = torch.empty_like(x)
    w1, w2 = _dense(w1), _dense(w2)
    grad_w1, grad_b1, grad_w2, grad_b2 = (torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2),
                                          torch.empty_like(b2))
    has_affine = weight is not None
    grad_weight = torch.empty_like(weight) if has_affine else None
    grad_bias = torch.empty_like(bias) if has_affine else None
    count, g_strides = geo.count, _strides(g)
    acc_tl = geo.acc_tl
    launch(_grad_sums_kernel, geo.rows_grid, g, x, ws, ws2, n, c, geo.hw, *g_strides, *geo.strides, geo.block_hw,
           geo.block_c, acc_tl)
    if se_first:
        launch(_se_bn_backward_kernel, geo.channel_grid, ws, ws2, gate_scale, grad_weight, grad_bias, grad_w2,
               grad_b2, n, c, latent, count, geo.hw, geo.block_n, geo.block_cs, geo.block_l, acc_tl)
        launch(_gate_hidden_backward_kernel, geo.hidden_grid, ws, ws2, w2, n, c, latent, True, geo.row_n,
               geo.row_c, geo.row_l, acc_tl)
        launch(_gate_input_backward_kernel, geo.channel_grid, ws, ws2, w1, grad_w1, grad_b1, geo.hw, n, c,
               latent, geo.block_n, geo.block_cs, geo.block_l, acc_tl)
    else:
        launch(_bn_se_gate_grad_kernel, geo.channel_grid, ws, ws2, gate_scale, grad_w2, grad_b2, n, c, latent,
               geo.block_n, geo.block_cs, geo.block_l, acc_tl)
        launch(_gate_hidden_backward_kernel, geo.hidden_grid, ws, ws2, w2, n, c, latent, False, geo.row_n,
               geo.row_c, geo.row_l, acc_tl)
        launch(_bn_se_backward_kernel, geo.channel_grid, ws, ws2, gate_scale, w1, grad_w1, grad_b1,
               ws2 if grad_weight is None else grad_weight, ws2 if grad_bias is None else grad_bias, n, c, latent,
               count, geo.hw, has_affine, geo.block_n, geo.block_cs, geo.block_l, acc_tl)
    launch(_affine_of_two_kernel, geo.tiles_grid, g, x, grad_u, ws, ws2, n, c, geo.hw, *g_strides, *geo.strides,
           not se_first, geo.block_hw, geo.block_c, acc_tl)
    return grad_u, grad_w1, grad_b1, grad_w2, grad_b2, grad_weight, grad_bias

def infer(launch: Callable[..., None], se_first: bool, u: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
          gate_scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
          running_var: Tensor, eps: float) -> Tensor:
    """:func:`composer_se.batchnorm.torch_passes.infer`."""
    x = _dense_activation(u)
    latent = w1.shape[0]
    geo = _geometry(x.shape, x.stride(), x.dtype, latent)
    n, c = geo.n, geo.c
    ws = torch.empty(n * c + n * latent, device=x.device, dtype=geo.acc)  # the mean, then the hidden units
    y = torch.empty_like(x)
    has_affine = weight is not None
    weight_, bias_ = (weight, bias) if has_affine else (running_mean, running_mean)
    w1, w2 = _dense(w1), _dense(w2)
    acc_tl, eps = geo.acc_tl, float(eps)
    launch(_channel_stats_kernel, geo.rows_grid, x, ws, n, c, geo.hw, *geo.strides, False, geo.block_hw,
           geo.block_c, acc_tl)
    launch(_gate_hidden_kernel, geo.hidden_grid, ws, w1, b1, weight_, bias_, running_mean, running_var, eps, n, c,
           latent, se_first, True, has_affine, geo.row_n, geo.row_c, geo.row_l, acc_tl)
    launch(_gate_affine_kernel, geo.tiles_grid, x, y, ws, w2, b2, gate_scale, weight_, bias_, running_mean,
           running_var, eps, n, c, geo.hw, latent, *geo.strides, se_first, True, True, has_affine, geo.block_hw,
           geo.block_c, geo.gate_l, acc_tl)
    return y

"""SE and a training-mode BatchNorm in one pass over the activation, in either order: the passes.

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
The gate's small MLP is differentiated by hand too, from its (N, L) and (N, C)
activations. The per-(n, c) formulas are in :mod:`composer_se.fused.torch_ops`.

**Where it runs.** The steps run as Triton kernels (:mod:`~composer_se.fused.triton_ops`)
on CUDA tensors, and as torch operations (:mod:`~composer_se.fused.torch_ops`) on other
devices; with ``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors too, which is
how they are tested without a GPU. Both keep their statistics in float32 (float64 for
float64 inputs) and return the input's dtype and memory format.
"""

from __future__ import annotations

import contextlib
import os
import sys
from types import ModuleType

import torch
import torch.nn.functional as F

from composer_se.fused import torch_ops

__all__ = ['bn_se_backward_pass', 'bn_se_forward_pass', 'count_per_channel', 'kernels_for', 'runs_triton',
           'se_bn_backward_pass', 'se_bn_forward_pass']


def runs_triton(x: torch.Tensor) -> bool:
    """Whether the fused functions run Triton kernels on ``x``: on CUDA; on CPU under ``TRITON_INTERPRET=1``, or
    while the active Triton driver takes CPU tensors (:func:`triton_takes_cpu_tensors`)."""
    return x.is_cuda or (x.device.type == 'cpu' and (os.environ.get('TRITON_INTERPRET') == '1' or
                                                     triton_takes_cpu_tensors()))


def triton_takes_cpu_tensors() -> bool:
    """Whether Triton is imported and a driver whose torch device is the CPU has been made its active one.

    Such a driver launches kernels on CPU tensors (the stand-in driver of
    ``benchmarks/stand_in_driver.py``, which compiles for a GPU without one). Triton's default
    driver is never made here: on a machine without a GPU, making it fails.
    """
    runtime = sys.modules.get('triton.runtime.driver')
    if runtime is None:
        return False
    config = runtime.driver
    if hasattr(config, '_active'):  # Triton 3.4 and later: None until a driver is set or first used
        active = config._active
        if active is None or active is config._default:
            return False
    else:
        active = config.active
        if active is config.default:  # the default, not yet made
            return False
    return active.get_active_torch_device().type == 'cpu'


def kernels_for(x: torch.Tensor) -> ModuleType:
    """The module of steps that runs on ``x``: Triton kernels where :func:`runs_triton`, else torch operations.

    Raises:
        RuntimeError: ``x`` is on CUDA and Triton cannot be imported.
    """
    if runs_triton(x):
        try:
            from composer_se.fused import triton_ops
        except ImportError as error:
            raise RuntimeError(
                f'SE folded into BatchNorm, and SE at the end of residual branches, run as Triton kernels on CUDA, '
                f'and Triton cannot be imported ({error}). Install the triton package that matches your torch (it '
                f'ships with torch\'s CUDA wheels on Linux), or use SqueezeExcite(fold_batchnorm=False, '
                f'placement=\'conv\').',
            ) from error
        return triton_ops
    return torch_ops


def _autocast_off(device_type: str):
    """A context that turns autocast off for ``device_type``, where it is on."""
    if device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def count_per_channel(u: torch.Tensor) -> int:
    """Values per channel in a batch, ``N * H * W``; BatchNorm's error where there is only one."""
    n, _, h, w = u.shape
    if n * h * w < 2:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {list(u.shape)}')
    return n * h * w


def _gate_logits(squeezed: torch.Tensor, w1, b1, w2, b2) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's hidden activation (N, L) and logits (N, C), in the parameters' dtype even under autocast."""
    with _autocast_off(squeezed.device.type):
        hidden = F.linear(squeezed.to(w1.dtype), w1, b1).relu_()
        return hidden, F.linear(hidden, w2, b2)


def _gate_backward(grad_z2: torch.Tensor, grad_b2: torch.Tensor, squeezed: torch.Tensor, hidden: torch.Tensor, w1, w2,
                   needs) -> tuple:
    """Back through ``W2 relu(W1 z + b1) + b2``, given ``grad_b2``, the batch sum of ``grad_z2``: the gradient of
    ``z`` and of ``(w1, b1, w2, b2)``."""
    grad_z2 = grad_z2.to(w2.dtype)
    grad_z1 = torch.ops.aten.threshold_backward(grad_z2 @ w2, hidden, 0)
    grad_squeezed = (grad_z1 @ w1).to(squeezed.dtype)
    return (
        grad_squeezed,
        grad_z1.t() @ squeezed.to(w1.dtype) if needs[0] else None,
        grad_z1.sum(0) if needs[1] else None,
        grad_z2.t() @ hidden if needs[2] else None,
        grad_b2.to(w2.dtype) if needs[3] else None,
    )


def se_bn_forward_pass(ops: ModuleType, count: int, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean,
                       running_var, momentum: float, eps: float) -> tuple[torch.Tensor, tuple]:
    """SE then BatchNorm, forward: the output, and what the backward pass needs,
    ``(mean, var, sig, mu, rstd, hidden)``."""
    mean, var = ops.channel_stats(u)
    hidden, z2 = _gate_logits(mean, w1, b1, w2, b2)
    sig, scale, shift, mu, rstd = ops.se_bn_forward(mean, var, z2, gate_scale, weight, bias, running_mean, running_var,
                                                    momentum, eps, count)
    return ops.affine(u, scale, shift), (mean, var, sig, mu, rstd, hidden)


def se_bn_backward_pass(ops: ModuleType, count: int, grad_out, u, saved: tuple, w1, w2, gate_scale, weight, bias,
                        needs) -> tuple:
    """SE then BatchNorm, backward: the gradients of ``(u, w1, b1, w2, b2, weight, bias)``, the gate's where
    ``needs``."""
    mean, var, sig, mu, rstd, hidden = saved
    g_sum, gu_c = ops.grad_sums(grad_out, u, mean)
    grad_weight, grad_bias, grad_z2, grad_b2, p, q, r = ops.se_bn_backward(g_sum, gu_c, mean, var, sig, gate_scale,
                                                                           mu, rstd, weight, count)
    grad_squeezed, *grad_gate = _gate_backward(grad_z2, grad_b2, mean, hidden, w1, w2, needs)
    grad_u = ops.affine2(grad_out, u, p, q, mean, r, grad_squeezed, 1.0 / (count // u.shape[0]))
    return grad_u, *grad_gate, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


def bn_se_forward_pass(ops: ModuleType, count: int, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean,
                       running_var, momentum: float, eps: float) -> tuple[torch.Tensor, tuple]:
    """BatchNorm then SE, forward: the output, and what the backward pass needs,
    ``(mean, sig, mu, rstd, hidden, squeezed)``."""
    mean, var = ops.channel_stats(u)
    mu, rstd, squeezed = ops.bn_stats(mean, var, weight, bias, running_mean, running_var, momentum, eps, count)
    hidden, z2 = _gate_logits(squeezed, w1, b1, w2, b2)
    sig, scale, shift = ops.bn_se_scale(z2, gate_scale, mu, rstd, weight, bias)
    return ops.affine(u, scale, shift), (mean, sig, mu, rstd, hidden, squeezed)


def bn_se_backward_pass(ops: ModuleType, count: int, grad_out, u, saved: tuple, w1, w2, gate_scale, weight, bias,
                        needs) -> tuple:
    """BatchNorm then SE, backward: as :func:`se_bn_backward_pass`."""
    mean, sig, mu, rstd, hidden, squeezed = saved
    g_sum, gu_c = ops.grad_sums(grad_out, u, mean)
    grad_z2, grad_b2 = ops.bn_se_gate_grad(g_sum, gu_c, mean, sig, gate_scale, mu, rstd, weight, bias)
    grad_squeezed, *grad_gate = _gate_backward(grad_z2, grad_b2, squeezed, hidden, w1, w2, needs)
    grad_weight, grad_bias, p, q, r = ops.bn_se_backward(g_sum, gu_c, mean, sig, gate_scale, grad_squeezed, mu, rstd,
                                                         weight, count)
    grad_u = ops.affine2(grad_out, u, p, q, mean, r)
    return grad_u, *grad_gate, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)

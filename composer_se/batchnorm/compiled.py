"""SE + BatchNorm as ``torch.compile`` sees it in training: operators whose Triton kernels the compiler launches.

In eager mode training is an autograd function (:mod:`~composer_se.batchnorm.function`).
Under ``torch.compile`` it is ``composer_se::se_batch_norm`` and its backward
``composer_se::se_batch_norm_backward``, both ``torch.library.triton_op``: the same passes
(:mod:`~composer_se.batchnorm.triton_passes`) with every kernel launched through
``torch.library.wrap_triton``. AOTAutograd traces through them, so the graph Inductor
gets holds the kernels themselves (``triton_kernel_wrapper_functional``), no opaque
Python call: Inductor launches them from its own code, and ``mode='reduce-overhead'``
records them in the CUDA graph with the rest of the step. ``torch.export`` keeps the
operators whole.

The forward returns the output, what its backward needs (the Triton passes' workspace;
the torch passes' six statistics) and the stepped running mean and variance (empty where
there are none): it is functional, as an operator with an autograd formula must be, and
:func:`se_batch_norm` copies the new statistics into the running buffers. The backward
returns the gradients of the input, the gate's four parameters and the BatchNorm's
weight and bias (empty without affine parameters).
On devices without Triton (the operators are never used there by the modules, whose
compiled form is plain operations) they run the torch passes, so that
``torch.library.opcheck`` can check them anywhere.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from composer_se.batchnorm import torch_passes
from composer_se.batchnorm.backend import runs_triton

__all__ = ['se_batch_norm']


def _passes(u: Tensor):
    """The forward and backward passes for ``u``: Triton's, launched through ``wrap_triton``, or torch's."""
    if runs_triton(u):
        from composer_se.batchnorm import triton_passes
        from composer_se.batchnorm.launch import traced_launch
        return (functools.partial(triton_passes.forward, traced_launch),
                functools.partial(triton_passes.backward, traced_launch))
    return torch_passes.forward, torch_passes.backward


def _empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.triton_op('composer_se::se_batch_norm', mutates_args=())
def _forward(se_first: bool, u: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gate_scale: Tensor,
             weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
             running_var: Optional[Tensor], momentum: float,
             eps: float) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    new_mean = None if running_mean is None else torch.empty_like(running_mean)
    new_var = None if running_var is None else torch.empty_like(running_var)
    out, saved = _passes(u)[0](se_first, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean, running_var,
                                    new_mean, new_var, momentum, eps)
    if out._base is not None:  # the torch passes may return a view
        out = out.clone()
    return out, list(saved), _empty_if_none(new_mean, u), _empty_if_none(new_var, u)


@torch.library.triton_op('composer_se::se_batch_norm_backward', mutates_args=())
def _backward(se_first: bool, grad_out: Tensor, u: Tensor, saved: list[Tensor], w1: Tensor, b1: Tensor, w2: Tensor,
              b2: Tensor, gate_scale: Tensor, weight: Optional[Tensor],
              bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad_u, *grads, grad_weight, grad_bias = _passes(u)[1](se_first, grad_out, u, tuple(saved), w1, b1, w2, b2,
                                                                 gate_scale, weight, bias)
    if grad_u._base is not None:
        grad_u = grad_u.clone()
    return (grad_u, *grads, _empty_if_none(grad_weight, u), _empty_if_none(grad_bias, u))


def _setup_context(ctx, inputs, output):
    se_first, u, w1, b1, w2, b2, gate_scale, weight, bias = inputs[:9]
    ctx.se_first = se_first
    ctx.has_affine = weight is not None
    ctx.save_for_backward(u, w1, b1, w2, b2, gate_scale, weight, bias, *output[1])
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_out, *unused):
    if grad_out is None:
        return (None,) * 13
    u, w1, b1, w2, b2, gate_scale, weight, bias, *saved = ctx.saved_tensors
    grad_u, grad_w1, grad_b1, grad_w2, grad_b2, grad_weight, grad_bias = _backward(
        ctx.se_first, grad_out, u, saved, w1, b1, w2, b2, gate_scale, weight, bias)
    if not ctx.has_affine:
        grad_weight = grad_bias = None
    return None, grad_u, grad_w1, grad_b1, grad_w2, grad_b2, None, grad_weight, grad_bias, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def se_batch_norm(se_first: bool, u: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, gate_scale: Tensor,
                  weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], momentum: float, eps: float) -> Tensor:
    """``torch.ops.composer_se.se_batch_norm``, its running statistics copied back: the output."""
    out, *_, new_mean, new_var = torch.ops.composer_se.se_batch_norm(se_first, u, w1, b1, w2, b2, gate_scale, weight,
                                                                     bias, running_mean, running_var, momentum, eps)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return out

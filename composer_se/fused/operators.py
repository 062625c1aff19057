"""The fused functions as torch custom operators, which ``torch.compile`` keeps whole in its graphs.

In eager mode the fused functions are autograd functions
(:mod:`~composer_se.fused.function`). A compiler cannot trace into their Triton
launches, so under ``torch.compile`` they are these operators instead: each is one
opaque call in the compiled graph that runs the same passes
(:mod:`~composer_se.fused.passes`).

- ``composer_se::squeeze_excite_batch_norm`` and ``composer_se::batch_norm_squeeze_excite``
  return the output, the six tensors their backward pass needs, and the updated running
  mean and variance (empty where there are none). They are functional, as operators with
  an autograd formula must be: :func:`squeeze_excite_batch_norm` and
  :func:`batch_norm_squeeze_excite` copy the new statistics into the running buffers.
- ``composer_se::squeeze_excite_batch_norm_backward`` and
  ``composer_se::batch_norm_squeeze_excite_backward`` return the gradients of the input,
  the gate's four parameters and the BatchNorm's weight and bias.

Each has a fake implementation (shapes, dtypes and strides, for tracing), and the
forward operators have their autograd formula registered. The outputs shaped like the
input are laid out as ``torch.empty_like(u)`` (the input's own layout for NCHW and
channels_last inputs); the others are contiguous.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from composer_se.fused.passes import (bn_se_backward_pass, bn_se_forward_pass, count_per_channel, kernels_for,
                                      se_bn_backward_pass, se_bn_forward_pass)
from composer_se.fused.torch_ops import accumulation_dtype

__all__ = ['batch_norm_squeeze_excite', 'squeeze_excite_batch_norm']

_FORWARD_SCHEMA = ('(Tensor u, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor gate_scale, Tensor weight, '
                   'Tensor bias, Tensor? running_mean, Tensor? running_var, float momentum, float eps) -> ('
                   + ', '.join(['Tensor'] * 9) + ')')
_BACKWARD_SCHEMA = ('(Tensor grad_out, Tensor u, Tensor[] saved, Tensor w1, Tensor w2, Tensor gate_scale, '
                    'Tensor weight, Tensor bias) -> (' + ', '.join(['Tensor'] * 7) + ')')


def _laid_out_as_input(t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides of ``torch.empty_like(u)``, as the fake implementations promise, and not a view.

    The Triton kernels already write such a tensor; the torch steps (CPU) may return a
    view or follow the gradient's layout, and are copied then.
    """
    if t.stride() == u.stride() and not t._is_view():  # a dense u: empty_like(u) has u's strides
        return t
    return torch.empty_like(u, dtype=t.dtype).copy_(t)


def _register(name: str, forward_pass: Callable, backward_pass: Callable, saved_shapes: Callable) -> Callable:
    """The forward and backward operators of one fused function, and the function that calls them.

    ``saved_shapes(u, w1)`` gives the ``(shape, dtype)`` of each tensor the forward pass
    saves for backward.
    """

    def forward(u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean, running_var, momentum, eps):
        new_mean = None if running_mean is None else running_mean.clone()
        new_var = None if running_var is None else running_var.clone()
        out, saved = forward_pass(kernels_for(u), count_per_channel(u), u, w1, b1, w2, b2, gate_scale, weight, bias,
                                  new_mean, new_var, momentum, eps)
        return (_laid_out_as_input(out, u), *saved, u.new_empty(0) if new_mean is None else new_mean,
                u.new_empty(0) if new_var is None else new_var)

    def forward_fake(u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean, running_var, momentum, eps):
        saved = (u.new_empty(shape, dtype=dtype) for shape, dtype in saved_shapes(u, w1))
        return (torch.empty_like(u), *saved, u.new_empty(0) if running_mean is None else torch.empty_like(running_mean),
                u.new_empty(0) if running_var is None else torch.empty_like(running_var))

    def backward(grad_out, u, saved, w1, w2, gate_scale, weight, bias):
        grad_u, *grads = backward_pass(kernels_for(u), count_per_channel(u), grad_out, u, saved, w1, w2, gate_scale,
                                       weight, bias, (True,) * 4)
        return _laid_out_as_input(grad_u, u), *grads

    def backward_fake(grad_out, u, saved, w1, w2, gate_scale, weight, bias):
        return (torch.empty_like(u), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
                w2.new_empty(w2.shape[0]), torch.empty_like(weight), torch.empty_like(bias))

    forward_op = torch.library.custom_op(f'composer_se::{name}', forward, mutates_args=(), schema=_FORWARD_SCHEMA)
    backward_op = torch.library.custom_op(f'composer_se::{name}_backward', backward, mutates_args=(),
                                          schema=_BACKWARD_SCHEMA)
    forward_op.register_fake(forward_fake)
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        u, w1, _, w2, _, gate_scale, weight, bias = inputs[:8]
        ctx.save_for_backward(u, w1, w2, gate_scale, weight, bias, *output[1:7])
        ctx.set_materialize_grads(False)

    def autograd_backward(ctx, grad_out, *unused):
        if grad_out is None:
            return (None,) * 12
        u, w1, w2, gate_scale, weight, bias, *saved = ctx.saved_tensors
        grad_u, grad_w1, grad_b1, grad_w2, grad_b2, grad_weight, grad_bias = backward_op(grad_out, u, saved, w1, w2,
                                                                                         gate_scale, weight, bias)
        return grad_u, grad_w1, grad_b1, grad_w2, grad_b2, None, grad_weight, grad_bias, None, None, None, None

    forward_op.register_autograd(autograd_backward, setup_context=setup_context)

    def run(u: torch.Tensor, w1, b1, w2, b2, gate_scale, weight, bias, running_mean: Optional[torch.Tensor],
            running_var: Optional[torch.Tensor], momentum: float, eps: float) -> torch.Tensor:
        out, *_, new_mean, new_var = forward_op(u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean,
                                                running_var, momentum, eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_(new_mean)
                running_var.copy_(new_var)
        return out

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f'``torch.ops.composer_se.{name}``, its running statistics copied back: the output.'
    return run


def _se_bn_saved(u: torch.Tensor, w1: torch.Tensor) -> list:
    """``(mean, var, sig, mu, rstd, hidden)``."""
    n, c = u.shape[:2]
    acc = accumulation_dtype(u.dtype)
    return [((n, c), acc)] * 3 + [((c,), acc)] * 2 + [((n, w1.shape[0]), w1.dtype)]


def _bn_se_saved(u: torch.Tensor, w1: torch.Tensor) -> list:
    """``(mean, sig, mu, rstd, hidden, squeezed)``."""
    n, c = u.shape[:2]
    acc = accumulation_dtype(u.dtype)
    return [((n, c), acc)] * 2 + [((c,), acc)] * 2 + [((n, w1.shape[0]), w1.dtype), ((n, c), acc)]


squeeze_excite_batch_norm = _register('squeeze_excite_batch_norm', se_bn_forward_pass, se_bn_backward_pass,
                                      _se_bn_saved)
batch_norm_squeeze_excite = _register('batch_norm_squeeze_excite', bn_se_forward_pass, bn_se_backward_pass,
                                      _bn_se_saved)

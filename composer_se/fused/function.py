"""The fused SE + BatchNorm functions: what the modules call, in eager mode and under ``torch.compile``.

The arithmetic and its passes are in :mod:`~composer_se.fused.passes`. In eager mode
each function is an autograd function whose backward is those passes; under
``torch.compile`` it is the custom operator of :mod:`~composer_se.fused.operators`, which
runs the same passes as one opaque call in the compiled graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from composer_se.fused import operators, torch_ops
from composer_se.fused.passes import (bn_se_backward_pass, bn_se_forward_pass, count_per_channel, kernels_for,
                                      se_bn_backward_pass, se_bn_forward_pass)
from composer_se.fused.torch_ops import accumulation_dtype

__all__ = ['affine', 'batch_norm_squeeze_excite', 'squeeze_excite_batch_norm']


def affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` with per-(n, c) ``scale`` (N, C) and ``shift`` (N, C) or (C,), differentiably.

    One pass where no gradient is asked for (inference); torch operations where one is
    (an eval-mode model under ``torch.enable_grad``, as for saliency maps or a frozen
    BatchNorm), since the Triton kernel has no backward.
    """
    if torch.compiler.is_compiling():  # plain operations, which the compiler fuses
        return torch_ops.affine(x, scale, shift)
    ops = kernels_for(x)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad)
    return (torch_ops if needs_grad else ops).affine(x, scale, shift)


class _Fused(torch.autograd.Function):
    """One of the fused functions in eager mode; subclasses name its forward and backward."""

    forward_pass = backward_pass = None

    @classmethod
    def forward(cls, ctx, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean, running_var, momentum, eps):
        ops, count = kernels_for(u), count_per_channel(u)
        out, saved = cls.forward_pass(ops, count, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean,
                                      running_var, momentum, eps)
        ctx.save_for_backward(u, *saved)
        # The parameters by reference: they live on anyway (saving them would only make
        # saved-tensor accounting count them).
        ctx.params = (w1, w2, gate_scale, weight, bias)
        ctx.ops, ctx.count = ops, count
        # detach: torch_ops.affine may return a view, and a custom Function's output must not be
        # one (an in-place op after it, such as ReLU(inplace=True), would be refused).
        return out.detach()

    @classmethod
    @torch.autograd.function.once_differentiable
    def backward(cls, ctx, grad_out):
        u, *saved = ctx.saved_tensors
        grad_u, grad_w1, grad_b1, grad_w2, grad_b2, grad_weight, grad_bias = cls.backward_pass(
            ctx.ops, ctx.count, grad_out, u, saved, *ctx.params, ctx.needs_input_grad[1:5])
        return grad_u, grad_w1, grad_b1, grad_w2, grad_b2, None, grad_weight, grad_bias, None, None, None, None


class _SqueezeExciteBatchNorm(_Fused):
    """``batch_norm(u * s)`` with ``s`` the SE gate of ``u``."""

    forward_pass, backward_pass = staticmethod(se_bn_forward_pass), staticmethod(se_bn_backward_pass)


class _BatchNormSqueezeExcite(_Fused):
    """``s * batch_norm(u)`` with ``s`` the SE gate of ``batch_norm(u)``."""

    forward_pass, backward_pass = staticmethod(bn_se_forward_pass), staticmethod(bn_se_backward_pass)


def _arguments(se: torch.nn.Module, norm: torch.nn.BatchNorm2d, u: torch.Tensor, momentum: float,
               running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor]) -> tuple:
    """The fused functions' arguments; a BatchNorm without affine parameters gets ones and zeros."""
    weight, bias = norm.weight, norm.bias
    if weight is None:
        acc = accumulation_dtype(u.dtype)
        weight = torch.ones(norm.num_features, device=u.device, dtype=acc)
        bias = torch.zeros(norm.num_features, device=u.device, dtype=acc)
    return (u, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, se.gate_scale, weight, bias, running_mean,
            running_var, momentum, norm.eps)


def squeeze_excite_batch_norm(u: torch.Tensor, se: torch.nn.Module, norm: torch.nn.BatchNorm2d, momentum: float,
                              running_mean: Optional[torch.Tensor],
                              running_var: Optional[torch.Tensor]) -> torch.Tensor:
    """``norm(se(u))`` in one pass over ``u``, for ``norm`` normalising with batch statistics.

    ``se`` is a :class:`~composer_se.layers.SqueezeExcite2d`; ``momentum`` and the running
    statistics to update (or ``None``) are those ``BatchNorm2d.forward`` would use (see
    :meth:`~composer_se.layers.norm.ScriptableBatchNorm2d._batch_norm_arguments`). The
    result equals ``norm(se(u))`` up to rounding, and so do the gradients.
    """
    arguments = _arguments(se, norm, u, momentum, running_mean, running_var)
    if torch.compiler.is_compiling():  # the same kernels, as an operator the compiler keeps whole
        return operators.squeeze_excite_batch_norm(*arguments)
    return _SqueezeExciteBatchNorm.apply(*arguments)


def batch_norm_squeeze_excite(u: torch.Tensor, norm: torch.nn.BatchNorm2d, se: torch.nn.Module, momentum: float,
                              running_mean: Optional[torch.Tensor],
                              running_var: Optional[torch.Tensor]) -> torch.Tensor:
    """``se(norm(u))`` in one pass over ``u``, for ``norm`` normalising with batch statistics.

    As :func:`squeeze_excite_batch_norm`, in the other order; ``norm`` may lack affine
    parameters.
    """
    arguments = _arguments(se, norm, u, momentum, running_mean, running_var)
    if torch.compiler.is_compiling():
        return operators.batch_norm_squeeze_excite(*arguments)
    return _BatchNormSqueezeExcite.apply(*arguments)

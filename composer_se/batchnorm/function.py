"""SE and a BatchNorm as one function, in training and in eval: what the modules call.

:func:`se_batch_norm` (batch statistics) and :func:`se_batch_norm_eval` (running
statistics) take the activation, the SE block and the BatchNorm, and ``se_first``: SE
then BatchNorm (a block folded into the BatchNorm after its conv) or BatchNorm then SE
(a block at the end of a residual branch). The arithmetic is
:mod:`~composer_se.batchnorm.torch_passes`. In eager mode training is an autograd
function whose backward is the hand-written backward pass; under ``torch.compile`` on
Triton devices it is the operator of :mod:`~composer_se.batchnorm.compiled`, whose
kernels the compiler sees.

Where the passes run (:mod:`~composer_se.batchnorm.backend`): on CUDA tensors, as
Triton kernels (:mod:`~composer_se.batchnorm.triton_passes`) launched through a launch
plan (:mod:`~composer_se.batchnorm.launch`); elsewhere as torch operations. Triton is
imported the first time a CUDA tensor arrives.
"""

from __future__ import annotations

from typing import Optional

import torch

from composer_se.batchnorm import torch_passes
from composer_se.batchnorm.backend import runs_triton

__all__ = ['plain_se_batch_norm', 'se_batch_norm', 'se_batch_norm_eval']

Tensor = torch.Tensor


_TRITON = None


def _triton():
    """:mod:`~composer_se.batchnorm.launch` and :mod:`~composer_se.batchnorm.triton_passes`, imported on first use.

    Raises:
        RuntimeError: Triton cannot be imported.
    """
    global _TRITON
    if _TRITON is None:
        try:
            from composer_se.batchnorm import launch, triton_passes
        except ImportError as error:
            raise RuntimeError(
                f'SE folded into BatchNorm, and SE at the end of residual branches, run as Triton kernels on CUDA, '
                f'and Triton cannot be imported ({error}). Install the triton package that matches your torch (it '
                f'ships with torch\'s CUDA wheels on Linux), or use SqueezeExcite(fold_batchnorm=False, '
                f'placement=\'conv\').',
            ) from error
        _TRITON = launch, triton_passes
    return _TRITON


def _launcher(key: tuple, u: Tensor, external: tuple):
    """The Triton passes, and the launcher of one eager call on ``u`` (through the launch plan of ``key``)."""
    launch, triton_passes = _triton()
    return triton_passes, launch.launcher(key, u.device, external)


class _NoContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_CONTEXT = _NoContext()


def _device_of(u: Tensor):
    """A context in which ``u``'s CUDA device is the current one (Triton launches on the current device)."""
    if u.is_cuda:
        return _triton()[0].device_of(u)
    return _NO_CONTEXT


def gate_tensors(se: torch.nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(w1, b1, w2, b2, gate_scale)`` of a :class:`~composer_se.layers.SqueezeExcite2d`, read from the modules'
    dictionaries (``Module.__getattr__`` costs a microsecond a name), or by attribute where a parametrisation makes
    one a property."""
    try:
        fc1, fc2 = se._modules['fc1'], se._modules['fc2']
        return (fc1._parameters['weight'], fc1._parameters['bias'], fc2._parameters['weight'],
                fc2._parameters['bias'], se._buffers['gate_scale'])
    except KeyError:
        return se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias, se.gate_scale


def _affine(norm: torch.nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """A BatchNorm's ``(weight, bias)``, ``None`` without affine parameters, read as :func:`gate_tensors` reads."""
    parameters = norm._parameters
    if 'weight' in parameters and 'bias' in parameters:
        return parameters['weight'], parameters['bias']
    return norm.weight, norm.bias


def _dtype(t: Optional[Tensor]) -> Optional[torch.dtype]:
    return None if t is None else t.dtype


class _SEBatchNorm(torch.autograd.Function):
    """SE and a training-mode BatchNorm in eager mode; its backward is the passes' ``backward``.

    Its inputs are the tensors that take a gradient, and ``fixed``: ``(se_first,
    gate_scale, running_mean, running_var, momentum, eps)`` (fewer inputs, less for
    autograd to go through).
    """

    @staticmethod
    def forward(ctx, u, w1, b1, w2, b2, weight, bias, fixed):
        se_first, gate_scale, running_mean, running_var, momentum, eps = fixed
        triton = runs_triton(u)
        if triton:
            key = (se_first, u.shape, u.stride(), u.dtype, u.device, w1.shape, w1.dtype, b1.dtype, w2.dtype,
                   b2.dtype, gate_scale.dtype, _dtype(weight), _dtype(running_mean))
            with _device_of(u):
                passes, launch = _launcher(key, u, (u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean,
                                                    running_var))
                out, saved = passes.forward(launch, se_first, u, w1, b1, w2, b2, gate_scale, weight, bias,
                                            running_mean, running_var, running_mean, running_var, momentum, eps)
            ctx.key = key
        else:
            out, saved = torch_passes.forward(se_first, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean,
                                              running_var, running_mean, running_var, momentum, eps)
            # A view (torch_passes.affine may return one) must not leave a custom function: an in-place
            # operation on it, such as ReLU(inplace=True), would be refused.
            out = out if out._base is None else out.detach()
        ctx.save_for_backward(u, *saved)
        # The parameters by reference: they live on anyway (saving them would only make
        # saved-tensor accounting count them).
        ctx.params = (w1, b1, w2, b2, gate_scale, weight, bias)
        ctx.se_first, ctx.triton = se_first, triton
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError('SE fused into a BatchNorm has no double backward (backward with create_graph=True); '
                               'use SqueezeExcite(fold_batchnorm=False, placement=\'conv\') for it')
        u, *saved = ctx.saved_tensors
        w1, b1, w2, b2, gate_scale, weight, bias = ctx.params
        if ctx.triton:
            with _device_of(u):
                passes, launch = _launcher((ctx.key, grad_out.stride(), grad_out.dtype), u, (grad_out,))
                grads = passes.backward(launch, ctx.se_first, grad_out, u, saved, w1, b1, w2, b2, gate_scale, weight,
                                        bias)
        else:
            grads = torch_passes.backward(ctx.se_first, grad_out, u, saved, w1, b1, w2, b2, gate_scale, weight, bias)
        return (*grads, None)


def se_batch_norm(u: Tensor, se: torch.nn.Module, norm: torch.nn.BatchNorm2d, se_first: bool, momentum: float,
                  running_mean: Optional[Tensor], running_var: Optional[Tensor]) -> Tensor:
    """``norm(se(u))`` (``se_first``) or ``se(norm(u))`` in one pass over ``u``, for ``norm`` normalising with batch
    statistics.

    ``se`` is a :class:`~composer_se.layers.SqueezeExcite2d`; ``momentum`` and the running
    statistics to step (or ``None``) are those ``BatchNorm2d.forward`` would use (see
    :meth:`~composer_se.batchnorm.modules.SqueezeExciteNorm._batch_norm_arguments`). The
    result equals the plain modules' up to rounding, and so do the gradients. ``norm`` may
    lack affine parameters where SE comes second.
    """
    weight, bias = _affine(norm)
    if se_first and weight is None:
        raise ValueError('SE then BatchNorm needs a BatchNorm with affine parameters (affine=True)')
    if u.numel() == 0:  # an empty batch: what the plain modules do (an empty output, the statistics as they were)
        return plain_se_batch_norm(u, se, norm, se_first, True, momentum, running_mean, running_var)
    w1, b1, w2, b2, gate_scale = gate_tensors(se)
    if torch.compiler.is_compiling():  # the same kernels, as an operator the compiler sees into
        from composer_se.batchnorm import compiled
        return compiled.se_batch_norm(se_first, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean,
                                      running_var, momentum, norm.eps)
    return _SEBatchNorm.apply(u, w1, b1, w2, b2, weight, bias,
                              (se_first, gate_scale, running_mean, running_var, momentum, norm.eps))


def se_batch_norm_eval(u: Tensor, se: torch.nn.Module, norm: torch.nn.BatchNorm2d, se_first: bool,
                       running_mean: Tensor, running_var: Tensor) -> Tensor:
    """As :func:`se_batch_norm`, for ``norm`` normalising with ``running_mean`` and ``running_var``, where no gradient
    is asked for: one read of ``u`` for its squeeze, then one affine pass."""
    if u.numel() == 0:
        return plain_se_batch_norm(u, se, norm, se_first, False, 0.0, running_mean, running_var)
    w1, b1, w2, b2, gate_scale = gate_tensors(se)
    weight, bias = _affine(norm)
    if not runs_triton(u):
        return torch_passes.infer(se_first, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean, running_var,
                                  norm.eps)
    key = ('eval', se_first, u.shape, u.stride(), u.dtype, u.device, w1.shape, w1.dtype, b1.dtype, w2.dtype,
           b2.dtype, gate_scale.dtype, _dtype(weight), running_mean.dtype)
    with _device_of(u):
        passes, launch = _launcher(key, u, (u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean, running_var))
        return passes.infer(launch, se_first, u, w1, b1, w2, b2, gate_scale, weight, bias, running_mean, running_var,
                            norm.eps)


def plain_se_batch_norm(u: Tensor, se: torch.nn.Module, norm: torch.nn.BatchNorm2d, se_first: bool,
                        use_batch_stats: bool, momentum: float, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor]) -> Tensor:
    """The block and ``F.batch_norm`` in plain operations, in ``se_first``'s order: what the fused passes compute, in
    a form the compiler fuses, autograd differentiates and every tool traces; and what an empty batch gets."""
    if se_first:
        u = se(u)
    out = torch.nn.functional.batch_norm(u, running_mean, running_var, norm.weight, norm.bias, use_batch_stats,
                                         momentum, norm.eps)
    return out if se_first else se(out)

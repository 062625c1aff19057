"""Where the fused SE + BatchNorm passes run: as Triton kernels, or as torch operations.

On CUDA tensors they are Triton kernels; on CPU tensors too under ``TRITON_INTERPRET=1``
(Triton's interpreter) or while the active Triton driver takes CPU tensors (a stand-in
driver that compiles for a GPU without one); elsewhere they are torch operations. This
module imports nothing of Triton.
"""

from __future__ import annotations

import os
import sys

from torch import Tensor

__all__ = ['compiles_triton', 'runs_triton', 'triton_takes_cpu_tensors']


#: Triton reads ``TRITON_INTERPRET`` when it makes its kernels, on import: whether they are interpreted.
_INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'


def runs_triton(x: Tensor) -> bool:
    """Whether the fused functions run Triton kernels on ``x``: on CUDA; on CPU under ``TRITON_INTERPRET=1``, or
    while the active Triton driver takes CPU tensors (:func:`triton_takes_cpu_tensors`)."""
    return x.is_cuda or (x.device.type == 'cpu' and (_INTERPRETED or triton_takes_cpu_tensors()))


def compiles_triton(x: Tensor) -> bool:
    """Whether ``torch.compile`` gets the Triton kernels for ``x`` (:mod:`~composer_se.batchnorm.compiled`): where
    they run (:func:`runs_triton`), compiled (``torch.library.wrap_triton`` takes no interpreted kernel)."""
    return runs_triton(x) and not _INTERPRETED


def triton_takes_cpu_tensors() -> bool:
    """Whether Triton is imported and a driver whose torch device is the CPU has been made its active one.

    Such a driver launches kernels on CPU tensors (the stand-in driver of
    ``benchmarks/stand_in_driver.py``, which compiles for a GPU without one). Triton's default
    driver is never made here: on a machine without a GPU, making it fails. ``torch.compile``
    reads it once, when it traces.
    """
    runtime = sys.modules.get('triton.runtime.driver')
    if runtime is None:
        return False
    state = vars(runtime.driver)  # Triton 3.4 and later: '_active' and '_default', None until set or first used
    active, default = (state['_active'], state['_default']) if '_active' in state else (state['active'],
                                                                                          state['default'])
    if active is None or active is default:
        return False  # no driver set, or Triton's default (on a machine without a GPU, it cannot be made)
    if active is not _CPU_DRIVER[0]:
        _CPU_DRIVER[:] = active, active.get_active_torch_device().type == 'cpu'
    return _CPU_DRIVER[1]


_CPU_DRIVER = [None, False]  # the active driver last asked, and whether it takes CPU tensors
# What torch.compiler.assume_constant_result does, without the import of torch._dynamo (and Triton) it makes: the
# compiler calls the function once, as it traces, instead of tracing into it.
triton_takes_cpu_tensors._dynamo_marked_constant = True
